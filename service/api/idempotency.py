"""``Idempotency-Key`` on ``POST /v1/jobs``: a retried submission returns the job the first one
created instead of creating a second.

A key belongs to the tenant that sent it (unique on (tenant_id, idempotency_key)). The job
records a hash of the request's canonical form: each file field's name and the sha256 of its
bytes as received, and each text field's value (file names are left out: the same bytes under
another name are the same request). Same key and hash: the same job again. Same key, other hash:
:class:`IdempotencyKeyReused` (422). Two concurrent first submissions are settled by the unique
constraint; the loser answers with the winner's job.
"""
from __future__ import annotations

import hashlib
import json
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from service.api.uploads import ReceivedForm
from service.store.models import Job

KEY_PATTERN = r"^[!-~]{1,255}$"  # visible ASCII: a UUID is the usual choice


class IdempotencyKeyReused(Exception):
    def __init__(self, key: str, job_id: uuid.UUID) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used for job {job_id} with another request")
        self.key = key
        self.job_id = job_id


def request_hash(form: ReceivedForm) -> str:
    canonical = {"files": {name: f.sha256 for name, f in sorted(form.files.items())},
                 "fields": dict(sorted(form.fields.items()))}
    raw = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def find(session: Session, tenant_id: uuid.UUID, key: str) -> Job | None:
    return session.scalars(select(Job).options(selectinload(Job.inputs))
                           .where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
                           ).one_or_none()


def replay(job: Job, key: str, digest: str) -> Job:
    """The job to answer a repeated submission with; raises when the request differs."""
    if job.request_hash != digest:
        raise IdempotencyKeyReused(key, job.id)
    return job
