"""Bearer API keys: every /v1 route refuses a request without a live key (401 problem+json that
says how to get one), keys are stored only as hashes, and `dare keys` creates, lists and revokes
them against the real database."""
from __future__ import annotations

import hashlib
import re
import subprocess

import pytest
from sqlalchemy import inspect, text

from service.api.auth import PREFIX_CHARS, authenticate, create_api_key, revoke
from service.cli.main import _auth_line, _is_loopback
from service.store.models import ApiKey, Job

from .conftest import REPO, api_routes, dare_cmd, make_key, service_env, submit_files

PROBLEM = "application/problem+json"


def _v1_requests(app) -> list[tuple[str, str]]:
    """(method, path) for every /v1 route, path parameters filled with harmless values."""
    fill = {"job_id": "6f1c2d4e-8a9b-4c3d-9e2f-1a2b3c4d5e6f"}
    return [(m, re.sub(r"\{(\w+)(:\w+)?\}", lambda g: fill.get(g[1], "x"), path))
            for m, path in api_routes(app)]


def _assert_401(r) -> None:
    assert r.status_code == 401, (r.request.method, r.request.url, r.text)
    assert r.headers["content-type"] == PROBLEM
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert body["code"] == "unauthorized"
    assert "dare keys create --tenant" in body["detail"]


@pytest.mark.parametrize("authorization", [
    None,                                    # no header
    "Bearer",                                # no credentials
    "Basic dXNlcjpwYXNz",                    # another scheme
    "Bearer not-a-key",                      # garbage
    "Bearer dare_" + "A" * 43,               # well-formed, unknown
])
def test_every_v1_route_refuses_a_request_without_a_live_key(client, authorization):
    requests = _v1_requests(client.app)
    assert ("POST", "/v1/jobs") in requests and ("GET", "/v1/jobs") in requests
    for method, path in requests:
        # replaces the client fixture's own key ("" sends none)
        _assert_401(client.request(method, path, headers={"Authorization": authorization or ""}))
    # health and docs stay open
    anonymous = {"Authorization": ""}
    assert client.get("/healthz", headers=anonymous).status_code == 200
    assert client.get("/readyz", headers=anonymous).status_code == 200
    assert client.get("/openapi.json", headers=anonymous).status_code == 200


def test_a_revoked_key_stops_working(client):
    factory = client.app.state.ctx.factory
    key = make_key(factory, "t3")
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=auth).status_code == 200
    with factory.begin() as s:
        revoke(s, key[:5 + PREFIX_CHARS])
    _assert_401(client.get("/v1/jobs", headers=auth))
    with factory.begin() as s:
        revoke(s, key[:5 + PREFIX_CHARS])  # twice is harmless
        assert authenticate(s, key) is None


def test_keys_are_stored_hashed_the_plaintext_is_nowhere(client, clean_db, subject_bytes):
    factory = client.app.state.ctx.factory
    key = make_key(factory, "t3")
    auth = {"Authorization": f"Bearer {key}"}
    files, data = submit_files(subject_bytes)
    assert client.post("/v1/jobs", files=files, data=data, headers=auth).status_code == 202
    secret = key[5 + PREFIX_CHARS:]  # what the stored prefix does not reveal
    engine = client.app.state.ctx.engine
    tables = inspect(engine).get_table_names()
    assert {"api_keys", "tenants", "jobs"} <= set(tables)
    with engine.connect() as c:
        for table in tables:
            for row in c.execute(text(f'SELECT * FROM "{table}"')):
                dump = repr(tuple(row))
                assert key not in dump and secret not in dump, table
    with factory() as s:
        stored = s.query(ApiKey).filter(ApiKey.prefix == key[5:5 + PREFIX_CHARS]).one()
        assert stored.key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert stored.last_used_at is not None  # the request above was recorded
        job = s.query(Job).one()
        assert job.tenant_id == stored.tenant_id  # the job belongs to the key's tenant


def test_keys_are_256_bit_random_and_distinct(client):
    factory = client.app.state.ctx.factory
    with factory.begin() as s:
        keys = {create_api_key(s, "t3") for _ in range(20)}
    assert len(keys) == 20
    for k in keys:
        assert k.startswith("dare_") and len(k) == 5 + 43  # token_urlsafe(32): 43 characters


def test_dare_keys_create_prints_a_working_key_list_hides_it_revoke_kills_it(
        client, clean_db, tmp_path, monkeypatch, capsys):
    # The real command line once; the other actions in-process (same code, no interpreter start).
    env = service_env(DARE_HOME=str(tmp_path), DARE_DATABASE_URL=clean_db)
    r = subprocess.run(dare_cmd("keys", "create", "--tenant", "cli-tenant", "--max-active-jobs",
                                "7"), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    key = r.stdout.splitlines()[0]
    assert key.startswith("dare_")
    assert "cannot be shown again" in r.stderr
    ok = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and ok.json()["items"] == []

    from service.cli.main import main
    from service.settings import get_settings

    monkeypatch.setenv("DARE_HOME", str(tmp_path))
    monkeypatch.setenv("DARE_DATABASE_URL", clean_db)
    get_settings.cache_clear()
    try:
        def dare(*args: str) -> tuple[int, str, str]:
            code = main(["keys", *args])
            out = capsys.readouterr()
            return code, out.out, out.err

        code, out, _ = dare("list")
        assert code == 0
        assert f"dare_{key[5:5 + PREFIX_CHARS]}" in out and "cli-tenant" in out
        assert key not in out and key[5 + PREFIX_CHARS:] not in out

        code, out, _ = dare("revoke", key[:5 + PREFIX_CHARS])
        assert code == 0 and "revoked" in out
        _assert_401(client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}))
        code, _, err = dare("revoke", "dare_zzzzzzzz")
        assert code == 1 and "no key with prefix" in err
        code, _, err = dare("create", "--tenant", "bad name!")
        assert code == 2 and "bad tenant name" in err
    finally:
        get_settings.cache_clear()
    with client.app.state.ctx.engine.connect() as c:
        limit = c.execute(text("SELECT max_active_jobs FROM tenants WHERE name = 'cli-tenant'"))
        assert limit.scalar() == 7


def test_open_mode_acts_as_the_default_tenant(settings, dispatcher, subject_bytes):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(settings.model_copy(update={"auth": "open"}), dispatcher=dispatcher)
    # open mode serves loopback names only (service.api.open_mode_guard), not "testserver"
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as c:
        files, data = submit_files(subject_bytes)
        r = c.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 202, r.text
        assert c.get(f"/v1/jobs/{r.json()['id']}").status_code == 200
        with app.state.ctx.engine.connect() as conn:
            owner = conn.execute(text("SELECT t.name FROM jobs j JOIN tenants t "
                                      "ON t.id = j.tenant_id")).scalar()
        assert owner == "default"
    app.state.ctx.engine.dispose()


def test_dare_serve_is_open_only_on_loopback():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")
    assert not _is_loopback("example.com")
    assert "open (no authentication) on loopback" in _auth_line("open", "127.0.0.1", "/h")
    assert "dare keys create --tenant" in _auth_line("required", "0.0.0.0", "/h")
    assert "WARNING" in _auth_line("open", "0.0.0.0", "/h")
