"""The stage runner at its edges, in-process against PostgreSQL: progress between two stages,
the result's count of sanity checks, which artifacts a re-run publishes again, and the lease's
heartbeat thread (it keeps renewing while the stage is ours and stops once it is not)."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import types
import uuid

import pytest

from service.jobs import records as jobs
from service.jobs.pipeline import _Claim, _Heartbeat, overall_progress
from service.states import JobStatus, StageStatus
from service.store.models import Job, StageRun

from .test_fanout import METHODS, _to_compare
from .test_pipeline import pipeline  # noqa: F401 (fixture)


def _row(client, jid: str) -> Job:
    with client.app.state.ctx.factory() as s:
        return s.get(Job, uuid.UUID(jid))


def test_a_finished_stage_reads_one_and_the_next_claim_starts_it_at_zero(client, submit,
                                                                         pipeline):
    jid = submit()
    t0 = time.monotonic()
    assert pipeline.run(jid, "validate", task_id="t1") == "slice"
    wall = time.monotonic() - t0
    with client.app.state.ctx.factory() as s:
        runs = {r.name: r for r in s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid))}
    assert runs["validate"].summary == {"stage": "validate", "device": "cpu"}  # the engine's
    assert runs["validate"].progress == 1.0 and 0 <= runs["validate"].duration_s <= wall
    assert (runs["slice"].status, runs["slice"].progress) == (StageStatus.queued, 0.0)
    job = _row(client, jid)
    assert job.stage_progress == 1.0
    assert job.progress == overall_progress(job.stages, 0, 1.0)
    pipeline._claim(uuid.UUID(jid), "slice", "t2")
    job = _row(client, jid)
    assert (job.stage_name, job.stage_progress) == ("slice", 0.0)
    assert job.progress == overall_progress(job.stages, 1, 0.0)


def test_the_result_counts_the_passed_sanity_checks_and_names_the_failed(client, submit,
                                                                          pipeline, tmp_path):
    jid = submit()
    (tmp_path / "artifacts").mkdir()
    checks = [{"name": "a", "passed": True}, {"name": "b", "passed": False},
              {"name": "c", "passed": True}]
    (tmp_path / "artifacts" / "report.json").write_text(json.dumps({"sanity_checks": checks}))
    with client.app.state.ctx.factory() as s:
        result = pipeline.build_result(s, s.get(Job, uuid.UUID(jid)), tmp_path)
    assert result["sanity_checks"] == {"passed": 2, "failed": ["b"]}


def test_an_unchanged_artifact_does_not_end_the_look_at_the_others(pipeline, tmp_path,
                                                                  monkeypatch):
    """A re-run stage publishes what changed; an artifact already stored with the same bytes
    is skipped, and the files after it (in name order) are still looked at."""
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "a.bin").write_bytes(b"same")
    (art / "b.bin").write_bytes(b"new")
    (art / ".partial").write_bytes(b"being written")  # hidden: never published, sorts first
    stored = [types.SimpleNamespace(name="a.bin", sha256=hashlib.sha256(b"same").hexdigest())]
    monkeypatch.setattr(jobs, "list_artifacts", lambda s, job_id: stored)
    claim = _Claim(job_id=uuid.uuid4(), stage="export", index=4, stages=[], config={}, inputs=[])
    assert claim.name == "export"  # a stage's run is named after it
    assert [a["name"] for a in pipeline._collect_artifacts(claim, tmp_path)] == ["b.bin"]


def test_the_heartbeat_renews_while_the_stage_is_ours_and_stops_when_it_is_not(
        client, submit, pipeline):
    pipeline.settings.heartbeat_interval_s = 0.05
    jid = submit()
    claim = pipeline._claim(uuid.UUID(jid), "validate", "t1")
    factory = client.app.state.ctx.factory

    def beat():
        with factory() as s:
            return s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one().heartbeat_at

    first = beat()
    hb = _Heartbeat(pipeline, claim).__enter__()
    try:
        time.sleep(0.6)
        assert hb._thread.is_alive()  # still renewing after many intervals
        assert beat() > first
        with factory.begin() as s:  # the stage ends (or another message takes it over)
            s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).update(
                {StageRun.status: StageStatus.succeeded})
        hb._thread.join(timeout=5)
        assert not hb._thread.is_alive()  # nothing left to renew: it stopped on its own
    finally:
        hb.__exit__(None, None, None)


def test_a_finished_stage_delivered_again_resends_only_a_next_stage_never_claimed(
        client, submit, pipeline):
    jid = submit()
    assert pipeline.run(jid, "validate", task_id="t1") == "slice"
    assert pipeline.step(jid, "validate", task_id="t1-again") == ["slice"]  # never claimed: sent
    with client.app.state.ctx.factory.begin() as s:  # claimed once, queued again since
        s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid), StageRun.name == "slice") \
            .update({StageRun.attempts: 1})
    assert pipeline.step(jid, "validate", task_id="t1-third") == []


def test_a_succeeded_job_reads_one_and_leaves_no_work_directory(client, submit, pipeline):
    jid = submit()
    stage = "validate"
    while stage:
        assert pipeline.workdir(jid).is_dir() or stage == "validate"  # kept between stages
        stage = pipeline.run(jid, stage, task_id=str(uuid.uuid4()))
    job = _row(client, jid)
    assert (job.status, job.progress, job.stage_progress) == ("succeeded", 1.0, 1.0)
    assert not pipeline.workdir(jid).exists()  # scratch: everything is in the store
    # each stage's row holds its place in the stage list (the order the job's runs are read in)
    with client.app.state.ctx.factory() as s:
        runs = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).order_by(StageRun.index)
        assert [(r.name, r.index) for r in runs] == list(zip(job.stages, range(len(job.stages))))


def test_a_progress_event_marks_each_tenth_of_a_stage(client, submit, pipeline):
    from service.jobs.pipeline import _ProgressWriter
    from service.store.models import JobEvent

    jid = submit()
    writer = _ProgressWriter(pipeline, pipeline._claim(uuid.UUID(jid), "validate", "t1"))
    for f in (0.05, 0.1, 0.15, 0.25, 0.3):
        writer.value = f
        writer.flush()
    with client.app.state.ctx.factory() as s:
        events = s.query(JobEvent).filter(JobEvent.job_id == uuid.UUID(jid),
                                          JobEvent.kind == "progress").order_by(JobEvent.id).all()
    assert [e.data["progress"] for e in events] == [0.1, 0.25]  # 0.1 exactly is a step


def test_the_next_to_last_stage_delivered_again_resends_the_last(client, submit, pipeline):
    jid = submit()
    stage = "validate"
    while stage != "evaluate":
        stage = pipeline.run(jid, stage, task_id=str(uuid.uuid4()))
    assert pipeline.step(jid, "export", task_id="again") == ["evaluate"]
    assert pipeline.run(jid, "evaluate", task_id="last") is None
    assert pipeline.step(jid, "evaluate", task_id="last-again") == []  # nothing follows the last


def test_a_running_stage_is_taken_over_exactly_when_its_lease_is_stale(client, submit, pipeline,
                                                                       monkeypatch):
    from datetime import timedelta

    from service.jobs import pipeline as pl

    jid = submit()
    pipeline._claim(uuid.UUID(jid), "validate", "first")
    with client.app.state.ctx.factory() as s:
        beat = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one().heartbeat_at
    stale = timedelta(seconds=pipeline.settings.stage_stale_after_s)
    monkeypatch.setattr(pl, "utcnow", lambda: beat + stale - timedelta(microseconds=1))
    assert isinstance(pipeline._claim(uuid.UUID(jid), "validate", "second"), pl._Skip)
    monkeypatch.setattr(pl, "utcnow", lambda: beat + stale)
    assert isinstance(pipeline._claim(uuid.UUID(jid), "validate", "second"), pl._Claim)


def test_a_stage_taken_over_from_a_lost_worker_starts_again_at_zero(client, submit, pipeline,
                                                                    monkeypatch):
    from datetime import timedelta

    from service.jobs import pipeline as pl

    jid = submit()
    pipeline._claim(uuid.UUID(jid), "validate", "first")
    with client.app.state.ctx.factory.begin() as s:  # the lost worker had got this far
        run = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one()
        run.progress, beat = 0.7, run.heartbeat_at
    monkeypatch.setattr(pl, "utcnow", lambda: beat + timedelta(
        seconds=pipeline.settings.stage_stale_after_s))
    assert isinstance(pipeline._claim(uuid.UUID(jid), "validate", "second"), pl._Claim)
    with client.app.state.ctx.factory() as s:
        run = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one()
    assert (run.task_id, run.attempts, run.progress) == ("second", 2, 0.0)


def test_the_methods_a_plan_or_a_method_releases_start_queued_at_zero(client, submit, pipeline):
    jid = _to_compare(pipeline, submit)
    factory = client.app.state.ctx.factory

    def released(by: str) -> dict[str, tuple]:
        sent = pipeline.step(jid, by, task_id=by)
        with factory() as s:
            rows = {r.name: r for r in s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid))}
        return {n: (rows[n].status, rows[n].attempts, rows[n].progress) for n in sent}

    fresh = (StageStatus.queued, 0, 0.0)
    assert released("compare") == {f"compare:{m}": fresh for m in ("dare", "at_fgsm",
                                                                   "at_pgd_online")}
    assert released("compare:dare") == {"compare:weight_noise": fresh}  # made from dare


def test_an_artifact_a_later_stage_rewrites_is_published_with_its_new_bytes(client, submit,
                                                                           pipeline):
    from service.store.models import Artifact

    jid = submit()
    art = pipeline.workdir(jid) / "artifacts"
    art.mkdir(parents=True)
    (art / "notes.txt").write_bytes(b"one")
    assert pipeline.run(jid, "validate", task_id="t1") == "slice"
    (art / "notes.txt").write_bytes(b"second!")  # the next stage writes it again
    assert pipeline.run(jid, "slice", task_id="t2") == "mine"
    with client.app.state.ctx.factory() as s:
        row = s.query(Artifact).filter(Artifact.job_id == uuid.UUID(jid)).one()
    assert (row.name, row.size, row.sha256) == ("notes.txt", 7,
                                                hashlib.sha256(b"second!").hexdigest())
    out = pipeline.workdir(jid) / "fetched"
    pipeline.store.fetch(row.uri, out)
    assert out.read_bytes() == b"second!"


def _claimed_method(client, submit, pipeline, method: str):
    jid = _to_compare(pipeline, submit)
    pipeline.step(jid, "compare", task_id="plan")
    return jid, pipeline._claim(uuid.UUID(jid), f"compare:{method}", f"{method}-task")


def test_a_method_that_ends_into_a_cancel_ends_the_job(client, submit, pipeline):
    jid, claim = _claimed_method(client, submit, pipeline, "dare")
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelling"
    assert pipeline._finish_part(claim, {"method": "dare"}, 0.1) == []
    assert _row(client, jid).status == "cancelled"
    with client.app.state.ctx.factory() as s:
        run = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid),
                                       StageRun.name == "compare:dare").one()
    assert run.status is StageStatus.cancelled


def test_a_method_that_lost_its_lease_leaves_a_running_job_running(client, submit, pipeline):
    jid, claim = _claimed_method(client, submit, pipeline, "dare")
    with client.app.state.ctx.factory.begin() as s:  # another message took the method over
        s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid),
                                 StageRun.name == "compare:dare").update({StageRun.task_id: "new"})
    assert pipeline._finish_part(claim, {"method": "dare"}, 0.1) == []
    assert _row(client, jid).status == "running"


def _while_locked(factory, jid: str, change, call):
    """Run ``call()`` in a thread while another transaction holds the job's row lock and has
    made ``change(session, job)``, not yet committed; commit once the thread waits on a lock (or
    has returned). What ``call`` returns, or raises, is the result."""
    from sqlalchemy import text

    out: list = []

    def target() -> None:
        try:
            out.append(("ok", call()))
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            out.append(("raised", e))

    with factory() as s:
        job = jobs.get_job(s, uuid.UUID(jid), for_update=True)
        change(s, job)
        s.flush()
        t = threading.Thread(target=target)
        t.start()
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                       " AND wait_event_type = 'Lock'")
        # the thread reaches its wait at once; the deadline is slack for a loaded machine
        deadline = time.monotonic() + 30
        while t.is_alive() and time.monotonic() < deadline:
            s.execute(text("SELECT pg_stat_clear_snapshot()"))  # else frozen for the transaction
            if s.scalar(waiting):
                break
            time.sleep(0.02)
        s.commit()
    t.join(timeout=30)
    assert not t.is_alive(), "the call did not return once the lock was released"
    kind, value = out[0]
    if kind == "raised":
        raise value
    return value


def test_a_stage_publishing_while_a_cancel_commits_is_cancelled_with_its_artifacts(
        client, submit, pipeline, monkeypatch):
    """The publish reads the job under its row lock: a cancel whose transaction is still open
    when the stage finishes wins, and what the stage had uploaded is removed."""
    from service.store.models import Artifact
    from service.store.storage import ArtifactNotFound

    jid = submit()
    claim = pipeline._claim(uuid.UUID(jid), "validate", "t1")
    art = pipeline.workdir(jid) / "artifacts"
    art.mkdir(parents=True)
    (art / "notes.txt").write_bytes(b"made by the stage")
    uploaded: list[str] = []
    put = pipeline.store.put
    monkeypatch.setattr(pipeline.store, "put",
                        lambda key, f, **kw: uploaded.append(put(key, f, **kw)) or uploaded[-1])
    sent = _while_locked(client.app.state.ctx.factory, jid,
                         lambda s, job: jobs.set_status(s, job, JobStatus.cancelling),
                         lambda: pipeline._finish(claim, {}, 0.1, pipeline.workdir(jid)))
    assert sent == [] and len(uploaded) == 1
    assert _row(client, jid).status == "cancelled"
    with client.app.state.ctx.factory() as s:
        assert s.query(Artifact).filter(Artifact.job_id == uuid.UUID(jid)).count() == 0
    with pytest.raises(ArtifactNotFound):  # the stored object went with its row
        pipeline.store.fetch(uploaded[0], pipeline.workdir(jid) / "gone")


def test_a_cancel_acknowledged_after_the_job_failed_meanwhile_changes_nothing(client, submit,
                                                                             pipeline):
    jid = submit()
    pipeline._claim(uuid.UUID(jid), "validate", "t1")
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelling"
    _while_locked(client.app.state.ctx.factory, jid,
                  lambda s, job: pipeline.fail_locked(s, job, "validate", "stage_failed", "boom"),
                  lambda: pipeline.mark_cancelled(uuid.UUID(jid), "validate"))
    job = _row(client, jid)
    assert (job.status, job.error_code) == ("failed", "stage_failed")


def test_a_stage_that_finishes_into_a_cancel_ends_it_and_publishes_nothing(client, submit,
                                                                          pipeline):
    from service.store.models import Artifact

    jid = submit()
    claim = pipeline._claim(uuid.UUID(jid), "validate", "t1")
    art = pipeline.workdir(jid) / "artifacts"
    art.mkdir(parents=True)
    (art / "notes.txt").write_bytes(b"made by the stage")
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelling"
    assert pipeline._finish(claim, {}, 0.1, pipeline.workdir(jid)) == []
    assert _row(client, jid).status == "cancelled"
    with client.app.state.ctx.factory() as s:
        run = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one()
        assert run.status is StageStatus.cancelled
        assert s.query(Artifact).filter(Artifact.job_id == uuid.UUID(jid)).count() == 0


def test_a_job_failed_before_it_had_a_work_directory_fails_cleanly_once(client, submit,
                                                                        pipeline):
    jid = submit()
    assert not pipeline.workdir(jid).exists()  # no stage has run: nothing to remove
    pipeline.fail(jid, "validate", "stage_failed", "the worker's failure hook")
    pipeline.fail(jid, "validate", "other", "called again")  # the job has ended: a no-op
    job = _row(client, jid)
    assert (job.status, job.error_code) == ("failed", "stage_failed")


def test_an_unreadable_report_leaves_the_result_without_its_figures(client, submit, pipeline,
                                                                    tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    jid = submit()
    (tmp_path / "artifacts").mkdir()
    report = tmp_path / "artifacts" / "report.json"
    report.write_text(json.dumps({"clean_accuracy": {"hardened": 0.9}}))
    read_text = Path.read_text

    def failing_disk(self, *a, **kw):
        if self == report:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", failing_disk)
    with client.app.state.ctx.factory() as s:
        result = pipeline.build_result(s, s.get(Job, uuid.UUID(jid)), tmp_path)
    assert set(result) == {"stage_durations_s", "artifacts"}


def test_a_failed_stage_is_marked_in_its_own_job_and_in_no_other(client, submit, pipeline):
    a, b = submit(), submit()
    for jid in (a, b):
        pipeline._claim(uuid.UUID(jid), "validate", f"{jid}-task")
    pipeline.fail(a, "validate", "stage_failed", "boom")
    with client.app.state.ctx.factory() as s:
        runs = {str(r.job_id): r.status
                for r in s.query(StageRun).filter(StageRun.name == "validate")}
    assert runs == {a: StageStatus.failed, b: StageStatus.running}
    assert (_row(client, a).status, _row(client, b).status) == ("failed", "running")


def test_the_result_times_only_its_own_jobs_stages(client, submit, pipeline, tmp_path):
    mine, other = submit(), submit()
    pipeline.run(mine, "validate", task_id="m1")
    stage = "validate"
    for _ in range(3):  # the other job gets further
        stage = pipeline.run(other, stage, task_id=str(uuid.uuid4()))
    with client.app.state.ctx.factory() as s:
        result = pipeline.build_result(s, s.get(Job, uuid.UUID(mine)), tmp_path)
    assert set(result["stage_durations_s"]) == {"validate"}


def _methods_running(client, submit, pipeline):
    """A compare job whose plan sent dare, at_fgsm and at_pgd_online (weight_noise waits for
    dare): dare has finished and at_fgsm is claimed. -> (job id, at_fgsm's progress writer)."""
    from service.jobs.pipeline import _ProgressWriter

    jid = _to_compare(pipeline, submit)
    pipeline.step(jid, "compare", task_id="plan")
    pipeline.step(jid, "compare:dare", task_id="dare")
    claim = pipeline._claim(uuid.UUID(jid), "compare:at_fgsm", "fgsm")
    return jid, _ProgressWriter(pipeline, claim)


def test_a_methods_progress_moves_compare_by_the_mean_over_every_planned_method(
        client, submit, pipeline):
    from service.jobs.pipeline import METHODS_SHARE

    t0 = time.monotonic()
    jid, writer = _methods_running(client, submit, pipeline)
    wall = time.monotonic() - t0
    writer.value = 0.5
    writer.flush()
    with client.app.state.ctx.factory() as s:
        dare = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid),
                                        StageRun.name == "compare:dare").one()
    assert (dare.status, dare.progress) == (StageStatus.succeeded, 1.0)
    assert 0 <= dare.duration_s <= wall
    job = _row(client, jid)
    assert job.stage_progress == METHODS_SHARE * (1.0 + 0.5) / 4  # 4 planned, 3 sent so far
    assert job.progress == overall_progress(job.stages, job.stages.index("compare"),
                                            job.stage_progress)


def test_an_engines_progress_is_read_between_zero_and_one(client, submit, pipeline):
    from service.jobs.pipeline import _ProgressWriter

    jid = submit()
    writer = _ProgressWriter(pipeline, pipeline._claim(uuid.UUID(jid), "validate", "t1"))
    writer(-0.5)
    assert writer.value == 0.0
    writer(1.5)
    writer.flush()
    with client.app.state.ctx.factory() as s:
        run = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one()
    assert run.progress == 1.0 and _row(client, jid).stage_progress == 1.0


def test_a_lost_progress_write_or_cancel_poll_does_not_fail_the_stage(client, submit, pipeline,
                                                                      monkeypatch):
    from sqlalchemy.exc import OperationalError

    from service.jobs import pipeline as pl

    jid = submit()
    writer = pl._ProgressWriter(pipeline, pipeline._claim(uuid.UUID(jid), "validate", "t1"))
    poll = pl._CancelPoller(pipeline, uuid.UUID(jid))

    def database_gone(factory):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(pl, "session_scope", database_gone)
    writer.value = 0.5
    writer.flush()  # logged, not raised
    assert poll() is False  # not cancelled as far as anyone can tell; asked again later


def test_compares_choice_gets_exactly_the_stage_attempts_of_its_own(client, submit, pipeline,
                                                                    monkeypatch):
    """The plan's claim of compare is not counted against the choice (its second claim): the
    choice may be taken over from lost workers until it has itself been claimed
    stage_max_attempts times."""
    from datetime import timedelta

    from service.jobs import pipeline as pl

    jid = _to_compare(pipeline, submit)
    pipeline.step(jid, "compare", task_id="plan")
    for m in METHODS:
        pipeline.step(jid, f"compare:{m}", task_id=m)
    pipeline.settings.stage_max_attempts = 2
    later, stale = pl.utcnow(), timedelta(seconds=pipeline.settings.stage_stale_after_s + 1)
    for k in range(2):  # each worker is lost: the next message takes the stale lease over
        later += stale
        monkeypatch.setattr(pl, "utcnow", lambda t=later: t)
        assert isinstance(pipeline._claim(uuid.UUID(jid), "compare", f"choice-{k}"), pl._Claim)
    later += stale
    monkeypatch.setattr(pl, "utcnow", lambda t=later: t)
    assert isinstance(pipeline._claim(uuid.UUID(jid), "compare", "choice-2"), pl._Skip)
    job = _row(client, jid)
    assert (job.status, job.error_code) == ("failed", "stage_attempts_exhausted")


def test_a_stage_fraction_outside_zero_to_one_counts_as_its_nearer_end():
    stages = ["validate", "slice", "mine", "tune", "export", "evaluate"]
    for i in range(len(stages)):
        assert overall_progress(stages, i, -0.5) == overall_progress(stages, i, 0.0)
        assert overall_progress(stages, i, 1.5) == overall_progress(stages, i, 1.0)


def test_compares_methods_move_it_only_part_way_the_choice_and_evaluation_are_the_rest(
        client, submit, pipeline):
    jid = _to_compare(pipeline, submit)
    pipeline.step(jid, "compare", task_id="plan")
    for m in ("dare", "at_fgsm", "at_pgd_online"):  # three of the four planned methods done
        pipeline.step(jid, f"compare:{m}", task_id=m)
    r = client.get(f"/v1/jobs/{jid}")
    assert r.status_code == 200, r.text
    stage = r.json()["stage"]
    assert stage["name"] == "compare" and 0 < stage["progress"] < 1
    job = _row(client, jid)
    assert job.progress < overall_progress(job.stages, job.stages.index("compare") + 1, 0.0)


def test_the_workers_pipeline_is_built_from_the_settings_it_is_given_or_the_environments(
        settings, monkeypatch):
    from service.jobs import pipeline as pl

    assert pl.pipeline_from_settings(settings).settings is settings
    monkeypatch.setattr(pl, "get_settings", lambda: settings)  # what the environment says
    assert pl.pipeline_from_settings().settings is settings  # the worker passes none


def test_a_stage_finished_twice_under_one_task_id_publishes_once(client, submit, pipeline):
    """A message redelivered with the same task id runs beside the first copy; whichever
    finishes second finds the stage no longer running and publishes nothing."""
    from service.store.models import JobEvent

    jid = submit()
    claim = pipeline._claim(uuid.UUID(jid), "validate", "same-task")
    workdir = pipeline.workdir(jid)
    (workdir / "artifacts").mkdir(parents=True)
    assert pipeline._finish(claim, {}, 0.1, workdir) == ["slice"]
    assert pipeline._finish(claim, {}, 0.2, workdir) == []
    with client.app.state.ctx.factory() as s:
        finished = s.query(JobEvent).filter(JobEvent.job_id == uuid.UUID(jid),
                                            JobEvent.kind == "stage_finished").count()
        run = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid),
                                       StageRun.name == "validate").one()
    assert (finished, run.duration_s) == (1, 0.1)


def test_a_stage_finishing_while_its_cancel_is_being_ended_leaves_it_to_that(client, submit,
                                                                            pipeline):
    """The job is cancelling; another transaction (the reconciler, say) is ending the cancel
    when the stage finishes: the stage re-reads the job under its lock and finds it done."""
    jid = submit()
    claim = pipeline._claim(uuid.UUID(jid), "validate", "t1")
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelling"
    sent = _while_locked(client.app.state.ctx.factory, jid,
                         lambda s, job: pipeline.cancel_locked(s, job, "validate"),
                         lambda: pipeline._finish(claim, {}, 0.1, pipeline.workdir(jid)))
    assert sent == [] and _row(client, jid).status == "cancelled"


def test_a_method_finishing_while_a_cancel_commits_ends_the_job(client, submit, pipeline):
    jid, claim = _claimed_method(client, submit, pipeline, "dare")
    sent = _while_locked(client.app.state.ctx.factory, jid,
                         lambda s, job: jobs.set_status(s, job, JobStatus.cancelling),
                         lambda: pipeline._finish_part(claim, {"method": "dare"}, 0.1))
    assert sent == [] and _row(client, jid).status == "cancelled"


def test_one_failed_heartbeat_does_not_stop_the_renewals(client, submit, pipeline,
                                                         monkeypatch):
    from sqlalchemy.exc import OperationalError

    from service.jobs import pipeline as pl

    pipeline.settings.heartbeat_interval_s = 0.05
    jid = submit()
    claim = pipeline._claim(uuid.UUID(jid), "validate", "t1")
    factory = client.app.state.ctx.factory
    with factory() as s:
        first = s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one().heartbeat_at
    calls = []
    scope = pl.session_scope

    def flaky(f):  # the database is away for the first renewal only
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("UPDATE stage_runs", {}, Exception("connection reset"))
        return scope(f)

    monkeypatch.setattr(pl, "session_scope", flaky)
    with _Heartbeat(pipeline, claim) as hb:
        time.sleep(0.6)
        assert hb._thread.is_alive() and len(calls) > 2
    with factory() as s:
        assert s.query(StageRun).filter(StageRun.job_id == uuid.UUID(jid)).one().heartbeat_at \
            > first


def test_the_one_chain_driver_refuses_a_fan_out_of_two(client, submit, pipeline):
    jid = _to_compare(pipeline, submit,
                      {"compare": True, "selection": {"methods": ["dare", "at_fgsm"]}})
    with pytest.raises(ValueError, match="fanned out"):
        pipeline.run(jid, "compare", task_id="plan")


def test_compares_progress_does_not_go_back_when_a_method_finishes(client, submit, pipeline):
    """Running methods' progress counts towards compare's; a method that finishes counts as one
    done method, which may be less than the progress already shown: the larger one stays."""
    from service.jobs.pipeline import _ProgressWriter

    jid, fgsm = _methods_running(client, submit, pipeline)  # dare is done
    pgd = pipeline._claim(uuid.UUID(jid), "compare:at_pgd_online", "pgd")
    for writer in (fgsm, _ProgressWriter(pipeline, pgd)):
        writer.value = 0.9
        writer.flush()
    shown = _row(client, jid).stage_progress  # (1 + 0.9 + 0.9) of 4 methods' share
    pipeline._finish_part(pgd, {"method": "at_pgd_online"}, 0.1)  # two of four done
    assert _row(client, jid).stage_progress == shown


def test_each_release_of_methods_is_one_event_naming_them(client, submit, pipeline):
    from service.store.models import JobEvent

    jid = _to_compare(pipeline, submit)
    for name in ("compare", "compare:at_fgsm", "compare:dare"):  # at_fgsm releases nothing
        pipeline.step(jid, name, task_id=name)
    with client.app.state.ctx.factory() as s:
        events = s.query(JobEvent).filter(JobEvent.job_id == uuid.UUID(jid),
                                          JobEvent.kind == "methods_sent").order_by(JobEvent.id)
        sent = [e.data["methods"] for e in events]
    assert sent == [["dare", "at_fgsm", "at_pgd_online"], ["weight_noise"]]


def test_an_object_that_cannot_be_deleted_does_not_stop_the_others():
    from service.jobs.pipeline import delete_objects

    deleted = []

    class Store:
        def delete(self, uri: str) -> None:
            if uri == "bad":
                raise OSError(5, "Input/output error")
            deleted.append(uri)

    delete_objects(Store(), ["a", "bad", "b", "a"])
    assert deleted == ["a", "b"]  # each once, and past the failure


def test_progress_is_written_once_a_full_interval_has_passed(client, submit, pipeline,
                                                             monkeypatch):
    from service.jobs import pipeline as pl

    pipeline.settings.progress_interval_s = 0.25
    clock = types.SimpleNamespace(now=1.0)
    monkeypatch.setattr(pl, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    jid = submit()
    writer = pl._ProgressWriter(pipeline, pipeline._claim(uuid.UUID(jid), "validate", "t1"))
    writes = []
    monkeypatch.setattr(writer, "flush", lambda: writes.append(writer.value))
    clock.now = 1.125
    writer(0.1)
    clock.now = 1.25  # exactly one interval after the writer started
    writer(0.2)
    assert writes == [0.2]


def test_a_single_methods_progress_is_all_of_the_methods_share(client, submit, pipeline):
    from service.jobs.pipeline import METHODS_SHARE, _ProgressWriter

    jid = _to_compare(pipeline, submit,
                      {"compare": True, "selection": {"methods": ["at_fgsm"]}})
    assert pipeline.step(jid, "compare", task_id="plan") == ["compare:at_fgsm"]
    writer = _ProgressWriter(pipeline, pipeline._claim(uuid.UUID(jid), "compare:at_fgsm", "m"))
    writer.value = 0.5
    writer.flush()
    assert _row(client, jid).stage_progress == METHODS_SHARE * 0.5
