"""compare fanned out over workers: one message and one stage_runs row per method, released by
the plan and by the methods they are made from; the last to finish sends the choice. In-process
against PostgreSQL for the bookkeeping (the order, the reconciler, cancel), then with two real
Celery worker processes on Redis: the methods run on both, at once; a cancel stops the rest; a
worker killed mid-method costs that method alone, re-sent by the reconciler."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from service.cli.main import worker_argv
from service.jobs.pipeline import Pipeline
from service.jobs.reconciler import reconcile_once
from service.states import StageStatus
from service.store.models import Job, JobEvent, StageRun

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

METHODS = ["dare", "at_fgsm", "at_pgd_online", "weight_noise"]  # weight_noise needs dare
COMPARE = {"compare": True, "selection": {"methods": METHODS}}
BEFORE = ["validate", "slice", "mine", "tune"]


# the in-process fixtures are the reconciler tests' (the fan-out is driven by the same pieces)
from .test_reconciler import ctx, empty_broker, pipeline  # noqa: E402, F401


def _rows(ctx, jid: str) -> dict[str, StageRun]:
    with ctx.factory() as s:
        return {r.name: r for r in s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid)))}


def _events(ctx, jid: str, kind: str) -> list[JobEvent]:
    with ctx.factory() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(jid),
                                                     JobEvent.kind == kind).order_by(JobEvent.id)))


def client_job(ctx, jid: str) -> Job:
    with ctx.factory() as s:
        return s.get(Job, uuid.UUID(jid))


def _to_compare(pipeline: Pipeline, submit, config: dict = COMPARE) -> str:
    """A compare job submitted with ``config`` and run up to its compare stage."""
    jid = submit(json.dumps(config))
    for stage in BEFORE:
        pipeline.run(jid, stage, task_id=str(uuid.uuid4()))
    return jid


def _step(pipeline: Pipeline, jid: str, name: str) -> list[str]:
    return pipeline.step(jid, name, task_id=str(uuid.uuid4()))


def _dead_worker(ctx, jid: str, method: str, attempts: int = 1, **job) -> None:
    """``compare:<method>`` claimed ``attempts`` times, last by a worker that died 25 s ago
    (older than the lease); ``job``: columns of the job to set in the same transaction."""
    with ctx.factory.begin() as s:
        run = s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid),
                                               StageRun.name == f"compare:{method}")).one()
        run.status, run.attempts, run.task_id = StageStatus.running, attempts, "dead"
        run.started_at = run.heartbeat_at = client_job(ctx, jid).updated_at - timedelta(seconds=25)
        for k, v in job.items():
            setattr(s.get(Job, uuid.UUID(jid)), k, v)


def test_compare_sends_each_method_and_the_last_one_sends_the_choice(ctx, pipeline, submit):
    jid = _to_compare(pipeline, submit)
    fake_engine.CALLS.clear()
    # the plan: every method that needs no other one, each its own message and row
    assert _step(pipeline, jid, "compare") == ["compare:dare", "compare:at_fgsm",
                                               "compare:at_pgd_online"]
    rows = _rows(ctx, jid)
    assert rows["compare"].status is StageStatus.waiting
    assert {n: r.status for n, r in rows.items() if ":" in n} == \
        {f"compare:{m}": StageStatus.queued for m in METHODS[:3]}
    # a copy of compare's message while its methods run does nothing
    assert _step(pipeline, jid, "compare") == [] and fake_engine.CALLS == ["compare.plan"]
    assert _step(pipeline, jid, "compare:at_pgd_online") == []
    job = client_job(ctx, jid)
    assert job.stage_name == "compare" and 0 < job.stage_progress < 0.5
    assert _step(pipeline, jid, "compare:dare") == ["compare:weight_noise"]  # made from dare
    assert _step(pipeline, jid, "compare:at_fgsm") == []
    assert _step(pipeline, jid, "compare:at_fgsm") == []  # redelivered after it finished
    assert _step(pipeline, jid, "compare:weight_noise") == ["compare"]  # the last one
    assert _rows(ctx, jid)["compare"].status is StageStatus.queued
    assert _step(pipeline, jid, "compare") == ["export"]
    assert _step(pipeline, jid, "export") == ["evaluate"]
    assert _step(pipeline, jid, "evaluate") == []
    assert fake_engine.CALLS == ["compare.plan", "compare:at_pgd_online", "compare:dare",
                                 "compare:at_fgsm", "compare:weight_noise", "compare",
                                 "export", "evaluate"]
    rows = _rows(ctx, jid)
    assert all(r.status is StageStatus.succeeded for r in rows.values())
    assert all(rows[f"compare:{m}"].attempts == 1 for m in METHODS)
    assert client_job(ctx, jid).status == "succeeded"
    with pytest.raises(ValueError, match="fanned out"):  # the one-chain driver refuses a fan-out
        pipeline.run(_to_compare(pipeline, submit), "compare", task_id="t")


def test_reconciler_resends_only_the_method_whose_worker_died(ctx, pipeline, submit, dispatcher,
                                                              empty_broker):
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _step(pipeline, jid, "compare:at_fgsm")
    _dead_worker(ctx, jid, "dare")
    dispatcher.sent.clear()
    # at_pgd_online's message is young (queued), so only the expired lease is re-sent
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"lease_expired": 1}
    assert dispatcher.sent == [(jid, "compare:dare")]
    assert [e.stage for e in _events(ctx, jid, "requeued")] == ["compare:dare"]
    assert _step(pipeline, jid, "compare:dare") == ["compare:weight_noise"]  # takes it over
    assert _rows(ctx, jid)["compare:dare"].attempts == 2
    assert _rows(ctx, jid)["compare:at_fgsm"].attempts == 1


def test_a_live_method_beside_a_dead_one_does_not_hold_back_the_resend(ctx, pipeline, submit,
                                                                       dispatcher, empty_broker):
    """One method's worker is alive (fresh heartbeat), another's died: the dead one is re-sent
    all the same (only a cancelling job waits for its live workers to end it)."""
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    now = client_job(ctx, jid).updated_at
    with ctx.factory.begin() as s:
        rows = {r.name: r for r in s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid)))}
        for name, age in (("compare:dare", 25), ("compare:at_fgsm", 0)):
            run = rows[name]
            run.status, run.attempts, run.task_id = StageStatus.running, 1, f"t-{name}"
            run.started_at = now - timedelta(seconds=25)
            run.heartbeat_at = now - timedelta(seconds=age)
    dispatcher.sent.clear()
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"lease_expired": 1}
    assert dispatcher.sent == [(jid, "compare:dare")]


def test_a_young_queued_method_does_not_end_the_look_at_the_ones_after_it(ctx, pipeline, submit,
                                                                          dispatcher, empty_broker):
    """The first method's message is young (it may be waiting its turn); the second's worker
    died: the pass still reaches the second and re-sends it."""
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _dead_worker(ctx, jid, "at_fgsm")
    dispatcher.sent.clear()
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"lease_expired": 1}
    assert dispatcher.sent == [(jid, "compare:at_fgsm")]


def test_a_cancel_that_no_worker_will_see_is_ended_at_the_first_waiting_method(
        ctx, pipeline, submit, dispatcher, empty_broker):
    """Cancelling while every method still waits in the queue: the reconciler ends the job and
    names the first of them as where it stopped."""
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    with ctx.factory.begin() as s:
        s.get(Job, uuid.UUID(jid)).status = "cancelling"
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"cancelled": 1}
    assert client_job(ctx, jid).status == "cancelled"
    assert [e.stage for e in _events(ctx, jid, "cancelled")] == ["compare:dare"]


def test_methods_wait_from_the_plans_end_not_from_the_jobs_last_update(ctx, pipeline, submit,
                                                                       dispatcher, empty_broker):
    """The plan ended 31 s ago and no method was picked up; a later write to the job (a
    progress update, say) does not make their messages young again."""
    from .test_reconciler import _age

    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _age(ctx, jid, 31)
    with ctx.factory.begin() as s:
        s.get(Job, uuid.UUID(jid)).updated_at = client_job(ctx, jid).updated_at + timedelta(seconds=31)
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"not_picked_up": 3}


def test_a_cancel_with_a_dead_method_worker_is_ended_by_the_reconciler(ctx, pipeline, submit,
                                                                        dispatcher, empty_broker):
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _dead_worker(ctx, jid, "dare", status="cancelling")
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"cancelled": 1}
    assert client_job(ctx, jid).status == "cancelled"


def test_a_method_still_waiting_in_the_queue_does_not_end_the_look_at_the_others(
        ctx, pipeline, submit, dispatcher, empty_broker):
    """All three methods are old; dare's message still waits in Redis (a long queue), the other
    two are lost: those two are re-sent."""
    from service.jobs.dispatch import CeleryDispatcher

    from .test_reconciler import _age

    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _age(ctx, jid, 31)
    ctx.settings.broker_url = REDIS_URL
    CeleryDispatcher(ctx.settings).enqueue(jid, "compare:dare")
    dispatcher.sent.clear()
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"not_picked_up": 2}
    assert sorted(dispatcher.sent) == [(jid, "compare:at_fgsm"), (jid, "compare:at_pgd_online")]


def test_a_throttled_method_does_not_end_the_look_at_the_others(ctx, pipeline, submit,
                                                                dispatcher, empty_broker):
    """dare was re-sent twice already (its next wait is 60 s), the others never (30 s); the
    last re-send was 40 s ago: dare waits, the other two go out."""
    from service.jobs import records as jobs

    from .test_reconciler import _age

    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _age(ctx, jid, 100)
    with ctx.factory.begin() as s:
        for _ in range(2):
            jobs.add_event(s, uuid.UUID(jid), "requeued", "compare:dare", {"reason": "not_picked_up"})
    _age(ctx, jid, 40)
    dispatcher.sent.clear()
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == \
        {"throttled": 1, "not_picked_up": 2}
    assert sorted(dispatcher.sent) == [(jid, "compare:at_fgsm"), (jid, "compare:at_pgd_online")]


def test_a_method_that_keeps_losing_its_worker_fails_the_job_and_ends_the_others(
        ctx, pipeline, submit, dispatcher, empty_broker):
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _dead_worker(ctx, jid, "dare", attempts=3)
    assert reconcile_once(ctx.settings, ctx.factory, dispatcher, ctx.store) == {"failed": 1}
    job = client_job(ctx, jid)
    assert job.status == "failed" and job.error_code == "stage_attempts_exhausted"
    assert job.error_stage == "compare:dare"
    rows = _rows(ctx, jid)
    assert rows["compare:at_fgsm"].status is StageStatus.cancelled
    assert rows["compare"].status is StageStatus.cancelled
    assert _step(pipeline, jid, "compare:at_fgsm") == []  # its queued message finds the job over


def test_cancel_during_the_fan_out_runs_no_further_method(ctx, client, pipeline, submit):
    jid = _to_compare(pipeline, submit)
    _step(pipeline, jid, "compare")
    _step(pipeline, jid, "compare:dare")
    fake_engine.CALLS.clear()
    assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202
    for m in ("at_fgsm", "at_pgd_online", "weight_noise"):
        assert _step(pipeline, jid, f"compare:{m}") == []
    assert fake_engine.CALLS == []
    assert client_job(ctx, jid).status == "cancelled"
    rows = _rows(ctx, jid)
    assert rows["compare:dare"].status is StageStatus.succeeded
    assert {rows[f"compare:{m}"].status for m in ("at_fgsm", "at_pgd_online")} == \
        {StageStatus.cancelled}


# --- two real workers -----------------------------------------------------------------------

STALE_S = 3


@pytest.fixture(scope="module")
def two_workers(pg_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    home = tmp_path_factory.mktemp("fanout")
    port = free_port()
    env = service_env(DARE_HOME=str(home), DARE_DATABASE_URL=pg_url, DARE_BROKER_URL=REDIS_URL,
                      DARE_STAGE_RUNNER=FAKE_RUNNER, DARE_PROGRESS_INTERVAL_S="0.2",
                      DARE_CANCEL_POLL_INTERVAL_S="0.2", DARE_AUTH="open",
                      DARE_SUBMIT_INSPECTION="off", DARE_MAX_ACTIVE_JOBS_PER_TENANT="100",
                      DARE_STAGE_STALE_AFTER_S=str(STALE_S), DARE_HEARTBEAT_INTERVAL_S="0.5",
                      DARE_RECONCILE_INTERVAL_S="1", DARE_REQUEUE_AFTER_S="5",
                      DARE_FAKE_METHOD_SECONDS="2")
    api = Proc("api", dare_cmd("api", "--port", str(port)), env, home)
    workers = [Proc(f"worker-{n}", worker_argv(extra=["-n", f"{n}@%h"]), env, home)
               for n in ("a", "b")]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", api)
        yield base, api, workers
    finally:
        for p in [*workers, api]:
            p.stop()


def _submit(base: str, subject_bytes, config: dict) -> str:
    files = {"model": ("model.onnx", subject_bytes["model"]),
             "history": ("history.zip", subject_bytes["history"])}
    r = httpx.post(f"{base}/v1/jobs", files=files, timeout=30,
                   data={"dataset": "digits", "config": json.dumps(config)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _job_events(base: str, jid: str) -> list[dict]:
    return httpx.get(f"{base}/v1/jobs/{jid}/events", params={"limit": 1000}, timeout=10).json()["items"]


def _wait_events(base: str, jid: str, kind: str, n: int, timeout: float, procs) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _job_events(base, jid) if e["kind"] == kind]
        if len(found) >= n:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} {kind} events:\n" + "\n".join(p.tail() for p in procs))


@pytest.mark.slow
def test_the_methods_of_one_compare_run_on_both_workers_at_once(two_workers, subject_bytes):
    base, api, workers = two_workers
    jid = _submit(base, subject_bytes, {**COMPARE, "seed": fake_engine.SLOW_METHODS_SEED})
    # while the methods run, the job's compare stage moves with them
    _wait_events(base, jid, "method_started", 2, 60, [api, *workers])
    time.sleep(1.0)
    running = httpx.get(f"{base}/v1/jobs/{jid}").json()
    assert running["stage"]["name"] == "compare" and 0 < running["stage"]["progress"] < 0.5
    done = wait_job(base, jid, {"succeeded", "failed", "cancelled"}, 90, [api, *workers])
    assert done["status"] == "succeeded", done
    events = _job_events(base, jid)
    started = {e["stage"]: e for e in events if e["kind"] == "method_started"}
    finished = {e["stage"]: e for e in events if e["kind"] == "method_finished"}
    assert set(started) == set(finished) == {f"compare:{m}" for m in METHODS}
    by_worker = {e["data"]["worker"] for e in started.values()}
    pool_pids = {int(w.rsplit("/", 1)[1]) for w in by_worker}
    # two processes, children of the two worker processes: each worker trained methods
    assert {os.getpgid(pid) for pid in pool_pids} == {w.p.pid for w in workers}
    # and at once: some method started before another one finished
    times = {n: (started[n]["at"], finished[n]["at"]) for n in started}
    assert any(a[0] < b[0] < a[1] for a in times.values() for b in times.values() if a != b)
    # the choice ran once, after the last method, and the chain went on
    resumed = [e for e in events if e["kind"] == "stage_resumed"]
    assert len(resumed) == 1 and resumed[0]["at"] >= max(f["at"] for f in finished.values())
    assert [e["stage"] for e in events if e["kind"] == "progress" and e["stage"].startswith(
        "compare:")]  # each method reports its own progress


@pytest.mark.slow
def test_cancel_stops_the_running_methods_and_starts_no_other(two_workers, subject_bytes):
    base, api, workers = two_workers
    methods = ["dare", "dare_adv", "at_fgsm", "at_bim", "at_pgd", "at_pgd_online"]
    jid = _submit(base, subject_bytes, {"compare": True, "seed": fake_engine.SLOW_METHODS_SEED,
                                        "selection": {"methods": methods}})
    _wait_events(base, jid, "method_started", 2, 60, [api, *workers])
    assert httpx.post(f"{base}/v1/jobs/{jid}/cancel").status_code == 202
    done = wait_job(base, jid, {"cancelled", "failed", "succeeded"}, 20, [api, *workers])
    assert done["status"] == "cancelled"
    time.sleep(1.5)  # the queued methods' messages reach the workers and are dropped
    events = _job_events(base, jid)
    assert len([e for e in events if e["kind"] == "method_started"]) == 2
    # both running methods stopped at a cancel poll, none ran to its end
    assert not [e for e in events if e["kind"] == "method_finished"]


@pytest.mark.slow
def test_a_worker_killed_mid_method_costs_that_method_alone(two_workers, subject_bytes):
    base, api, workers = two_workers
    jid = _submit(base, subject_bytes, {**COMPARE, "seed": fake_engine.SLOW_METHODS_SEED})
    first = _wait_events(base, jid, "method_started", 1, 60, [api, *workers])[0]
    victim_pid = int(first["data"]["worker"].rsplit("/", 1)[1])
    victim = next(w for w in workers if os.getpgid(victim_pid) == w.p.pid)
    time.sleep(0.5)  # mid-method: its lease is being renewed
    os.killpg(victim.p.pid, signal.SIGKILL)  # the main process and its pool: nothing acks
    victim.p.wait(10)
    survivor = next(w for w in workers if w is not victim)
    done = wait_job(base, jid, {"succeeded", "failed", "cancelled"}, 90, [api, survivor])
    assert done["status"] == "succeeded", done
    events = _job_events(base, jid)
    assert [e["stage"] for e in events if e["kind"] == "requeued"] == [first["stage"]]
    starts = [e for e in events if e["kind"] == "method_started"]
    again = [e for e in starts if e["stage"] == first["stage"]]
    assert [e["data"]["attempt"] for e in again] == [1, 2]
    assert os.getpgid(int(again[1]["data"]["worker"].rsplit("/", 1)[1])) == survivor.p.pid
    others = [e for e in starts if e["stage"] != first["stage"]]
    assert sorted(e["stage"] for e in others) == sorted(f"compare:{m}" for m in METHODS
                                                        if f"compare:{m}" != first["stage"])
    assert all(e["data"]["attempt"] == 1 for e in others)
    assert len([e for e in events if e["kind"] == "stage_started" and e["stage"] == "compare"]) == 1


def test_stage_runs_fit_method_names():
    from worker.engine.config import COMPARE_METHODS

    with_prefix = max(len(f"compare:{m}") for m in COMPARE_METHODS)
    assert with_prefix <= StageRun.__table__.c.name.type.length
