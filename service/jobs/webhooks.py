"""Signed webhooks through a transactional outbox.

A job whose config has ``webhook_url`` gets a ``webhook_deliveries`` row for each of its
``succeeded``, ``failed`` and ``cancelled`` events (and ``stage_started`` / ``stage_finished`` with
``webhook_stage_events: true``), inserted by :func:`enqueue_for_event` inside the very transaction
that records the event, so an event is sent if and only if it happened. :func:`deliver_due`, run
periodically by the API's background runner, claims due rows (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so API replicas share the work without sending a message twice), POSTs them signed
per Standard Webhooks (https://www.standardwebhooks.com) from a small pool of sender threads
(a few per tenant at most), and records every attempt both on the row and as a
``webhook_delivery`` job event with a coarse result. Delivery is at least once: a receiver
deduplicates on ``webhook-id``. Where a POST may go, and how it is bounded in time and size, is
:mod:`service.jobs.webhook_net`.

No FastAPI or Celery here.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.jobs.urls import job_urls
from service.jobs.webhook_net import UnsafeWebhookUrl, check_url, post
from service.logs import log_context
from service.settings import Settings
from service.states import JobStatus, utcnow
from service.store.db import session_scope
from service.store.models import DeliveryStatus, Job, JobEvent, Tenant, WebhookDelivery

log = logging.getLogger("dare.webhooks")

JOB_EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed",
                   "cancelled": "job.cancelled"}
STAGE_EVENT_TYPES = {"stage_started": "job.stage_started", "stage_finished": "job.stage_finished"}
DELIVERY_EVENT = "webhook_delivery"  # the job event of each attempt; never itself sent
SECRET_PREFIX = "whsec_"
LEASE_MARGIN_S = 60  # a claimed row is ours for the send's deadline plus this
REFILL_S = 0.25
SUBMIT_RESOLVE_TIMEOUT_S = 5.0  # a submission waits no longer for the webhook host's DNS  # while sends are in flight, how often free senders look for due rows
TIMESTAMP_TOLERANCE_S = 300  # what receivers should accept (Standard Webhooks' default)

HOW_TO_VERIFY = (
    "Each webhook is a POST with a JSON body and the Standard Webhooks headers webhook-id, "
    "webhook-timestamp (unix seconds) and webhook-signature ('v1,' + base64 signature; several "
    "space-separated when the secret rotates). To verify: take the secret without its 'whsec_' "
    "prefix and base64-decode it to get the key; compute HMAC-SHA256(key, "
    "webhook-id + '.' + webhook-timestamp + '.' + raw body bytes); base64-encode it and compare "
    "it, in constant time, with each signature after its 'v1,'. Reject timestamps more than 5 "
    "minutes from your clock, and deduplicate on webhook-id (delivery is at least once). Any "
    "Standard Webhooks library does all of this, e.g. Webhook(secret).verify(body, headers).")


# --- signing ----------------------------------------------------------------------------------

def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, body: bytes,
                   timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body),
            "content-type": "application/json", "user-agent": "dare-webhooks/1"}


def tenant_secret(session: Session, tenant_id: uuid.UUID) -> str:
    """The tenant's signing secret, made (under the row lock, so once) on first use."""
    # Read without a lock first: the submission path holds the tenant's row lock while it
    # stores uploads, and a sender must not queue behind that for a secret that already exists.
    existing = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
    if existing:
        return existing
    tenant = session.scalars(select(Tenant).where(Tenant.id == tenant_id).with_for_update()
                             .execution_options(populate_existing=True)).one()
    if not tenant.webhook_secret:
        tenant.webhook_secret = new_secret()
    return tenant.webhook_secret


# --- where we may send (SSRF): service.jobs.webhook_net ---------------------------------------------

def check_submitted_url(url: str, *, allow_private: bool) -> None:
    """:func:`check_url` for a submission: an ``InputError`` (422) naming the config field."""
    from worker.engine.errors import InputError

    try:
        # The send checks again: DNS answers change.
        check_url(url, allow_private=allow_private, timeout_s=SUBMIT_RESOLVE_TIMEOUT_S)
    except UnsafeWebhookUrl as e:
        raise InputError("invalid_webhook_url", f"config field 'webhook_url': {e}",
                         "use a public http(s) URL; an operator can allow private addresses "
                         "with DARE_WEBHOOK_ALLOW_PRIVATE=true") from None


# --- the outbox -------------------------------------------------------------------------------

def event_type_for(kind: str, config: Mapping[str, Any]) -> str | None:
    if not config.get("webhook_url"):
        return None
    if kind in JOB_EVENT_TYPES:
        return JOB_EVENT_TYPES[kind]
    if kind in STAGE_EVENT_TYPES and config.get("webhook_stage_events"):
        return STAGE_EVENT_TYPES[kind]
    return None


def job_summary(job: Job, stage: str | None) -> dict[str, Any]:
    stages = job.stages or []
    name = stage or job.stage_name
    error = ({"code": job.error_code, "message": job.error_message or "", "stage": job.error_stage}
             if job.error_code else None)
    return {"id": str(job.id), "status": JobStatus(job.status).value,
            "stage": {"name": name, "index": stages.index(name) if name in stages else None,
                      "total": len(stages)},
            "progress": round(float(job.progress or 0.0), 4), "error": error,
            "urls": job_urls(job)}


def enqueue_for_event(session: Session, job_id: uuid.UUID, kind: str, stage: str | None,
                      at: datetime) -> WebhookDelivery | None:
    """Called by ``jobs.add_event`` for every event: adds an outbox row when this event of this
    job is to be sent. Same session, same transaction as the event."""
    if kind not in JOB_EVENT_TYPES and kind not in STAGE_EVENT_TYPES:
        return None  # progress, created, webhook_delivery, ...: nothing to look up
    job = session.get(Job, job_id)  # the caller has it loaded: no query
    if job is None:
        return None
    etype = event_type_for(kind, job.config or {})
    if etype is None:
        return None
    row = WebhookDelivery(
        job_id=job_id, msg_id=f"msg_{uuid.uuid4().hex}", event_type=etype,
        url=job.config["webhook_url"], status=DeliveryStatus.pending, attempts=0,
        payload={"type": etype, "timestamp": at.isoformat(), "data": job_summary(job, stage)},
        next_attempt_at=at, created_at=at)
    session.add(row)
    return row


def backoff_s(attempt: int, settings: Settings) -> float:
    """Exponential (base doubles per attempt), capped, with jitter in [50 %, 100 %] so receivers
    that failed together are not retried together."""
    doublings = min(max(0, attempt - 1), 60)  # past the cap anyway; 2**big would overflow a float
    base = min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** doublings)
    return base * (0.5 + random.random() / 2)


@dataclass
class _Claimed:
    id: int
    job_id: uuid.UUID
    tenant_id: uuid.UUID
    msg_id: str
    event_type: str
    url: str
    payload: dict[str, Any]
    attempt: int
    secret: str


@dataclass
class _Outcome:
    result: str  # delivered | retrying | failed | refused
    reason: str  # coarse, safe to show the tenant: webhook_net.PostResult's outcomes, or
    # refused_address / unresolvable / invalid_url / internal_error
    status_code: int | None = None


def _claim(settings: Settings, factory: sessionmaker[Session], want: int,
           busy: Counter[uuid.UUID]) -> list[_Claimed]:
    """Claim up to ``want`` due rows, leaving out tenants that already have
    ``webhook_per_tenant`` sends in flight (``busy``, this process's count)."""
    now = utcnow()
    # While we send, the row is ours: next_attempt_at goes past the send's deadline (a row is
    # claimed only when a sender is free to start it at once), so no other sender takes it; if
    # this process dies, it falls due again.
    lease = timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S)
    counts = Counter(busy)
    out: list[_Claimed] = []
    with session_scope(factory) as s:
        secrets_by_tenant: dict[uuid.UUID, str] = {}
        # Rounds: a round's rows can fill a tenant's allowance, then the next round asks again
        # without that tenant, so a tenant with many due rows does not crowd out the others.
        # Every non-empty round claims at least one row (claimed rows are no longer due once
        # flushed), so this ends.
        while len(out) < want:
            full = [t for t, n in counts.items() if n >= settings.webhook_per_tenant]
            stmt = (select(WebhookDelivery, Job.tenant_id)
                    .join(Job, Job.id == WebhookDelivery.job_id)
                    .where(WebhookDelivery.status == DeliveryStatus.pending,
                           WebhookDelivery.next_attempt_at <= now)
                    .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                    .limit(want - len(out))
                    # SKIP LOCKED: concurrent senders take different rows. SQLite has no row
                    # locks (SQLAlchemy renders nothing there) and a single writer anyway.
                    .with_for_update(of=WebhookDelivery, skip_locked=True))
            if full:
                stmt = stmt.where(Job.tenant_id.not_in(full))
            rows = s.execute(stmt).all()
            if not rows:
                break
            for row, tenant_id in rows:
                if counts[tenant_id] >= settings.webhook_per_tenant:
                    continue  # an earlier row of this round filled the tenant's allowance
                counts[tenant_id] += 1
                if tenant_id not in secrets_by_tenant:
                    secrets_by_tenant[tenant_id] = tenant_secret(s, tenant_id)
                row.attempts += 1
                row.next_attempt_at = now + lease
                out.append(_Claimed(id=row.id, job_id=row.job_id, tenant_id=tenant_id,
                                    msg_id=row.msg_id, event_type=row.event_type, url=row.url,
                                    payload=dict(row.payload), attempt=row.attempts,
                                    secret=secrets_by_tenant[tenant_id]))
            s.flush()
    return out


def _send(c: _Claimed, settings: Settings) -> _Outcome:
    started = time.monotonic()  # the deadline covers the lookup too
    try:
        # Resolved and checked now (DNS answers change), and the POST connects to exactly the
        # addresses checked here.
        target = check_url(c.url, allow_private=settings.webhook_allow_private,
                           timeout_s=settings.webhook_timeout_s)
    except UnsafeWebhookUrl as e:
        log.info("webhook %s: not sent: %s", c.msg_id, e)
        # A DNS failure may pass; a forbidden address or a bad URL is final.
        return _Outcome("retrying" if e.code == "unresolvable" else "refused", e.code)
    left = settings.webhook_timeout_s - (time.monotonic() - started)
    if left <= 0:
        return _Outcome("retrying", "timeout")
    body = json.dumps(c.payload, separators=(",", ":"), sort_keys=True).encode()
    r = post(target, body, signed_headers(c.secret, c.msg_id, body), timeout_s=left,
             max_response_bytes=settings.webhook_max_response_bytes)
    if r.detail:
        log.info("webhook %s: %s (%s)", c.msg_id, r.outcome, r.detail)
    return _Outcome("delivered" if r.outcome == "delivered" else "retrying", r.outcome,
                    r.status_code)


def _record(c: _Claimed, o: _Outcome, settings: Settings, factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as s:
        row = s.scalars(select(WebhookDelivery).where(WebhookDelivery.id == c.id)
                        .with_for_update()).one_or_none()
        if row is None:  # its job was deleted meanwhile
            return
        data: dict[str, Any] = {"msg_id": c.msg_id, "type": c.event_type, "attempt": c.attempt}
        # Only the sender that holds the latest claim moves the row. Sends end by their deadline,
        # well inside the lease, so this is a guard, not a path.
        ours = row.status == DeliveryStatus.pending and row.attempts == c.attempt
        if ours:
            row.last_status_code = o.status_code
            row.last_error = None if o.result == "delivered" else o.reason
        if o.result == "delivered":
            if ours:
                row.status, row.delivered_at, row.next_attempt_at = (
                    DeliveryStatus.delivered, now, None)
        elif o.result == "retrying" and c.attempt < settings.webhook_max_attempts:
            if ours:
                row.next_attempt_at = now + timedelta(seconds=backoff_s(c.attempt, settings))
                data["next_attempt_at"] = row.next_attempt_at.isoformat()
        else:
            if o.result == "retrying":
                o.result = "failed"  # out of attempts
            if ours:
                row.status, row.next_attempt_at = DeliveryStatus.failed, None
        data["result"] = o.result
        if o.status_code is not None:
            data["status_code"] = o.status_code
        if o.result != "delivered":
            data["error"] = o.reason
        # Straight to the table, not jobs.add_event: an attempt is never itself a webhook.
        s.add(JobEvent(job_id=c.job_id, kind=DELIVERY_EVENT, stage=None, data=data, at=now))
    with log_context(job_id=c.job_id):
        log.info("webhook %s (%s) attempt %d: %s (%s)", c.msg_id, c.event_type, c.attempt,
                 o.result, o.reason)


def _deliver(c: _Claimed, settings: Settings, factory: sessionmaker[Session]) -> None:
    """One attempt in a sender thread: send, then record."""
    try:
        outcome = _send(c, settings)
    except Exception:  # a bug, not the receiver: still an attempt, recorded, retried
        log.exception("webhook %s: unexpected error while sending", c.msg_id)
        outcome = _Outcome("retrying", "internal_error")
    try:
        _record(c, outcome, settings, factory)
    except Exception:  # e.g. the database is down: the row falls due again after its lease
        log.exception("webhook %s: could not record attempt %d", c.msg_id, c.attempt)


def deliver_due(settings: Settings, factory: sessionmaker[Session], *,
                max_sends: int = 200) -> int:
    """Send what is due and return the number of attempts made; return when nothing is due or
    in flight (or ``max_sends`` were started). Safe to run in several processes at once.

    ``webhook_senders`` threads send at once, at most ``webhook_per_tenant`` of them for one
    tenant, and each send ends by its deadline. While sends are in flight, free senders keep
    claiming rows that fall due, so one slow receiver holds one sender, not the others."""
    running: dict[Future[None], uuid.UUID] = {}
    started = 0
    with ThreadPoolExecutor(settings.webhook_senders, thread_name_prefix="webhook-send") as pool:
        while True:
            free = settings.webhook_senders - len(running)
            if free > 0 and started < max_sends:
                for c in _claim(settings, factory, min(free, max_sends - started),
                                Counter(running.values())):
                    running[pool.submit(_deliver, c, settings, factory)] = c.tenant_id
                    started += 1
            if not running:
                return started
            done, _ = wait(running, timeout=REFILL_S, return_when=FIRST_COMPLETED)
            for f in done:
                del running[f]


def delivery_counts(session: Session) -> dict[str, int]:
    """Deliveries by status, for /metrics."""
    from sqlalchemy import func

    rows = session.execute(select(WebhookDelivery.status, func.count())
                           .group_by(WebhookDelivery.status)).all()
    return {DeliveryStatus(s).value: n for s, n in rows}
