"""The service's one settings object, read from ``DARE_*`` environment variables.

Everything has an embedded default under ``DARE_HOME`` (``./var``): a SQLite file, kombu's
filesystem transport and a local artifact directory, so ``dare serve`` needs no server. Production
sets ``DARE_DATABASE_URL`` (PostgreSQL), ``DARE_BROKER_URL`` (Redis) and ``DARE_ARTIFACT_ROOT`` (a
volume the API and the workers share). Read it through :func:`get_settings`; tests build their own
``Settings(...)`` and hand it to ``create_app``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARE_", extra="ignore")

    home: Path = Field(Path("var"), description="where the embedded defaults live")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///$DARE_HOME/dare.db")
    broker_url: str = Field("", description="Celery broker; default filesystem:// under $DARE_HOME/broker")
    artifact_root: Path | None = Field(None, description="artifact store root; default $DARE_HOME/artifacts")
    work_dir: Path | None = Field(None, description="worker job directories; default $DARE_HOME/work")
    upload_tmp_dir: Path | None = Field(None, description="uploads stream here; default $DARE_HOME/uploads")

    # Artifact store: "local" (artifact_root, shared by API and workers) or "s3" (one bucket that
    # API and workers on any machine reach; credentials from the usual AWS_* variables).
    artifact_store: Literal["local", "s3"] = "local"
    s3_bucket: str = Field("", description="bucket for inputs and artifacts (artifact_store=s3)")
    s3_prefix: str = Field("", description="key prefix inside the bucket, e.g. 'dare/prod'")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible server (MinIO); default AWS")
    s3_region: str | None = Field(None, description="default: boto3's (AWS_DEFAULT_REGION)")

    # Upload limits, per file. The per-kind ones default to max_upload_bytes.
    max_upload_bytes: int = Field(2 * GiB, ge=1)
    max_model_bytes: int | None = Field(None, ge=1)
    max_history_bytes: int | None = Field(None, ge=1)
    max_data_bytes: int | None = Field(None, ge=1)
    max_config_bytes: int = Field(64 * 1024, ge=1)
    upload_chunk_bytes: int = Field(1 * MiB, ge=4096)
    # Hostile input (service.api.inspection, worker.engine.archive_safety): zip caps checked in the
    # API, and a deep look at the files in a resource-limited child process before a job exists.
    max_history_uncompressed_bytes: int = Field(8 * GiB, ge=1, description="declared total of a zip")
    max_zip_ratio: float = Field(200.0, gt=1, description="per zip member, uncompressed/compressed")
    submit_inspection: Literal["subprocess", "off"] = Field(
        "subprocess", description="load the inputs as the engine will before accepting a job")
    inspection_timeout_s: float = Field(120.0, gt=0, description="wall-clock limit of the inspector")
    inspection_memory_bytes: int = Field(8 * GiB, ge=GiB, description="RLIMIT_AS of the inspector")
    inspection_max_concurrent: int = Field(2, ge=1, description="inspector processes at once")
    # The fast path (service.api.inspector_pool): children of a fork server that has torch imported.
    inspection_fork_server: bool = Field(True, description="false: a fresh python per inspection "
                                         "(a torch import each, ~10 s; for comparison)")
    inspection_queue_timeout_s: float = Field(
        10.0, gt=0, description="wait for a free inspector; past it: 503 inspector_busy")

    # Pipeline
    queue: str = "gpu"
    stage_soft_time_limit_s: int = Field(4 * 3600, ge=1)
    stage_hard_time_limit_s: int | None = Field(None, ge=1, description="default: soft limit + 5 min")
    broker_visibility_timeout_s: int | None = Field(None, ge=1, description="default: hard limit + 1 h")
    stage_max_attempts: int = Field(3, ge=1, description="deliveries of one stage before the job fails")
    stage_stale_after_s: int = Field(300, ge=1, description="a silent running stage may be taken over")
    # Crash recovery (service.jobs.reconciler): a worker renews its stage's lease every
    # heartbeat_interval_s; the reconciler re-sends stages whose lease expired and messages
    # nobody picked up within requeue_after_s (a flushed or restarted broker).
    heartbeat_interval_s: float = Field(10.0, gt=0, description="lease renewal while a stage runs")
    requeue_after_s: float = Field(60.0, gt=0, description="re-send an unclaimed stage after this; "
                                   "also the least time between two re-sends of one job")
    reconcile_interval_s: float = Field(15.0, ge=0, description="reconciler period in the API; 0 disables")
    progress_interval_s: float = Field(2.0, gt=0, description="at most one progress write per interval")
    cancel_poll_interval_s: float = Field(1.0, gt=0, description="how often the worker re-reads the status")
    broker_poll_interval_s: float = Field(0.1, gt=0, description="filesystem transport polling")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(1, ge=1)
    # Test seam: the function that runs one stage, "module:attribute" (the engine by default).
    stage_runner: str = "worker.engine.stages:run_stage"

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # "required": every /v1 request carries `Authorization: Bearer dare_...` (dare keys create).
    # "open": no keys, every request acts as tenant "default"; `dare serve` uses it on loopback.
    auth: Literal["required", "open"] = "required"
    max_active_jobs_per_tenant: int = Field(4, ge=1, description="queued+running+cancelling jobs "
                                            "per tenant unless the tenant has its own limit")
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line")
    metrics_enabled: bool = Field(True, description="serve GET /metrics (Prometheus, no auth)")

    # MLflow (service.jobs.mlflow_log): each succeeded job becomes a run, unless its config says
    # "mlflow": false. Needs MLflow installed: the extra dare-service[mlflow] (README).
    mlflow_tracking_uri: str | None = Field(None, description="e.g. http://mlflow:5000; unset: off")
    mlflow_experiment: str = Field("dare", min_length=1, description="default experiment name")
    mlflow_attempts: int = Field(3, ge=1, description="tries before the run is given up")
    mlflow_backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles each try")
    mlflow_timeout_s: float = Field(15.0, gt=0, description="one HTTP request to the server")

    # Webhooks (a transactional outbox; service.jobs.webhooks)
    webhook_max_attempts: int = Field(8, ge=1, description="tries before a delivery is failed")
    webhook_backoff_s: float = Field(5.0, gt=0, description="first retry delay; doubles each try")
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="cap on one retry delay")
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="total wall-clock per attempt: DNS, connect, TLS, request, answer")
    webhook_poll_interval_s: float = Field(2.0, ge=0, description="outbox polling; 0 disables")
    webhook_allow_private: bool = Field(
        False, description="allow webhook URLs on loopback/private/link-local addresses (SSRF)")
    webhook_senders: int = Field(4, ge=1, description="webhook POSTs in flight at once")
    webhook_per_tenant: int = Field(
        2, ge=1, description="webhook POSTs in flight at once for one tenant")
    webhook_max_response_bytes: int = Field(
        65536, ge=1024, description="most of a receiver's answer read (status line, headers, body)")

    # Slow and hostile uploads (service.api.uploads, service.api.admission): refused before the body is
    # read when the tenant is at its quota or has this many uploads in flight; cut with 408 when
    # the body trickles; 503 when staging would outgrow its disk budget. Per API process.
    max_inflight_submissions_per_tenant: int = Field(
        2, ge=1, description="POST /v1/jobs bodies received or inspected at once per tenant")
    upload_min_rate_bytes_s: int = Field(
        16 * 1024, ge=0, description="least bytes/s a body must average over each rate window; 0 "
        "disables")
    upload_rate_window_s: float = Field(30.0, gt=0, description="the rate window, also the grace "
                                        "before the first check")
    upload_deadline_s: float = Field(3600.0, gt=0, description="the most one request body may take")
    staging_max_bytes: int = Field(16 * GiB, ge=1, description="bytes of uploads staged on disk "
                                   "at once, all requests together")
    # Retention (service.jobs.retention, run by the reconciler): finished jobs older than this lose
    # their stored inputs and artifacts; the job row and its events stay. 0 keeps them forever.
    retention_days: float = Field(30, ge=0, description="days a finished job keeps its files")

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        home = self.home.expanduser().resolve()
        self.home = home
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'dare.db'}"
        self.database_url = normalize_database_url(self.database_url)
        if not self.broker_url:
            self.broker_url = "filesystem://"
        self.artifact_root = (self.artifact_root or home / "artifacts").expanduser().resolve()
        self.work_dir = (self.work_dir or home / "work").expanduser().resolve()
        self.upload_tmp_dir = (self.upload_tmp_dir or home / "uploads").expanduser().resolve()
        if self.artifact_store == "s3" and not self.s3_bucket:
            raise ValueError("DARE_ARTIFACT_STORE=s3 needs DARE_S3_BUCKET (the bucket's name)")
        if self.stage_hard_time_limit_s is None:
            self.stage_hard_time_limit_s = self.stage_soft_time_limit_s + 300
        if self.stage_hard_time_limit_s <= self.stage_soft_time_limit_s:
            raise ValueError("DARE_STAGE_HARD_TIME_LIMIT_S must exceed DARE_STAGE_SOFT_TIME_LIMIT_S")
        if self.broker_visibility_timeout_s is None:
            self.broker_visibility_timeout_s = self.stage_hard_time_limit_s + 3600
        if self.heartbeat_interval_s >= self.stage_stale_after_s:
            # a live worker's lease would expire between two renewals
            raise ValueError("DARE_HEARTBEAT_INTERVAL_S must be below DARE_STAGE_STALE_AFTER_S")
        if self.broker_visibility_timeout_s <= self.stage_hard_time_limit_s:
            # Redis would hand a still-running stage to a second worker.
            raise ValueError("DARE_BROKER_VISIBILITY_TIMEOUT_S must exceed the hard time limit")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_is_filesystem(self) -> bool:
        return self.broker_url.startswith("filesystem:")

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    def limit_for(self, field: str) -> int:
        per_kind = {"model": self.max_model_bytes, "history": self.max_history_bytes,
                    "data": self.max_data_bytes}.get(field)
        return per_kind or self.max_upload_bytes

    def ensure_dirs(self) -> None:
        for d in (self.artifact_root, self.work_dir, self.upload_tmp_dir):
            if d is self.artifact_root and self.artifact_store != "local":
                continue  # the objects live in the bucket
            d.mkdir(parents=True, exist_ok=True)
        if self.is_sqlite:
            self.home.mkdir(parents=True, exist_ok=True)
        if self.broker_is_filesystem:
            for sub in ("queue", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


def normalize_database_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL whatever driver the URL names (or none)."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()
