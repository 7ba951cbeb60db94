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

Reads (``--reads``, see :func:`run_reads`): `dare api` on PostgreSQL with an API key, beside a
trivial FastAPI app served the same way, loaded by `wrk` (`apt-get install wrk`): saturated
throughput and a paced ~200 requests/s run, one table.

    python -m bench.latency --reads [--duration 5] [--rounds 3] [--before DIR]

``--before DIR`` serves the same database from another source tree as well (another `dare api`,
with DIR first on its path), measured in the same interleaved rounds: a before/after pair that
machine load hits alike.
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
from dare_client.client import wait_ready

DARE = [sys.executable, "-c", "from service.cli.main import main; raise SystemExit(main())"]
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

    from service.cli.main import worker_argv

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
    ap.add_argument("--reads", action="store_true",
                    help="measure GET throughput and latency beside a trivial app (needs wrk)")
    ap.add_argument("--duration", type=int, default=5,
                    help="seconds per saturated wrk run (--reads; paced runs take twice that)")
    ap.add_argument("--rounds", type=int, default=3, help="saturated rounds (--reads)")
    ap.add_argument("--before", type=Path, default=None,
                    help="--reads: also serve the same database from this source tree (e.g. "
                         "`git archive main | tar -x -C DIR`) and measure it in the same rounds")
    args = ap.parse_args(argv)
    if args.reads:
        print_reads(run_reads(args.duration, args.rounds, before=args.before))
        return 0
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


# --- reads: GET /v1/jobs beside a trivial endpoint ---------------------------------------------
#
# A Python load generator saturates before the server does on a small machine, so this needs
# `wrk` (Debian: `apt-get install wrk`). Debian's wrk has no constant-rate mode (wrk2's -R); the
# paced runs use wrk's Lua `delay()` hook instead: each of PACED_CONNECTIONS connections waits
# PACED_DELAY_MS after every answer, which offers about 200 requests/s. That is a closed loop
# (a slow answer delays the next request, so tail latency is slightly understated compared with
# wrk2's open loop); the achieved rate is printed beside the percentiles.

READ_JOBS = 60           # jobs of the benchmark's tenant, two inputs each
SATURATE = ("-t1", "-c8")  # the measurement
PACED_CONNECTIONS = 8
PACED_DELAY_MS = 38      # 8 connections / (38 ms + ~2 ms per answer) ~= 200 requests/s
_PACED_LUA = f"function delay() return {PACED_DELAY_MS} end\n"


def trivial_app():  # noqa: ANN201 (FastAPI)
    """The baseline: FastAPI and uvicorn doing no work. ``/readyz`` only lets wait_ready poll."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


# Served exactly as `dare api` serves service.api.app (service/cli/main.py cmd_api): one process, the
# same log configuration (JSON access lines), uvicorn's default (uvloop/httptools) loop.
_TRIVIAL_SERVER = (
    "import sys, uvicorn\n"
    "from service.logs import uvicorn_log_config\n"
    "uvicorn.run('bench.latency:trivial_app', factory=True, host='127.0.0.1',\n"
    "            port=int(sys.argv[1]), log_level='info', proxy_headers=True,\n"
    "            log_config=uvicorn_log_config('json', 'INFO'))\n")


def seed_read_jobs(url: str, n: int = READ_JOBS) -> tuple[str, list[str]]:
    """An API key and ``n`` finished jobs of its tenant, written straight to the database (the
    submission path is not what this measures). Finished, so the reconciler leaves them be."""
    from sqlalchemy import create_engine

    from service.api.auth import create_api_key, ensure_tenant
    from service.jobs.records import StoredInput, create_job
    from service.states import JobStatus, utcnow
    from service.store.db import session_factory
    from worker.engine.config import parse_config, stage_names

    engine = create_engine(url)
    config = parse_config({"dataset": "digits"})
    ids = []
    try:
        with session_factory(engine).begin() as s:
            key = create_api_key(s, "bench-reads")
            tenant_id = ensure_tenant(s, "bench-reads").id
            for i in range(n):
                job = create_job(
                    s, job_id=uuid.uuid4(), tenant_id=tenant_id,
                    config=config.model_dump(mode="json"), stages=stage_names(config),
                    model_format="onnx", inputs=[
                        StoredInput("model", "model.onnx", f"file:///bench/{i}/model.onnx",
                                    250_000 + i, "0" * 64),
                        StoredInput("history", "history.zip", f"file:///bench/{i}/history.zip",
                                    2_500_000 + i, "1" * 64)])
                job.status = JobStatus.succeeded
                job.started_at = job.finished_at = utcnow()
                job.progress = job.stage_progress = 1.0
                ids.append(str(job.id))
    finally:
        engine.dispose()
    return key, ids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): the server's cost per request
    is steadier than its rate on a machine that other work shares."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, duration: int, *, key: str | None = None, paced: bool = False,
        scratch: Path | None = None, pid: int | None = None) -> dict[str, float]:
    """One wrk run: requests/s, p50 and p99 in ms, non-2xx answers, and (given the server's
    pid) its CPU milliseconds per request."""
    import re

    args = ["wrk", *SATURATE, f"-d{duration}s", "--latency"]
    if paced:
        assert scratch is not None
        lua = scratch / "paced.lua"
        lua.write_text(_PACED_LUA)
        args = ["wrk", "-t1", f"-c{PACED_CONNECTIONS}", f"-d{duration}s", "--latency",
                "-s", str(lua)]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu0 if pid else float("nan")

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rate and total, out
    n = int(total.group(1))
    return {"rps": float(rate.group(1)), "p50": ms("50%"), "p99": ms("99%"),
            "bad": int(bad.group(1)) if bad else 0, "n": n, "cpu_ms": 1000 * cpu / max(n, 1)}


def run_reads(duration: int = 5, rounds: int = 3,
              before: Path | None = None) -> list[tuple[str, dict, dict]]:
    """Start `dare api` (PostgreSQL scratch database, keys required) and the trivial app, then
    wrk the targets in turn: ``rounds`` saturated runs of ``duration`` s each, interleaved so
    that other load on the machine hits every target alike (the median round is kept), then
    one paced run each. Rows: (target, saturated, paced)."""
    from sqlalchemy import create_engine, text

    if shutil.which("wrk") is None:
        raise SystemExit("bench.latency --reads needs wrk: apt-get install wrk")
    scratch = Path(tempfile.mkdtemp(prefix="dare-bench-reads-"))
    db = f"dare_bench_reads_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    env = {**os.environ, "DARE_HOME": str(scratch / "var"), "DARE_DATABASE_URL": url,
           "DARE_BROKER_URL": REDIS_URL, "DARE_AUTH": "required"}
    procs: list[subprocess.Popen] = []
    log = (scratch / "servers.log").open("wb")
    try:
        subprocess.run([*DARE, "db", "upgrade"], env=env, check=True, capture_output=True)
        key, ids = seed_read_jobs(url)
        api_port, trivial_port = free_port(), free_port()
        procs.append(subprocess.Popen([*DARE, "api", "--port", str(api_port)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([sys.executable, "-c", _TRIVIAL_SERVER, str(trivial_port)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        api, trivial = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{trivial_port}"
        wait_ready(api, procs, what="dare api")
        wait_ready(trivial, procs, what="the trivial app")
        api_pid, trivial_pid = procs[0].pid, procs[1].pid
        targets = [("trivial FastAPI endpoint", f"{trivial}/ping", None, trivial_pid),
                   ("GET /healthz", f"{api}/healthz", None, api_pid),
                   ("GET /v1/jobs/{id}", f"{api}/v1/jobs/{ids[0]}", key, api_pid),
                   ("GET /v1/jobs?limit=20", f"{api}/v1/jobs?limit=20", key, api_pid)]
        if before is not None:
            old_port = free_port()
            procs.append(subprocess.Popen(
                [*DARE, "api", "--port", str(old_port)], cwd=before,
                env={**env, "PYTHONPATH": str(before.resolve())}, stdout=log,
                stderr=subprocess.STDOUT))
            old = f"http://127.0.0.1:{old_port}"
            wait_ready(old, procs, what="dare api (--before)")
            old_pid = procs[-1].pid
            targets += [("before: GET /healthz", f"{old}/healthz", None, old_pid),
                        ("before: GET /v1/jobs/{id}", f"{old}/v1/jobs/{ids[0]}", key, old_pid),
                        ("before: GET /v1/jobs?l=20", f"{old}/v1/jobs?limit=20", key, old_pid)]
        for _, u, k, _pid in targets:  # each answers 200 before it is measured
            r = httpx.get(u, headers={"Authorization": f"Bearer {k}"} if k else {})
            assert r.status_code == 200, (u, r.status_code, r.text[:300])
            wrk(u, 1, key=k)  # warm up: pool connections, prepared statements
        runs: dict[str, list[dict]] = {name: [] for name, *_ in targets}
        for _ in range(rounds):
            for name, u, k, pid in targets:
                runs[name].append(wrk(u, duration, key=k, pid=pid))
        rows = []
        for name, u, k, pid in targets:
            median = sorted(runs[name], key=lambda r: r["rps"])[len(runs[name]) // 2]
            rows.append((name, median,
                         wrk(u, 2 * duration, key=k, paced=True, scratch=scratch, pid=pid)))
        return rows
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(40)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def print_reads(rows: list[tuple[str, dict, dict]]) -> None:
    base = rows[0][1]["rps"]
    print(f"\nReads: `dare api` (PostgreSQL, API key) beside a trivial FastAPI app served the "
          f"same way, one run ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end)")
    print(f"saturated: wrk {' '.join(SATURATE)}, median of the interleaved rounds; paced: wrk -t1 "
          f"-c{PACED_CONNECTIONS}, {PACED_DELAY_MS} ms between answer and next request on each "
          "connection (~200 requests/s, closed loop); CPU: the server process's ms per request")
    print(f"{'target':<25}{'req/s':>7}{'x trivial':>10}{'p50 ms':>8}{'p99 ms':>8}{'CPU ms':>8}"
          f"  |{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}{'non-2xx':>9}")
    for name, sat, paced in rows:
        print(f"{name:<25}{sat['rps']:>7.0f}{sat['rps'] / base:>10.2f}{sat['p50']:>8.1f}"
              f"{sat['p99']:>8.1f}{sat['cpu_ms']:>8.2f}  |{paced['rps']:>7.0f}{paced['p50']:>8.1f}"
              f"{paced['p99']:>8.1f}{sat['bad'] + paced['bad']:>9}")


if __name__ == "__main__":
    raise SystemExit(main())
