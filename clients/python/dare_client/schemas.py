"""The API's request and response shapes (the contract of DESIGN.md). Tables are in ``models``."""
from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


_EXAMPLE_ID = "6f1c2d4e-8a9b-4c3d-9e2f-1a2b3c4d5e6f"


class StageRead(BaseModel):
    name: str | None = Field(description="the current stage; the next one while queued")
    index: int | None = Field(description="0-based position of the stage in the job's stage list")
    total: int = Field(description="number of stages this job runs")
    progress: float = Field(ge=0, le=1)


class ErrorRead(BaseModel):
    code: str
    message: str
    stage: str | None


class InputRead(BaseModel):
    field: str
    filename: str
    size: int
    sha256: str


class JobRead(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "id": _EXAMPLE_ID, "status": "running",
        "stage": {"name": "mine", "index": 2, "total": 6, "progress": 0.4},
        "progress": 0.31, "created_at": "2026-11-25T16:00:00Z", "started_at": "2026-11-25T16:00:01Z",
        "finished_at": None, "error": None, "result": None,
        "urls": {"self": f"/v1/jobs/{_EXAMPLE_ID}", "events": f"/v1/jobs/{_EXAMPLE_ID}/events",
                 "cancel": f"/v1/jobs/{_EXAMPLE_ID}/cancel",
                 "artifacts": f"/v1/jobs/{_EXAMPLE_ID}/artifacts"},
        "config": {"q": 0.95, "p": 1, "dataset": "digits"},
        "inputs": [{"field": "model", "filename": "model.onnx", "size": 251234,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}],
    }})

    id: uuid.UUID
    status: JobStatus
    stage: StageRead
    progress: float = Field(ge=0, le=1, description="overall progress of the job")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorRead | None
    result: dict[str, Any] | None = Field(description="summary of report.json once succeeded")
    urls: dict[str, str]
    config: dict[str, Any] = Field(description="the validated configuration, defaults filled in")
    inputs: list[InputRead] = Field(description="the uploads as received: size and sha256")


class JobList(BaseModel):
    items: list[JobRead]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at the end")


class EventRead(BaseModel):
    id: int = Field(description="increasing; pass the last one seen as ?after= to poll for new events")
    at: datetime
    kind: str = Field(description="created, stage_started, progress, stage_finished, cancel_requested, "
                                  "cancelled, failed, succeeded, requeued (the reconciler re-sent "
                                  "a lost stage) or webhook_delivery (one attempt, with its result)")
    stage: str | None
    data: dict[str, Any] | None


class EventList(BaseModel):
    items: list[EventRead]
    next_after: int | None = Field(description="the last event id returned (or the one passed)")


class ArtifactRead(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "name": "hardened.onnx", "size": 251234, "media_type": "application/octet-stream",
        "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        "url": f"/v1/jobs/{_EXAMPLE_ID}/artifacts/hardened.onnx"}})

    name: str
    size: int
    sha256: str
    media_type: str
    url: str


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str
    checks: dict[str, str]
