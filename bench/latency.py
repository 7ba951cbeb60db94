"""Time from `POST /v1/jobs` to the worker starting the job's first stage.

Two set-ups, each started fresh in a scratch directory:

- embedded: `dare serve` (SQLite, kombu's filesystem transport);
- redis:    `dare api` + a Celery worker process (`dare worker`'s command) on Redis (db 6, flushed)
            and PostgreSQL (a scratch database, dropped at the end).

For each of N submissions of a real subject, the latency is the `stage_started` event's time
minus the job's `created_at` (both stamped by the service, so no client clock is involved), plus
the client's view: POST round trip. After each measurement the job is cancelled and the next one
waits for the worker to be free. Prints a table.

    python -m bench.latency [--n 5] [--subject demo-out/subject] [--modes embedded,redis]

With ``--inspect-n N`` it measures instead how long `POST /v1/jobs` takes to answer 202 with the
submit-time inspection on (`dare api`, SQLite, no worker), N sequential digits subjects, through
the one-shot inspector child (a torch import per POST, the path before issue 9) and through the
fork server; prints median, p90 and max:

    python -m bench.latency --inspect-n 20 [--subject demo-out/subject]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

from service.client import wait_ready

DARE = [sys.executable, "-c", "from service.cli import main; raise SystemExit(main())"]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/6"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_subject(path: Path) -> Path:
    if (path / "model.onnx").is_file():
        return path
    print(f"training a reference subject into {path} ...", flush=True)
    subprocess.run([*DARE, "train-reference", "--arch", "lenet", "--dataset", "digits",
                    "--epochs", "10", "--out", str(path)], check=True, capture_output=True)
    return path


def measure(base: str, subject: Path, n: int) -> list[tuple[float, float]]:
    """n + 1 submissions; the first (a cold worker finishing its imports) is returned first."""
    out = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        with (subject / "model.onnx").open("rb") as m, (subject / "history.zip").open("rb") as h:
            r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", m),
                                                     "history": ("history.zip", h)},
                           data={"dataset": "digits"}, timeout=60)
        post_s = time.perf_counter() - t0
        assert r.status_code == 202, r.text
        job = r.json()
        created = datetime.fromisoformat(job["created_at"])
        started = None
        deadline = time.monotonic() + 120
        while started is None and time.monotonic() < deadline:
            for e in httpx.get(f"{base}{job['urls']['events']}").json()["items"]:
                if e["kind"] == "stage_started":
                    started = datetime.fromisoformat(e["at"])
                    break
            else:
                time.sleep(0.02)
        assert started is not None, "the first stage never started"
        out.append((post_s, (started - created).total_seconds()))
        httpx.post(f"{base}{job['urls']['cancel']}")
        while httpx.get(f"{base}{job['urls']['self']}").json()["status"] not in (
                "cancelled", "failed", "succeeded"):
            time.sleep(0.1)
        time.sleep(0.5)  # let the worker go idle: measure a waiting worker, as a new job meets it
    return out


# This measures queueing (POST -> first stage), not the submit-time inspection (a child process
# that costs a torch import, a few seconds) or key handling: both are turned off.
BENCH_ENV = {"OMP_NUM_THREADS": "1", "DARE_AUTH": "open", "DARE_SUBMIT_INSPECTION": "off"}


def run_embedded(subject: Path, n: int, scratch: Path) -> list[tuple[float, float]]:
    port = free_port()
    log = (scratch / "serve.log").open("wb")
    env = {**os.environ, **BENCH_ENV}
    serve = subprocess.Popen([*DARE, "serve", "--port", str(port), "--home", str(scratch / "var")],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, [serve])
        return measure(base, subject, n)
    finally:
        serve.terminate()
        serve.wait(40)
        log.close()


def run_redis(subject: Path, n: int, scratch: Path) -> list[tuple[float, float]]:
    import redis
    from sqlalchemy import create_engine, text

    from service.cli import worker_argv

    redis.Redis.from_url(REDIS_URL).flushdb()
    db = f"dare_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    env = {**os.environ, **BENCH_ENV, "DARE_HOME": str(scratch / "var"),
           "DARE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
           "DARE_BROKER_URL": REDIS_URL}
    procs: list[subprocess.Popen] = []
    log = (scratch / "redis-stack.log").open("wb")
    try:
        subprocess.run([*DARE, "db", "upgrade"], env=env, check=True, capture_output=True)
        port = free_port()
        procs.append(subprocess.Popen([*DARE, "api", "--port", str(port)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(worker_argv(loglevel="WARNING"), env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, procs)
        return measure(base, subject, n)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(40)
        log.close()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


# --- submit latency with the submit-time inspection on (issue 9, item 2) ----------------------

def _submit_times(base: str, subject: Path, n: int) -> list[float]:
    """n sequential POSTs of the subject (model, history, dataset=digits); seconds to the 202."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with (subject / "model.onnx").open("rb") as m, (subject / "history.zip").open("rb") as h:
            r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", m),
                                                     "history": ("history.zip", h)},
                           data={"dataset": "digits"}, timeout=600)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 202, r.text
    return out


def run_inspected_api(subject: Path, n: int, scratch: Path, fork_server: bool) -> list[float]:
    """`dare api` alone (SQLite, no worker: the jobs just queue) with inspection on, through the
    fork server or the one-shot child (a fresh python per POST, the path before issue 9). One
    untimed POST first: it waits for the fork server's torch import."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DARE_AUTH": "open",
           "DARE_HOME": str(scratch / "var"), "DARE_SUBMIT_INSPECTION": "subprocess",
           "DARE_INSPECTION_FORK_SERVER": "true" if fork_server else "false",
           "DARE_MAX_ACTIVE_JOBS_PER_TENANT": str(n + 10), "DARE_RECONCILE_INTERVAL_S": "0"}
    subprocess.run([*DARE, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    log = (scratch / "api.log").open("wb")
    api = subprocess.Popen([*DARE, "api", "--port", str(port)], env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, [api])
        _submit_times(base, subject, 1)
        return _submit_times(base, subject, n)
    finally:
        api.terminate()
        api.wait(40)
        log.close()


def inspection_section(subject: Path, n: int) -> None:
    rows = []
    for name, fork_server in (("one-shot child (before)", False), ("fork server (after)", True)):
        scratch = Path(tempfile.mkdtemp(prefix="dare-bench-inspect-"))
        try:
            times = sorted(t * 1000 for t in run_inspected_api(subject, n, scratch, fork_server))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows.append((name, len(times), statistics.median(times),
                     times[max(0, int(round(0.9 * len(times))) - 1)], times[-1]))
    print(f"\nPOST /v1/jobs -> 202 with the submit-time inspection on, digits subject, sequential "
          f"({os.cpu_count()} CPUs)")
    print(f"{'inspector':<26}{'n':>4}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}")
    for name, k, med, p90, mx in rows:
        print(f"{name:<26}{k:>4}{med:>11.0f}{p90:>9.0f}{mx:>9.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--subject", type=Path, default=Path("demo-out/subject"))
    ap.add_argument("--modes", default="embedded,redis")
    ap.add_argument("--inspect-n", type=int, default=0,
                    help="instead: N sequential POSTs with the inspection on, one-shot vs fork server")
    args = ap.parse_args(argv)
    subject = ensure_subject(args.subject)
    if args.inspect_n:
        inspection_section(subject, args.inspect_n)
        return 0
    rows = []
    for mode in args.modes.split(","):
        scratch = Path(tempfile.mkdtemp(prefix=f"dare-bench-latency-{mode}-"))
        try:
            res = {"embedded": run_embedded, "redis": run_redis}[mode](subject, args.n, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        cold, warm = res[0], res[1:]
        posts = [p * 1000 for p, _ in warm]
        lats = sorted(s * 1000 for _, s in warm)
        rows.append((mode, len(warm), statistics.median(posts), statistics.median(lats),
                     lats[max(0, int(round(0.9 * len(lats))) - 1)], lats[-1], cold[1] * 1000))
    print(f"\nPOST /v1/jobs -> first stage started ({os.cpu_count()} CPUs; server timestamps)")
    print(f"{'set-up':<10}{'n':>4}{'POST 202 ms (median)':>22}{'start ms median':>17}"
          f"{'p90':>8}{'max':>8}{'first job after start':>23}")
    for mode, n, post_ms, med, p90, mx, cold_ms in rows:
        print(f"{mode:<10}{n:>4}{post_ms:>22.0f}{med:>17.0f}{p90:>8.0f}{mx:>8.0f}{cold_ms:>21.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
