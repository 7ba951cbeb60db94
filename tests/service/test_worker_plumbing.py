"""The production topology with a stand-in engine: `dare api` (uvicorn) and a real Celery worker
process (the docker-compose command) on Redis and PostgreSQL. Fast, so it can cover what the
real engine makes slow: cancel, failure, redelivery, limits over the wire."""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from service.cli.main import worker_argv

from . import fake_engine
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

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(pg_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    home = tmp_path_factory.mktemp("plumbing")
    port = free_port()
    env = service_env(DARE_HOME=str(home), DARE_DATABASE_URL=pg_url, DARE_BROKER_URL=REDIS_URL,
                      DARE_STAGE_RUNNER=FAKE_RUNNER, DARE_PROGRESS_INTERVAL_S="0.3",
                      DARE_CANCEL_POLL_INTERVAL_S="0.2", DARE_MAX_UPLOAD_BYTES=str(4 << 20),
                      DARE_FAKE_ALLOW_CRASH="1",
                      # plumbing, not authentication (test_auth/test_e2e use real keys): open mode,
                      # and no quota in the way of the jobs these tests leave queued
                      DARE_AUTH="open", DARE_SUBMIT_INSPECTION="off", DARE_MAX_ACTIVE_JOBS_PER_TENANT="100")
    api = Proc("api", dare_cmd("api", "--port", str(port)), env, home)
    worker = Proc("worker", worker_argv(), env, home)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", api)
        yield base, [api, worker]
    finally:
        worker.stop()
        api.stop()


def _submit(base: str, subject_bytes, config: str = "{}") -> dict:
    files = {"model": ("model.onnx", subject_bytes["model"]),
             "history": ("history.zip", subject_bytes["history"])}
    r = httpx.post(f"{base}/v1/jobs", files=files, data={"dataset": "digits", "config": config},
                   timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["location"].endswith(r.json()["id"])
    return r.json()


def test_job_runs_through_the_worker_and_its_onnx_runs(stack, subject_bytes):
    import onnxruntime as ort

    base, procs = stack
    job = _submit(base, subject_bytes)
    done = wait_job(base, job["id"], {"succeeded", "failed", "cancelled"}, 60, procs)
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["result"]["attacks"]
    r = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts/hardened.onnx", timeout=30)
    assert r.status_code == 200
    sess = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert out.shape == (3, 10)
    kinds = [e["kind"] for e in httpx.get(f"{base}/v1/jobs/{job['id']}/events").json()["items"]]
    assert kinds[0] == "created" and kinds[-1] == "succeeded"


def test_cancel_reaches_the_running_worker(stack, subject_bytes):
    base, procs = stack
    job = _submit(base, subject_bytes, f'{{"seed": {fake_engine.SLOW_SEED}}}')
    wait_job(base, job["id"], {"running"}, 30, procs)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # progress reaches the database while the stage runs
        running = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
        if running["stage"]["progress"] > 0:
            break
        time.sleep(0.2)
    assert 0 < running["stage"]["progress"] < 1 and 0 < running["progress"] < 1, running
    r = httpx.post(f"{base}/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled")
    t0 = time.monotonic()
    done = wait_job(base, job["id"], {"cancelled", "failed", "succeeded"}, 15, procs)
    assert done["status"] == "cancelled"
    assert time.monotonic() - t0 < fake_engine.SLOW_SECONDS / 2


def test_failures_end_the_job_with_a_stable_code(stack, subject_bytes):
    base, procs = stack
    bad_input = _submit(base, subject_bytes, f'{{"seed": {fake_engine.FAIL_INPUT_SEED}}}')
    bug = _submit(base, subject_bytes, f'{{"seed": {fake_engine.FAIL_BUG_SEED}}}')
    a = wait_job(base, bad_input["id"], {"failed", "succeeded"}, 60, procs)
    b = wait_job(base, bug["id"], {"failed", "succeeded"}, 60, procs)
    assert a["error"]["code"] == "no_oracles" and a["error"]["stage"] == "mine"
    assert b["error"]["code"] == "internal_error" and b["error"]["stage"] == "slice"
    assert fake_engine.SECRET not in b["error"]["message"]


def test_a_stage_whose_worker_dies_is_delivered_again_and_finishes(stack, subject_bytes):
    """acks_late + reject_on_worker_lost: the killed stage's message comes back, the same
    message takes its own stale claim over, and the job goes on (attempt 2)."""
    base, procs = stack
    job = _submit(base, subject_bytes, f'{{"seed": {fake_engine.CRASH_SEED}}}')
    done = wait_job(base, job["id"], {"succeeded", "failed", "cancelled"}, 90, procs)
    assert done["status"] == "succeeded", done
    starts = [e for e in httpx.get(f"{base}/v1/jobs/{job['id']}/events").json()["items"]
              if e["kind"] == "stage_started" and e["stage"] == "slice"]
    assert [e["data"]["attempt"] for e in starts] == [1, 2]
    assert starts[0]["data"]["worker"] != starts[1]["data"]["worker"]  # a new pool child


def test_chunked_oversize_upload_gets_413_over_the_wire(stack, subject_bytes):
    """No Content-Length: the API counts while it streams and answers before the body ends."""
    base, _ = stack
    boundary = "b0undary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"history\"; "
               "filename=\"history.zip\"\r\n\r\n").encode()
        for _ in range(64 * 16):  # 64 MiB, far past the 4 MiB limit
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(f"{base}/v1/jobs", content=body(), timeout=60,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "upload_too_large" and r.json()["field"] == "history"


def test_readyz_sees_redis_and_postgres(stack):
    base, _ = stack
    assert httpx.get(f"{base}/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}


def test_docs_are_served(stack):
    base, _ = stack
    assert "swagger" in httpx.get(f"{base}/docs").text.lower()
