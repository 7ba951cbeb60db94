"""service/api/auth.py at its edges, straight against PostgreSQL (no HTTP): revocation by prefix
(its minimum length, a shared prefix, LIKE wildcards, a whole key), the stored prefix's length,
a key that shares a live key's prefix, last_used_at's one-minute resolution, the tenant insert
race, the quota a key sets, and the principal cache's LRU order and size bound."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from service.api import auth
from service.api.auth import (KeyNotFound, Principal, PrincipalCache, authenticate, create_api_key,
                              ensure_tenant, get_tenant, hash_key, revoke)
from service.states import utcnow
from service.store.db import engine_for, session_factory
from service.store.models import ApiKey


@pytest.fixture
def factory(clean_db):
    return session_factory(engine_for(clean_db))


def _new_key(factory, tenant="t1", **kw) -> str:
    with factory.begin() as s:
        return create_api_key(s, tenant, **kw)


def _row(factory, key: str) -> ApiKey:
    with factory() as s:
        return s.query(ApiKey).filter(ApiKey.key_hash == hash_key(key)).one()


def test_the_stored_prefix_is_the_12_characters_after_the_scheme(factory):
    """The prefix is persisted: keys made before a change of its length must still be found."""
    key = _new_key(factory)
    assert _row(factory, key).prefix == key[5:17]


def test_revoking_takes_4_characters_or_more_with_or_without_the_scheme(factory):
    key = _new_key(factory)
    with factory.begin() as s, pytest.raises(KeyNotFound, match="too short"):
        revoke(s, key[5:8])
    with factory.begin() as s:
        assert revoke(s, "dare_" + key[5:9]).revoked_at is not None
    with factory() as s:
        assert authenticate(s, key) is None
    other = _new_key(factory)
    with factory.begin() as s:  # the whole key is a prefix too (only its first 12 are compared)
        revoke(s, other)
    with factory() as s:
        assert authenticate(s, other) is None


def test_revoking_twice_keeps_the_first_time(factory):
    key = _new_key(factory)
    with factory.begin() as s:
        first = revoke(s, key[:9]).revoked_at
    with factory.begin() as s:
        assert revoke(s, key[:9]).revoked_at == first


def test_a_prefix_two_keys_share_revokes_neither(factory):
    key = _new_key(factory)
    with factory.begin() as s:
        row = s.query(ApiKey).one()
        twin = ApiKey(id=uuid.uuid4(), tenant_id=row.tenant_id, prefix=row.prefix[:4] + "zzzzzzzz",
                      key_hash="0" * 64, created_at=utcnow())
        s.add(twin)
    with factory.begin() as s, pytest.raises(KeyNotFound, match="2 keys start with"):
        revoke(s, key[5:9])
    with factory() as s:
        assert authenticate(s, key) is not None


def test_wildcards_in_a_prefix_are_literal_characters(factory):
    key = _new_key(factory)
    for pattern in ("%%%%", "____"):
        with factory.begin() as s, pytest.raises(KeyNotFound, match="no key with prefix"):
            revoke(s, pattern)
    with factory() as s:
        assert authenticate(s, key) is not None


def test_a_key_with_a_live_keys_prefix_but_another_secret_is_refused(factory):
    key = _new_key(factory)
    forged = key[:17] + ("A" if key[17] != "A" else "B") + key[18:]
    with factory() as s:
        assert authenticate(s, forged) is None and authenticate(s, key) is not None


@pytest.mark.parametrize("ago_s, written", [(59, False), (61, True)])
def test_last_used_is_written_at_most_once_a_minute(factory, ago_s, written):
    key = _new_key(factory)
    before = utcnow() - timedelta(seconds=ago_s)
    with factory.begin() as s:
        s.query(ApiKey).update({ApiKey.last_used_at: before})
    with factory.begin() as s:
        assert authenticate(s, key) is not None
    assert (_row(factory, key).last_used_at != before) is written


def test_a_tenant_created_meanwhile_by_another_session_is_reused(factory, monkeypatch):
    """The insert race: this session did not see the tenant, another created it; the unique
    name makes the insert fail inside its savepoint and the winner's row is returned."""
    with factory.begin() as s:
        winner = ensure_tenant(s, "race").id
    calls = []

    def blind_once(session, name):
        calls.append(name)
        return None if len(calls) == 1 else get_tenant(session, name)

    monkeypatch.setattr(auth, "get_tenant", blind_once)
    with factory.begin() as s:
        assert ensure_tenant(s, "race").id == winner
    assert calls == ["race", "race"]


def test_a_key_sets_its_tenants_quota_only_when_asked(factory):
    _new_key(factory, "q", max_active_jobs=3)
    _new_key(factory, "q")  # a second key leaves the quota alone
    with factory() as s:
        assert get_tenant(s, "q").max_active_jobs == 3
    _new_key(factory, "q", max_active_jobs=0)
    with factory() as s:
        assert get_tenant(s, "q").max_active_jobs == 0


def test_the_principal_cache_evicts_the_least_recently_read_and_holds_its_size():
    cache = PrincipalCache(ttl_s=60, size=2, clock=lambda: 0.0)
    p = {k: Principal(tenant_id=uuid.uuid4(), tenant=k) for k in "abc"}
    cache.put("a", p["a"], cache.generation())
    cache.put("b", p["b"], cache.generation())
    assert cache.get("a") == p["a"]  # a read makes "a" the most recent
    cache.put("c", p["c"], cache.generation())
    assert cache.get("b") is None  # the least recently used went
    assert cache.get("a") == p["a"] and cache.get("c") == p["c"]  # two entries, as sized
    cache.put(None, p["b"], cache.generation())  # open mode's principal has a slot of its own
    assert cache.get(None) == p["b"] and cache.get("a") is None


def test_the_key_list_names_each_keys_own_tenant(factory):
    a1, b1, a2 = _new_key(factory, "a"), _new_key(factory, "b"), _new_key(factory, "a")
    with factory() as s:
        listed = [(k.prefix, name) for k, name in auth.list_keys(s)]
    assert listed == [(a1[5:17], "a"), (a2[5:17], "a"), (b1[5:17], "b")]


def test_a_principal_cannot_be_changed_once_made():
    """The cache hands the same Principal to every request of a key: none may alter it."""
    import dataclasses

    p = Principal(tenant_id=uuid.uuid4(), tenant="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tenant = "other"
