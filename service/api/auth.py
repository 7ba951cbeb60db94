"""API keys and tenants: create, look up, revoke. No FastAPI here (``service.api.deps`` wraps it).

A key is ``dare_`` + 43 URL-safe characters (32 random bytes). The database keeps only its
SHA-256: with 256 bits of randomness a fast hash is enough (there is nothing to brute-force, so
a slow password hash would only cost time on every request). The first characters after
``dare_`` are stored in clear as ``prefix``, to find the row with an index and to name the key
in ``dare keys list`` / ``dare keys revoke``.

The API remembers a live key's principal for ``KEY_CACHE_TTL_S`` (:class:`PrincipalCache`), so a
read costs no key lookup. A revocation through :func:`revoke` in the same process empties every
cache at once; one made by another process (an operator's ``dare keys revoke``) takes effect in
an API process within ``KEY_CACHE_TTL_S`` seconds.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.states import utcnow
from service.store.models import ApiKey, Tenant

KEY_SCHEME = "dare_"
PREFIX_CHARS = 12
DEFAULT_TENANT = "default"  # who the open (loopback-only) mode acts as
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A key's last_used_at is written at most this often, so reads do not become writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_KEY_SHAPE = re.compile(r"^dare_[A-Za-z0-9_-]{40,64}$")
# How long an API process trusts a key it has checked. Bounds how late a revocation made by
# another process is noticed; short enough for an operator, long enough that steady traffic
# looks a key up once per period instead of once per request.
KEY_CACHE_TTL_S = 5.0
KEY_CACHE_SIZE = 4096  # keys remembered per process (least recently used go first)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant every query is scoped to."""

    tenant_id: uuid.UUID
    tenant: str
    key_prefix: str | None = None  # None in open mode


class InvalidTenantName(ValueError):
    pass


class KeyNotFound(LookupError):
    pass


def generate_key() -> str:
    return KEY_SCHEME + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    return key[len(KEY_SCHEME):][:PREFIX_CHARS]


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.match(name):
        raise InvalidTenantName(
            f"bad tenant name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit")
    return name


def get_tenant(session: Session, name: str) -> Tenant | None:
    return session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created if missing. Safe against a concurrent creator: the
    insert runs in a savepoint and the loser re-reads the winner's row."""
    check_tenant_name(name)
    tenant = get_tenant(session, name)
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(id=uuid.uuid4(), name=name, created_at=utcnow())
            session.add(tenant)
    except IntegrityError:
        tenant = get_tenant(session, name)
        assert tenant is not None
    return tenant


def create_api_key(session: Session, tenant: str, *, max_active_jobs: int | None = None) -> str:
    """A new key for ``tenant`` (created if needed); returns the plaintext, which is stored
    nowhere. The caller commits. ``max_active_jobs`` given: the tenant's quota is set to it."""
    t = ensure_tenant(session, tenant)
    if max_active_jobs is not None:
        t.max_active_jobs = max_active_jobs
    key = generate_key()
    session.add(ApiKey(id=uuid.uuid4(), tenant_id=t.id, prefix=key_prefix(key),
                       key_hash=hash_key(key), created_at=utcnow()))
    session.flush()
    return key


def authenticate(session: Session, key: str) -> Principal | None:
    """The principal a key stands for; None for a malformed, unknown or revoked key."""
    if not _KEY_SHAPE.match(key):
        return None
    digest = hash_key(key)
    rows = session.execute(
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == key_prefix(key), ApiKey.revoked_at.is_(None))).all()
    for api_key, tenant_name in rows:
        if hmac.compare_digest(api_key.key_hash, digest):
            now = utcnow()
            if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
                api_key.last_used_at = now
            return Principal(tenant_id=api_key.tenant_id, tenant=tenant_name,
                             key_prefix=api_key.prefix)
    return None


def is_key_shaped(key: str) -> bool:
    return bool(_KEY_SHAPE.match(key))


# Bumped by revoke() (before and after its commit): every PrincipalCache entry remembered under
# an older value is stale, so a revocation in this process is seen by its next request.
_revocations = 0
_revocations_lock = threading.Lock()


def _note_revocation(*_args: object) -> None:
    global _revocations
    with _revocations_lock:
        _revocations += 1


class PrincipalCache:
    """Who a key is (SHA-256 of the key -> :class:`Principal`), for ``ttl_s`` seconds; ``None``
    as the key stands for open mode's principal. Only live keys are remembered: an unknown or
    revoked key is looked up every time, so a flood of bad keys cannot evict good ones. Thread
    safe (the lookups run in the threadpool)."""

    def __init__(self, ttl_s: float = KEY_CACHE_TTL_S, size: int = KEY_CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.size, self.clock = ttl_s, size, clock
        self._entries: OrderedDict[str, tuple[float, int, Principal]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def generation() -> int:
        """Take this before a lookup and hand it to :meth:`put`: a revocation in between
        makes the entry stale at once."""
        return _revocations

    def get(self, key: str | None) -> Principal | None:
        slot = self._slot(key)
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return None
            expires, generation, principal = entry
            if generation != _revocations or self.clock() >= expires:
                del self._entries[slot]
                return None
            self._entries.move_to_end(slot)
            return principal

    def put(self, key: str | None, principal: Principal, generation: int) -> None:
        slot = self._slot(key)
        with self._lock:
            self._entries[slot] = (self.clock() + self.ttl_s, generation, principal)
            self._entries.move_to_end(slot)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    @staticmethod
    def _slot(key: str | None) -> str:
        # The digest, not the key: the process keeps no plaintext keys around longer than a request.
        return "" if key is None else hash_key(key)


def open_principal(session: Session) -> Principal:
    """Open mode: every request acts as the "default" tenant."""
    t = ensure_tenant(session, DEFAULT_TENANT)
    return Principal(tenant_id=t.id, tenant=t.name)


def list_keys(session: Session) -> list[tuple[ApiKey, str]]:
    return [(k, name) for k, name in session.execute(
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(Tenant.name, ApiKey.created_at)).all()]


def revoke(session: Session, prefix: str) -> ApiKey:
    """Revoke the one key whose prefix starts with ``prefix`` (``dare_`` optional). Revoking
    twice is harmless. Raises :class:`KeyNotFound` for no match or several."""
    prefix = prefix.removeprefix(KEY_SCHEME)
    if len(prefix) < 4:
        raise KeyNotFound(f"prefix {prefix!r} is too short: give at least 4 characters, as "
                          "`dare keys list` shows them")
    matches = list(session.scalars(select(ApiKey).where(
        ApiKey.prefix.startswith(prefix[:PREFIX_CHARS], autoescape=True))))
    if not matches:
        raise KeyNotFound(f"no key with prefix {prefix!r}; see `dare keys list`")
    if len(matches) > 1:
        raise KeyNotFound(f"{len(matches)} keys start with {prefix!r}; give more characters")
    key = matches[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        # This process's caches forget the key now and again once the revocation is committed
        # (a request in between may have re-read it as live).
        _note_revocation()
        event.listen(session, "after_commit", _note_revocation, once=True)
    return key
