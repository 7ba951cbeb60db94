"""The links a job's JSON carries (``urls``): shared by the API's job views (``records``) and the
webhook payloads (``webhooks``), which import it from here so neither imports the other for it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from service.states import JobStatus

if TYPE_CHECKING:
    from service.store.models import Job


def job_urls(job: Job) -> dict[str, str]:
    """Paths relative to the API root (``job`` is a Job row or a records.JobView); ``report*``
    only once the job has succeeded."""
    base = f"/v1/jobs/{job.id}"
    urls = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel",
            "artifacts": f"{base}/artifacts"}
    if job.status is JobStatus.succeeded:
        urls["report_json"] = f"{base}/artifacts/report.json"
        urls["report_html"] = f"{base}/artifacts/report.html"
        urls["report"] = f"{base}/report"  # the same page, inline, for a browser
    return urls
