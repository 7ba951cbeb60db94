"""Request dependencies as ``Annotated`` aliases, so route signatures read as plain types.

``get_principal`` (``PrincipalDep``) authenticates the bearer key; it is a dependency of the whole
``/v1`` router, and ``JobDep`` resolves a job id within the caller's tenant only, so every route
that takes a ``JobDep`` is tenant-scoped without saying so.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .auth import Principal, authenticate, open_principal
from .dispatch import Dispatcher
from .errors import ProblemError
from .jobs import JobNotFound, get_job
from .models import Job
from .settings import Settings
from .storage import ArtifactStore


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    store: ArtifactStore
    dispatcher: Dispatcher


def get_ctx(request: Request) -> AppContext:
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


def get_principal(ctx: CtxDep, session: SessionDep, credentials: BearerDep) -> Principal:
    """401 unless the request carries a live key (in open mode: the "default" tenant). The
    session's transaction ends here, so no connection idles in a transaction during an upload."""
    try:
        if ctx.settings.auth == "open":
            principal = open_principal(session)
        else:
            if credentials is None:
                raise _unauthorized("this request has no `Authorization: Bearer <key>` header")
            principal = authenticate(session, credentials.credentials)
            if principal is None:
                raise _unauthorized("the API key is unknown or revoked")
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
