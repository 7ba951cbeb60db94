"""Per-tenant limit on concurrent jobs (queued, running or cancelling).

The count and the insert of the new job happen while the tenant's row is locked, so two
submissions racing for the last slot cannot both win: PostgreSQL takes a row lock (SELECT ... FOR
UPDATE); SQLite has no row locks, so a no-op UPDATE takes its database write lock first.
"""
from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.states import JobStatus
from service.store.models import Job, Tenant

ACTIVE = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)
RETRY_AFTER_S = 30


class TooManyActiveJobs(Exception):
    def __init__(self, tenant: str, limit: int, active: int) -> None:
        super().__init__(f"tenant {tenant!r} has {active} active jobs; the limit is {limit}")
        self.tenant = tenant
        self.limit = limit
        self.active = active


def lock_tenant(session: Session, tenant_id: uuid.UUID) -> Tenant:
    """The tenant's row, locked until the session's transaction ends. Call it first in the
    transaction (on SQLite the write lock must come before any read)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Tenant).where(Tenant.id == tenant_id)
                        .values(max_active_jobs=Tenant.max_active_jobs))
    tenant = session.scalars(select(Tenant).where(Tenant.id == tenant_id).with_for_update()
                             .execution_options(populate_existing=True)).one()
    return tenant


def active_jobs(session: Session, tenant_id: uuid.UUID) -> int:
    return session.scalar(select(func.count(Job.id)).where(Job.tenant_id == tenant_id,
                                                           Job.status.in_(ACTIVE))) or 0


def check_quota(session: Session, tenant: Tenant, default_limit: int) -> None:
    """Raise :class:`TooManyActiveJobs` when one more job would exceed the tenant's limit."""
    limit = tenant.max_active_jobs if tenant.max_active_jobs is not None else default_limit
    active = active_jobs(session, tenant.id)
    if active >= limit:
        raise TooManyActiveJobs(tenant.name, limit, active)


def precheck(session: Session, tenant_id: uuid.UUID, default_limit: int) -> None:
    """The same check without the lock: refuses early, before the costly checks of the upload."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is not None:
        check_quota(session, tenant, default_limit)
