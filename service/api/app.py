"""The FastAPI application. ``create_app()`` is the factory ``dare api`` and the tests use."""
from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from service import logs
from service.api import errors, metrics, staging
from service.api.admission import (
    INFLIGHT_RETRY_AFTER_S,
    STAGING_RETRY_AFTER_S,
    Admission,
    TooManySubmissionsInFlight,
)
from service.api.deps import AppContext, get_principal
from service.api.errors import problem_response
from service.api.idempotency import IdempotencyKeyReused
from service.api.inspector_pool import inspector_for
from service.api.open_mode_guard import OpenModeGuard
from service.api.polled_reads import PolledReads
from service.api.quotas import RETRY_AFTER_S, TooManyActiveJobs
from service.api.routes import health, jobs
from service.api.routes import metrics as metrics_route
from service.api.routes import report as report_route
from service.api.routes import webhooks as webhooks_route
from service.api.uploads import (
    StagingFull,
    UnsupportedMediaType,
    UploadTooLarge,
    UploadTooSlow,
)
from service.jobs.background import Background
from service.jobs.dispatch import BrokerUnavailable, CeleryDispatcher, Dispatcher
from service.jobs.records import InvalidCursor, JobFinished, JobNotFound
from service.jobs.webhooks import deliver_due
from service.settings import Settings, get_settings
from service.store.db import SchemaOutdated, check_schema, make_engine, session_factory
from service.store.storage import ArtifactStore, store_from_settings
from worker.engine.errors import InputError

log = logging.getLogger("dare.api")

STAGING_SWEEP_INTERVAL_S = 600.0

DESCRIPTION = """\
Hardens an image classifier with DARE (ASE 2022) and reports its robustness to FGSM, BIM, PGD,
C&W and JSMA, before and after. Submit a model, its training history and its data; poll the job;
download the hardened model and the report. Errors are `application/problem+json` with a stable
`code`.

Every `/v1` request needs `Authorization: Bearer dare_...`: an operator creates keys with
`dare keys create --tenant NAME`. A tenant sees only its own jobs.
"""


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None,
               store: ArtifactStore | None = None, check_db_schema: bool = True) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    engine = make_engine(settings.database_url)
    ctx = AppContext(settings=settings, engine=engine, factory=session_factory(engine),
                     store=store or store_from_settings(settings),
                     dispatcher=dispatcher or CeleryDispatcher(settings))
    # Periodic housekeeping in the API process, which is always up (workers come and go):
    # the reconciler re-sends stages lost with a worker or a broker. Add more with .add().
    background = Background()
    background.add("reconcile", settings.reconcile_interval_s, lambda: _reconcile(ctx))
    background.add("webhooks", settings.webhook_poll_interval_s,
                   lambda: deliver_due(ctx.settings, ctx.factory))  # the outbox sender
    # Staging folders a dead API process left (its locks died with it; service.api.staging).
    background.add("staging_sweep", STAGING_SWEEP_INTERVAL_S,
                   lambda: staging.sweep(settings.upload_tmp_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if check_db_schema:
            check_schema(engine)  # refuses to serve on an old schema; the message says what to run
        staging.sweep(settings.upload_tmp_dir)  # what a crash left: nothing else owns it now
        background.start()
        if ctx.reads is not None:
            ctx.reads.open()  # its connections belong to this event loop
        if app.state.inspector is not None:  # None with DARE_SUBMIT_INSPECTION=off
            app.state.inspector.start()  # its fork server imports torch meanwhile
        # What start-up built (modules, FastAPI's routes and models, SQLAlchemy's tables:
        # ~120k objects) lives as long as the process: out of the collector's sight, a full
        # collection no longer walks it (tens of ms, paid by whichever request triggers it).
        gc.collect()  # no garbage of start-up's frozen with it
        gc.freeze()
        yield
        if app.state.inspector is not None:
            app.state.inspector.stop()
        background.stop()
        if ctx.reads is not None:
            await ctx.reads.close()
        engine.dispose()
        if engine.dialect.name == "sqlite":  # its read engine has a pool of its own
            ctx.read_engine.dispose()

    app = FastAPI(title="DARE hardening service", version="1.0.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.ctx = ctx
    # Innermost of the three: the polled reads it answers get request ids and open-mode checks.
    app.add_middleware(PolledReads, ctx=ctx)
    if settings.auth == "open":  # no keys: refuse what a web page could send (CSRF, rebinding)
        app.add_middleware(OpenModeGuard)
    app.add_middleware(logs.RequestContextMiddleware)  # request_id/job_id on every log line
    app.state.background = background
    app.state.inspector = inspector_for(settings)  # tests may swap in a stand-in before start-up
    app.state.admission = Admission()  # submissions in flight, staged bytes (service.api.admission)
    errors.install(app)
    _install_domain_errors(app)

    # Every /v1 route needs a bearer key (service.api.deps.get_principal); health routes stay open.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(get_principal)],
                   responses=errors.problem_responses(401))
    v1.include_router(jobs.router)
    v1.include_router(webhooks_route.router)
    v1.include_router(report_route.router)
    app.include_router(v1)
    app.include_router(health.router)
    if settings.metrics_enabled:
        app.include_router(metrics_route.router)
    return app


def _reconcile(ctx: AppContext) -> dict[str, int]:
    from service.jobs.reconciler import reconcile_once

    return reconcile_once(ctx.settings, ctx.factory, ctx.dispatcher, ctx.store)


def _install_domain_errors(app: FastAPI) -> None:
    def path(request: Request) -> str:
        return request.url.path

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        metrics.count_rejection(exc.code)
        detail = f"{exc.message}. Fix: {exc.hint}" if exc.hint else exc.message
        return problem_response(422, exc.code, detail, instance=path(request))

    @app.exception_handler(UploadTooLarge)
    async def _too_large(request: Request, exc: UploadTooLarge) -> JSONResponse:
        env = {"model": "DARE_MAX_MODEL_BYTES", "history": "DARE_MAX_HISTORY_BYTES",
               "data": "DARE_MAX_DATA_BYTES", "config": "DARE_MAX_CONFIG_BYTES",
               "dataset": "DARE_MAX_CONFIG_BYTES"}.get(exc.field, "DARE_MAX_UPLOAD_BYTES")
        metrics.count_rejection("upload_too_large")
        return problem_response(
            413, "upload_too_large",
            f"{exc.field} is larger than the limit of {exc.limit} bytes. Fix: send a smaller file, "
            f"or have the operator raise {env}", instance=path(request),
            headers={"Connection": "close"}, field=exc.field, limit=exc.limit)

    @app.exception_handler(UploadTooSlow)
    async def _too_slow(request: Request, exc: UploadTooSlow) -> JSONResponse:
        metrics.count_rejection("upload_too_slow")
        if exc.reason == "deadline":
            why = (f"the request body was not complete within DARE_UPLOAD_DEADLINE_S="
                   f"{exc.deadline_s:g} s ({exc.received} bytes arrived)")
        else:
            why = (f"the request body arrived slower than DARE_UPLOAD_MIN_RATE_BYTES_S="
                   f"{exc.min_rate} bytes/s over a window of {exc.window_s:g} s ({exc.received} "
                   f"bytes in {exc.elapsed_s:.0f} s)")
        return problem_response(
            408, "upload_too_slow",
            f"{why}; the upload was cut and nothing was kept. Fix: send the whole body without "
            "pauses from a faster or nearer network (or smaller files: fewer checkpoints in "
            "history.zip, a dataset name instead of data), or have the operator lower "
            "DARE_UPLOAD_MIN_RATE_BYTES_S or raise DARE_UPLOAD_DEADLINE_S",
            instance=path(request), headers={"Connection": "close"}, reason=exc.reason,
            received=exc.received)

    @app.exception_handler(StagingFull)
    async def _staging_full(request: Request, exc: StagingFull) -> JSONResponse:
        metrics.count_rejection("staging_full")
        return problem_response(
            503, "staging_full",
            f"the server is receiving too many uploads at once: {exc.in_use} of its "
            f"{exc.budget} bytes of staging space are in use and this upload needs {exc.wanted} "
            "more. Fix: retry after the Retry-After delay; if the upload alone is larger than "
            "that space, the operator must raise DARE_STAGING_MAX_BYTES",
            instance=path(request),
            headers={"Retry-After": str(STAGING_RETRY_AFTER_S), "Connection": "close"},
            budget=exc.budget)

    @app.exception_handler(TooManySubmissionsInFlight)
    async def _inflight(request: Request, exc: TooManySubmissionsInFlight) -> JSONResponse:
        metrics.count_rejection("too_many_submissions_in_flight")
        return problem_response(
            429, "too_many_submissions_in_flight",
            f"this tenant already has {exc.limit} submissions being uploaded or inspected, the "
            "most it may have at once. Fix: wait for one of them to be answered, then retry "
            "(send them one after the other); an operator can raise "
            "DARE_MAX_INFLIGHT_SUBMISSIONS_PER_TENANT", instance=path(request),
            headers={"Retry-After": str(INFLIGHT_RETRY_AFTER_S)}, limit=exc.limit)

    @app.exception_handler(UnsupportedMediaType)
    async def _media(request: Request, exc: UnsupportedMediaType) -> JSONResponse:
        metrics.count_rejection("unsupported_media_type")
        return problem_response(415, "unsupported_media_type",
                                "send multipart/form-data (curl -F model=@model.onnx ...)",
                                instance=path(request))

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return problem_response(404, "job_not_found",
                                f"no job with id {exc.job_id!s}; list jobs with GET /v1/jobs",
                                instance=path(request))

    @app.exception_handler(JobFinished)
    async def _finished(request: Request, exc: JobFinished) -> JSONResponse:
        return problem_response(409, "job_finished", str(exc), instance=path(request),
                                job_status=exc.job.status.value)

    @app.exception_handler(TooManyActiveJobs)
    async def _quota(request: Request, exc: TooManyActiveJobs) -> JSONResponse:
        metrics.count_rejection("too_many_active_jobs")
        return problem_response(
            429, "too_many_active_jobs",
            f"this tenant already has {exc.active} queued or running jobs, the most it may have "
            f"at once is {exc.limit}. Fix: wait for one to finish (or cancel one) and retry; an "
            "operator can raise the limit with `dare keys create --tenant NAME --max-active-jobs "
            "N` or DARE_MAX_ACTIVE_JOBS_PER_TENANT", instance=path(request),
            headers={"Retry-After": str(RETRY_AFTER_S)}, limit=exc.limit, active=exc.active)

    @app.exception_handler(IdempotencyKeyReused)
    async def _idempotency(request: Request, exc: IdempotencyKeyReused) -> JSONResponse:
        metrics.count_rejection("idempotency_key_reused")
        return problem_response(
            422, "idempotency_key_reused",
            f"the Idempotency-Key {exc.key!r} was already used for job {exc.job_id} with a "
            "different request (other files or fields). Fix: send a new key for a new "
            "submission, or resend exactly the same request to get that job back",
            instance=path(request), job_id=str(exc.job_id))

    @app.exception_handler(InvalidCursor)
    async def _cursor(request: Request, exc: InvalidCursor) -> JSONResponse:
        return problem_response(422, "invalid_cursor", "the cursor is not one this API gave out; "
                                "start again without it and use next_cursor", instance=path(request))

    @app.exception_handler(BrokerUnavailable)
    async def _broker(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return problem_response(503, "broker_unavailable", "the job could not be queued because the "
                                "message broker did not answer; retry later", instance=path(request),
                                headers={"Retry-After": "30"})

    @app.exception_handler(SchemaOutdated)
    async def _schema(request: Request, exc: SchemaOutdated) -> JSONResponse:
        return problem_response(503, "schema_outdated", str(exc), instance=path(request))
