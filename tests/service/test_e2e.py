"""End to end with the real engine: a reference `digits` subject trained by
`dare train-reference`, submitted over HTTP, hardened by a real worker, its `hardened.onnx`
downloaded and run in onnxruntime. Once on the production topology (`dare api` + a Celery worker
process on Redis and PostgreSQL), once on the embedded one (`dare serve`: SQLite, filesystem
broker)."""
from __future__ import annotations

import functools
import json
import subprocess

import httpx
import numpy as np
import pytest

from service.cli.main import worker_argv

from .conftest import (
    REDIS_URL,
    REPO,
    Proc,
    dare_cmd,
    free_port,
    make_key,
    service_env,
    wait_http,
    wait_job,
)

pytestmark = pytest.mark.slow

# Small enough for two CPU cores, large enough to exercise every stage.
CONFIG = {"evaluation": {"n_samples": 64, "attacks": ["fgsm", "pgd"]}, "tune": {"epochs": 3}}
TERMINAL = {"succeeded", "failed", "cancelled"}


def _engine_ready() -> str | None:
    try:
        from worker import cli
        from worker.engine import stages
    except ImportError as e:
        return f"engine not importable: {e}"
    if not hasattr(stages, "run_stage") or not hasattr(cli, "register"):
        return "the engine's run_stage / worker.cli.register have not landed yet"
    return None


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    reason = _engine_ready()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("subject")
    r = subprocess.run(dare_cmd("train-reference", "--arch", "lenet", "--dataset", "digits",
                                "--epochs", "10", "--out", str(out)),
                       cwd=REPO, env=service_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("model.onnx", "model.pt2", "history.zip", "data.npz"):
        assert (out / f).is_file(), f
    return out


def _check_succeeded(base: str, job_id: str, subject, procs, expect: set[str],
                     headers: dict[str, str] | None = None) -> None:
    import onnxruntime as ort

    get = functools.partial(httpx.get, headers=headers)
    job = wait_job(base, job_id, TERMINAL, 300, procs, headers=headers)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["error"] is None
    res = job["result"]
    assert set(res["attacks"]) == {"fgsm", "pgd"}
    for a in res["attacks"].values():
        assert set(a) == {"original_accuracy", "transfer_er", "adaptive_accuracy"}
    arts = {a["name"]: a for a in get(f"{base}/v1/jobs/{job_id}/artifacts").json()}
    assert expect <= set(arts), arts
    report = get(f"{base}/v1/jobs/{job_id}/artifacts/report.json").json()
    assert report["schema_version"] == 1
    assert "<html" in get(f"{base}/v1/jobs/{job_id}/artifacts/report.html").text.lower()

    onnx_bytes = get(f"{base}/v1/jobs/{job_id}/artifacts/hardened.onnx", timeout=60).content
    assert len(onnx_bytes) == arts["hardened.onnx"]["size"]
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    data = np.load(subject / "data.npz")
    x, y = data["x_test"].astype(np.float32), data["y_test"]
    if x.max() > 1.5:
        x = x / 255.0
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert logits.shape == (len(x), 10)
    acc = float((logits.argmax(1) == y).mean())
    assert acc > 0.7, acc  # a hardened digits LeNet still classifies digits
    assert abs(acc - report["clean_accuracy"]["hardened"]) < 0.05, (acc, report["clean_accuracy"])

    kinds = [e["kind"] for e in get(f"{base}/v1/jobs/{job_id}/events").json()["items"]]
    assert kinds.count("stage_started") == len(job_stages(job)) and kinds[-1] == "succeeded"


def job_stages(job: dict) -> range:
    return range(job["stage"]["total"])


def test_production_topology_redis_postgres(subject, pg_url, tmp_path):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    env = service_env(DARE_HOME=str(tmp_path), DARE_DATABASE_URL=pg_url,
                      DARE_BROKER_URL=REDIS_URL)
    subprocess.run(dare_cmd("db", "upgrade"), cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=120)  # what the compose "migrate" service runs
    from service.store.db import engine_for, session_factory

    auth = {"Authorization": f"Bearer {make_key(session_factory(engine_for(pg_url)), 'e2e')}"}
    api = Proc("api", dare_cmd("api", "--port", str(port)), env, tmp_path)
    worker = Proc("worker", worker_argv(), env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", api)
        assert httpx.get(f"{base}/v1/jobs").status_code == 401  # `dare api` requires a key
        with (subject / "model.onnx").open("rb") as m, (subject / "history.zip").open("rb") as h:
            r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", m),
                                                     "history": ("history.zip", h)},
                           data={"dataset": "digits", "config": json.dumps(CONFIG)}, timeout=60,
                           headers=auth)
        assert r.status_code == 202, r.text
        _check_succeeded(base, r.json()["id"], subject, [api, worker],
                         {"hardened.onnx", "hardened.safetensors", "report.json", "report.html"},
                         headers=auth)
    finally:
        worker.stop()
        api.stop()


def test_embedded_dare_serve_with_pt2_and_npz(subject, tmp_path):
    port = free_port()
    serve = Proc("serve", dare_cmd("serve", "--port", str(port), "--home", str(tmp_path / "var")),
                 service_env(), tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", serve, timeout=120)
        assert "open (no authentication) on loopback" in serve.log.read_text()
        with (subject / "model.pt2").open("rb") as m, (subject / "history.zip").open("rb") as h, \
                (subject / "data.npz").open("rb") as d:
            r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.pt2", m),
                                                     "history": ("history.zip", h),
                                                     "data": ("data.npz", d)},
                           data={"config": json.dumps(CONFIG)}, timeout=60)
        assert r.status_code == 202, r.text
        _check_succeeded(base, r.json()["id"], subject, [serve],
                         {"hardened.onnx", "hardened.pt2", "hardened.safetensors", "report.json",
                          "report.html"})
        assert (tmp_path / "var" / "dare.db").is_file()  # SQLite, migrated by serve itself
    finally:
        serve.stop()


def test_a_colour_resnet_goes_through_dare_serve(tmp_path):
    """The 3-channel 32x32 path through the service: a ResNet-18 (residual adds) at 1/16 width
    trained on synthetic colour images, submitted as .pt2 with its .npz, hardened by the
    embedded worker; the hardened ONNX takes (N, 3, 32, 32) and gives the 3 classes."""
    import onnxruntime as ort

    from tests.engine.test_paper_archs import WIDTH, colour_splits
    from worker.engine.reference import train_reference

    splits = colour_splits(n=24, classes=3)
    ref = train_reference("resnet18", splits, 2, tmp_path / "subject", width=WIDTH,
                          lr_schedule="cosine")
    port = free_port()
    serve = Proc("serve", dare_cmd("serve", "--port", str(port), "--home", str(tmp_path / "var")),
                 service_env(), tmp_path)
    base = f"http://127.0.0.1:{port}"
    config = {"evaluation": {"n_samples": 12, "attacks": ["fgsm"]}, "tune": {"epochs": 1},
              "history_fraction": 1.0}
    try:
        wait_http(f"{base}/readyz", serve, timeout=120)
        with open(ref["model_pt2"], "rb") as m, open(ref["history_zip"], "rb") as h, \
                open(ref["data_npz"], "rb") as d:
            r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.pt2", m),
                                                     "history": ("history.zip", h),
                                                     "data": ("data.npz", d)},
                           data={"config": json.dumps(config)}, timeout=60)
        assert r.status_code == 202, r.text
        job = wait_job(base, r.json()["id"], TERMINAL, 600, [serve])
        assert job["status"] == "succeeded", job
        onnx_bytes = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts/hardened.onnx",
                               timeout=60).content
    finally:
        serve.stop()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    logits = sess.run(None, {inp.name: splits.x_test[:5].numpy()})[0]
    assert logits.shape == (5, 3)
