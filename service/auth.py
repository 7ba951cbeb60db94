"""API keys and tenants: create, look up, revoke. No FastAPI here (``service.deps`` wraps it).

A key is ``dare_`` + 43 URL-safe characters (32 random bytes). The database keeps only its
SHA-256: with 256 bits of randomness a fast hash is enough (there is nothing to brute-force, so
a slow password hash would only cost time on every request). The first characters after
``dare_`` are stored in clear as ``prefix``, to find the row with an index and to name the key
in ``dare keys list`` / ``dare keys revoke``.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import ApiKey, Tenant
from .states import utcnow

KEY_SCHEME = "dare_"
PREFIX_CHARS = 12
DEFAULT_TENANT = "default"  # who the open (loopback-only) mode acts as
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A key's last_used_at is written at most this often, so reads do not become writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_KEY_SHAPE = re.compile(r"^dare_[A-Za-z0-9_-]{40,64}$")


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
    return key
