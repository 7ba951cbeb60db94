"""The S3 artifact store against a real S3-compatible server (moto in server mode, over HTTP on a
free port): the store's contract, multipart uploads, and a job run by an API and a Celery worker
that share nothing but the bucket, Redis and PostgreSQL (different DARE_HOME and work
directories, as if on two machines)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.cli.main import worker_argv
from service.settings import Settings
from service.store.storage import (
    ArtifactNotFound,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_key,
    input_key,
    store_from_settings,
)

from .conftest import (
    FAKE_RUNNER,
    REDIS_URL,
    Proc,
    dare_cmd,
    free_port,
    service_env,
    wait_http,
    wait_job,
)

BUCKET = "dare-test"
PREFIX = "tenant-a/prod"
# Fake credentials: moto accepts any; boto3 refuses to sign without some.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
AWS_ENV_KEYS = (*AWS_ENV, "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_CONFIG_FILE")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in AWS_ENV_KEYS}
    for k in AWS_ENV_KEYS:
        os.environ.pop(k, None)
    os.environ.update(AWS_ENV)
    # No ~/.aws of the machine's user may leak in (a profile there would override the env).
    empty = tmp_path_factory.mktemp("aws") / "none"
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.environ["AWS_CONFIG_FILE"] = str(empty)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def store(s3_endpoint: str) -> S3ArtifactStore:
    st = S3ArtifactStore(BUCKET, PREFIX, endpoint_url=s3_endpoint, region="us-east-1")
    st.client.create_bucket(Bucket=BUCKET)
    return st


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- the contract ----------------------------------------------------------------------------

def test_put_open_exists_fetch_delete(store: S3ArtifactStore, tmp_path: Path):
    data = os.urandom(3000)
    key = input_key("j1", "model.onnx")
    uri = store.put(key, _file(tmp_path / "a", data))
    assert uri == f"s3://{BUCKET}/{PREFIX}/jobs/j1/inputs/model.onnx" == store.uri(key)
    assert (tmp_path / "a").exists()  # a copy by default
    obj = store.client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/j1/inputs/model.onnx")
    assert obj["Body"].read() == data  # really in the bucket, under the prefix
    assert store.exists(uri)
    assert store.local_path(uri) is None  # the API streams it
    with store.open(uri) as fh:
        assert fh.read(10) + fh.read() == data

    dest = tmp_path / "work" / "inputs" / "model.onnx"
    store.fetch(uri, dest)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]  # no temporary left

    moved = _file(tmp_path / "b", b"second")
    uri2 = store.put(artifact_key("j1", "report.json"), moved, move=True)
    assert not moved.exists()  # move semantics: the local file is gone once stored
    with store.open(uri2) as fh:
        assert fh.read() == b"second"
    store.put(artifact_key("j1", "report.json"), _file(tmp_path / "c", b"third"))
    with store.open(uri2) as fh:
        assert fh.read() == b"third"  # a put replaces

    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting twice is harmless
    with pytest.raises(ArtifactNotFound):
        store.open(uri)
    with pytest.raises(ArtifactNotFound):
        store.fetch(uri, tmp_path / "gone" / "x")
    assert not (tmp_path / "gone").exists() or list((tmp_path / "gone").iterdir()) == []
    assert store.exists(uri2)


@pytest.mark.parametrize("key", ["../x", "jobs/../../x", "jobs/./x", "/abs/x", "jobs//x", "", "."])
def test_bad_keys_are_refused(store: S3ArtifactStore, tmp_path: Path, key: str):
    with pytest.raises(ValueError):
        store.put(key, _file(tmp_path / "f", b"x"))
    with pytest.raises(ValueError):
        store.uri(key)


@pytest.mark.parametrize("uri", [
    f"s3://other-bucket/{PREFIX}/jobs/j/inputs/model.onnx",    # another bucket
    f"s3://{BUCKET}/other/jobs/j/inputs/model.onnx",           # outside the prefix
    f"s3://{BUCKET}/{PREFIX}-x/jobs/j/model.onnx",             # a prefix that only starts alike
    f"s3://{BUCKET}/{PREFIX}/../other/jobs/j/model.onnx",      # escapes with ..
    f"s3://{BUCKET}/{PREFIX}/jobs//model.onnx",
    f"s3://{BUCKET}",
    "file:///etc/passwd",
    "/etc/passwd",
])
def test_uris_outside_the_bucket_and_prefix_are_refused(store: S3ArtifactStore, tmp_path: Path,
                                                        uri: str):
    # The object exists, so only the URI check can stop it.
    store.client.put_object(Bucket=BUCKET, Key="other/jobs/j/inputs/model.onnx", Body=b"secret")
    for call in (store.open, lambda u: store.fetch(u, tmp_path / "d"), store.delete):
        with pytest.raises(ValueError):
            call(uri)
    assert store.exists(uri) is False
    assert store.client.get_object(Bucket=BUCKET, Key="other/jobs/j/inputs/model.onnx")


def test_big_files_go_up_in_parts(store: S3ArtifactStore, s3_endpoint: str, tmp_path: Path):
    # S3's smallest part is 5 MiB; a lower threshold makes a small test file multipart.
    small_parts = S3ArtifactStore(BUCKET, PREFIX, client=store.client,
                                  multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    data = os.urandom(11 << 20)
    uri = small_parts.put(artifact_key("big", "hardened.onnx"), _file(tmp_path / "big", data))
    head = store.client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/big/artifacts/hardened.onnx")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a 3-part multipart upload
    small_parts.fetch(uri, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_settings_select_the_store(s3_endpoint: str, tmp_path: Path):
    with pytest.raises(ValidationError, match="DARE_S3_BUCKET"):
        Settings(home=tmp_path, artifact_store="s3")
    s = Settings(home=tmp_path, artifact_store="s3", s3_bucket=BUCKET, s3_prefix="/p/q/",
                 s3_endpoint_url=s3_endpoint)
    st = store_from_settings(s)
    assert isinstance(st, S3ArtifactStore) and st.uri("jobs/x/y") == f"s3://{BUCKET}/p/q/jobs/x/y"
    st.ping()  # the bucket answers
    with pytest.raises(ValueError, match="DARE_S3_PREFIX"):
        S3ArtifactStore(BUCKET, "a/../b", endpoint_url=s3_endpoint)
    with pytest.raises(Exception):
        S3ArtifactStore("no-such-bucket", endpoint_url=s3_endpoint).ping()
    assert isinstance(store_from_settings(Settings(home=tmp_path)), LocalArtifactStore)


def test_readyz_checks_the_bucket(s3_endpoint: str, settings: Settings, store: S3ArtifactStore):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    from .conftest import RecordingDispatcher

    for bucket, status in ((BUCKET, 200), ("no-such-bucket", 503)):
        app = create_app(settings, dispatcher=RecordingDispatcher(),
                         store=S3ArtifactStore(bucket, endpoint_url=s3_endpoint))
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/readyz")
        app.state.ctx.engine.dispose()
        assert r.status_code == status, r.text
        check = r.json()["checks"]["artifact_store"]
        assert (check == "ok") == (status == 200), check


# --- two machines that share only the bucket, Redis and PostgreSQL ----------------------------

@pytest.mark.slow
def test_job_on_two_machines_sharing_only_the_bucket(store, s3_endpoint, pg_url, subject_bytes,
                                                     tmp_path: Path):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    common = dict(DARE_DATABASE_URL=pg_url, DARE_BROKER_URL=REDIS_URL, DARE_AUTH="open",
                  DARE_ARTIFACT_STORE="s3", DARE_S3_BUCKET=BUCKET, DARE_S3_PREFIX=PREFIX,
                  DARE_S3_ENDPOINT_URL=s3_endpoint, DARE_S3_REGION="us-east-1",
                  DARE_STAGE_RUNNER=FAKE_RUNNER, DARE_PROGRESS_INTERVAL_S="0.3",
                  # The stand-in subject (a history of empty checkpoints) is for the fake engine
                  # only; the submit-time inspection, which runs before anything is stored,
                  # would rightly refuse it.
                  DARE_SUBMIT_INSPECTION="off",
                  **{k: os.environ[k] for k in AWS_ENV_KEYS if k in os.environ})
    api_home, worker_home = tmp_path / "api-machine", tmp_path / "worker-machine"
    api = Proc("api", dare_cmd("api", "--port", str(port)),
               service_env(DARE_HOME=str(api_home), **common), tmp_path)
    worker = Proc("worker", worker_argv(), service_env(DARE_HOME=str(worker_home), **common),
                  tmp_path)
    try:
        wait_http(f"{base}/readyz", api)
        assert httpx.get(f"{base}/readyz").json()["checks"]["artifact_store"] == "ok"
        files = {"model": ("model.onnx", subject_bytes["model"]),
                 "history": ("history.zip", subject_bytes["history"])}
        r = httpx.post(f"{base}/v1/jobs", files=files, data={"dataset": "digits"}, timeout=30)
        assert r.status_code == 202, f"{r.text}\n{api.tail()}"
        job_id = r.json()["id"]
        job = wait_job(base, job_id, {"succeeded", "failed", "cancelled"}, 60, [api, worker])
        assert job["status"] == "succeeded", job

        # The worker got the inputs from the bucket, not from the API's disk: its work directory
        # (while kept) holds them, and the fake engine's hardened.onnx, below, is the model.
        fetched = worker_home / "work" / "jobs" / job_id / "inputs" / "model.onnx"
        if (worker_home / "work" / "jobs" / job_id).exists():  # unless cleaned up after the job
            assert fetched.read_bytes() == subject_bytes["model"]
        for home in (api_home, worker_home):  # no local artifact directory on either
            assert not (home / "artifacts").exists()
        with store.open(store.uri(input_key(job_id, "history.zip"))) as fh:
            assert fh.read() == subject_bytes["history"]

        arts = {a["name"]: a for a in httpx.get(f"{base}/v1/jobs/{job_id}/artifacts").json()}
        assert {"hardened.onnx", "report.json", "report.html"} <= set(arts)
        for name in ("hardened.onnx", "report.json"):
            got = httpx.get(f"{base}/v1/jobs/{job_id}/artifacts/{name}", timeout=30)
            assert got.status_code == 200, got.text
            in_bucket = store.client.get_object(
                Bucket=BUCKET, Key=f"{PREFIX}/jobs/{job_id}/artifacts/{name}")["Body"].read()
            assert got.content == in_bucket and len(in_bucket) == arts[name]["size"]
            assert hashlib.sha256(got.content).hexdigest() == arts[name]["sha256"]
            assert got.headers["etag"] == f'"{arts[name]["sha256"]}"'
        assert httpx.get(f"{base}/v1/jobs/{job_id}/artifacts/hardened.onnx").content == \
            subject_bytes["model"]  # the fake engine's "hardened" model is the input

        # An object gone from the bucket is a 404 with a reason, not a 500.
        store.delete(store.uri(artifact_key(job_id, "report.html")))
        gone = httpx.get(f"{base}/v1/jobs/{job_id}/artifacts/report.html")
        assert gone.status_code == 404 and gone.json()["code"] == "artifact_not_found", gone.text
    finally:
        worker.stop()
        api.stop()
