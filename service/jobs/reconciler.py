"""The reconciler: puts back, from the database, the stage messages that the broker lost.

Celery only carries messages; the database says what should be happening. Three ways a job can
stall with no message left to move it, and what :func:`reconcile_once` does about each:

- its worker died mid-stage (kill -9, OOM, a lost machine): the stage's lease
  (``stage_runs.heartbeat_at``, renewed by the worker) runs out after ``stage_stale_after_s``.
  Redis would hand the unacked message back only after ``visibility_timeout`` (hours), so the
  stage is re-sent; the claim in ``service.jobs.pipeline`` takes the stale run over. A stage that
  already used ``stage_max_attempts`` fails the job with ``stage_attempts_exhausted`` instead.
- its next message never reached a worker (the broker was flushed or restarted, or the send after
  the commit failed): the stage is still ``queued`` ``requeue_after_s`` after the previous stage
  finished (or the job was created) and no copy waits in the broker's queue: re-sent.
- it was cancelled while its worker died: ``cancelling`` with an expired lease becomes
  ``cancelled`` here, since no worker will come back to say so.

A fanned-out stage (``compare`` while ``waiting``) is looked at through its methods' rows: each
is one of the runs above, so a method whose worker died is re-sent alone, and the others go on.

Each pass also applies retention (``service.jobs.retention``): finished jobs older than
``DARE_RETENTION_DAYS`` lose their stored inputs and artifacts (counted as ``expired``).

Each re-send records a ``requeued`` event with its reason, and a job is re-sent at most once per
``requeue_after_s``; while the same stage stays stuck, the wait doubles (up to 32 times). Duplicates are harmless by construction: the claim drops a message for a
finished stage or for one whose lease is fresh. Every job is handled under its row lock
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so several API replicas may run this at once.
"""
from __future__ import annotations

import base64
import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.jobs import records as jobs
from service.jobs.dispatch import Dispatcher
from service.jobs.pipeline import Pipeline
from service.jobs.retention import expire_finished
from service.settings import Settings
from service.states import JobStatus, StageStatus, utcnow
from service.store.models import Job, JobEvent, StageRun
from service.store.storage import ArtifactStore, store_from_settings

log = logging.getLogger("dare.reconciler")

ACTIVE = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)
BATCH = 500  # jobs looked at per pass; the rest wait for the next one
MAX_BACKOFF_DOUBLINGS = 5  # repeated re-sends of one stage: at most 32 x requeue_after_s apart
# kombu's Redis transport keeps priority levels > 0 in lists named queue + sep + level.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


def reconcile_once(settings: Settings, factory: sessionmaker[Session], dispatcher: Dispatcher,
                   store: ArtifactStore | None = None) -> dict[str, int]:
    """One pass over the active jobs. Returns counts: ``lease_expired`` and ``not_picked_up``
    (stages re-sent), ``failed`` (attempts used up), ``cancelled``, ``throttled`` (would re-send,
    but did so less than ``requeue_after_s`` ago), ``send_errors``."""
    now = utcnow()  # the same clock as the heartbeats and events it is compared with
    pipeline = Pipeline(settings, factory, store or store_from_settings(settings))
    waiting = queued_messages(settings)
    counts: Counter[str] = Counter()
    with factory() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_(ACTIVE))
                             .order_by(Job.updated_at).limit(BATCH)))
    for jid in ids:
        try:
            resend = _reconcile_job(pipeline, jid, now, waiting, counts)
        except Exception:  # one odd job must not stop the others
            log.exception("reconciling job %s failed", jid)
            counts["errors"] += 1
            continue
        for name in resend:
            try:
                dispatcher.enqueue(str(jid), name)  # after the commit, like every send
            except Exception as e:  # the event is recorded: the next pass retries
                log.warning("job %s: re-sending %s failed: %s", jid, name, e)
                counts["send_errors"] += 1
    try:
        counts["expired"] += expire_finished(settings, factory, pipeline.store, now)
    except Exception:  # retention is housekeeping: the next pass tries again
        log.exception("applying retention failed")
        counts["errors"] += 1
    result = {k: v for k, v in counts.items() if v}
    if any(k != "throttled" for k in result):
        log.info("reconciled: %s", result)
    return result


def _reconcile_job(p: Pipeline, jid: uuid.UUID, now: datetime, waiting: set[tuple[str, str]] | None,
                   counts: Counter[str]) -> list[str]:
    """Decide for one job under its row lock; return the runs to re-send (after commit)."""
    st = p.settings
    with p.transaction() as s:
        job = s.scalars(select(Job).where(Job.id == jid).with_for_update(skip_locked=True)
                        .execution_options(populate_existing=True)).one_or_none()
        if job is None or JobStatus(job.status) not in ACTIVE:
            return []  # gone, finished meanwhile, or locked by a worker's claim right now
        runs = list(s.scalars(select(StageRun).where(StageRun.job_id == jid)
                              .order_by(StageRun.index, StageRun.id)))
        stages = [r for r in runs if ":" not in r.name]
        current = stages[-1] if stages else None
        if current is None:  # never claimed: the first message is the one to look for
            pending = [_Pending(job.stages[0], job.created_at, False, 0)]
        elif current.status is StageStatus.waiting:  # fanned out: its methods are the runs
            parts = [r for r in runs if r.name.startswith(current.name + ":")]
            pending = [x for r in parts
                       if (x := _pending(r, current.finished_at or job.updated_at, now, st))]
            live = sum(r.status is StageStatus.running for r in parts) - \
                sum(x.expired for x in pending)
            if live and JobStatus(job.status) is JobStatus.cancelling:
                return []  # a live worker ends the job at its next cancel poll
        else:
            prev = stages[-2] if len(stages) > 1 else None
            x = _pending(current, prev.finished_at if prev is not None and prev.finished_at
                         else job.created_at, now, st)
            if x is None:
                return []
            pending = [x]
        if not pending:
            return []

        if JobStatus(job.status) is JobStatus.cancelling:
            # Nobody runs it (every lease gone) or it waits unclaimed: no worker will end it.
            p.cancel_locked(s, job, pending[0].name)
            counts["cancelled"] += 1
            return []
        out = []
        requeued = (JobEvent.job_id == jid) & (JobEvent.kind == "requeued")
        last = s.scalar(select(func.max(JobEvent.at)).where(requeued))
        patience = timedelta(seconds=st.requeue_after_s)
        for run in pending:
            if run.expired and run.attempts >= st.stage_max_attempts:
                p.fail_locked(s, job, run.name, "stage_attempts_exhausted",
                              f"the {run.name} stage was started {run.attempts} times and its "
                              "worker was lost each time (out of memory, killed, or its machine "
                              "went away); use a smaller config or a bigger worker, then submit "
                              "the job again")
                counts["failed"] += 1
                return []
            if not run.expired:
                if now - run.since < patience:
                    continue  # its message may simply be waiting its turn
                if waiting is not None and (str(jid), run.name) in waiting:
                    continue  # it is: a long queue, not a lost message
            # Re-sent already and still stuck (no worker up, or one slow to start): back off,
            # doubling the wait each time, so an hour without workers adds a handful of copies.
            n = s.scalar(select(func.count()).select_from(JobEvent)
                         .where(requeued, JobEvent.stage == run.name, JobEvent.at >= run.since)) or 0
            wait = patience * 2 ** min(max(n - 1, 0), MAX_BACKOFF_DOUBLINGS)
            if last is not None and now - last < wait:
                counts["throttled"] += 1
                continue
            reason = "lease_expired" if run.expired else "not_picked_up"
            jobs.add_event(s, jid, "requeued", run.name,
                           {"reason": reason, "since": run.since.isoformat(),
                            "attempts": run.attempts})
            job.updated_at = now
            counts[reason] += 1
            out.append(run.name)
        return out


@dataclass
class _Pending:
    """A run no live worker holds: its name, since when, whether a lease expired, attempts."""
    name: str
    since: datetime
    expired: bool
    attempts: int


def _pending(run: StageRun, queued_since: datetime, now: datetime,
             st: Settings) -> _Pending | None:
    """``run`` as something to re-send, or None while a live worker holds it (or it ended)."""
    if run.status is StageStatus.running:
        beat = run.heartbeat_at or run.started_at or queued_since
        if now - beat < timedelta(seconds=st.stage_stale_after_s):
            return None
        return _Pending(run.name, beat, True, run.attempts)
    if run.status is StageStatus.queued:
        # compare, queued again by its last method, waits since then (its finished_at)
        return _Pending(run.name, run.finished_at or queued_since, False, run.attempts)
    return None  # succeeded/failed/cancelled while the job is active: the worker is mid-commit


# --- what the broker still holds -------------------------------------------------------------

def queued_messages(settings: Settings) -> set[tuple[str, str]] | None:
    """``(job_id, stage)`` of every stage message waiting in the broker's queue, or ``None`` when
    this broker cannot be looked into (then the age rule alone decides). Messages a worker has
    taken but not acked are not counted: after a kill -9 those are exactly the lost ones."""
    try:
        if settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return _redis_queued(settings)
        if settings.broker_is_filesystem:
            folder = settings.broker_dir / "queue"
            suffix = f".{settings.queue}.msg"
            return _parse_all(f.read_bytes() for f in folder.iterdir() if f.name.endswith(suffix))
    except Exception as e:  # unknown is safe: fall back to the age rule
        log.warning("cannot look into the broker's queue: %s", e)
    return None


def _redis_queued(settings: Settings) -> set[tuple[str, str]]:
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = [settings.queue] + [f"{settings.queue}{_KOMBU_PRIORITY_SEP}{n}"
                                   for n in _KOMBU_PRIORITY_STEPS]
        pipe = client.pipeline()
        for k in keys:
            pipe.lrange(k, 0, -1)
        return _parse_all(raw for batch in pipe.execute() for raw in batch)
    finally:
        client.close()


def _parse_all(payloads: Iterable[bytes]) -> set[tuple[str, str]]:
    out = set()
    for raw in payloads:
        parsed = _parse(raw)
        if parsed is not None:
            out.add(parsed)
    return out


def _parse(raw: bytes | str) -> tuple[str, str] | None:
    """A kombu message envelope -> (job id, stage) of a stage task, else None."""
    from worker.celery_app import STAGE_TASK_PREFIX

    try:
        msg: dict[str, Any] = json.loads(raw)
        task = (msg.get("headers") or {}).get("task", "")
        if not task.startswith(STAGE_TASK_PREFIX):
            return None
        body = msg["body"]
        if (msg.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        stage = task[len(STAGE_TASK_PREFIX):]
        return str(args[0]), f"{stage}:{args[1]}" if len(args) > 1 else stage
    except (ValueError, KeyError, IndexError, TypeError):
        return None
