"""Request dependencies as ``Annotated`` aliases, so route signatures read as plain types.

``get_principal`` (``PrincipalDep``) authenticates the bearer key; it is a dependency of the whole
``/v1`` router, and ``JobDep`` resolves a job id within the caller's tenant only, so every route
that takes a ``JobDep`` is tenant-scoped without saying so.

Reads are kept cheap: a key checked in the last ``auth.KEY_CACHE_TTL_S`` seconds costs no query
(``AppContext.principals``), dependencies that do no I/O are ``async`` (a sync one is a trip
through the threadpool), and the polled reads use connections of their own:
``AppContext.reads`` (async, autocommit) on PostgreSQL, ``AppContext.read_engine`` on SQLite.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.api.auth import (
    Principal,
    PrincipalCache,
    authenticate,
    is_key_shaped,
    open_principal,
)
from service.api.errors import ProblemError
from service.jobs import pg_json
from service.jobs.dispatch import Dispatcher
from service.jobs.records import JobNotFound, get_job
from service.settings import Settings
from service.store.aio_pool import AsyncPool
from service.store.models import Job
from service.store.storage import ArtifactStore


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    store: ArtifactStore
    dispatcher: Dispatcher
    principals: PrincipalCache = field(default_factory=PrincipalCache)
    read_engine: Engine = field(init=False)
    reads: AsyncPool | None = field(init=False, default=None)  # opened and closed by the lifespan
    # the bodies of polled reads this process sent, reused while their rows are unchanged
    read_cache: pg_json.ReadCache = field(default_factory=pg_json.ReadCache)

    def __post_init__(self) -> None:
        # PostgreSQL: async autocommit connections for reads that are one statement (a
        # snapshot by themselves: no BEGIN, no ROLLBACK), used on the event loop without a
        # trip through the threadpool (service.jobs.pg_json). SQLite: an engine of its own
        # without service.store.db's BEGIN IMMEDIATE, so these plain reads never queue for the
        # write lock behind submissions (WAL lets them read while another connection writes);
        # 30 submissions in flight made a GET /v1/jobs wait 2.6 s for the lock.
        if self.engine.dialect.name == "postgresql":
            self.read_engine = self.engine
            self.reads = AsyncPool.for_engine(self.engine)
        elif self.engine.dialect.name == "sqlite":
            from service.store.db import make_engine

            self.read_engine = make_engine(self.engine.url.render_as_string(hide_password=False),
                                           begin_immediate=False)
        else:
            self.read_engine = self.engine


async def get_ctx(request: Request) -> AppContext:  # async: no threadpool trip for an attribute
    return request.app.state.ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with ctx.factory() as session:
        yield session


# Closed when the route returns, not after the response is sent: a streamed download must not
# hold a database connection (on SQLite, whose transactions take the write lock, it would stall
# the worker for as long as the client takes to read).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                     description="an API key: `Authorization: Bearer dare_...`; an operator "
                                 "creates one with `dare keys create --tenant NAME`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_principal(request: Request, credentials: BearerDep) -> Principal:
    """401 unless the request carries a live key (in open mode: the "default" tenant). A key
    seen in the last KEY_CACHE_TTL_S seconds is answered from ``ctx.principals`` without a
    query; otherwise it is looked up in a session of its own, whose transaction ends before the
    route runs (no connection idles in a transaction during an upload). It reads the app's
    context from ``request`` rather than through ``CtxDep``: each dependency costs a little
    on every request, and this one runs on all of them."""
    ctx: AppContext = request.app.state.ctx
    if ctx.settings.auth == "open":
        key = None
    else:
        if credentials is None:
            raise _unauthorized("this request has no `Authorization: Bearer <key>` header")
        key = credentials.credentials
        if not is_key_shaped(key):
            raise _unauthorized("the API key is unknown or revoked")
    principal = ctx.principals.get(key)
    if principal is None:
        generation = ctx.principals.generation()
        principal = await run_in_threadpool(_look_up, ctx.factory, key)
        if principal is None:
            raise _unauthorized("the API key is unknown or revoked")
        ctx.principals.put(key, principal, generation)
    return principal


def _look_up(factory: sessionmaker[Session], key: str | None) -> Principal | None:
    with factory() as session:
        try:
            principal = open_principal(session) if key is None else authenticate(session, key)
            session.commit()  # open mode's tenant, a key's last_used_at
        except BaseException:
            session.rollback()
            raise
    return principal


def _unauthorized(what: str) -> ProblemError:
    return ProblemError(401, "unauthorized",
                        f"{what}. Fix: send `Authorization: Bearer dare_...` with a key the "
                        "operator creates with `dare keys create --tenant NAME`",
                        headers={"WWW-Authenticate": 'Bearer realm="dare"'})


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def parse_job_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise JobNotFound(job_id) from None


JobIdPath = Annotated[str, Path(description="the job's id (a UUID)",
                                examples=["6f1c2d4e-8a9b-4c3d-9e2f-1a2b3c4d5e6f"])]


def get_job_dep(job_id: JobIdPath, session: SessionDep, principal: PrincipalDep) -> Job:
    # Another tenant's job answers exactly like a missing one: 404 job_not_found.
    return get_job(session, parse_job_id(job_id), tenant_id=principal.tenant_id)


JobDep = Annotated[Job, Depends(get_job_dep)]
