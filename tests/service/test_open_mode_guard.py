"""Open mode (no keys, `dare serve` on loopback) refuses what a web page could send: a foreign
Origin (CSRF) or a foreign Host (DNS rebinding); curl-like clients (no Origin, a loopback Host)
keep working without a token. With keys required the guard is not installed."""
from __future__ import annotations

import httpx
import pytest
from sqlalchemy import func, select

from service.api.open_mode_guard import OpenModeGuard, host_name, is_loopback_origin
from service.store.models import Job

from .conftest import (
    Proc,
    dare_cmd,
    free_port,
    make_key,
    service_env,
    submit_files,
    wait_http,
)

LOOPBACK = "http://127.0.0.1:8000"


@pytest.fixture
def open_app(settings, dispatcher):
    from service.api.app import create_app

    app = create_app(settings.model_copy(update={"auth": "open"}), dispatcher=dispatcher)
    yield app
    app.state.ctx.engine.dispose()


def _client(app, base_url: str = LOOPBACK):  # noqa: ANN001, ANN202
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


def _jobs_in_db(app) -> int:  # noqa: ANN001
    with app.state.ctx.factory() as s:
        return s.scalar(select(func.count()).select_from(Job))


def _staging(app) -> list:  # noqa: ANN001
    d = app.state.ctx.settings.upload_tmp_dir
    return list(d.iterdir()) if d.is_dir() else []


def _assert_refused(r: httpx.Response, code: str) -> None:
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code
    assert "DARE_AUTH=required" in body["detail"] and "Fix:" in body["detail"]


# --- the parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("host,name", [
    ("127.0.0.1", "127.0.0.1"), ("127.0.0.1:8000", "127.0.0.1"), ("localhost:3000", "localhost"),
    ("[::1]:8000", "::1"), ("[::1]", "::1"), ("evil.example:80", "evil.example"),
    ("::1", None), ("[::1]x", None), ("127.0.0.1:80x", None), ("[::1", None)])
def test_host_header_names(host, name):
    assert host_name(host) == name


@pytest.mark.parametrize("origin,ok", [
    ("http://127.0.0.1:8000", True), ("http://localhost:3000", True), ("https://localhost", True),
    ("http://[::1]:8000", True), ("http://LOCALHOST:8000", True), ("http://127.0.0.2", True),
    ("null", False), ("", False), ("https://evil.example", False),
    ("http://localhost.evil.example", False), ("http://127.0.0.1.nip.io", False),
    ("file://", False), ("ftp://127.0.0.1", False), ("http://127.0.0.1:99999", False),
    ("http://user@127.0.0.1", False), ("http://127.0.0.1/path", False),
    ("http://0.0.0.0:8000", False), ("http://[::ffff:7f00:1]", False)])
def test_loopback_origins(origin, ok):
    assert is_loopback_origin(origin) is ok


# --- the app in open mode ---------------------------------------------------------------------

def test_a_foreign_origin_cannot_submit_and_nothing_is_stored(open_app, dispatcher, subject_bytes):
    files, data = submit_files(subject_bytes)
    with _client(open_app) as c:
        for origin in ("https://evil.example", "null", "http://localhost.evil.example:8000"):
            r = c.post("/v1/jobs", files=files, data=data, headers={"Origin": origin})
            _assert_refused(r, "forbidden_origin")
        # a read is refused too: the page must not learn what this machine runs
        _assert_refused(c.get("/v1/jobs", headers={"Origin": "https://evil.example"}),
                        "forbidden_origin")
        assert _jobs_in_db(open_app) == 0 and dispatcher.sent == [] and _staging(open_app) == []


def test_a_foreign_host_is_refused_for_every_route(open_app, dispatcher, subject_bytes):
    files, data = submit_files(subject_bytes)
    # What a DNS-rebound page sends: its own name as Host, and its own origin (same-origin).
    with _client(open_app, "http://rebind.evil.example:8000") as c:
        _assert_refused(c.post("/v1/jobs", files=files, data=data), "forbidden_host")
        _assert_refused(c.get("/v1/jobs"), "forbidden_host")
        _assert_refused(c.get("/healthz"), "forbidden_host")
        r = c.get("/v1/jobs", headers={"Host": "127.0.0.1.evil.example"})
        _assert_refused(r, "forbidden_host")
    with _client(open_app, "http://testserver") as c:  # the TestClient's default Host
        _assert_refused(c.get("/v1/jobs"), "forbidden_host")
    assert _jobs_in_db(open_app) == 0 and dispatcher.sent == [] and _staging(open_app) == []


@pytest.mark.parametrize("host,origin", [
    ("127.0.0.1:8000", None), ("127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("127.0.0.1", "http://localhost:3000"), ("localhost:8000", None),
    ("[::1]:8000", "http://[::1]:8000")])
def test_loopback_hosts_and_origins_are_served_without_a_token(open_app, dispatcher, subject_bytes,
                                                                 host, origin):
    files, data = submit_files(subject_bytes)
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    with _client(open_app) as c:
        r = c.post("/v1/jobs", files=files, data=data, headers=headers)
        assert r.status_code == 202, r.text
        assert c.get(f"/v1/jobs/{r.json()['id']}", headers=headers).status_code == 200
    assert _jobs_in_db(open_app) == 1 and len(dispatcher.sent) == 1


def test_with_keys_required_the_guard_is_not_installed(client, subject_bytes):
    assert all(m.cls is not OpenModeGuard for m in client.app.user_middleware)
    # Behind a proxy with its own name, a key is what authorises, not the Host or Origin.
    r = client.get("/v1/jobs", headers={"Host": "dare.example.com",
                                         "Origin": "https://dashboard.example.com"})
    assert r.status_code == 200, r.text
    assert client.get("/v1/jobs", headers={"Authorization": ""}).status_code == 401


# --- over a real socket -----------------------------------------------------------------------

def test_dare_api_in_open_mode_refuses_cross_site_requests_over_http(settings, subject_bytes,
                                                                     tmp_path):
    from .conftest import REDIS_URL

    port = free_port()
    env = service_env(DARE_HOME=str(tmp_path / "home"), DARE_DATABASE_URL=settings.database_url,
                      DARE_BROKER_URL=REDIS_URL, DARE_AUTH="open", DARE_SUBMIT_INSPECTION="off",
                      DARE_RECONCILE_INTERVAL_S="0", DARE_WEBHOOK_POLL_INTERVAL_S="0")
    api = Proc("api", dare_cmd("api", "--port", str(port)), env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", api)
        files, data = submit_files(subject_bytes)
        r = httpx.post(f"{base}/v1/jobs", files=files, data=data, timeout=30,
                       headers={"Origin": "https://evil.example"})
        _assert_refused(r, "forbidden_origin")
        r = httpx.get(f"{base}/v1/jobs", headers={"Host": f"evil.example:{port}"}, timeout=30)
        _assert_refused(r, "forbidden_host")
        r = httpx.get(f"{base}/v1/jobs", timeout=30)  # what curl does
        assert r.status_code == 200 and r.json()["items"] == []
        staging = tmp_path / "home" / "uploads"
        assert not staging.is_dir() or list(staging.iterdir()) == []
    finally:
        api.stop()
