"""Liveness and readiness."""
from __future__ import annotations

import anyio
from dare_client.schemas import Health, Ready
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import CtxDep
from service.api.errors import problem_response, problem_responses
from service.store.db import check_schema

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:  # async: a sync route is a trip through the threadpool
    return Health()


@router.get("/readyz", response_model=Ready, summary="The database and the broker answer",
            responses=problem_responses(503))
async def readyz(ctx: CtxDep) -> Ready | JSONResponse:
    def db() -> None:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        check_schema(ctx.engine)

    probes = [("database", db), ("broker", ctx.dispatcher.ping)]
    if hasattr(ctx.store, "ping"):  # a remote store (S3): is the bucket there and reachable?
        probes.append(("artifact_store", ctx.store.ping))
    checks: dict[str, str] = {}
    for name, probe in probes:
        try:
            with anyio.fail_after(5):
                await anyio.to_thread.run_sync(probe, abandon_on_cancel=True)
            checks[name] = "ok"
        except TimeoutError:
            checks[name] = "timed out after 5 s"
        except Exception as e:  # the message names the host, never a password
            checks[name] = f"{type(e).__name__}: {str(e)[:200]}"
    if all(v == "ok" for v in checks.values()):
        return Ready(status="ready", checks=checks)
    bad = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    return problem_response(503, "not_ready", f"not ready ({bad}); check DARE_DATABASE_URL, "
                            "DARE_BROKER_URL (and DARE_S3_* for an S3 store) and that those "
                            "services run", checks=checks)
