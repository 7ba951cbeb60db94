"""``/v1/jobs``: thin routes over ``service.jobs.records``, ``service.api.uploads`` and ``service.api.submission``."""
from __future__ import annotations

import shutil
import uuid
from typing import Annotated

from dare_client.schemas import ArtifactRead, EventList, JobList, JobRead
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.admission import admit
from service.api.deps import (
    AppContext,
    CtxDep,
    JobDep,
    JobIdPath,
    PrincipalDep,
    SessionDep,
    parse_job_id,
)
from service.api.errors import ProblemError, problem_responses
from service.api.idempotency import KEY_PATTERN
from service.api.inspection import inspect_submission
from service.api.submission import submit, validate_form
from service.api.uploads import receive_form
from service.jobs import pg_json
from service.jobs import records as jobs
from service.jobs.retention import expired_at
from service.states import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["model", "history"],
                "properties": {
                    "model": {"type": "string", "format": "binary",
                              "description": "the classifier: .onnx (opset <= 17) or .pt2 "
                                             "(torch.export)"},
                    "history": {"type": "string", "format": "binary",
                                "description": ".zip of per-epoch checkpoints (.safetensors, .pt, "
                                               ".pt2 or .onnx), ordered by the epoch number in "
                                               "their names or by a manifest"},
                    "data": {"type": "string", "format": "binary",
                             "description": ".npz with x_train, y_train, x_val, y_val, x_test, "
                                            "y_test (NCHW, float in [0,1] or uint8)"},
                    "dataset": {"type": "string", "enum": ["digits", "mnist5k", "fashion"],
                                "description": "an embedded dataset instead of data"},
                    "config": {"type": "string",
                               "description": "JSON object; see the README's config table",
                               "example": '{"q": 0.95, "p": 1, "history_fraction": 0.5, '
                                          '"evaluation": {"n_samples": 200}}'},
                },
            },
        }},
    },
}


@router.post(
    "", status_code=202, response_model=JobRead, summary="Submit a model to harden",
    description="Streams each file to disk (size-limited per file), checks formats cheaply, "
                "validates the config, queues the job and answers 202 with the job object and a "
                "Location header. Before accepting, the files are loaded as the engine will, "
                "in a resource-limited child process: unusable or hostile inputs (pickled code, "
                "TorchScript, zip slip, zip bombs, NaN weights, shape or label mismatches) are a "
                "422 with a stable code.\n\n"
                "With an `Idempotency-Key` header, a repeat of the same request (same files, "
                "same fields) answers **200** with the job the first one created and the header "
                "`Idempotent-Replayed: true`, storing nothing; the same key with a different "
                "request is a 422 `idempotency_key_reused`. Past the tenant's limit of active "
                "(queued, running, cancelling) jobs: 429 `too_many_active_jobs` with Retry-After.",
    responses={200: {"model": JobRead, "description": "an Idempotency-Key replay: the job the "
                                                      "first request with this key created"},
               **problem_responses(408, 413, 415, 422, 429, 503)},
    openapi_extra=_UPLOAD_BODY)
async def create_job(
    request: Request, response: Response, ctx: CtxDep, principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", pattern=KEY_PATTERN,
        description="any unique string (a UUID) to make retries safe; up to 255 visible ASCII "
                    "characters; remembered per tenant")] = None,
) -> JobRead:
    job_id = uuid.uuid4()
    staging = ctx.settings.upload_tmp_dir / str(job_id)
    # 429 before a byte of the body is read: the tenant's quota and its submissions in flight.
    ticket = await run_in_threadpool(
        admit, request.app.state.admission, ctx.factory, principal.tenant_id,
        max_inflight=ctx.settings.max_inflight_submissions_per_tenant,
        staging_budget=ctx.settings.staging_max_bytes,
        max_active_jobs=ctx.settings.max_active_jobs_per_tenant, idempotency_key=idempotency_key)
    try:
        form = await receive_form(request, ctx.settings, staging, ticket)
        # Load the files in the sandboxed inspector before anything is stored; waiting for a
        # free inspector holds no thread (503 inspector_busy past the bounded wait). A replay
        # of an accepted submission stores nothing and is not inspected again.
        validated = None
        if not ticket.replay:
            validated = await run_in_threadpool(validate_form, form, ctx.settings)  # cheap checks
            await inspect_submission(request.app.state.inspector, form,
                                     validated[0].model_dump_json(), ctx.settings)
        done = await run_in_threadpool(
            submit, form, job_id=job_id, tenant_id=principal.tenant_id, factory=ctx.factory,
            store=ctx.store, dispatcher=ctx.dispatcher, idempotency_key=idempotency_key,
            max_active_jobs=ctx.settings.max_active_jobs_per_tenant, settings=ctx.settings,
            validated=validated)
    finally:
        ticket.release()  # first, and not awaited: it must happen even when cancelled
        # A replayed or refused submission stored nothing: its upload goes with the staging dir.
        await run_in_threadpool(shutil.rmtree, staging, True)
    if done.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{done.job.id}"
    return jobs.job_read(done.job)


# The two reads clients poll. On PostgreSQL: one statement on an async connection (no trip
# through the threadpool) that returns the JSON itself (service.jobs.pg_json); the same calls
# answer most of these requests before they reach this router (service.api.polled_reads).
# On SQLite: one trip through the threadpool for one or two Core statements
# (service.jobs.records.read_job / list_jobs) and the encoding. Either way the route sends
# bytes (response_model stays for the OpenAPI schema; FastAPI passes a Response through
# without validating or encoding it again).
@router.get("", response_model=JobList, summary="List jobs, newest first",
            responses=problem_responses(422))
async def list_jobs(
    request: Request, principal: PrincipalDep,
    status: Annotated[list[JobStatus], Query(description="keep only these statuses (repeatable)")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=200, description="page size")] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> Response:
    ctx: AppContext = request.app.state.ctx  # not CtxDep: one dependency less to solve
    if ctx.reads is not None:
        async with ctx.reads.connection() as conn:
            body = await pg_json.page_body(conn, principal.tenant_id, statuses=status,
                                           limit=limit, cursor=cursor, cache=ctx.read_cache)
        return Response(body, media_type="application/json")

    def read() -> bytes:
        with ctx.read_engine.connect() as conn:
            rows, nxt = jobs.list_jobs(conn, tenant_id=principal.tenant_id, statuses=status,
                                       limit=limit, cursor=cursor)
        return jobs.page_json(rows, nxt)  # the connection is back in the pool already

    return Response(await run_in_threadpool(read), media_type="application/json")


@router.get("/{job_id}", response_model=JobRead, summary="One job",
            responses=problem_responses(404))
async def get_job(job_id: JobIdPath, request: Request, principal: PrincipalDep) -> Response:
    job_uuid = parse_job_id(job_id)  # another tenant's job is a 404, like a missing one
    ctx: AppContext = request.app.state.ctx
    if ctx.reads is not None:
        async with ctx.reads.connection() as conn:
            body = await pg_json.job_body(conn, job_uuid, principal.tenant_id, ctx.read_cache)
        if body is None:
            raise jobs.JobNotFound(job_uuid)
        return Response(body, media_type="application/json")

    def read() -> bytes:
        with ctx.read_engine.connect() as conn:
            view = jobs.read_job(conn, job_uuid, tenant_id=principal.tenant_id)
        return jobs.job_json(view)

    return Response(await run_in_threadpool(read), media_type="application/json")


@router.get("/{job_id}/events", response_model=EventList, summary="The job's history",
            responses=problem_responses(404))
def list_events(
    job: JobDep, session: SessionDep, principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, description="only events after this id")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> EventList:
    rows = jobs.list_events(session, job.id, tenant_id=principal.tenant_id, after=after,
                            limit=limit)
    return EventList(items=[jobs.event_read(e) for e in rows],
                     next_after=rows[-1].id if rows else after)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead, summary="Cancel a job",
             description="A queued job is cancelled at once; a running one becomes `cancelling` "
                         "and stops between batches. Cancelling twice is harmless; a finished "
                         "job answers 409.",
             responses=problem_responses(404, 409))
def cancel_job(job: JobDep, session: SessionDep, principal: PrincipalDep) -> JobRead:
    job = jobs.request_cancel(session, job.id, tenant_id=principal.tenant_id)
    session.commit()
    return jobs.job_read(job)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactRead],
            summary="The job's artifacts so far", responses=problem_responses(404))
def list_artifacts(job: JobDep, session: SessionDep,
                   principal: PrincipalDep) -> list[ArtifactRead]:
    rows = jobs.list_artifacts(session, job.id, tenant_id=principal.tenant_id)
    return [jobs.artifact_read(a) for a in rows]


@router.get("/{job_id}/artifacts/{name}", summary="Download an artifact",
            response_class=Response, responses={
                200: {"description": "the file", "content": {"application/octet-stream": {}}},
                **problem_responses(404, 410)})
def download_artifact(job: JobDep, name: str, session: SessionDep, ctx: CtxDep,
                      principal: PrincipalDep) -> Response:
    art = jobs.get_artifact(session, job.id, name, tenant_id=principal.tenant_id)
    if art is None:
        gone_at = expired_at(session, job.id)
        if gone_at is not None:
            raise ProblemError(
                410, "artifact_expired",
                f"job {job.id} ended more than DARE_RETENTION_DAYS="
                f"{ctx.settings.retention_days:g} days ago; its inputs and artifacts were deleted "
                f"on {gone_at:%Y-%m-%d %H:%M} UTC. Fix: submit the job again to get them anew "
                "(download artifacts soon after a job ends)", expired_at=gone_at.isoformat())
    if art is None or not ctx.store.exists(art.uri):
        have = [a.name for a in jobs.list_artifacts(session, job.id,
                                                    tenant_id=principal.tenant_id)]
        hint = (f"this job has: {', '.join(have)}" if have
                else f"this job has no artifacts yet (status {job.status.value})")
        raise ProblemError(404, "artifact_not_found", f"no artifact {name!r}; {hint}")
    headers = {"ETag": f'"{art.sha256}"'}
    path = ctx.store.local_path(art.uri)
    if path is not None:
        return FileResponse(path, media_type=art.media_type, filename=art.name, headers=headers)
    return StreamingResponse(_chunks(ctx.store.open(art.uri)), media_type=art.media_type,
                             headers={**headers, "Content-Disposition":
                                      f'attachment; filename="{art.name}"'})


def _chunks(fh):  # noqa: ANN001, ANN202
    with fh:
        yield from iter(lambda: fh.read(1 << 20), b"")
