"""``GET /v1/jobs/{id}`` and ``GET /v1/jobs`` answered before FastAPI's routing (PostgreSQL).

These two are what clients poll. Through FastAPI they cost ~0.2 ms of CPU before the route
ran (matching the path against every route, solving the bearer and principal dependencies,
validating the query), as much again as the statement (service.jobs.pg_json). This pure ASGI
middleware answers the plain case itself, with the same calls as the routes in
``service.api.routes.jobs``: a key remembered in ``AppContext.principals`` (checked in the last
``auth.KEY_CACHE_TTL_S`` seconds), a well-formed id or query, a job that exists. Everything
else goes on to FastAPI unchanged, which answers as it always does (the key looked up and
remembered, 401, 404, 422 problem+json), so this path only ever sends what the route would.

It sits inside the request-id and open-mode middlewares, so their headers and refusals apply
to it as to any request.
"""
from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import parse_qsl

from starlette.routing import get_route_path

from service.api.auth import Principal
from service.api.deps import AppContext
from service.jobs import pg_json
from service.jobs.records import InvalidCursor
from service.states import JobStatus

_LIST = "/v1/jobs"
_ONE = "/v1/jobs/"
_STATUSES = frozenset(s.value for s in JobStatus)
_LIMIT = re.compile(r"[1-9][0-9]{0,2}")  # what the route accepts within 1..200, plainly written
_HEADERS = [(b"content-type", b"application/json")]


class PolledReads:
    def __init__(self, app: Any, ctx: AppContext) -> None:  # noqa: ANN401
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # noqa: ANN401
        body = None
        if (scope["type"] == "http" and scope["method"] == "GET"
                and self.ctx.reads is not None):
            path = get_route_path(scope)
            if path == _LIST or (path.startswith(_ONE) and "/" not in path[len(_ONE):]):
                principal = self._principal(scope)
                if principal is not None:
                    body = await (self._page(scope, principal) if path == _LIST
                                  else self._job(path[len(_ONE):], principal))
        if body is None:
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), *_HEADERS]})
        await send({"type": "http.response.body", "body": body})

    def _principal(self, scope: dict) -> Principal | None:
        """The caller, if ``deps.get_principal`` would answer it from the cache (the same
        header parsing as FastAPI's HTTPBearer); None sends the request the long way."""
        if self.ctx.settings.auth == "open":
            return self.ctx.principals.get(None)
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                key = key.strip()
                if scheme.lower() != "bearer" or not key:
                    return None
                return self.ctx.principals.get(key)
        return None

    async def _job(self, job_id: str, principal: Principal) -> bytes | None:
        try:
            job_uuid = uuid.UUID(job_id)
        except ValueError:
            return None  # the route's 404
        async with self.ctx.reads.connection() as conn:
            return await pg_json.job_body(conn, job_uuid, principal.tenant_id,
                                         self.ctx.read_cache)

    async def _page(self, scope: dict, principal: Principal) -> bytes | None:
        limit, cursor, statuses = 20, None, []
        seen = set()
        for name, value in parse_qsl(scope["query_string"].decode("latin-1"),
                                     keep_blank_values=True):
            if name == "status" and value in _STATUSES:
                statuses.append(JobStatus(value))
            elif name == "limit" and name not in seen and _LIMIT.fullmatch(value) \
                    and int(value) <= 200:
                limit = int(value)
            elif name == "cursor" and name not in seen:
                cursor = value
            else:  # anything the route would refuse, or read otherwise: it answers
                return None
            seen.add(name)
        try:
            async with self.ctx.reads.connection() as conn:
                return await pg_json.page_body(conn, principal.tenant_id, statuses=statuses,
                                               limit=limit, cursor=cursor,
                                               cache=self.ctx.read_cache)
        except InvalidCursor:
            return None  # the route's 422
