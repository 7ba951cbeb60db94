"""The polled reads on PostgreSQL: JSON written by the database (service.jobs.pg_json) is byte for
byte what the ORM and pydantic write, for the values that format differently in SQL (floats near
0 and 1, NaN, whole seconds, NULLs, strings that need escaping, jsonb with ", " inside strings);
the middleware that answers them before FastAPI (service.api.polled_reads) answers only what the
route would, and hands everything else on; the async pool replaces broken connections and
never opens more than its size."""
from __future__ import annotations

import asyncio
import math
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from dare_client.schemas import JobRead
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.api.polled_reads import PolledReads
from service.jobs import records as jobs
from service.jobs.records import StoredInput, create_job
from service.states import JobStatus
from service.store import db
from service.store.aio_pool import AsyncPool
from service.store.db import make_engine

from .conftest import tenant_id

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
# (status, stage_name, stage_index, stages, stage_progress, progress, error, result)
ODD_VALUES = [
    ("queued", None, None, ["validate", "mine"], 0.0, 0.0, None, None),
    ("queued", None, None, [], 0.0, 0.0, None, None),
    ("running", "mine", 1, ["validate", "mine"], 1 / 3, 0.1 + 0.2, None, None),
    ("running", "mine", 1, ["validate", "mine"], 1e-4, 9.99e-5, None, None),
    ("running", "mine", 1, ["validate", "mine"], 1.5e-5, 1e-5, None, None),
    ("running", "mine", 1, ["validate", "mine"], 9.9e-6, 1.234e-7, None, None),
    ("running", "mine", 1, ["validate", "mine"], 5e-324, 0.999999999999, None, None),
    ("running", "tune", 2, ["a", "b", "c"], -0.5, 1.5, None, None),
    ("running", "tune", 2, ["a", "b", "c"], math.nan, math.inf, None, None),
    ("failed", "tune", 2, ["a"], 1.0, -math.inf,
     ("stage_failed", 'a "quoted", \\ back\nslash\t\x01\x1f é ✓ 😀 </script>', "tune"), None),
    ("failed", None, None, ["a"], 0.5, 0.5, ("code_only", None, None), None),
    ("failed", None, None, ["a"], 0.5, 0.5, ("", "an empty code is no error", None), None),
    ("succeeded", "evaluate", 5, ["a"] * 6, 1.0, 1.0, None,
     {"acc": 0.9, "tiny": 1e-7, "big": 1e16, "whole": 1.0, "int": 3, "neg": -2.5e-5,
      "text": "a, b: c", "nested": {"k: v": [1, 2.0, None, True, "x,y"]}, "e": "é\u2028"}),
    ("succeeded", "evaluate", 5, ["a"], 1.0, 1.0, None, {}),
    ("cancelled", "mine", 1, ["a", "b"], 0.25, 0.125, None, None),
]


def _seed_odd_jobs(factory, tenant: uuid.UUID) -> list[str]:  # noqa: ANN001
    ids = []
    with factory.begin() as s:
        for n, (status, name, index, stages, sp, p, error, result) in enumerate(ODD_VALUES):
            job = create_job(
                s, job_id=uuid.uuid4(), tenant_id=tenant, stages=stages, model_format="onnx",
                config={"q": 0.95, "lr": 1e-6, "note": "x, y: z", "nested": {"b": [1.0, 2]},
                        "n": n},
                inputs=[StoredInput("model", f'm"{n}", é.onnx', "file:///x", 10 ** n, "0" * 64),
                        StoredInput("history", "h.zip", "file:///y", 0, "f" * 64)][:n % 3])
            job.status = JobStatus(status)
            job.stage_name, job.stage_index, job.stage_progress, job.progress = name, index, sp, p
            # whole seconds, and microseconds, both formatted
            job.created_at = T0 + timedelta(seconds=n, microseconds=0 if n % 2 else 1000 * n + 7)
            job.started_at = None if status == "queued" else T0 + timedelta(minutes=n)
            job.finished_at = T0 + timedelta(hours=1, microseconds=500000) \
                if status in ("failed", "succeeded", "cancelled") else None
            if error:
                job.error_code, job.error_message, job.error_stage = error
            job.result = result
            ids.append(str(job.id))
    return ids


def test_the_json_postgresql_writes_is_the_bytes_pydantic_writes(client):
    ctx = client.app.state.ctx
    tenant = tenant_id(ctx.factory, "t1")
    ids = _seed_odd_jobs(ctx.factory, tenant)
    with ctx.factory() as s:
        for job_id in ids:
            orm = jobs.get_job(s, uuid.UUID(job_id))
            expected = JobRead.__pydantic_serializer__.to_json(jobs.job_read(orm))
            got = client.get(f"/v1/jobs/{job_id}")
            assert got.status_code == 200
            assert got.content == expected, (orm.progress, orm.stage_progress, orm.result)
        cursor = None
        for _ in range(len(ids) // 4 + 2):  # every page, pages of 4 (cursor at whole seconds)
            q = f"limit=4&cursor={cursor}" if cursor else "limit=4"
            got = client.get(f"/v1/jobs?{q}")
            assert got.content == jobs.page_json(*jobs.list_jobs(s, tenant_id=tenant, limit=4,
                                                                 cursor=cursor))
            cursor = got.json()["next_cursor"]
            if cursor is None:
                break
        assert cursor is None


def _stub_app(calls: list[str]):  # noqa: ANN202
    """What PolledReads hands on to: records the request and answers 599."""
    async def app(scope, receive, send) -> None:  # noqa: ANN001
        calls.append(f"{scope['path']}?{scope['query_string'].decode()}")
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    return app


def test_the_fast_path_answers_only_what_the_route_would(client, client_t2, subject_bytes):
    from .conftest import submit_files

    files, data = submit_files(subject_bytes)
    job = client.post("/v1/jobs", files=files, data=data).json()
    client.post("/v1/jobs", files=files, data=data)
    other = client_t2.post("/v1/jobs", files=files, data=data).json()
    ctx = client.app.state.ctx
    calls: list[str] = []
    fast = TestClient(PolledReads(_stub_app(calls), ctx), headers=client.headers)
    for path in (f"/v1/jobs/{job['id']}", "/v1/jobs", "/v1/jobs?limit=1",
                 "/v1/jobs?status=queued&status=running&limit=200", "/v1/jobs?cursor="):
        got = fast.get(path)  # a key the API checked a moment ago (the submissions)
        assert got.status_code == 200 and got.content == client.get(path).content, path
        assert got.headers["content-type"] == "application/json"
    assert calls == []
    cursor = client.get("/v1/jobs?limit=1").json()["next_cursor"]
    assert fast.get(f"/v1/jobs?limit=1&cursor={cursor}").json()["items"][0]["id"] != \
        client.get("/v1/jobs?limit=1").json()["items"][0]["id"]
    handed_on = [
        f"/v1/jobs/{other['id']}",                  # another tenant's job: the route's 404
        f"/v1/jobs/{uuid.uuid4()}", "/v1/jobs/not-a-uuid",
        f"/v1/jobs/{job['id']}/events", "/v1/jobs/",
        "/v1/jobs?limit=0", "/v1/jobs?limit=201", "/v1/jobs?limit=020", "/v1/jobs?limit=",
        "/v1/jobs?limit=2&limit=3", "/v1/jobs?status=bogus", "/v1/jobs?cursor=bad",
        "/v1/jobs?unknown=1",
    ]
    for path in handed_on:
        assert fast.get(path).status_code == 599, path
    for headers in ({"Authorization": "Bearer dare_" + "x" * 43},  # not a key this API knows
                    {"Authorization": "Basic " + client.headers["Authorization"].split()[1]},
                    {"Authorization": ""}):
        assert fast.get("/v1/jobs", headers=headers).status_code == 599
    assert fast.post("/v1/jobs").status_code == 599
    assert len(calls) == len(handed_on) + 4


def test_an_unknown_job_and_another_tenants_job_are_the_same_404(client, client_t2,
                                                                  subject_bytes):
    from .conftest import submit_files

    files, data = submit_files(subject_bytes)
    other = client_t2.post("/v1/jobs", files=files, data=data).json()
    client.get("/v1/jobs")  # the key is cached: the fast path is tried first
    missing = uuid.uuid4()
    a, b = client.get(f"/v1/jobs/{other['id']}"), client.get(f"/v1/jobs/{missing}")
    assert a.status_code == b.status_code == 404
    assert a.json()["code"] == b.json()["code"] == "job_not_found"
    assert a.json()["detail"].replace(other["id"], "X") == \
        b.json()["detail"].replace(str(missing), "X")


# --- the bodies kept between polls (pg_json.ReadCache) -----------------------------------------

def _bodies(client, job_id: str) -> tuple[bytes, bytes]:  # noqa: ANN001
    return client.get(f"/v1/jobs/{job_id}").content, client.get("/v1/jobs?limit=5").content


def _fresh(ctx, tenant: uuid.UUID, job_id: str) -> tuple[bytes, bytes]:  # noqa: ANN001
    """What the ORM and pydantic say now (no cache involved)."""
    with ctx.factory() as s:
        one = JobRead.__pydantic_serializer__.to_json(jobs.job_read(jobs.get_job(s, uuid.UUID(job_id))))
        return one, jobs.page_json(*jobs.list_jobs(s, tenant_id=tenant, limit=5))


def test_a_kept_body_is_sent_only_while_its_rows_are_unchanged(client, monkeypatch):
    """Every way a job's JSON can change shows in the very next read: an UPDATE by any code
    path (here raw SQL that leaves updated_at alone), retention removing its inputs, the job
    row deleted; and while nothing changed, nothing is rebuilt."""
    from service.jobs import pg_json
    from service.jobs.retention import _expire_job

    ctx = client.app.state.ctx
    tenant = tenant_id(ctx.factory, "t1")
    ids = _seed_odd_jobs(ctx.factory, tenant)
    job_id = ids[-2]  # succeeded, with a result and inputs
    assert _bodies(client, job_id) == _fresh(ctx, tenant, job_id)

    def no_rebuild(row):  # noqa: ANN001
        raise AssertionError("an unchanged job's JSON was built again")

    with monkeypatch.context() as m:
        m.setattr(pg_json, "_job", no_rebuild)
        assert _bodies(client, job_id) == _fresh(ctx, tenant, job_id)

    with ctx.engine.begin() as c:
        c.execute(text("UPDATE jobs SET progress = 0.5, error_code = 'x' WHERE id = :j"),
                  {"j": uuid.UUID(job_id)})
    one, page = _bodies(client, job_id)
    assert (one, page) == _fresh(ctx, tenant, job_id) and b'"progress":0.5' in one

    ctx.settings.retention_days = 1
    assert _expire_job(ctx.factory, uuid.UUID(job_id), ctx.settings) is not None
    one, page = _bodies(client, job_id)
    assert (one, page) == _fresh(ctx, tenant, job_id) and b'"inputs":[]' in one

    with ctx.engine.begin() as c:
        c.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": uuid.UUID(job_id)})
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    page = client.get("/v1/jobs?limit=5").content
    assert job_id.encode() not in page
    with ctx.factory() as s:
        assert page == jobs.page_json(*jobs.list_jobs(s, tenant_id=tenant, limit=5))


def test_a_body_kept_for_one_tenant_is_never_sent_to_another(client, client_t2, subject_bytes):
    from .conftest import submit_files

    files, data = submit_files(subject_bytes)
    job = client.post("/v1/jobs", files=files, data=data).json()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200  # kept now
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    client_t2.get("/v1/jobs")  # t2's key cached: the fast path answers t2 too
    assert client_t2.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in client_t2.get("/v1/jobs").text


def test_the_cache_holds_at_most_its_budget_and_drops_the_least_recently_used():
    from service.jobs.pg_json import ReadCache

    c = ReadCache(budget=10)
    c.put("a", "1", b"aaaa")
    c.put("b", "1", b"bbbb")
    assert c.get("a") == ("1", b"aaaa")  # a is now the most recently used
    c.put("c", "1", b"cccc")
    assert c.get("b") is None and c.get("a") is not None and c.held == 8
    c.put("a", "2", b"A")  # a new version replaces the old one and its bytes
    assert c.get("a") == ("2", b"A") and c.held == 5
    c.put("big", "1", b"x" * 11)  # larger than the whole budget: not kept
    assert c.get("big") is None and c.held == 5


# --- the pool ---------------------------------------------------------------------------------

def _backend_pid(conn: psycopg.AsyncConnection):  # noqa: ANN202
    return conn.info.backend_pid


def test_the_pool_replaces_a_connection_whose_server_went_away(pg_url, monkeypatch):
    engine = make_engine(pg_url)
    pool = AsyncPool.for_engine(engine, size=2)

    async def scenario() -> None:
        pool.open()
        async with pool.connection() as c:
            pid = _backend_pid(c)
        with engine.connect() as admin:  # c's connection idles in the pool; its server goes
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            admin.commit()
        monkeypatch.setattr(db, "PING_IDLE_AFTER_S", 0.0)  # every pooled one is "idle"
        async with pool.connection() as c:
            assert _backend_pid(c) != pid
            assert await (await c.execute("SELECT 1")).fetchone() == (1,)
        await pool.close()

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


def test_the_pool_drops_a_connection_left_in_a_transaction_and_survives_a_cancel(pg_url):
    engine = make_engine(pg_url)
    pool = AsyncPool.for_engine(engine, size=1)

    async def scenario() -> None:
        pool.open()
        async with pool.connection() as c:
            first = c
            await c.execute("BEGIN")  # returned mid-transaction: the next user must not see it
        async with pool.connection() as c:  # the only slot came back, with a new connection
            assert c is not first
            assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

        async def slow() -> None:
            async with pool.connection() as c:
                await c.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.3)
        task.cancel()  # as a request whose client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.connection() as c:
            assert await (await c.execute("SELECT 2")).fetchone() == (2,)
            assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await asyncio.sleep(0.1)  # the dropped connection's close ran
        assert first.closed
        await pool.close()

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


def test_the_pool_opens_at_most_its_size_and_queues_the_rest(pg_url):
    engine = make_engine(pg_url)
    pool = AsyncPool.for_engine(engine, size=2)

    async def scenario() -> None:
        pool.open()
        pids, busy, most = set(), [0], [0]

        async def read() -> None:
            async with pool.connection() as c:
                busy[0] += 1
                most[0] = max(most[0], busy[0])
                pids.add(_backend_pid(c))
                await c.execute("SELECT pg_sleep(0.05)")
                busy[0] -= 1

        await asyncio.gather(*(read() for _ in range(8)))
        assert most[0] == 2 and len(pids) == 2
        await pool.close()

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
