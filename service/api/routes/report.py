"""``GET /v1/jobs/{id}/report``: the job's report.html, to open in a browser.

The same bytes as the ``report.html`` artifact, but served inline as ``text/html`` under a
Content-Security-Policy that forbids every network load and every script. The page needs neither
(inline CSS and SVG only), and the policy keeps it harmless even if a user-supplied string (a file
name, a config value) ever slipped through the renderer's escaping.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from service.api.deps import CtxDep, JobDep, SessionDep
from service.api.errors import ProblemError, problem_responses
from service.jobs import records as jobs
from service.states import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])

REPORT_ARTIFACT = "report.html"
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")
_CHUNK = 1 << 16


@router.get(
    "/{job_id}/report", summary="The job's report as a web page", response_class=StreamingResponse,
    description="report.html of a finished job, inline, as text/html with a Content-Security-Policy "
                "that blocks scripts and network loads. 404 `report_not_ready` while the job has no "
                "report (the detail gives its status).",
    responses={200: {"description": "the self-contained HTML page", "content": {"text/html": {}}},
               **problem_responses(404)})
def get_report(job: JobDep, session: SessionDep, ctx: CtxDep) -> StreamingResponse:
    art = jobs.get_artifact(session, job.id, REPORT_ARTIFACT)  # JobDep already checked the tenant
    if art is None or not ctx.store.exists(art.uri):
        raise ProblemError(404, "report_not_ready", _not_ready_detail(job),
                           job_status=JobStatus(job.status).value)
    headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "private, no-cache",
               "ETag": f'"{art.sha256}"'}
    # open() streams from any store (a local file or an S3 object), so nothing is buffered whole.
    return StreamingResponse(_chunks(ctx.store.open(art.uri)), media_type="text/html; charset=utf-8",
                             headers=headers)


def _not_ready_detail(job) -> str:  # noqa: ANN001
    status = JobStatus(job.status)
    where = f"/v1/jobs/{job.id}"
    if status in (JobStatus.queued, JobStatus.running, JobStatus.cancelling):
        stage = f" (stage {job.stage_name})" if job.stage_name else ""
        return (f"job {job.id} has no report yet: it is {status.value}{stage}. Fix: poll GET {where} "
                "until its status is succeeded, then fetch this page again")
    if status is JobStatus.succeeded:
        return (f"job {job.id} succeeded but its report.html is missing from the artifact store. "
                f"Fix: list what it has with GET {where}/artifacts; ask the operator to check the store")
    return (f"job {job.id} ended as {status.value} without a report. Fix: see its error at GET "
            f"{where} and its history at GET {where}/events, correct the input and submit again")


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        yield from iter(lambda: fh.read(_CHUNK), b"")
