"""Service tests run against the real PostgreSQL (127.0.0.1:5432, trust auth) and Redis
(127.0.0.1:6379): a fresh database per session, dropped at the end; Redis db 5, flushed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from service.settings import Settings
from service.store.db import dispose_engines, engine_for, upgrade

from . import fake_engine, subjects

REPO = Path(__file__).resolve().parents[2]
PG_HOST = os.environ.get("DARE_TEST_PG", "postgres@127.0.0.1:5432")
PG_ADMIN_URL = f"postgresql+psycopg://{PG_HOST}/postgres"
REDIS_URL = os.environ.get("DARE_TEST_REDIS", "redis://127.0.0.1:6379/5")
FAKE_RUNNER = "tests.service.fake_engine:run_stage"


class RecordingDispatcher:
    """Stands in for the broker in API-only tests: records (job_id, stage)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = False

    def enqueue(self, job_id: str, stage: str) -> None:
        if self.fail:
            raise ConnectionError("broker down (test)")
        self.sent.append((job_id, stage))

    def ping(self) -> None:
        if self.fail:
            raise ConnectionError("broker down (test)")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"dare_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # pragma: no cover
        pytest.fail(f"PostgreSQL at {PG_HOST} is needed for the service tests ({e}); start it "
                    "with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    url = f"postgresql+psycopg://{PG_HOST}/{name}"
    upgrade(url)
    yield url
    dispose_engines()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def clean_db(pg_url: str) -> str:
    with engine_for(pg_url).begin() as c:
        c.execute(text("TRUNCATE jobs, job_inputs, artifacts, stage_runs, job_events, tenants, "
                       "api_keys CASCADE"))
    return pg_url


@pytest.fixture
def settings(tmp_path: Path, clean_db: str) -> Settings:
    return Settings(home=tmp_path / "home", database_url=clean_db, broker_url=REDIS_URL,
                    max_upload_bytes=256 * 1024, progress_interval_s=0.2,
                    cancel_poll_interval_s=0.1, stage_runner=FAKE_RUNNER,
                    submit_inspection="off",  # the stand-in subjects are not loadable models
                    # tests queue many jobs that never finish; test_quotas sets its own limit
                    max_active_jobs_per_tenant=1000)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def client(settings: Settings, dispatcher: RecordingDispatcher):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(settings, dispatcher=dispatcher)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 't1')}"
        yield c
    app.state.ctx.engine.dispose()


@pytest.fixture
def client_t2(client):
    """The same app as ``client``, acting as a second tenant "t2"."""
    from fastapi.testclient import TestClient

    key = make_key(client.app.state.ctx.factory, "t2")
    return TestClient(client.app, raise_server_exceptions=False,
                      headers={"Authorization": f"Bearer {key}"})


def api_routes(app, prefix: str = "/v1") -> list[tuple[str, str]]:  # noqa: ANN001
    """(method, path template) of every route under ``prefix``, read from the app's route
    table, so routes added later are covered by the tests that iterate it."""
    try:  # FastAPI >= 0.16x keeps included routers lazily; this flattens them
        from fastapi.routing import iter_route_contexts

        routes = list(iter_route_contexts(app.routes))
    except ImportError:  # pragma: no cover (older FastAPI: app.routes is flat)
        routes = app.routes
    return sorted({(m, r.path) for r in routes if (r.path or "").startswith(prefix)
                   for m in (r.methods or ()) if m != "HEAD"})


def make_key(factory, tenant: str, **kw) -> str:  # noqa: ANN001
    """A real API key for ``tenant`` (created if new), as `dare keys create` makes it."""
    from service.api.auth import create_api_key

    with factory.begin() as s:
        return create_api_key(s, tenant, **kw)


def tenant_id(factory, tenant: str) -> uuid.UUID:  # noqa: ANN001
    from service.api.auth import ensure_tenant

    with factory.begin() as s:
        return ensure_tenant(s, tenant).id


@pytest.fixture(scope="session")
def subject_bytes() -> dict[str, bytes]:
    return {"model": subjects.tiny_onnx(), "history": subjects.history_zip(),
            "data": subjects.data_npz()}


def submit_files(subject_bytes: dict[str, bytes], *, dataset: str | None = "digits",
                 config: str | None = None, with_data: bool = False) -> tuple[dict, dict]:
    files = {"model": ("model.onnx", subject_bytes["model"], "application/octet-stream"),
             "history": ("history.zip", subject_bytes["history"], "application/zip")}
    if with_data:
        files["data"] = ("data.npz", subject_bytes["data"], "application/octet-stream")
    data = {}
    if dataset:
        data["dataset"] = dataset
    if config is not None:
        data["config"] = config
    return files, data


@pytest.fixture
def submit(client, subject_bytes):
    """``submit(config=None) -> job id``: POST the stand-in subject as tenant t1, expect 202."""
    def _submit(config: str | None = None) -> str:
        files, data = submit_files(subject_bytes, config=config)
        r = client.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 202, r.text
        return r.json()["id"]
    return _submit


def run_all_stages(client, job_id: str) -> None:  # noqa: ANN001 (TestClient)
    """Drive every stage of a job in-process, as the worker would, with the stand-in engine."""
    from service.jobs.pipeline import Pipeline

    ctx = client.app.state.ctx
    p = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)
    stage = "validate"
    while stage:
        stage = p.run(job_id, stage, task_id=str(uuid.uuid4()))


# --- processes for the multi-process tests --------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(overrides)
    return env


def dare_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from service.cli.main import main; raise SystemExit(main())", *args]


class Proc:
    """A subprocess with its output in a file, stopped (and its log shown) at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._fh.close()


def wait_http(url: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise AssertionError(f"{proc.name} exited {proc.p.returncode}:\n{proc.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{proc.tail()}")


def wait_job(base: str, job_id: str, statuses: set[str], timeout: float,
             procs: list[Proc] = (), headers: dict[str, str] | None = None) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10, headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout} s: {job}\n{logs}")
