"""Request dependencies as ``Annotated`` aliases, so route signatures read as plain types.

Authentication will be one more dependency here (a ``PrincipalDep``), added to the ``/v1``
router; nothing else needs to change for it.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .dispatch import Dispatcher
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


SessionDep = Annotated[Session, Depends(get_session)]


def parse_job_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise JobNotFound(job_id) from None


JobIdPath = Annotated[str, Path(description="the job's id (a UUID)",
                                examples=["6f1c2d4e-8a9b-4c3d-9e2f-1a2b3c4d5e6f"])]


def get_job_dep(job_id: JobIdPath, session: SessionDep) -> Job:
    return get_job(session, parse_job_id(job_id))


JobDep = Annotated[Job, Depends(get_job_dep)]
