"""The typed client (``dare_client.client``) and the ``dare submit/status/watch/list/cancel/download``
commands, against a real server: ``dare api`` and a Celery worker process on PostgreSQL and Redis,
with API keys required. The worker runs the fake stage runner, so a job takes a second or two; the
CLI runs as subprocesses exactly as a user types it (URL and key from DARE_URL / DARE_API_KEY)."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import subprocess
import threading
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dare_client import cli as client_cli
from dare_client.client import ApiError, DareClient, DownloadError, ServerUnreachable
from dare_client.schemas import ArtifactRead, EventRead, JobList, JobRead
from safetensors.numpy import save as st_save

from service.cli.main import worker_argv

from . import subjects
from .conftest import (
    FAKE_RUNNER,
    REDIS_URL,
    Proc,
    dare_cmd,
    free_port,
    service_env,
    wait_http,
)
from .fake_engine import FAIL_INPUT_SEED, SLOW_SEED

EXPECTED_ARTIFACTS = {"hardened.onnx", "hardened.safetensors", "report.json", "report.html"}
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass
class Server:
    base: str
    key: str
    procs: list[Proc]

    def client(self) -> DareClient:
        return DareClient(self.base, api_key=self.key)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(30)}" for p in self.procs)


def _make_key(pg_url: str, tenant: str) -> str:
    from sqlalchemy.orm import Session

    from service.api.auth import create_api_key
    from service.store.db import engine_for

    with Session(engine_for(pg_url)) as s:
        key = create_api_key(s, tenant)
        s.commit()
    return key


@pytest.fixture(scope="module")
def server(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("client-server")
    key = _make_key(pg_url, f"client-{uuid.uuid4().hex[:8]}")
    env = service_env(DARE_HOME=str(tmp / "home"), DARE_DATABASE_URL=pg_url,
                      DARE_BROKER_URL=REDIS_URL, DARE_STAGE_RUNNER=FAKE_RUNNER, DARE_AUTH="required",
                      DARE_PROGRESS_INTERVAL_S="0.1", DARE_CANCEL_POLL_INTERVAL_S="0.1",
                      # the inputs' deep inspection is the engine's business, tested elsewhere
                      DARE_SUBMIT_INSPECTION="off", DARE_MAX_ACTIVE_JOBS_PER_TENANT="50",
                      DARE_LOG_FORMAT="text")
    port = free_port()
    api = Proc("api", dare_cmd("api", "--port", str(port)), env, tmp)
    worker = Proc("worker", worker_argv(loglevel="WARNING"), env, tmp)
    srv = Server(f"http://127.0.0.1:{port}", key, [api, worker])
    try:
        wait_http(f"{srv.base}/readyz", api)
        yield srv
    finally:
        worker.stop()
        api.stop()


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny ONNX classifier (8x8 input, like digits) and a history whose checkpoints really
    match its parameters."""
    d = tmp_path_factory.mktemp("client-subject")
    (d / "model.onnx").write_bytes(subjects.tiny_onnx())
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for e in range(1, 4):
            z.writestr(f"epoch_{e:02d}.safetensors", st_save({
                "fc.weight": rng.normal(size=(10, 64)).astype(np.float32),
                "fc.bias": np.zeros(10, np.float32)}))
    (d / "history.zip").write_bytes(buf.getvalue())
    return {"model": d / "model.onnx", "history": d / "history.zip"}


def dare(server: Server, *args: str, cwd: Path, key: str | None = "env",
         timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = service_env(DARE_URL=server.base)
    if key == "env":
        env["DARE_API_KEY"] = server.key
    elif key is not None:
        args = (*args, "--key", key)
    return subprocess.run(dare_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _out(r: subprocess.CompletedProcess[str]) -> str:
    return f"rc={r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def _submit_args(subject: dict[str, Path], seed: int) -> list[str]:
    return ["submit", "--model", str(subject["model"]), "--history", str(subject["history"]),
            "--dataset", "digits", "--config", json.dumps({"seed": seed})]


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- the CLI --------------------------------------------------------------------------------

def test_submit_wait_then_status_list_watch_download(server: Server, subject, tmp_path: Path) -> None:
    r = dare(server, *_submit_args(subject, 7), "--wait", "--interval", "0.2", cwd=tmp_path)
    assert r.returncode == 0, _out(r) + server.logs()
    job_id = re.search(rf"submitted job ({UUID_RE})", r.stdout).group(1)
    with server.client() as c:
        arts = c.artifacts(job_id)
        stages = c.events(job_id).items[0].data["stages"]
    # every stage was shown as it started and finished, then the summary and the downloads
    for stage in stages:
        assert f"{stage} started" in r.stdout and f"{stage} finished in" in r.stdout, _out(r)
    assert "succeeded" in r.stdout and "clean accuracy: 0.900 -> 0.880" in r.stdout, _out(r)
    out = tmp_path / f"dare-{job_id[:8]}"
    assert {a.name for a in arts} >= EXPECTED_ARTIFACTS
    assert {p.name for p in out.iterdir()} == {a.name for a in arts}  # no .part files left
    for a in arts:
        assert _sha256(out / a.name) == a.sha256 and (out / a.name).stat().st_size == a.size
        assert f"downloaded {out.relative_to(tmp_path) / a.name}" in r.stdout

    r = dare(server, "status", job_id[:8], cwd=tmp_path)  # the short id of the dare-* directory
    assert r.returncode == 0 and "succeeded" in r.stdout and "input model: model.onnx" in r.stdout, _out(r)
    r = dare(server, "status", job_id, "--json", cwd=tmp_path)
    assert JobRead.model_validate_json(r.stdout).status.value == "succeeded", _out(r)

    r = dare(server, "list", "--status", "succeeded", "--limit", "200", "--json", cwd=tmp_path)
    listed = [JobRead.model_validate(j) for j in json.loads(r.stdout)]
    assert job_id in {str(j.id) for j in listed} and {j.status.value for j in listed} == {"succeeded"}
    r = dare(server, "list", "--limit", "1", cwd=tmp_path)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines[0].startswith("ID") and len(lines) == 2, _out(r)

    r = dare(server, "watch", job_id, cwd=tmp_path)  # a finished job: its history, then exit 0
    assert r.returncode == 0 and "succeeded" in r.stdout and "export finished" in r.stdout, _out(r)

    r = dare(server, "download", job_id, "report.json", "--out", "d2", cwd=tmp_path)
    assert r.returncode == 0, _out(r)
    assert [p.name for p in (tmp_path / "d2").iterdir()] == ["report.json"]
    assert (tmp_path / "d2" / "report.json").read_bytes() == (out / "report.json").read_bytes()
    r = dare(server, "download", job_id, "nope.bin", cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_API_ERROR and "it has: " in r.stderr, _out(r)
    r = dare(server, "cancel", job_id, cwd=tmp_path)  # finished: the API's 409, said plainly
    assert r.returncode == client_cli.EXIT_API_ERROR and "409" in r.stderr, _out(r)
    assert "Traceback" not in r.stderr


def test_failed_job_exits_with_its_error(server: Server, subject, tmp_path: Path) -> None:
    r = dare(server, *_submit_args(subject, FAIL_INPUT_SEED), "--wait", "--interval", "0.2",
             cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_JOB_FAILED, _out(r) + server.logs()
    assert "no_oracles" in r.stderr and "in stage mine" in r.stderr, _out(r)
    job_id = re.search(rf"submitted job ({UUID_RE})", r.stdout).group(1)
    assert not list(tmp_path.glob("dare-*"))  # nothing to download from a failed job
    for cmd in ("status", "watch"):
        r = dare(server, cmd, job_id, cwd=tmp_path)
        assert r.returncode == client_cli.EXIT_JOB_FAILED and "no_oracles" in r.stderr, _out(r)


def test_cancel_then_watch(server: Server, subject, tmp_path: Path) -> None:
    r = dare(server, *_submit_args(subject, SLOW_SEED), "--json", cwd=tmp_path)
    assert r.returncode == 0, _out(r)
    job_id = str(JobRead.model_validate_json(r.stdout).id)
    r = dare(server, "cancel", job_id, cwd=tmp_path)
    assert r.returncode == 0 and job_id in r.stdout, _out(r)
    r = dare(server, "watch", job_id, "--interval", "0.2", cwd=tmp_path, timeout=60)
    assert r.returncode == client_cli.EXIT_JOB_CANCELLED and "cancelled" in r.stdout, _out(r)
    r = dare(server, "cancel", job_id, cwd=tmp_path)  # twice is harmless
    assert r.returncode == 0 and "cancelled" in r.stdout, _out(r)


def test_errors_are_one_clear_line(server: Server, subject, tmp_path: Path) -> None:
    some = str(uuid.uuid4())
    r = dare(server, "status", some, key="dare_" + "x" * 43, cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_API_ERROR and "401" in r.stderr, _out(r)
    r = dare(server, "list", key=None, cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_API_ERROR and "DARE_API_KEY" in r.stderr, _out(r)
    r = dare(server, "status", some[:8], cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_API_ERROR and "404" in r.stderr, _out(r)
    r = dare(server, *_submit_args(subject, 0)[:-2], "--config", '{"q": 5}', cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_API_ERROR and "q" in r.stderr and "422" in r.stderr, _out(r)
    r = dare(server, *_submit_args(subject, 0)[:-2], "--config", "{q: 1}", cwd=tmp_path)
    assert r.returncode == client_cli.EXIT_USAGE and "not valid JSON" in r.stderr, _out(r)
    down = f"http://127.0.0.1:{free_port()}"
    r = subprocess.run(dare_cmd("list", "--url", down), cwd=tmp_path, env=service_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == client_cli.EXIT_UNREACHABLE, _out(r)
    assert r.stderr.strip().count("\n") == 0 and "connection refused" in r.stderr, _out(r)


# --- the typed client -----------------------------------------------------------------------

def test_typed_client(server: Server, subject, tmp_path: Path) -> None:
    progress: list[tuple[str, int, int]] = []
    key = uuid.uuid4().hex
    with server.client() as c:
        job = c.submit(subject["model"], subject["history"], dataset="digits", config={"seed": 11},
                       idempotency_key=key, on_upload_progress=lambda *a: progress.append(a))
        assert isinstance(job, JobRead) and job.config["seed"] == 11
        for field in ("model", "history"):
            size = subject[field].stat().st_size
            last = [p for p in progress if p[0] == field][-1]
            assert last == (field, size, size)
        assert c.submit(subject["model"], subject["history"], dataset="digits",
                        config={"seed": 11}, idempotency_key=key).id == job.id

        events: list[EventRead] = []
        updates: list[JobRead] = []
        done = c.wait(job.id, on_event=events.append, on_update=updates.append, interval=0.2,
                      timeout=60)
        assert done.status.value == "succeeded" and updates[-1] == done
        kinds = [e.kind for e in events]
        assert kinds[0] == "created" and kinds[-1] == "succeeded" and "stage_started" in kinds
        assert [e.id for e in events] == sorted({e.id for e in events})  # each once, in order
        assert c.events(job.id, after=events[-2].id).items == [events[-1]]

        assert isinstance(c.get(job.id), JobRead)
        page = c.list(status=["succeeded"], limit=1)
        assert isinstance(page, JobList) and len(page.items) == 1
        paged = list(c.iter_jobs(page_size=1, max_items=500))  # one job per page
        assert str(job.id) in {str(j.id) for j in paged}
        assert len({j.id for j in paged}) == len(paged)

        arts = c.artifacts(job.id)
        assert all(isinstance(a, ArtifactRead) for a in arts)
        report = next(a for a in arts if a.name == "report.json")
        p = c.download(job.id, "report.json", tmp_path)
        assert p == tmp_path / "report.json" and _sha256(p) == report.sha256
        assert json.loads(p.read_text())["schema_version"] == 1

        seen: list[int] = []
        bad = report.model_copy(update={"sha256": "0" * 64})
        with pytest.raises(DownloadError, match="sha256"):
            c.download(job.id, "report.json", tmp_path / "bad.json", artifact=bad,
                       on_progress=lambda n, d, t: seen.append(d))
        assert seen and seen[-1] == report.size
        assert not (tmp_path / "bad.json").exists() and not list(tmp_path.glob(".*.part"))

        with pytest.raises(ApiError) as e:
            c.get(uuid.uuid4())
        assert e.value.status == 404 and e.value.code and e.value.detail
        with pytest.raises(ApiError) as e:
            c.cancel(job.id)
        assert e.value.status == 409
    with DareClient(server.base, api_key="dare_" + "y" * 43) as c, pytest.raises(ApiError) as e:
        c.list()
    assert e.value.status == 401


def test_non_problem_error_and_no_server() -> None:
    """A proxy's HTML error page is still a readable ApiError; no server is ServerUnreachable."""

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Proxy)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        with DareClient(f"http://127.0.0.1:{httpd.server_address[1]}") as c, \
                pytest.raises(ApiError) as e:
            c.get(uuid.uuid4())
        assert e.value.status == 502 and e.value.code == "http_502"
        assert "Bad Gateway" in e.value.detail
    finally:
        httpd.shutdown()
        httpd.server_close()
    with DareClient(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(ServerUnreachable) as u:
        c.get(uuid.uuid4())
    assert "connection refused" in str(u.value)
