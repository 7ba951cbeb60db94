"""What is left behind: a job's work directory goes when the job ends (succeeded, failed,
cancelled) and not before; staging folders whose request died are swept at start-up (a real
process killed with SIGKILL); finished jobs past DARE_RETENTION_DAYS lose their inputs and
artifacts to the reconciler, keep their row, and answer 410 for a download."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from service.api.staging import OWNER_FILE, StagingLock, sweep
from service.jobs import records as jobs
from service.jobs.pipeline import Pipeline
from service.jobs.reconciler import reconcile_once
from service.states import JobStatus, transition, utcnow
from service.store.models import Artifact, Job, JobInput

from . import fake_engine
from .conftest import REPO, RecordingDispatcher, run_all_stages


def _pipeline(client) -> Pipeline:  # noqa: ANN001
    ctx = client.app.state.ctx
    return Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)


def _status(client, jid: str) -> str:  # noqa: ANN001
    return client.get(f"/v1/jobs/{jid}").json()["status"]


# --- work directories -----------------------------------------------------------------------

def test_workdir_stays_between_stages_and_goes_when_the_job_succeeds(client, submit):
    p = _pipeline(client)
    jid = submit()
    assert p.run(jid, "validate", "t1") == "slice"
    assert p.workdir(jid).is_dir()  # later stages read what earlier ones left
    # a message the job cannot use ends nothing: the directory stays
    assert p.run(jid, "no-such-stage", "t2") is None
    assert p.workdir(jid).is_dir()
    stage = "slice"
    while stage:
        stage = p.run(jid, stage, task_id=str(uuid.uuid4()))
    assert _status(client, jid) == "succeeded"
    assert not p.workdir(jid).exists()


def test_workdir_goes_when_the_job_fails(client, submit):
    p = _pipeline(client)
    jid = submit(json.dumps({"seed": fake_engine.FAIL_INPUT_SEED}))
    stage, seen = "validate", False
    while stage:
        stage = p.run(jid, stage, task_id=str(uuid.uuid4()))
        seen = seen or p.workdir(jid).is_dir()
    assert seen and _status(client, jid) == "failed"
    assert not p.workdir(jid).exists()


def test_workdir_goes_when_the_worker_reports_a_failure(client, submit):
    """The Celery task's failure hook (a hard time limit) calls Pipeline.fail."""
    p = _pipeline(client)
    jid = submit()
    assert p.run(jid, "validate", "t1") == "slice"
    assert p.workdir(jid).is_dir()
    p.fail(jid, "slice", "stage_timeout", "killed at the hard time limit (test)")
    assert _status(client, jid) == "failed"
    assert not p.workdir(jid).exists()


def test_workdir_goes_when_the_job_is_cancelled_between_stages(client, submit):
    p = _pipeline(client)
    jid = submit()
    assert p.run(jid, "validate", "t1") == "slice"
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelling"
    assert p.workdir(jid).is_dir()
    assert p.run(jid, "slice", "t2") is None  # the claim sees the cancel
    assert _status(client, jid) == "cancelled"
    assert not p.workdir(jid).exists()


def test_workdir_goes_when_the_engine_stops_on_a_cancel(client, submit):
    p = _pipeline(client)
    jid = submit()
    assert p.run(jid, "validate", "t1") == "slice"
    ctx = client.app.state.ctx
    with ctx.factory.begin() as s:
        transition(jobs.get_job(s, uuid.UUID(jid), for_update=True), JobStatus.cancelling)
    assert p.run(jid, "slice", "t2") is None  # fake engine polls cancelled() and stops
    assert _status(client, jid) == "cancelled"
    assert not p.workdir(jid).exists()


# --- staging --------------------------------------------------------------------------------

def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_sweep_removes_what_no_living_request_owns(tmp_path):
    root = tmp_path / "uploads"
    orphan = root / "orphan"
    (orphan / "inputs").mkdir(parents=True)
    (orphan / "inputs" / "model.onnx").write_bytes(b"x")
    (orphan / OWNER_FILE).write_bytes(b"")  # its owner died: nobody holds the lock
    owned = StagingLock(root / "owned")  # a request of this process, still uploading
    fresh = root / "fresh"  # just created, maybe not locked yet
    fresh.mkdir()
    for p in (orphan, owned.folder):
        _age(p, 600)
    assert sweep(root) == 1
    assert sorted(p.name for p in root.iterdir()) == ["fresh", "owned"]
    owned.release()
    _age(owned.folder, 600)
    _age(fresh, 600)
    assert sweep(root) == 2 and list(root.iterdir()) == []


def test_staging_of_a_killed_process_is_swept_at_start_up(settings, dispatcher):
    """A real process stages (and locks) a folder and is killed with SIGKILL: while it lives
    the sweep keeps the folder, after the kill the API's start-up removes it."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    root = settings.upload_tmp_dir
    folder = root / str(uuid.uuid4())
    code = ("import sys, time; from pathlib import Path; from service.api.staging import StagingLock; "
            "StagingLock(Path(sys.argv[1])); (Path(sys.argv[1]) / 'inputs').mkdir(); "
            "print('staged', flush=True); time.sleep(300)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == b"staged"
        _age(folder, 600)
        assert sweep(root) == 0 and folder.is_dir()  # alive: its lock is held
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    app = create_app(settings, dispatcher=dispatcher)
    assert folder.is_dir()
    with TestClient(app):  # the lifespan runs the sweep
        assert not folder.exists()
    app.state.ctx.engine.dispose()


# --- retention ------------------------------------------------------------------------------

def _backdate(client, jid: str, days: float) -> None:  # noqa: ANN001
    ctx = client.app.state.ctx
    with ctx.factory.begin() as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(jid))
                  .values(finished_at=utcnow() - timedelta(days=days)))


def _counts(client, jid: str) -> tuple[int, int]:  # noqa: ANN001
    ctx = client.app.state.ctx
    with ctx.factory() as s:
        j = uuid.UUID(jid)
        return (s.scalar(select(func.count()).select_from(JobInput).where(JobInput.job_id == j)),
                s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == j)))


def _files(settings, jid: str) -> list[str]:  # noqa: ANN001
    d = settings.artifact_root / "jobs" / jid
    return sorted(p.name for p in d.rglob("*") if p.is_file()) if d.exists() else []


def test_retention_expires_old_finished_jobs_only(client, submit, settings):
    ctx = client.app.state.ctx
    old, recent, active = submit(), submit(), submit()
    run_all_stages(client, old)
    run_all_stages(client, recent)
    assert _status(client, old) == "succeeded"
    assert "report.json" in _files(settings, old) and "model.onnx" in _files(settings, old)
    _backdate(client, old, settings.retention_days + 1)
    _backdate(client, recent, settings.retention_days - 1)
    with ctx.factory.begin() as s:  # an active job is never expired, however old
        s.execute(update(Job).where(Job.id == uuid.UUID(active))
                  .values(created_at=utcnow() - timedelta(days=365)))

    counts = reconcile_once(settings, ctx.factory, RecordingDispatcher(), ctx.store)
    assert counts.get("expired") == 1, counts
    assert _files(settings, old) == [] and _counts(client, old) == (0, 0)
    assert _files(settings, recent) and _counts(client, recent) != (0, 0)
    assert _files(settings, active) and _counts(client, active)[0] == 3 - 1  # model, history

    job = client.get(f"/v1/jobs/{old}").json()  # the row stays
    assert job["status"] == "succeeded" and job["inputs"] == []
    events = client.get(f"/v1/jobs/{old}/events").json()["items"]
    expired = [e for e in events if e["kind"] == "expired"]
    assert len(expired) == 1 and expired[0]["data"]["artifacts_removed"] > 0
    assert expired[0]["data"]["inputs_removed"] == 2
    r = client.get(f"/v1/jobs/{old}/artifacts/report.json")
    assert r.status_code == 410 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "artifact_expired" and "DARE_RETENTION_DAYS" in body["detail"]
    assert "Fix:" in body["detail"]
    assert client.get(f"/v1/jobs/{recent}/artifacts/report.json").status_code == 200
    # a second pass has nothing left to do
    counts = reconcile_once(settings, ctx.factory, RecordingDispatcher(), ctx.store)
    assert "expired" not in counts, counts


def test_retention_zero_keeps_everything(client, submit, settings):
    ctx = client.app.state.ctx
    jid = submit()
    run_all_stages(client, jid)
    _backdate(client, jid, 10_000)
    forever = settings.model_copy(update={"retention_days": 0})
    assert "expired" not in reconcile_once(forever, ctx.factory, RecordingDispatcher(), ctx.store)
    assert _files(settings, jid) and client.get(
        f"/v1/jobs/{jid}/artifacts/report.json").status_code == 200


def test_a_failed_or_cancelled_job_expires_too(client, submit, settings):
    ctx = client.app.state.ctx
    cancelled = submit()
    assert client.post(f"/v1/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
    _backdate(client, cancelled, settings.retention_days + 1)
    assert _files(settings, cancelled)  # a cancel unpublishes artifacts, not the inputs
    counts = reconcile_once(settings, ctx.factory, RecordingDispatcher(), ctx.store)
    assert counts.get("expired") == 1
    assert _files(settings, cancelled) == [] and _counts(client, cancelled) == (0, 0)
