"""A Redis restart in the middle of a job: the test runs its own redis-server (no persistence, so
the restart loses every queued and unacked message, the worst case), stops it while a stage
runs, refuses a submission cleanly while it is down, starts it again on the same port, and checks
that the worker reconnects, the reconciler re-sends what was lost, and the job succeeds with
every stage finished exactly once."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter

import httpx
import pytest

from . import fake_engine
from .conftest import FAKE_RUNNER, free_port, service_env, wait_job
from .test_crash import (
    TERMINAL,
    _assert_each_stage_finished_once,
    _events,
    _submit,
    _wait_inside,
    fake_engine_stages,
    running_stack,
)

pytestmark = pytest.mark.slow


class RedisServer:
    """redis-server on ``port``, in memory only; stop() and start() keep the port."""

    def __init__(self, port: int, log_dir) -> None:  # noqa: ANN001
        self.port, self.log_dir, self.proc = port, log_dir, None
        self.start()

    def start(self) -> None:
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=(self.log_dir / "redis.log").open("ab"),
                                     stderr=subprocess.STDOUT)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def stack(pg_url, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (Debian: apt-get install redis-server; .ci/run does)")
    redis_port, port = free_port(), free_port()
    broker = f"redis://127.0.0.1:{redis_port}/0"
    server = RedisServer(redis_port, tmp_path)
    env = service_env(DARE_HOME=str(tmp_path), DARE_DATABASE_URL=pg_url, DARE_BROKER_URL=broker,
                      DARE_AUTH="open", DARE_SUBMIT_INSPECTION="off",
                      DARE_MAX_ACTIVE_JOBS_PER_TENANT="50", DARE_STAGE_RUNNER=FAKE_RUNNER,
                      DARE_FAKE_SLOW_SECONDS="3", DARE_FAKE_SLOW_STAGES="validate,evaluate",
                      DARE_PROGRESS_INTERVAL_S="0.2", DARE_STAGE_STALE_AFTER_S="4",
                      DARE_HEARTBEAT_INTERVAL_S="0.5", DARE_REQUEUE_AFTER_S="3",
                      DARE_RECONCILE_INTERVAL_S="0.5")
    try:
        with running_stack(env, tmp_path, port, pg_url) as st:
            st["redis"] = server
            yield st
    finally:
        server.stop()


def test_redis_restart_mid_stage(stack):
    st = stack
    jid = _submit(st, fake_engine.SLOW_SEED)
    _wait_inside(st, jid, "validate")
    st["redis"].stop()  # the running stage's message and anything queued are gone with it
    # While the broker is down, a submission is refused with a clear 503, not a 500 or a hang.
    from . import subjects

    r = httpx.post(f"{st['base']}/v1/jobs", timeout=30, data={"dataset": "digits"},
                   files={"model": ("model.onnx", subjects.tiny_onnx()),
                          "history": ("history.zip", subjects.history_zip())})
    assert r.status_code == 503 and r.json()["code"] == "broker_unavailable", r.text
    time.sleep(4)  # validate (3 s) ends while Redis is down: sending "slice" fails
    st["redis"].start()
    procs = [st["api"], *st["worker"].generations]
    done = wait_job(st["base"], jid, TERMINAL, 90, procs)
    assert done["status"] == "succeeded", done
    assert _assert_each_stage_finished_once(st, jid)["validate"] == 1  # validate was not re-run
    requeued = [e.stage for e in _events(st, jid) if e.kind == "requeued"]
    assert "slice" in requeued, requeued  # the lost message came back from the database
    # the worker reconnected by itself (no restart of its process was needed) and serves new jobs
    assert len(st["worker"].generations) == 1
    ok = _submit(st)
    assert wait_job(st["base"], ok, TERMINAL, 60, procs)["status"] == "succeeded"
    assert Counter(e.stage for e in _events(st, ok) if e.kind == "stage_finished") == \
        Counter(fake_engine_stages())
