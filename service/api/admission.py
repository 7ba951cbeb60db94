"""Admitting a job submission before its body is read, and the staging disk's budget.

Refusing costs nothing while the body is still unread, so two checks come first in
``POST /v1/jobs``: the tenant's quota of active jobs (:func:`service.api.quotas.precheck`; checked
again under the tenant's lock in ``service.api.submission``) and a cap on the tenant's submissions
in flight (bodies being received or inspected at once), so one tenant cannot hold the API's
threads, the inspector's queue or the staging disk with many slow uploads.

The admitted submission gets a :class:`Ticket`; the route releases it on every path (``finally``),
which returns its in-flight place and the staged bytes it was charged, and gives up its staging
folder (``service.api.staging``). Both counts live in this
process: one API process owns its staging folder (``DARE_UPLOAD_TMP_DIR``), so with several
replicas the caps hold per replica.
"""
from __future__ import annotations

import threading
import uuid
from collections import Counter
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.api import idempotency, quotas
from service.api.staging import StagingLock
from service.api.uploads import StagingFull
from service.store.db import session_scope

INFLIGHT_RETRY_AFTER_S = 5
STAGING_RETRY_AFTER_S = 30


class TooManySubmissionsInFlight(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} submissions of this tenant are in flight already")
        self.limit = limit


class Admission:
    """Per-process counts: each tenant's submissions in flight, and the bytes being staged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # charged from the thread pool as well as the event loop
        self._inflight: Counter[uuid.UUID] = Counter()
        self.staged = 0

    def inflight(self, tenant_id: uuid.UUID) -> int:
        with self._lock:
            return self._inflight[tenant_id]

    def enter(self, tenant_id: uuid.UUID, max_inflight: int, staging_budget: int) -> Ticket:
        with self._lock:
            if self._inflight[tenant_id] >= max_inflight:
                raise TooManySubmissionsInFlight(max_inflight)
            self._inflight[tenant_id] += 1
        return Ticket(self, tenant_id, staging_budget)

    def _charge(self, n: int, budget: int) -> None:
        with self._lock:
            if self.staged + n > budget:
                raise StagingFull(budget, self.staged, n)
            self.staged += n

    def _leave(self, tenant_id: uuid.UUID, staged: int) -> None:
        with self._lock:
            self.staged -= staged
            self._inflight[tenant_id] -= 1
            if self._inflight[tenant_id] <= 0:
                del self._inflight[tenant_id]


class Ticket:
    """One admitted submission: its in-flight place and the staged bytes charged to it."""

    def __init__(self, admission: Admission, tenant_id: uuid.UUID, budget: int) -> None:
        self._admission = admission
        self.tenant_id = tenant_id
        self.budget = budget
        self.staged = 0
        self._released = False
        self._lock: StagingLock | None = None
        # The Idempotency-Key already has a job: the upload is only compared with that job's
        # request (service.api.submission replays it), so it is neither quota-checked nor inspected.
        self.replay = False

    def hold(self, staging: Path) -> None:
        """Create the staging folder and own it (service.api.staging) until :meth:`release`."""
        self._lock = StagingLock(staging)

    def room_for(self, n: int) -> None:
        """Raise :class:`StagingFull` unless ``n`` more bytes would fit now (charges nothing)."""
        a = self._admission
        with a._lock:
            if a.staged + n > self.budget:
                raise StagingFull(self.budget, a.staged, n)

    def charge(self, n: int) -> None:
        """Count ``n`` bytes about to be written to staging; raise :class:`StagingFull` past the
        budget."""
        self._admission._charge(n, self.budget)
        self.staged += n

    def release(self) -> None:
        """Idempotent: the route calls it in ``finally`` whatever happened."""
        if not self._released:
            self._released = True
            self._admission._leave(self.tenant_id, self.staged)
            if self._lock is not None:
                self._lock.release()


def admit(admission: Admission, factory: sessionmaker[Session], tenant_id: uuid.UUID, *,
          max_inflight: int, staging_budget: int, max_active_jobs: int,
          idempotency_key: str | None) -> Ticket:
    """Take one of the tenant's in-flight places, then check its quota (a database read: call
    it from a worker thread). Raises :class:`TooManySubmissionsInFlight` or
    :class:`service.api.quotas.TooManyActiveJobs`, holding nothing."""
    ticket = admission.enter(tenant_id, max_inflight, staging_budget)
    try:
        with session_scope(factory) as s:
            # A retry of an accepted submission answers with that job even at the quota (which
            # that very job may fill): service.api.submission replays it after the upload.
            ticket.replay = bool(idempotency_key
                                 and idempotency.find(s, tenant_id, idempotency_key))
            if not ticket.replay:
                quotas.precheck(s, tenant_id, max_active_jobs)
    except BaseException:
        ticket.release()
        raise
    return ticket
