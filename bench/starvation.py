"""Reads while submissions wait: `GET /v1/jobs` latency with N real submissions in flight.

Issue 9 item 3: submissions waiting for an inspector must not hold the threads that serve reads.
This starts `dare api` (SQLite, open mode, inspection on through the fork server, no worker: the
jobs only queue), sends N concurrent POSTs of the digits subject (the per-tenant in-flight cap
and the inspector's queue wait are raised so that all N really are in flight at once), and polls
`GET /v1/jobs` every 100 ms meanwhile. Prints the reads' latency (median, p99, worst) and the
POSTs' outcomes. With the old thread-holding wait (before issue 9) 45 POSTs made a read take 60 s.

    python -m bench.starvation [--n 30] [--subject demo-out/subject]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from dare_client.client import wait_ready

from .latency import DARE, PG_ADMIN, ensure_subject, free_port


def post(base: str, subject: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with (subject / "model.onnx").open("rb") as m, (subject / "history.zip").open("rb") as h:
        r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", m),
                                                 "history": ("history.zip", h)},
                       data={"dataset": "digits"}, timeout=900)
    return r.status_code, time.perf_counter() - t0


def run(subject: Path, n: int, scratch: Path, database_url: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DARE_AUTH": "open",
           "DARE_HOME": str(scratch / "var"), "DARE_SUBMIT_INSPECTION": "subprocess",
           "DARE_INSPECTION_FORK_SERVER": "true", "DARE_RECONCILE_INTERVAL_S": "0",
           "DARE_MAX_ACTIVE_JOBS_PER_TENANT": str(n + 10),
           "DARE_MAX_INFLIGHT_SUBMISSIONS_PER_TENANT": str(n),  # all N in flight at once
           "DARE_INSPECTION_QUEUE_TIMEOUT_S": "600"}  # they wait for an inspector, not 503
    if database_url:
        env["DARE_DATABASE_URL"] = database_url
    subprocess.run([*DARE, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    log = (scratch / "api.log").open("wb")
    api = subprocess.Popen([*DARE, "api", "--port", str(port)], env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [api])
        post(base, subject)  # untimed: waits for the fork server's torch import
        reads: list[float] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=120) as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    r = c.get(f"{base}/v1/jobs", params={"limit": 20})
                    reads.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                    time.sleep(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(post, base, subject) for _ in range(n)]
            time.sleep(0.5)  # the POSTs are sent and waiting before the reads start
            poller.start()
            answers = [f.result() for f in futures]
        done.set()
        poller.join(130)
        return {"n": n, "wall_s": time.perf_counter() - t0, "reads": reads, "answers": answers}
    finally:
        api.terminate()
        api.wait(60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--subject", type=Path, default=Path("demo-out/subject"))
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite",
                    help="postgres: a scratch database on 127.0.0.1:5432, dropped afterwards")
    args = ap.parse_args(argv)
    subject = ensure_subject(args.subject)
    scratch = Path(tempfile.mkdtemp(prefix="dare-bench-starvation-"))
    admin, url = None, None
    if args.db == "postgres":
        from sqlalchemy import create_engine, text

        db = f"dare_bench_starvation_{os.getpid()}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{db}"'))
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    try:
        res = run(subject, args.n, scratch, url)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if admin is not None:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    ms = sorted(r * 1000 for r in res["reads"])
    codes: dict[int, int] = {}
    for code, _ in res["answers"]:
        codes[code] = codes.get(code, 0) + 1
    post_s = sorted(t for _, t in res["answers"])
    print(f"\nGET /v1/jobs?limit=20 every 100 ms while {res['n']} POSTs of the digits subject are in "
          f"flight (dare api, {args.db}, inspection on, {os.cpu_count()} CPUs)")
    print(f"{'reads':>6}{'median ms':>11}{'p99 ms':>9}{'worst ms':>10}   POST answers      "
          f"POST s (median / max)   wall s")
    p99 = ms[max(0, int(round(0.99 * len(ms))) - 1)]
    print(f"{len(ms):>6}{statistics.median(ms):>11.1f}{p99:>9.1f}{ms[-1]:>10.1f}   "
          f"{', '.join(f'{k}: {v}' for k, v in sorted(codes.items())):<18}"
          f"{statistics.median(post_s):>8.1f} / {post_s[-1]:<12.1f}{res['wall_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
