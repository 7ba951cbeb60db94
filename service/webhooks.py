"""Signed webhooks through a transactional outbox.

A job whose config has ``webhook_url`` gets a ``webhook_deliveries`` row for each of its
``succeeded``, ``failed`` and ``cancelled`` events (and ``stage_started`` / ``stage_finished`` with
``webhook_stage_events: true``), inserted by :func:`enqueue_for_event` inside the very transaction
that records the event, so an event is sent if and only if it happened. :func:`deliver_due`, run
periodically by the API's background runner, claims due rows (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so API replicas share the work without sending a message twice), POSTs them signed
per Standard Webhooks (https://www.standardwebhooks.com), and records every attempt both on the
row and as a ``webhook_delivery`` job event. Delivery is at least once: a receiver deduplicates on
``webhook-id``.

No FastAPI or Celery here.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .db import session_scope
from .logs import log_context
from .models import DeliveryStatus, Job, JobEvent, Tenant, WebhookDelivery
from .settings import Settings
from .states import JobStatus, utcnow

log = logging.getLogger("dare.webhooks")

JOB_EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed",
                   "cancelled": "job.cancelled"}
STAGE_EVENT_TYPES = {"stage_started": "job.stage_started", "stage_finished": "job.stage_finished"}
DELIVERY_EVENT = "webhook_delivery"  # the job event of each attempt; never itself sent
SECRET_PREFIX = "whsec_"
CLAIM_BATCH = 10
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


# --- where we may send (SSRF) -----------------------------------------------------------------

class UnsafeWebhookUrl(ValueError):
    """The URL cannot be used: not http(s), does not resolve, or reaches a private address."""


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or not ip.is_global)


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse URLs whose host resolves to a loopback, private, link-local or otherwise
    non-public address (cloud metadata at 169.254.169.254, the database next door), unless the
    operator allows them. Called at submission and again before every POST, because DNS answers
    change."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise UnsafeWebhookUrl(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookUrl("not an absolute http:// or https:// URL")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UnsafeWebhookUrl(f"the host {parts.hostname!r} does not resolve ({e})") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if _forbidden(ip):
            raise UnsafeWebhookUrl(f"the host {parts.hostname!r} resolves to {ip}, a loopback, "
                                   "private or link-local address, which webhooks may not reach")


def check_submitted_url(url: str, *, allow_private: bool) -> None:
    """:func:`check_url` for a submission: an ``InputError`` (422) naming the config field."""
    from worker.engine.errors import InputError

    try:
        check_url(url, allow_private=allow_private)
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
    from .jobs import job_urls  # jobs imports this module

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
    msg_id: str
    event_type: str
    url: str
    payload: dict[str, Any]
    attempt: int
    secret: str


@dataclass
class _Outcome:
    result: str  # delivered | retrying | failed | refused
    status_code: int | None = None
    error: str | None = None


def _claim(settings: Settings, factory: sessionmaker[Session], batch: int) -> list[_Claimed]:
    now = utcnow()
    # While we send, the rows are ours: pushing next_attempt_at past the longest the batch can
    # take keeps other senders off them; if this process dies they fall due again.
    lease = timedelta(seconds=settings.webhook_timeout_s * batch + 60)
    with session_scope(factory) as s:
        stmt = (select(WebhookDelivery, Job.tenant_id).join(Job, Job.id == WebhookDelivery.job_id)
                .where(WebhookDelivery.status == DeliveryStatus.pending,
                       WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(batch)
                # SKIP LOCKED: concurrent senders take different rows. SQLite has no row locks
                # (SQLAlchemy renders nothing there) and a single writer anyway.
                .with_for_update(of=WebhookDelivery, skip_locked=True))
        rows = s.execute(stmt).all()
        secrets_by_tenant: dict[uuid.UUID, str] = {}
        out = []
        for row, tenant_id in rows:
            if tenant_id not in secrets_by_tenant:
                secrets_by_tenant[tenant_id] = tenant_secret(s, tenant_id)
            row.attempts += 1
            row.next_attempt_at = now + lease
            out.append(_Claimed(id=row.id, job_id=row.job_id, msg_id=row.msg_id,
                                event_type=row.event_type, url=row.url, payload=dict(row.payload),
                                attempt=row.attempts, secret=secrets_by_tenant[tenant_id]))
        return out


def _send(c: _Claimed, settings: Settings, client: httpx.Client) -> _Outcome:
    try:
        check_url(c.url, allow_private=settings.webhook_allow_private)
    except UnsafeWebhookUrl as e:
        return _Outcome("refused", error=str(e))
    body = json.dumps(c.payload, separators=(",", ":"), sort_keys=True).encode()
    try:
        r = client.post(c.url, content=body, headers=signed_headers(c.secret, c.msg_id, body),
                        timeout=settings.webhook_timeout_s)
    except httpx.HTTPError as e:
        return _Outcome("retrying", error=f"{type(e).__name__}: {e}"[:500])
    except Exception as e:  # e.g. httpx.InvalidURL: still an attempt, recorded, not a crash
        log.warning("webhook %s: unexpected error while sending", c.msg_id, exc_info=True)
        return _Outcome("retrying", error=f"{type(e).__name__}: {e}"[:500])
    if 200 <= r.status_code < 300:
        return _Outcome("delivered", status_code=r.status_code)
    return _Outcome("retrying", status_code=r.status_code, error=f"HTTP {r.status_code}")


def _record(c: _Claimed, o: _Outcome, settings: Settings, factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as s:
        row = s.scalars(select(WebhookDelivery).where(WebhookDelivery.id == c.id)
                        .with_for_update()).one_or_none()
        if row is None:  # its job was deleted meanwhile
            return
        row.last_status_code, row.last_error = o.status_code, o.error
        data: dict[str, Any] = {"msg_id": c.msg_id, "type": c.event_type, "attempt": c.attempt}
        if o.result == "delivered":
            row.status, row.delivered_at, row.next_attempt_at = DeliveryStatus.delivered, now, None
        elif o.result == "retrying" and c.attempt < settings.webhook_max_attempts:
            row.next_attempt_at = now + timedelta(seconds=backoff_s(c.attempt, settings))
            data["next_attempt_at"] = row.next_attempt_at.isoformat()
        else:
            if o.result == "retrying":
                o.result = "failed"  # out of attempts
            row.status, row.next_attempt_at = DeliveryStatus.failed, None
        data["result"] = o.result
        if o.status_code is not None:
            data["status_code"] = o.status_code
        if o.error is not None and o.status_code is None:
            data["error"] = o.error
        # Straight to the table, not jobs.add_event: an attempt is never itself a webhook.
        s.add(JobEvent(job_id=c.job_id, kind=DELIVERY_EVENT, stage=None, data=data, at=now))
    with log_context(job_id=c.job_id):
        log.info("webhook %s (%s) attempt %d: %s%s", c.msg_id, c.event_type, c.attempt, o.result,
                 f" ({o.error})" if o.error else "")


def deliver_due(settings: Settings, factory: sessionmaker[Session], *,
                client: httpx.Client | None = None, batch: int = CLAIM_BATCH,
                max_batches: int = 10) -> int:
    """Send what is due; return the number of attempts made. Safe to run in several processes
    at once."""
    own = client is None
    # trust_env=False: no proxy from the environment, so the address checked is the one reached;
    # redirects are not followed (a 3xx is a failed attempt), for the same reason.
    client = client or httpx.Client(follow_redirects=False, trust_env=False)
    attempts = 0
    try:
        for _ in range(max_batches):
            claimed = _claim(settings, factory, batch)
            for c in claimed:
                _record(c, _send(c, settings, client), settings, factory)
                attempts += 1
            if len(claimed) < batch:
                break
    finally:
        if own:
            client.close()
    return attempts


def delivery_counts(session: Session) -> dict[str, int]:
    """Deliveries by status, for /metrics."""
    from sqlalchemy import func

    rows = session.execute(select(WebhookDelivery.status, func.count())
                           .group_by(WebhookDelivery.status)).all()
    return {DeliveryStatus(s).value: n for s, n in rows}
