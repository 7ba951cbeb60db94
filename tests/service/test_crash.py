"""Jobs survive crashes: a real API (uvicorn, running the reconciler) and a real Celery worker on
Redis db and PostgreSQL, with the stand-in engine. The worker runs under a restart policy (like
docker's ``restart: always``); the tests kill its whole process group with SIGKILL in the middle
of a stage, flush Redis, restart the API, and check from the database's own records that each job
resumes from its last finished stage, never runs a finished stage again, and ends."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import select

from service.cli.main import worker_argv
from service.store.db import engine_for, session_factory
from service.store.models import JobEvent, StageRun

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

STALE_S = 3           # a lease older than this means the worker is gone
SLOW_STAGE_S = 2.0    # validate, slice and evaluate of a SLOW_SEED job
MAX_ATTEMPTS = 2
TERMINAL = {"succeeded", "failed", "cancelled"}


class SupervisedWorker:
    """A Celery worker restarted whenever its process group dies, as an orchestrator would."""

    def __init__(self, env: dict[str, str], log_dir) -> None:  # noqa: ANN001
        self.env, self.log_dir = env, log_dir
        self.generations: list[Proc] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._spawn()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.generations.append(Proc(f"worker-{len(self.generations)}", worker_argv(), self.env,
                                     self.log_dir))

    @property
    def current(self) -> Proc:
        return self.generations[-1]

    def kill(self) -> None:
        """SIGKILL the main process and its pool at once: nothing gets to ack or clean up."""
        with self._lock:
            os.killpg(self.current.p.pid, signal.SIGKILL)
            self.current.p.wait(10)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                if self.current.p.poll() is not None:
                    self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for p in self.generations:
            p.stop(5)


@pytest.fixture(scope="module")
def stack(pg_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    home = tmp_path_factory.mktemp("crash")
    port = free_port()
    env = service_env(DARE_HOME=str(home), DARE_DATABASE_URL=pg_url, DARE_BROKER_URL=REDIS_URL,
                      DARE_AUTH="open", DARE_SUBMIT_INSPECTION="off",
                      DARE_MAX_ACTIVE_JOBS_PER_TENANT="50",
                      DARE_STAGE_RUNNER=FAKE_RUNNER, DARE_FAKE_ALLOW_CRASH="1",
                      DARE_FAKE_SLOW_SECONDS=str(SLOW_STAGE_S), DARE_PROGRESS_INTERVAL_S="0.2",
                      DARE_FAKE_SLOW_STAGES="validate,slice,evaluate",  # where the tests strike
                      DARE_STAGE_STALE_AFTER_S=str(STALE_S), DARE_HEARTBEAT_INTERVAL_S="0.5",
                      DARE_REQUEUE_AFTER_S="3", DARE_RECONCILE_INTERVAL_S="0.5",
                      DARE_STAGE_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    with running_stack(env, home, port, pg_url) as st:
        yield st


@contextmanager
def running_stack(env: dict[str, str], home, port: int, pg_url: str) -> Iterator[dict]:  # noqa: ANN001
    """`dare api` on ``port`` and a supervised worker, both with ``env``; stopped at the end."""
    st = {"base": f"http://127.0.0.1:{port}", "env": env, "home": home, "port": port,
          "db": session_factory(engine_for(pg_url))}
    st["api"] = Proc("api", dare_cmd("api", "--port", str(port)), env, home)
    st["worker"] = SupervisedWorker(env, home)
    try:
        wait_http(f"{st['base']}/readyz", st["api"])
        yield st
    finally:
        st["worker"].stop()
        st["api"].stop()


def _procs(st) -> list[Proc]:  # noqa: ANN001
    return [st["api"], *st["worker"].generations]


def _submit(st, seed: int | None = None) -> str:  # noqa: ANN001
    from . import subjects

    files = {"model": ("model.onnx", subjects.tiny_onnx()),
             "history": ("history.zip", subjects.history_zip())}
    config = "{}" if seed is None else f'{{"seed": {seed}}}'
    r = httpx.post(f"{st['base']}/v1/jobs", files=files, data={"dataset": "digits", "config": config},
                   timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _runs(st, jid: str) -> dict[str, StageRun]:  # noqa: ANN001
    with st["db"]() as s:
        return {r.name: r for r in s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid)))}


def _events(st, jid: str) -> list[JobEvent]:  # noqa: ANN001
    with st["db"]() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(jid))
                              .order_by(JobEvent.id)))


def _wait_inside(st, jid: str, stage: str, timeout: float = 30) -> None:  # noqa: ANN001
    """Until the engine is inside ``stage`` (its progress has reached the database)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _runs(st, jid).get(stage)
        if run is not None and run.status.value == "running" and run.progress > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{stage} of {jid} never ran: {_runs(st, jid)}")


def _assert_each_stage_finished_once(st, jid: str) -> Counter:  # noqa: ANN001
    events = _events(st, jid)
    finished = Counter(e.stage for e in events if e.kind == "stage_finished")
    job_stages = fake_engine_stages()
    assert finished == Counter(job_stages), finished
    return Counter(e.stage for e in events if e.kind == "stage_started")


def fake_engine_stages() -> list[str]:
    return ["validate", "slice", "mine", "tune", "export", "evaluate"]


def test_kill_9_of_the_whole_worker_mid_stage_resumes_from_the_last_finished_stage(stack):
    st = stack
    jid = _submit(st, fake_engine.SLOW_SEED)
    _wait_inside(st, jid, "slice")
    st["worker"].kill()  # SIGKILL to main process and pool child, mid-slice
    done = wait_job(st["base"], jid, TERMINAL, 60, _procs(st))
    assert done["status"] == "succeeded", done
    started = _assert_each_stage_finished_once(st, jid)
    assert started == Counter({"slice": 2, "validate": 1, "mine": 1, "tune": 1, "export": 1,
                               "evaluate": 1})  # validate was not run again
    runs = _runs(st, jid)
    assert {n: r.attempts for n, r in runs.items()} == {n: 2 if n == "slice" else 1
                                                        for n in fake_engine_stages()}
    # re-sent by the reconciler once the lease ran out (a worker slow to start may add copies)
    requeued = [(e.stage, e.data["reason"]) for e in _events(st, jid) if e.kind == "requeued"]
    assert ("slice", "lease_expired") in requeued, requeued
    assert len(st["worker"].generations) >= 2


def test_redis_flush_and_api_restart_mid_job(stack):
    """A runs a stage while B's first message waits in Redis; FLUSHDB loses B's message (and A's
    unacked one); then the API restarts. The new API's reconciler re-sends B; A goes on."""
    import redis

    st = stack
    a = _submit(st, fake_engine.SLOW_SEED)
    _wait_inside(st, a, "validate")
    b = _submit(st)
    assert (b, "validate") in _queued(st)
    redis.Redis.from_url(REDIS_URL).flushdb()
    st["api"].stop()
    st["api"] = Proc("api-2", dare_cmd("api", "--port", str(st["port"])), st["env"], st["home"])
    wait_http(f"{st['base']}/readyz", st["api"])
    for jid in (a, b):
        done = wait_job(st["base"], jid, TERMINAL, 60, _procs(st))
        assert done["status"] == "succeeded", done
        assert _assert_each_stage_finished_once(st, jid) == Counter(fake_engine_stages())
    requeued = [(e.stage, e.data["reason"]) for e in _events(st, b) if e.kind == "requeued"]
    assert requeued[:1] == [("validate", "not_picked_up")], requeued


def _queued(st) -> set[tuple[str, str]]:  # noqa: ANN001
    from service.jobs.reconciler import queued_messages
    from service.settings import Settings

    return queued_messages(Settings(database_url="sqlite://", broker_url=REDIS_URL,
                                    home=st["home"]))


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(stack):
    st = stack
    jid = _submit(st, fake_engine.KILL_ALWAYS_SEED)
    done = wait_job(st["base"], jid, TERMINAL, 60, _procs(st))
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "stage_attempts_exhausted" and done["error"]["stage"] == "slice"
    assert _runs(st, jid)["slice"].attempts == MAX_ATTEMPTS
    # the worker is still serving other jobs
    ok = _submit(st)
    assert wait_job(st["base"], ok, TERMINAL, 30, _procs(st))["status"] == "succeeded"


def test_a_job_cancelled_while_its_worker_is_dead_ends_cancelled_without_artifacts(stack):
    st = stack
    jid = _submit(st, fake_engine.SLOW_SEED)
    _wait_inside(st, jid, "evaluate", timeout=40)  # export has published hardened.*
    assert httpx.get(f"{st['base']}/v1/jobs/{jid}/artifacts").json()
    st["worker"].kill()
    r = httpx.post(f"{st['base']}/v1/jobs/{jid}/cancel")
    assert r.json()["status"] == "cancelling"
    done = wait_job(st["base"], jid, TERMINAL, 30, _procs(st))
    assert done["status"] == "cancelled", done
    arts = httpx.get(f"{st['base']}/v1/jobs/{jid}/artifacts").json()
    assert arts in ([], {"items": []}), arts
    adir = st["home"] / "artifacts" / "jobs" / jid / "artifacts"
    assert not adir.is_dir() or not list(adir.iterdir())
