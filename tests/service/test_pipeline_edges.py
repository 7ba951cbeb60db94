"""The stage runner at its edges, in-process against PostgreSQL: progress between two stages,
the result's count of sanity checks, which artifacts a re-run publishes again, and the lease's
heartbeat thread (it keeps renewing while the stage is ours and stops once it is not)."""
from __future__ import annotations

import hashlib
import json
import time
import types
import uuid

from service.jobs import records as jobs
from service.jobs.pipeline import _Claim, _Heartbeat, overall_progress
from service.states import StageStatus
from service.store.models import Job, StageRun

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


def test_a_succeeded_job_reads_one(client, submit, pipeline):
    jid = submit()
    stage = "validate"
    while stage:
        stage = pipeline.run(jid, stage, task_id=str(uuid.uuid4()))
    job = _row(client, jid)
    assert (job.status, job.progress, job.stage_progress) == ("succeeded", 1.0, 1.0)


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
