"""Running one stage of one job against the database: the work behind each Celery task.

``Pipeline.run(job_id, stage, task_id)`` claims the stage (skipping it when a redelivered
message finds it done or still running elsewhere), runs the engine's stage in the job's work
directory, registers the artifacts it wrote, records the outcome, and returns the stage to
enqueue next, which the caller sends only after this function has committed. No Celery here.

Progress reaches the database at most once per ``progress_interval_s``; the cancel flag is read
from the database at most once per ``cancel_poll_interval_s`` (the engine polls it between
batches). While a stage runs, a heartbeat thread renews its lease (``stage_runs.heartbeat_at``)
every ``heartbeat_interval_s`` whatever the engine does; a lease older than
``stage_stale_after_s`` means the worker is gone, and ``service.jobs.reconciler`` re-sends the stage.

A cancelled job publishes nothing: becoming cancelled deletes its artifact rows and, after the
commit, their stored objects; a stage that ends after the cancel registers nothing.

``compare`` fans out: its first message runs the engine's plan (``compare.plan``) and parks the
stage as ``waiting``; each method then runs as its own message and ``stage_runs`` row
(``compare:<method>``), with its own claim, lease, heartbeat, attempts and progress, so a method
whose worker dies is re-sent alone. Under the job's row lock, each method that finishes releases
the methods made from it, and the last one puts ``compare`` back to ``queued`` and sends it
again: that message runs the choice and the evaluation (``run_stage("compare")``, which finds
every method done) and the chain goes on.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.jobs import mlflow_log
from service.jobs import records as jobs
from service.logs import log_context
from service.settings import Settings, get_settings
from service.states import JobStatus, StageStatus, utcnow
from service.store.db import engine_for, session_factory, session_scope
from service.store.models import Artifact, Job, StageRun
from service.store.storage import ArtifactStore, artifact_key, store_from_settings

log = logging.getLogger("dare.pipeline")

# Rough relative cost of each stage, for the overall progress figure.
STAGE_WEIGHTS = {"validate": 1, "slice": 2, "mine": 2, "tune": 4, "export": 1, "evaluate": 8,
                 "compare": 30}
MEDIA_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8",
               ".onnx": "application/octet-stream", ".pt2": "application/zip",
               ".safetensors": "application/octet-stream", ".png": "image/png",
               ".csv": "text/csv"}
PROGRESS_EVENT_STEP = 0.1  # a progress event each time a stage advances this much
PURGE_KEY = "dare.purge_uris"  # Session.info: stored objects to delete once the session commits
FANOUT_STAGE = "compare"  # the stage whose methods run as their own messages
PLAN_RUN = "compare.plan"  # worker.engine.stages.PLAN: the engine's name for compare's first part
METHODS_SHARE = 0.5  # of compare's progress: its methods; the choice and evaluation are the rest
ACTIVE_RUN = (StageStatus.running, StageStatus.queued, StageStatus.waiting)

StageRunner = Callable[[str, Any], dict]


def overall_progress(stages: list[str], index: int, stage_progress: float) -> float:
    w = [STAGE_WEIGHTS.get(s, 1) for s in stages]
    done = sum(w[:index]) + w[index] * min(1.0, max(0.0, stage_progress))
    return min(1.0, done / sum(w))


def load_runner(dotted: str) -> StageRunner:
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_device(job_device: str, worker_device: str) -> str:
    """CUDA when asked for or, on "auto", when present. Called inside the task (the pool child),
    so the parent process never initialises CUDA."""
    from worker.engine.errors import InputError

    want = job_device if job_device != "auto" else worker_device
    if want == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if want == "cuda":
        raise InputError("cuda_unavailable", "the job asks for device 'cuda' but this worker has "
                         "no GPU", 'set "device": "auto" or "cpu" in the config')
    return "cpu"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str)) if obj is not None else None


def part_name(stage: str, method: str) -> str:
    """The ``stage_runs`` row (and message) of one method of a fanned-out stage."""
    return f"{stage}:{method}"


@dataclass
class _Claim:
    job_id: uuid.UUID
    stage: str
    index: int
    stages: list[str]
    config: dict[str, Any]
    inputs: list[tuple[str, str]]  # (canonical file name, uri)
    task_id: str | None = None  # the message that holds the lease
    name: str = ""  # the stage_runs row: the stage, or "compare:<method>"
    kind: str = "stage"  # stage | plan (compare's first message) | method | select (its last)
    planned: int = 0  # kind method: how many methods the plan has (for the stage's progress)

    def __post_init__(self) -> None:
        self.name = self.name or self.stage

    @property
    def runner_name(self) -> str:
        """What the engine runs: the stage, compare's plan, or one method (its row's name)."""
        return PLAN_RUN if self.kind == "plan" else self.name


@dataclass
class _Skip:
    messages: list[str] = field(default_factory=list)


class Pipeline:
    def __init__(self, settings: Settings, factory: sessionmaker[Session], store: ArtifactStore,
                 runner: StageRunner | None = None,
                 timeout_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.settings = settings
        self.factory = factory
        self.store = store
        self._runner = runner
        self.timeout_errors = timeout_errors
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}"

    @property
    def runner(self) -> StageRunner:
        if self._runner is None:
            self._runner = load_runner(self.settings.stage_runner)
        return self._runner

    def workdir(self, job_id: uuid.UUID | str) -> Path:
        return self.settings.work_dir / "jobs" / str(job_id)

    # --- the whole step -------------------------------------------------------------------

    def step(self, job_id: str, name: str, task_id: str | None = None) -> list[str]:
        """Run ``name`` of ``job_id`` (a stage, or ``compare:<method>``); return the messages to
        send next (already committed): none, the next stage, or the methods a fan-out releases."""
        try:
            jid = uuid.UUID(str(job_id))
        except ValueError:
            log.error("dropping a message with a bad job id %r", job_id)
            return []
        with log_context(job_id=jid, stage=name):  # every log line below carries both
            claim = self._claim(jid, name, task_id)
            if isinstance(claim, _Skip):
                return self._after_step(jid, claim.messages)
            log.info("job %s: %s started (attempt by %s)", jid, name, self.worker_name)
            # The lease is renewed from the claim to the commit: downloads, the engine, uploads.
            with _Heartbeat(self, claim):
                nxt = self._execute(claim)
            return self._after_step(jid, nxt)

    def run(self, job_id: str, stage: str, task_id: str | None = None) -> str | None:
        """:meth:`step` for a driver that follows one chain: the one message to send next, or
        None. A step that fans out sends several; only :meth:`step` returns those."""
        nxt = self.step(job_id, stage, task_id)
        if len(nxt) > 1:
            raise ValueError(f"{stage} fanned out into {nxt}: drive this job with Pipeline.step")
        return nxt[0] if nxt else None

    def _after_step(self, job_id: uuid.UUID, messages: list[str]) -> list[str]:
        """Pass ``messages`` through; when there are none and the job has ended (succeeded,
        failed, cancelled), remove its work directory here."""
        if not messages and self.workdir(job_id).exists():
            with session_scope(self.factory) as s:
                status = s.scalar(select(Job.status).where(Job.id == job_id))
            if status is None or JobStatus(status).is_terminal():
                self.remove_workdir(job_id)
        return messages

    def remove_workdir(self, job_id: uuid.UUID | str) -> None:
        """A job's work directory is scratch: its inputs and artifacts are in the store. Only
        once the job has ended: a later stage reads what earlier ones left there."""
        shutil.rmtree(self.workdir(job_id), ignore_errors=True)

    def _execute(self, claim: _Claim) -> list[str]:
        from worker.engine.config import HardenConfig
        from worker.engine.errors import Cancelled, InputError
        from worker.engine.stages import StageContext

        workdir = self.workdir(claim.job_id)
        t0 = time.monotonic()
        progress = _ProgressWriter(self, claim)
        try:
            self._materialize(claim, workdir)
            config = HardenConfig.model_validate(claim.config)
            device = resolve_device(config.device, self.settings.device)
            with session_scope(self.factory) as s:
                s.execute(update(StageRun).where(StageRun.job_id == claim.job_id,
                                                 StageRun.name == claim.name).values(device=device))
            ctx = StageContext(workdir=workdir, config=config, progress=progress,
                               cancelled=_CancelPoller(self, claim.job_id), device=device)
            summary = self.runner(claim.runner_name, ctx)
        except Cancelled:
            self.mark_cancelled(claim.job_id, claim.name)
            return []
        except InputError as e:
            msg = f"{e.message}. Fix: {e.hint}" if e.hint else e.message
            self.fail(claim.job_id, claim.name, e.code, msg)
            return []
        except self.timeout_errors:
            self.fail(claim.job_id, claim.name, "stage_timeout",
                      f"the {claim.name} stage ran past its time limit of "
                      f"{self.settings.stage_soft_time_limit_s} s; use a smaller config (fewer "
                      "evaluation samples or tuning epochs) or raise DARE_STAGE_SOFT_TIME_LIMIT_S")
            return []
        except Exception:
            log.exception("job %s: stage %s failed", claim.job_id, claim.name)
            self.fail(claim.job_id, claim.name, "internal_error",
                      f"the {claim.name} stage failed unexpectedly; the worker log has the details "
                      f"(job {claim.job_id}). Retry, or report it with the job id.")
            return []
        if claim.kind in ("plan", "method"):
            return self._finish_part(claim, summary, time.monotonic() - t0)
        return self._finish(claim, summary, time.monotonic() - t0, workdir)

    # --- claim ----------------------------------------------------------------------------

    # Test seam: called with (job id, stage) once the claim has read the job, before it writes
    # anything, so a test can land a cancel exactly there (tests/service/test_sqlite_atomic.py).
    after_claim_read: Callable[[uuid.UUID, str], None] | None = None

    def _claim(self, jid: uuid.UUID, name: str, task_id: str | None) -> _Claim | _Skip:
        # The read below holds the job until the commit: a row lock on PostgreSQL, the write
        # lock taken by BEGIN IMMEDIATE on SQLite (service.store.db). A cancel waits for the claim
        # and then sees "running", or commits first and the claim sees "cancelled".
        with self.transaction() as s:
            job = s.scalars(select(Job).where(Job.id == jid).with_for_update()).one_or_none()
            if job is None:
                log.warning("dropping stage %s of unknown job %s", name, jid)
                return _Skip()
            if self.after_claim_read is not None:
                self.after_claim_read(jid, name)
            status = JobStatus(job.status)
            if status.is_terminal():
                return _Skip()
            stage, _, method = name.partition(":")
            if stage not in job.stages:
                log.error("job %s has no stage %r", jid, stage)
                return _Skip()
            if status is JobStatus.cancelling:
                self.cancel_locked(s, job, name)
                return _Skip()
            index = job.stages.index(stage)
            kind, planned = "stage", 0
            if method:
                run = self._find_run(s, job.id, name)
                if run is None:
                    log.error("job %s: %s was never planned; dropping it", jid, name)
                    return _Skip()
                kind, planned = "method", len(self._plan(s, job.id, stage)["methods"])
            else:
                run = self._stage_run(s, job, stage, index)
                if run.status is StageStatus.waiting:
                    return _Skip()  # its methods run: the last one to finish sends it again
                if stage == FANOUT_STAGE:
                    kind = "select" if (run.summary or {}).get("plan") is not None else "plan"
            now = utcnow()
            if run.status is StageStatus.succeeded:
                if method:  # whoever finished it sent what follows (or the reconciler will)
                    return _Skip()
                # Delivered again after it finished (the worker died before acking): make sure
                # the chain goes on, unless the next stage has been claimed already.
                nxt = job.stages[index + 1] if index + 1 < len(job.stages) else None
                if nxt is not None:
                    nrun = self._stage_run(s, job, nxt, index + 1)
                    if nrun.status is StageStatus.queued and nrun.attempts == 0:
                        return _Skip([nxt])
                return _Skip()
            if run.status is StageStatus.running and run.task_id != task_id and run.heartbeat_at \
                    and now - run.heartbeat_at < timedelta(seconds=self.settings.stage_stale_after_s):
                log.info("job %s: %s is running elsewhere (%s); dropping a duplicate",
                         jid, name, run.worker)
                return _Skip()
            if run.status in (StageStatus.failed, StageStatus.cancelled):
                return _Skip()
            if run.attempts >= self.settings.stage_max_attempts:
                self.fail_locked(s, job, name, "stage_attempts_exhausted",
                                  f"the {name} stage was started {run.attempts} times without "
                                  "finishing (its worker was lost: out of memory, killed, or past "
                                  "the hard time limit); use a smaller config or a bigger worker")
                return _Skip()
            run.status = StageStatus.running
            run.attempts += 1
            run.task_id = task_id
            run.worker = self.worker_name
            run.started_at = run.heartbeat_at = now
            run.progress = 0.0
            if status is JobStatus.queued:
                jobs.set_status(s, job, JobStatus.running, now=now)
            job.stage_name, job.stage_index = stage, index
            if kind in ("stage", "plan"):
                job.stage_progress = 0.0
                job.progress = overall_progress(job.stages, index, 0.0)
            job.updated_at = now
            event = {"stage": "stage_started", "plan": "stage_started", "method": "method_started",
                     "select": "stage_resumed"}[kind]
            jobs.add_event(s, jid, event, name,
                           {"index": index, "attempt": run.attempts, "worker": self.worker_name})
            return _Claim(job_id=jid, stage=stage, index=index, stages=list(job.stages),
                          config=dict(job.config),
                          inputs=[(i.uri.rsplit("/", 1)[-1], i.uri) for i in job.inputs],
                          task_id=task_id, name=name, kind=kind, planned=planned)

    @staticmethod
    def _stage_run(s: Session, job: Job, stage: str, index: int) -> StageRun:
        run = s.scalars(select(StageRun).where(StageRun.job_id == job.id,
                                               StageRun.name == stage)).one_or_none()
        if run is None:
            run = StageRun(job_id=job.id, name=stage, index=index, status=StageStatus.queued,
                           attempts=0, progress=0.0)
            s.add(run)
            s.flush()
        return run

    @staticmethod
    def _find_run(s: Session, job_id: uuid.UUID, name: str) -> StageRun | None:
        return s.scalars(select(StageRun).where(StageRun.job_id == job_id,
                                                StageRun.name == name)).one_or_none()

    @staticmethod
    def _plan(s: Session, job_id: uuid.UUID, stage: str) -> dict[str, Any]:
        """The engine's plan of a fanned-out stage, as its first message recorded it."""
        summary = s.scalar(select(StageRun.summary).where(StageRun.job_id == job_id,
                                                          StageRun.name == stage)) or {}
        return summary.get("plan") or {"methods": [], "needs": {}}

    def _materialize(self, claim: _Claim, workdir: Path) -> None:
        """The engine reads ``inputs/`` in its work directory: fetch what is not there yet."""
        for name, uri in claim.inputs:
            dest = workdir / "inputs" / name
            if not dest.exists():
                self.store.fetch(uri, dest)
        (workdir / "artifacts").mkdir(parents=True, exist_ok=True)

    # --- finish ---------------------------------------------------------------------------

    def _collect_artifacts(self, claim: _Claim, workdir: Path) -> list[dict[str, Any]]:
        with session_scope(self.factory) as s:
            known = {a.name: a.sha256 for a in jobs.list_artifacts(s, claim.job_id)}
        out = []
        adir = workdir / "artifacts"
        for f in sorted(adir.iterdir()) if adir.is_dir() else []:
            if not f.is_file() or f.name.startswith("."):
                continue
            sha = file_sha256(f)
            if known.get(f.name) == sha:
                continue
            uri = self.store.put(artifact_key(claim.job_id, f.name), f)
            out.append({"name": f.name, "uri": uri, "size": f.stat().st_size, "sha256": sha,
                        "media_type": MEDIA_TYPES.get(f.suffix, "application/octet-stream")})
        return out

    def _still_ours(self, s: Session, job: Job, claim: _Claim) -> bool:
        """Whether this stage may still publish: the job goes on and our message holds the lease
        (a worker that stalled past it and was replaced must not overwrite the new one's work)."""
        if JobStatus(job.status) is not JobStatus.running:
            return False
        run = self._find_run(s, job.id, claim.name)
        if run is None or run.status is not StageStatus.running or run.task_id != claim.task_id:
            log.warning("job %s: %s lost its lease to %s; its result is dropped",
                        job.id, claim.name, run.worker if run is not None else None)
            return False
        return True

    def _finish(self, claim: _Claim, summary: Any, duration: float, workdir: Path) -> list[str]:
        with self.transaction() as s:  # cheap check first: cancelled jobs upload nothing
            job = jobs.get_job(s, claim.job_id)
            if JobStatus(job.status) is JobStatus.cancelling:
                job = jobs.get_job(s, claim.job_id, for_update=True)
                if JobStatus(job.status) is JobStatus.cancelling:
                    self.cancel_locked(s, job, claim.stage)
                return []
            if not self._still_ours(s, job, claim):
                return []
        new_artifacts = self._collect_artifacts(claim, workdir)
        with self.transaction() as s:
            job = jobs.get_job(s, claim.job_id, for_update=True)
            if not self._still_ours(s, job, claim):
                if JobStatus(job.status) is JobStatus.cancelling:  # the cancel came meanwhile
                    s.info.setdefault(PURGE_KEY, []).extend(a["uri"] for a in new_artifacts)
                    self.cancel_locked(s, job, claim.stage)
                return []
            for a in new_artifacts:
                row = jobs.get_artifact(s, claim.job_id, a["name"])
                if row is None:
                    s.add(Artifact(job_id=claim.job_id, stage=claim.stage, created_at=utcnow(), **a))
                else:
                    for k, v in a.items():
                        setattr(row, k, v)
            run = self._stage_run(s, job, claim.stage, claim.index)
            now = utcnow()
            run.status, run.progress, run.finished_at, run.heartbeat_at = \
                StageStatus.succeeded, 1.0, now, now
            run.duration_s = round(duration, 3)
            run.summary = _json_safe(summary if isinstance(summary, dict) else {"value": summary})
            jobs.add_event(s, job.id, "stage_finished", claim.stage,
                           {"duration_s": run.duration_s,
                            "artifacts": [a["name"] for a in new_artifacts]})
            last = claim.index + 1 == len(claim.stages)
            if last:
                job.result = self.build_result(s, job, workdir)
                job.stage_progress, job.progress = 1.0, 1.0
                jobs.set_status(s, job, JobStatus.succeeded, now=now)
                jobs.add_event(s, job.id, "succeeded")
            else:
                nxt = claim.stages[claim.index + 1]
                self._stage_run(s, job, nxt, claim.index + 1)
                job.stage_progress = 1.0
                job.progress = overall_progress(claim.stages, claim.index, 1.0)
                job.updated_at = now
                return [nxt]
        # Committed: the job has succeeded whatever happens below.
        mlflow_log.log_job(self.settings, self.factory, claim.job_id, workdir / "artifacts")
        return []

    def _finish_part(self, claim: _Claim, summary: Any, duration: float) -> list[str]:
        """Record compare's plan (the stage waits for its methods) or one method, and release
        what is now ready: the methods whose every input method is done, or, once every method
        is, the stage itself again. Under the job's row lock, so of two methods finishing at
        once exactly one sees the last one done."""
        with self.transaction() as s:
            job = jobs.get_job(s, claim.job_id, for_update=True)
            if not self._still_ours(s, job, claim):
                if JobStatus(job.status) is JobStatus.cancelling:
                    self.cancel_locked(s, job, claim.name)
                return []
            run = self._find_run(s, job.id, claim.name)
            now = utcnow()
            run.finished_at = run.heartbeat_at = now
            run.duration_s = round(duration, 3)
            stage_run = self._stage_run(s, job, claim.stage, claim.index)
            if claim.kind == "plan":
                plan = {"methods": list(summary["methods"]), "needs": dict(summary["needs"])}
                run.status, run.progress, run.attempts = StageStatus.waiting, 0.0, 0
                run.summary = {"plan": plan}  # the next claim of this stage is the choice
            else:
                plan = self._plan(s, job.id, claim.stage)
                run.status, run.progress = StageStatus.succeeded, 1.0
                run.summary = _json_safe(summary)
                jobs.add_event(s, job.id, "method_finished", claim.name,
                               {"duration_s": run.duration_s, "worker": self.worker_name})
            s.flush()
            rows = {r.name: r for r in s.scalars(select(StageRun).where(
                StageRun.job_id == job.id, StageRun.name.like(f"{claim.stage}:%")))}
            done = {m for m in plan["methods"]
                    if (r := rows.get(part_name(claim.stage, m))) is not None
                    and r.status is StageStatus.succeeded}
            ready = [m for m in plan["methods"] if part_name(claim.stage, m) not in rows
                     and all(d in done for d in plan["needs"].get(m, ()))]
            for m in ready:
                s.add(StageRun(job_id=job.id, name=part_name(claim.stage, m), index=claim.index,
                               status=StageStatus.queued, attempts=0, progress=0.0))
            if ready:
                jobs.add_event(s, job.id, "methods_sent", claim.stage, {"methods": ready})
                stage_run.finished_at = now  # the reconciler's clock for their messages
            job.updated_at = now
            if len(done) == len(plan["methods"]):  # every method is done: the choice is next
                stage_run.status = StageStatus.queued
                stage_run.finished_at = now  # the reconciler's clock for an unclaimed message
                return [claim.stage]
            frac = METHODS_SHARE * len(done) / len(plan["methods"])
            job.stage_progress = max(job.stage_progress or 0.0, frac)
            job.progress = overall_progress(claim.stages, claim.index, job.stage_progress)
            return [part_name(claim.stage, m) for m in ready]

    def build_result(self, s: Session, job: Job, workdir: Path) -> dict[str, Any]:
        """A summary for the job object; the full report stays in report.json."""
        runs = s.scalars(select(StageRun).where(StageRun.job_id == job.id)
                         .order_by(StageRun.index)).all()
        result: dict[str, Any] = {
            "stage_durations_s": {r.name: r.duration_s for r in runs if r.duration_s is not None},
            "artifacts": sorted(a.name for a in jobs.list_artifacts(s, job.id)),
        }
        report_path = workdir / "artifacts" / "report.json"
        if report_path.is_file():
            try:
                report = json.loads(report_path.read_text())
            except (OSError, ValueError):
                log.warning("job %s: report.json is not readable JSON", job.id)
                return result
            result["clean_accuracy"] = report.get("clean_accuracy")
            keys = ("original_accuracy", "transfer_er", "adaptive_accuracy")
            result["attacks"] = {a: {k: v.get(k) for k in keys if k in v}
                                 for a, v in (report.get("attacks") or {}).items()
                                 if isinstance(v, dict)}
            checks = report.get("sanity_checks") or []
            result["sanity_checks"] = {
                "passed": sum(1 for c in checks if c.get("passed")),
                "failed": [c.get("name") for c in checks if not c.get("passed")]}
            result["timings_s"] = report.get("timings_s")
        return result

    # --- ends -----------------------------------------------------------------------------

    def fail(self, job_id: uuid.UUID | str, stage: str | None, code: str, message: str) -> None:
        """Mark the job failed unless it already ended. Safe to call from anywhere, twice."""
        with session_scope(self.factory) as s:
            job = s.scalars(select(Job).where(Job.id == uuid.UUID(str(job_id)))
                            .with_for_update()).one_or_none()
            if job is None or JobStatus(job.status).is_terminal():
                return
            self.fail_locked(s, job, stage, code, message)
        self.remove_workdir(job_id)  # committed: the job has ended (the worker's failure hook)

    def fail_locked(self, s: Session, job: Job, stage: str | None, code: str, message: str) -> None:
        jobs.set_status(s, job, JobStatus.failed)
        job.error_code, job.error_message, job.error_stage = code, message, stage
        if stage is not None:
            s.execute(update(StageRun).where(StageRun.job_id == job.id, StageRun.name == stage)
                      .values(status=StageStatus.failed, finished_at=utcnow()))
        # a fanned-out stage's other methods: their workers stop at the next cancel poll
        s.execute(update(StageRun).where(StageRun.job_id == job.id, StageRun.status.in_(ACTIVE_RUN))
                  .values(status=StageStatus.cancelled, finished_at=utcnow()))
        jobs.add_event(s, job.id, "failed", stage, {"code": code, "message": message})
        log.info("job %s failed in %s: %s", job.id, stage, code)

    def mark_cancelled(self, job_id: uuid.UUID, stage: str) -> None:
        with self.transaction() as s:
            job = jobs.get_job(s, job_id, for_update=True)
            if not JobStatus(job.status).is_terminal():
                self.cancel_locked(s, job, stage)

    @staticmethod
    def cancel_locked(s: Session, job: Job, stage: str | None) -> None:
        """Cancel the locked job and unpublish its artifacts: the rows go now, the stored
        objects once the session commits (see :meth:`transaction`)."""
        if JobStatus(job.status) is JobStatus.running:  # the engine stopped on its own
            jobs.set_status(s, job, JobStatus.cancelling)
        jobs.set_status(s, job, JobStatus.cancelled)
        # the stage, or every method of a fanned-out one (each of their workers stops at its next
        # cancel poll; their queued messages find the job cancelled)
        s.execute(update(StageRun).where(StageRun.job_id == job.id, StageRun.status.in_(ACTIVE_RUN))
                  .values(status=StageStatus.cancelled, finished_at=utcnow()))
        uris = list(s.scalars(select(Artifact.uri).where(Artifact.job_id == job.id)))
        s.execute(delete(Artifact).where(Artifact.job_id == job.id))
        s.info.setdefault(PURGE_KEY, []).extend(uris)
        jobs.add_event(s, job.id, "cancelled", stage, {"artifacts_removed": len(uris)})

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """``session_scope`` that also deletes the stored objects queued in ``PURGE_KEY``, after
        the commit: a crash in between leaves an orphan object, never a row without its object."""
        with session_scope(self.factory) as s:
            yield s
            purge = list(s.info.get(PURGE_KEY, ()))
        delete_objects(self.store, purge)


def delete_objects(store: ArtifactStore, uris: list[str]) -> None:
    for uri in dict.fromkeys(uris):
        try:
            store.delete(uri)
        except Exception:  # the row is gone already: the object is unreachable, only wasted space
            log.warning("could not delete %s", uri, exc_info=True)


class _Heartbeat:
    """Renews the stage's lease every ``heartbeat_interval_s`` in a thread, independent of the
    engine's progress calls (one long batch or attack must not look like a dead worker). Only
    the message that holds the lease renews it."""

    def __init__(self, pipeline: Pipeline, claim: _Claim) -> None:
        self.p = pipeline
        self.claim = claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"heartbeat-{claim.job_id}-{claim.name}")

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        c = self.claim
        while not self._stop.wait(self.p.settings.heartbeat_interval_s):
            try:
                with session_scope(self.p.factory) as s:
                    n = s.execute(update(StageRun).where(
                        StageRun.job_id == c.job_id, StageRun.name == c.name,
                        StageRun.status == StageStatus.running, StageRun.task_id == c.task_id)
                        .values(heartbeat_at=utcnow())).rowcount
                if n == 0:  # finished, cancelled, failed, or taken over: nothing left to renew
                    log.info("job %s: %s no longer holds its lease", c.job_id, c.name)
                    return
            except Exception:  # one lost renewal is not fatal: the lease outlasts several
                log.warning("job %s: heartbeat failed", c.job_id, exc_info=True)


class _ProgressWriter:
    """The engine's ``progress(f)`` callback: cheap to call often, writes at most every
    ``progress_interval_s`` (stage progress, overall progress and the heartbeat)."""

    def __init__(self, pipeline: Pipeline, claim: _Claim) -> None:
        self.p = pipeline
        self.claim = claim
        self.value = 0.0
        self.last_write = time.monotonic()
        self.last_event = 0.0

    def __call__(self, fraction: float) -> None:
        self.value = max(self.value, min(1.0, max(0.0, float(fraction))))
        now = time.monotonic()
        if now - self.last_write >= self.p.settings.progress_interval_s:
            self.last_write = now
            self.flush()

    def flush(self) -> None:
        c, f, now = self.claim, self.value, utcnow()
        try:
            with session_scope(self.p.factory) as s:
                s.execute(update(StageRun).where(StageRun.job_id == c.job_id, StageRun.name == c.name)
                          .values(progress=f, heartbeat_at=now))
                stage_f = self._stage_fraction(s, f)
                if stage_f is not None:
                    s.execute(update(Job).where(Job.id == c.job_id,
                                                Job.status.in_([JobStatus.running,
                                                                JobStatus.cancelling]))
                              .values(stage_progress=stage_f, updated_at=now,
                                      progress=overall_progress(c.stages, c.index, stage_f)))
                if f - self.last_event >= PROGRESS_EVENT_STEP:
                    self.last_event = f
                    jobs.add_event(s, c.job_id, "progress", c.name, {"progress": round(f, 4)})
        except Exception:  # a lost progress write must not fail the stage
            log.warning("job %s: progress write failed", c.job_id, exc_info=True)

    def _stage_fraction(self, s: Session, f: float) -> float | None:
        """The stage's progress given this run's: a method moves compare's first part by the
        mean of every planned method's progress; compare's plan moves nothing."""
        c = self.claim
        if c.kind == "plan":
            return None
        if c.kind != "method":
            return f
        total = s.scalar(select(func.coalesce(func.sum(StageRun.progress), 0.0)).where(
            StageRun.job_id == c.job_id, StageRun.name.like(f"{c.stage}:%")))
        return METHODS_SHARE * min(1.0, float(total) / max(1, c.planned))


class _CancelPoller:
    """The engine's ``cancelled()`` callback: re-reads the status at most every
    ``cancel_poll_interval_s``."""

    def __init__(self, pipeline: Pipeline, job_id: uuid.UUID) -> None:
        self.p = pipeline
        self.job_id = job_id
        self.flag = False
        self.last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.flag and now - self.last >= self.p.settings.cancel_poll_interval_s:
            self.last = now
            try:
                with session_scope(self.p.factory) as s:
                    status = s.scalar(select(Job.status).where(Job.id == self.job_id))
                # failed too: another method of the same compare failed the job
                self.flag = status is not None and (JobStatus(status).is_terminal()
                                                    or status == JobStatus.cancelling)
            except Exception:
                log.warning("job %s: cancel poll failed", self.job_id, exc_info=True)
        return self.flag


def pipeline_from_settings(settings: Settings | None = None, **kw: Any) -> Pipeline:
    settings = settings or get_settings()
    settings.ensure_dirs()
    return Pipeline(settings, session_factory(engine_for(settings.database_url)),
                    store_from_settings(settings), **kw)
