"""The two polled reads on PostgreSQL, answered with JSON that the database writes.

``GET /v1/jobs/{id}`` and ``GET /v1/jobs`` are what clients poll. Decoding a job's row into
Python values and encoding them again cost the API more CPU than the query itself (a page of
20 jobs: ~2 ms), so on PostgreSQL one statement returns each job as the text of its JSON, in
five pieces: everything but ``result`` and ``config`` is written by SQL; those two jsonb values
come as their text, which PostgreSQL writes with a space after every ``,`` and ``:``. They are
re-encoded here by the encoder that answered before (pydantic-core, through :func:`_compact`,
remembered by content), so the bytes are those ``records.job_json``/``page_json`` give for the
same rows (tests/service/test_polled_reads.py compares them on values chosen to format
differently).

What the SQL must match, from ``records.job_dict`` through pydantic-core: floats in [0, 1] as
the shortest repr with ``.0`` when whole and pydantic's notation below 1e-4 (see
:data:`_UNIT`); UTC times as ``...THH:MM:SS[.ffffff]Z``; strings escaped as JSON (to_json
escapes what serde does); ``stage`` showing the first stage of a queued job; ``urls`` with the
report links once succeeded. Another tenant's job is not found, exactly like a missing one.

What a poll sends back mostly did not change since the last poll, so each process keeps the
bodies it sent (:class:`ReadCache`, bounded by bytes), keyed by the rows' ``xmin``: PostgreSQL
gives every new version of a row a new one (any UPDATE, by any code path), so an unchanged
``xmin`` is an unchanged row. A job read asks only for the ``xmin`` when it holds a body for
it (and builds the JSON again only for a row that changed); a page read first asks for the ids and
``xmin``s of the page's rows as one short string and sends the page it built for that
string, if any. The inputs belong to the job's JSON too: they are written with the job and
only ever removed by retention, which updates the job's row in the same transaction.
"""
from __future__ import annotations

import base64
import functools
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pydantic_core import from_json, to_json

from service.jobs.records import decode_cursor
from service.states import JobStatus


def _unit(col: str) -> str:
    """A float column clamped to [0, 1] (``records._unit``: NULL and NaN are 0), as pydantic
    writes it: shortest round-trip digits, like float8out's (with PostgreSQL's default
    extra_float_digits = 1; a server configured with 0 or less writes 15 significant digits),
    which only writes whole numbers without ".0" and switches to exponents sooner (below 1e-4,
    where pydantic keeps decimals down to 1e-5 and writes "1e-6", not "1e-06")."""
    return (f"CASE WHEN {col} IS NULL OR {col} <= 0 OR {col} = 'NaN' THEN '0.0' "
            f"WHEN {col} >= 1 THEN '1.0' "
            f"WHEN {col} >= 1e-4 THEN {col}::text "
            f"WHEN {col} >= 1e-5 THEN '0.0000' || replace(split_part({col}::text, 'e', 1), '.', '') "
            f"ELSE replace({col}::text, 'e-0', 'e-') END")


def _time(col: str, suffix: str = "Z") -> str:
    """A timestamptz as pydantic writes a UTC datetime (microseconds only when not zero);
    suffix ``+00:00`` gives Python's isoformat instead (the page cursor)."""
    return (f"replace(to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), "
            f"'.000000', '') || '{suffix}'")


def _time_or_null(col: str) -> str:
    return f"CASE WHEN {col} IS NULL THEN 'null' ELSE '\"' || {_time(col)} || '\"' END"


def _str(expr: str) -> str:
    return f"coalesce(to_json({expr})::text, 'null')"


_N_STAGES = "CASE WHEN jsonb_typeof(j.stages) = 'array' THEN jsonb_array_length(j.stages) ELSE 0 END"
_URL = "'\"/v1/jobs/' || j.id"

# job_dict's keys in order, cut where result and config go: head || result || middle || config
# || tail is one job's JSON.
_HEAD = f"""'{{"id":"' || j.id || '","status":' || to_json(j.status)::text
 || ',"stage":' || CASE WHEN j.stage_name IS NULL AND {_N_STAGES} > 0
      THEN '{{"name":' || {_str("j.stages->>0")} || ',"index":0,"total":' || {_N_STAGES}
           || ',"progress":0.0}}'
      ELSE '{{"name":' || {_str("j.stage_name")} || ',"index":'
           || coalesce(j.stage_index::text, 'null') || ',"total":' || {_N_STAGES}
           || ',"progress":' || {_unit("j.stage_progress")} || '}}' END
 || ',"progress":' || {_unit("j.progress")}
 || ',"created_at":' || {_time_or_null("j.created_at")}
 || ',"started_at":' || {_time_or_null("j.started_at")}
 || ',"finished_at":' || {_time_or_null("j.finished_at")}
 || ',"error":' || CASE WHEN j.error_code <> ''
      THEN '{{"code":' || to_json(j.error_code)::text || ',"message":'
           || to_json(coalesce(j.error_message, ''))::text || ',"stage":' || {_str("j.error_stage")}
           || '}}'
      ELSE 'null' END
 || ',"result":'"""
_MIDDLE = f"""',"urls":{{"self":' || {_URL} || '","events":' || {_URL} || '/events","cancel":'
 || {_URL} || '/cancel","artifacts":' || {_URL} || '/artifacts"'
 || CASE WHEN j.status = 'succeeded' THEN ',"report_json":' || {_URL}
      || '/artifacts/report.json","report_html":' || {_URL} || '/artifacts/report.html","report":'
      || {_URL} || '/report"' ELSE '' END
 || '}},"config":'"""
_TAIL = """',"inputs":[' || coalesce((
   SELECT string_agg('{"field":' || to_json(i.field)::text || ',"filename":'
                     || to_json(i.filename)::text || ',"size":' || i.size || ',"sha256":'
                     || to_json(i.sha256)::text || '}', ',' ORDER BY i.id)
   FROM job_inputs i WHERE i.job_id = j.id), '') || ']}'"""
_PIECES = f"{_HEAD},\n j.result::text,\n {_MIDDLE},\n j.config::text,\n {_TAIL}"

_WHERE_JOB = "WHERE j.id = %(job_id)s AND j.tenant_id = %(tenant_id)s"
JOB_SQL = f"SELECT {_PIECES},\n j.xmin::text\nFROM jobs j {_WHERE_JOB}"
# the row's version alone: a fifth of the statement's cost when the body is held already
JOB_VERSION_SQL = f"SELECT j.xmin::text FROM jobs j {_WHERE_JOB}"
_VERSION = "j.id::text || '.' || j.xmin::text"


@functools.cache
def page_sql(by_status: bool, after_cursor: bool) -> str:
    """The page query for one combination of filters; after the five pieces come the cursor's
    JSON (records.encode_cursor's) and the row's version (id and xmin), the order that of
    ix_jobs_tenant_id_created_at_id."""
    where = ["j.tenant_id = %(tenant_id)s"]
    if by_status:
        where.append("j.status = ANY(%(statuses)s)")
    if after_cursor:
        where.append("(j.created_at < %(after_t)s "
                     "OR (j.created_at = %(after_t)s AND j.id < %(after_id)s))")
    cursor = f"""'{{"t":"' || {_time("j.created_at", "+00:00")} || '","i":"' || j.id || '"}}'"""
    return (f"SELECT {_PIECES},\n {cursor}, {_VERSION}\nFROM jobs j WHERE {' AND '.join(where)}\n"
            "ORDER BY j.created_at DESC, j.id DESC LIMIT %(limit)s")


@functools.cache
def page_version_sql(by_status: bool, after_cursor: bool) -> str:
    """The ids and versions of the rows ``page_sql`` would return, in its order, as one string
    (the same text ``page_body`` joins from that query's last column)."""
    full = page_sql(by_status, after_cursor)
    where = full[full.index("\nFROM jobs j"):full.index("\nORDER BY")]
    return (f"SELECT coalesce(string_agg(v, ',' ORDER BY t DESC, i DESC), '') FROM ("
            f"SELECT {_VERSION} AS v, j.created_at AS t, j.id AS i{where}\n"
            "ORDER BY j.created_at DESC, j.id DESC LIMIT %(limit)s) p")


class ReadCache:
    """Bodies this process sent, by key, with the version they were built from; the least
    recently used go first once ``budget`` bytes are held."""

    def __init__(self, budget: int = 16 << 20) -> None:
        self.budget = budget
        self.held = 0
        self._items: OrderedDict[Any, tuple[str, bytes]] = OrderedDict()

    def get(self, key: Any) -> tuple[str, bytes] | None:  # noqa: ANN401
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: Any, version: str, body: bytes) -> None:  # noqa: ANN401
        old = self._items.pop(key, None)
        if old is not None:
            self.held -= len(old[1])
        if len(body) > self.budget:
            return
        self._items[key] = (version, body)
        self.held += len(body)
        while self.held > self.budget:
            _, (_, dropped) = self._items.popitem(last=False)
            self.held -= len(dropped)


@functools.lru_cache(maxsize=4096)
def _compact(text: str) -> str:
    """A jsonb value's text as the API's encoder writes it. Configs repeat from job to job and
    a finished job's result never changes, so most calls are a lookup."""
    return to_json(from_json(text)).decode()


def _job(row: Sequence[Any]) -> str:
    head, result, middle, config, tail = row[:5]
    return "".join((head, "null" if result is None else _compact(result), middle,
                    _compact(config), tail))


async def job_body(conn: Any, job_id: uuid.UUID, tenant_id: uuid.UUID,  # noqa: ANN401
                   cache: ReadCache | None = None) -> bytes | None:
    """The job's JSON (JobRead), or None when the tenant has no such job. ``conn``: a psycopg
    AsyncConnection; ``cache``: bodies sent before (the key holds the tenant as well, though
    the statement alone already finds nothing for another tenant)."""
    key = ("job", tenant_id, job_id)
    params = {"job_id": job_id, "tenant_id": tenant_id}
    held = cache.get(key) if cache is not None else None
    if held is not None:
        cur = await conn.execute(JOB_VERSION_SQL, params)
        row = await cur.fetchone()
        if row is None:
            return None
        if row[0] == held[0]:  # the row is the version the body was built from
            return held[1]
    cur = await conn.execute(JOB_SQL, params)
    row = await cur.fetchone()
    if row is None:
        return None
    body = _job(row).encode()
    if cache is not None:
        cache.put(key, row[5], body)
    return body


async def page_body(conn: Any, tenant_id: uuid.UUID, *,  # noqa: ANN401
                    statuses: Sequence[JobStatus] = (), limit: int = 20,
                    cursor: str | None = None, cache: ReadCache | None = None) -> bytes:
    """A page of the tenant's jobs, newest first (JobList); raises records.InvalidCursor."""
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit + 1}
    if statuses:
        params["statuses"] = [JobStatus(s).value for s in statuses]
    if cursor:
        params["after_t"], params["after_id"] = decode_cursor(cursor)
    key = ("page", tenant_id, tuple(params.get("statuses", ())), limit, cursor)
    held = cache.get(key) if cache is not None else None
    if held is not None:
        cur = await conn.execute(page_version_sql(bool(statuses), bool(cursor)), params)
        version = (await cur.fetchone())[0]
        if version == held[0]:
            return held[1]
    cur = await conn.execute(page_sql(bool(statuses), bool(cursor)), params)
    rows = await cur.fetchall()
    page = rows[:limit]
    nxt = "null"
    if len(rows) > limit and page:
        nxt = '"' + base64.urlsafe_b64encode(page[-1][5].encode()).decode().rstrip("=") + '"'
    items = ",".join(_job(r) for r in page)
    body = f'{{"items":[{items}],"next_cursor":{nxt}}}'.encode()
    if cache is not None:
        cache.put(key, ",".join(r[6] for r in rows), body)
    return body

