"""Celery tasks: one per stage, on the ``gpu`` queue, each carrying only the job id.

A task is a thin edge: ``Pipeline.run`` claims the stage in the database (a finished stage is
skipped when its message is delivered again), runs it, commits the outcome, and names the next
stage; only then is the next message sent. The database, not Celery, holds every status, so
a message that is lost (a failed send, a flushed broker, a killed worker) is re-sent from it by
``service.jobs.reconciler``.
"""
from __future__ import annotations

import logging

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from worker.celery_app import app, stage_message, stage_task_name

log = logging.getLogger("dare.tasks")

_pipeline = None


def pipeline():  # noqa: ANN201 (service.jobs.pipeline.Pipeline), built once per process
    global _pipeline
    if _pipeline is None:
        from service.jobs.pipeline import pipeline_from_settings
        from worker.engine import archive_safety

        _pipeline = pipeline_from_settings(timeout_errors=(SoftTimeLimitExceeded,))
        s = _pipeline.settings  # the engine refuses exactly the archives the API would
        archive_safety.configure(s.max_history_uncompressed_bytes, s.max_zip_ratio)
    return _pipeline


def warm() -> None:
    """Build the pipeline and open a database connection in the pool child before any task."""
    global _pipeline
    from sqlalchemy import text

    _pipeline = None  # one inherited from the parent (its failure hook) is rebuilt here
    try:
        with pipeline().factory() as s:
            s.execute(text("SELECT 1"))
    except Exception:  # the first task will report a real problem
        log.warning("could not reach the database while warming up", exc_info=True)


def enqueue(job_id: str, name: str) -> None:
    task, args = stage_message(job_id, name)
    app.send_task(task, args=args, queue=pipeline().settings.queue)


class StageTask(Task):
    acks_late = True
    ignore_result = True

    stage: str = ""

    def run_stage(self, job_id: str, method: str | None = None) -> None:
        name = f"{self.stage}:{method}" if method else self.stage
        for nxt in pipeline().step(job_id, name, task_id=self.request.id):
            try:
                enqueue(job_id, nxt)  # after Pipeline.step committed
            except Exception as e:
                # The step succeeded and is recorded: failing the job now would be wrong. What
                # it released stays queued in the database and the reconciler sends it after
                # DARE_REQUEUE_AFTER_S.
                log.error("job %s: could not send %s (%s); the reconciler will", job_id, nxt, e)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001
        # Pipeline.run handles the stage's own errors; this sees what escaped it, and the hard
        # time limit, which the worker's main process reports after killing the child.
        job_id = args[0] if args else kwargs.get("job_id")
        method = args[1] if len(args) > 1 else kwargs.get("method")
        name = f"{self.stage}:{method}" if method else self.stage
        if job_id is None or isinstance(exc, WorkerLostError):
            return  # a lost worker's message is re-queued (reject_on_worker_lost): let it retry
        if isinstance(exc, TimeLimitExceeded):
            code, msg = "stage_timeout", (f"the {name} stage was killed at the hard time "
                                          "limit; use a smaller config or raise "
                                          "DARE_STAGE_HARD_TIME_LIMIT_S")
        else:
            code, msg = "internal_error", f"the {name} stage failed unexpectedly (job {job_id})"
        try:
            pipeline().fail(job_id, name, code, msg)
        except Exception:
            log.exception("job %s: could not record the failure", job_id)


_OPTS = {"base": StageTask, "bind": True, "queue": app.conf.task_default_queue}


@app.task(name=stage_task_name("validate"), stage="validate", **_OPTS)
def validate(self: StageTask, job_id: str) -> None:
    self.run_stage(job_id)


@app.task(name=stage_task_name("slice"), stage="slice", **_OPTS)
def slice_(self: StageTask, job_id: str) -> None:
    self.run_stage(job_id)


@app.task(name=stage_task_name("mine"), stage="mine", **_OPTS)
def mine(self: StageTask, job_id: str) -> None:
    self.run_stage(job_id)


@app.task(name=stage_task_name("tune"), stage="tune", **_OPTS)
def tune(self: StageTask, job_id: str) -> None:
    self.run_stage(job_id)


@app.task(name=stage_task_name("export"), stage="export", **_OPTS)
def export(self: StageTask, job_id: str) -> None:
    self.run_stage(job_id)


@app.task(name=stage_task_name("evaluate"), stage="evaluate", **_OPTS)
def evaluate(self: StageTask, job_id: str) -> None:
    self.run_stage(job_id)


@app.task(name=stage_task_name("compare"), stage="compare", **_OPTS)
def compare(self: StageTask, job_id: str, method: str | None = None) -> None:
    """Without ``method``: compare's plan (which sends every method), later its choice and
    evaluation; with it: that one method, on whichever worker takes the message."""
    self.run_stage(job_id, method)

