"""Reads are cheap, and stay correct: a live key is looked up once per KEY_CACHE_TTL_S, a
revocation by another process (an operator's `dare keys revoke`) locks the key out within that
time, the polled reads are one statement each, whose JSON, written by PostgreSQL, is byte for
byte what the ORM and pydantic give, and a pooled connection whose server went away while it
idled is replaced, not handed to a request (no ping on every checkout any more)."""
from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import text

from service.api.auth import KEY_CACHE_TTL_S, PREFIX_CHARS, Principal, PrincipalCache
from service.store import db

from .conftest import REPO, dare_cmd, make_key, service_env, submit_files


@contextmanager
def statements(engine) -> Iterator[list[str]]:  # noqa: ANN001
    """The SQL sent to PostgreSQL for requests while the block runs, counted at psycopg's
    cursors, sync and async (the polled reads bypass SQLAlchemy, see service.jobs.pg_json);
    the API's own periodic threads, reconciler and webhook sender, are not counted."""
    assert engine.dialect.name == "postgresql"
    seen: list[str] = []
    execute, aexecute = psycopg.Cursor.execute, psycopg.AsyncCursor.execute

    def record(self, query, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not threading.current_thread().name.startswith("background"):
            seen.append(str(query))
        return execute(self, query, *args, **kwargs)

    async def arecord(self, query, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen.append(str(query))
        return await aexecute(self, query, *args, **kwargs)

    psycopg.Cursor.execute, psycopg.AsyncCursor.execute = record, arecord
    try:
        yield seen
    finally:
        psycopg.Cursor.execute, psycopg.AsyncCursor.execute = execute, aexecute


def test_a_live_key_is_looked_up_once_then_served_from_the_cache(client):
    engine = client.app.state.ctx.engine
    with statements(engine) as first:
        assert client.get("/v1/jobs").status_code == 200
    assert any("api_keys" in s for s in first)
    with statements(engine) as later:
        for _ in range(3):
            assert client.get("/v1/jobs").status_code == 200
    assert not any("api_keys" in s for s in later), later
    assert len(later) == 3  # the page itself


def test_a_job_is_one_statement_and_a_page_one_whatever_its_size(client, subject_bytes):
    files, data = submit_files(subject_bytes)
    created = [client.post("/v1/jobs", files=files, data=data).json() for _ in range(3)]
    job = created[0]
    engine = client.app.state.ctx.engine
    with statements(engine) as one:
        got = client.get(f"/v1/jobs/{job['id']}").json()
    with statements(engine) as page:
        listed = client.get("/v1/jobs?limit=5").json()
    with statements(engine) as small_page:
        first = client.get("/v1/jobs?limit=1").json()
    assert len(one) == 1 and len(page) == 1 and len(small_page) == 1, (one, page, small_page)
    assert got == job  # the same object the submission answered, inputs included
    assert listed["items"] == created[::-1]  # newest first, each with its own inputs
    assert first["items"] == [created[-1]] and first["next_cursor"]
    assert {i["field"] for i in got["inputs"]} == {"model", "history"}


def test_a_key_revoked_by_another_process_fails_within_the_ttl(client, clean_db, tmp_path):
    key = make_key(client.app.state.ctx.factory, "t-revoke")
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=auth).status_code == 200  # now cached
    env = service_env(DARE_HOME=str(tmp_path), DARE_DATABASE_URL=clean_db)
    r = subprocess.run(dare_cmd("keys", "revoke", key[:5 + PREFIX_CHARS]), check=False,
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    revoked_at = time.monotonic()
    # Another process cannot reach this one's cache: the key may work until its entry expires,
    # never longer.
    while time.monotonic() - revoked_at < KEY_CACHE_TTL_S + 0.5:
        time.sleep(0.25)
    got = client.get("/v1/jobs", headers=auth)
    assert got.status_code == 401, got.text
    assert got.json()["code"] == "unauthorized"


def test_the_cache_expires_forgets_on_revocation_and_stays_bounded():
    now = [0.0]
    cache = PrincipalCache(ttl_s=5, size=2, clock=lambda: now[0])
    p = Principal(tenant_id=uuid.uuid4(), tenant="t")
    keys = [f"dare_{c * 43}" for c in "abc"]
    cache.put(keys[0], p, cache.generation())
    assert cache.get(keys[0]) == p
    now[0] = 5.0
    assert cache.get(keys[0]) is None  # expired
    for k in keys:
        cache.put(k, p, cache.generation())
    assert cache.get(keys[0]) is None and cache.get(keys[2]) == p  # least recently used went
    stale = cache.generation()
    from service.api.auth import _note_revocation

    _note_revocation()  # what revoke() does in this process
    assert cache.get(keys[2]) is None
    cache.put(keys[1], p, stale)  # looked up before the revocation: not trusted
    assert cache.get(keys[1]) is None


def test_a_connection_whose_server_went_away_while_idle_is_replaced(pg_url, monkeypatch):
    engine = db.make_engine(pg_url)
    try:
        with engine.connect() as admin:  # held throughout: the pool's other connection
            with engine.connect() as c:
                pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
            # c's connection now idles in the pool; its server process goes away
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            admin.commit()
            monkeypatch.setattr(db, "PING_IDLE_AFTER_S", 0.0)  # every pooled one is "idle"
            with engine.connect() as c:
                assert c.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


def test_the_driver_level_reads_answer_what_the_orm_answers(client, subject_bytes):
    """GET /v1/jobs(/id) read PostgreSQL through psycopg directly and send pre-encoded bytes:
    they must be the bytes the ORM's Job, through job_read and FastAPI's response_model, give,
    with every filter (statuses, cursor) of a page."""
    from dare_client.schemas import JobList, JobRead

    from service.jobs import records as jobs
    from service.states import JobStatus

    files, data = submit_files(subject_bytes)
    ids = [client.post("/v1/jobs", files=files, data=data).json()["id"] for _ in range(3)]
    cancelled = client.post(f"/v1/jobs/{ids[1]}/cancel").json()
    assert cancelled["status"] == "cancelled"
    ctx = client.app.state.ctx
    tenant_id = ctx.principals.get(client.headers["Authorization"].split()[1]).tenant_id
    with ctx.factory() as s:
        orm = JobRead.__pydantic_serializer__.to_json(
            JobRead.model_validate(jobs.job_read(jobs.get_job(s, uuid.UUID(ids[1])))))
        got = client.get(f"/v1/jobs/{ids[1]}")
        assert got.headers["content-type"] == "application/json"
        assert got.content == orm
        for statuses in ([], [JobStatus.queued], [JobStatus.cancelled, JobStatus.queued]):
            q = "&".join(f"status={st.value}" for st in statuses)
            first = client.get(f"/v1/jobs?limit=1&{q}")
            expected = jobs.page_json(*jobs.list_jobs(s, tenant_id=tenant_id, statuses=statuses,
                                                      limit=1))  # Session: the ORM path
            assert first.content == expected, statuses
            cursor = first.json()["next_cursor"]
            nxt = client.get(f"/v1/jobs?limit=1&{q}&cursor={cursor}")
            assert nxt.content == jobs.page_json(*jobs.list_jobs(
                s, tenant_id=tenant_id, statuses=statuses, limit=1, cursor=cursor))
            assert JobList.model_validate_json(nxt.content).items[0].id != \
                JobList.model_validate_json(first.content).items[0].id
