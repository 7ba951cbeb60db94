"""Fan-out: the wall time of one real ``compare`` with 1, then 2 Celery workers.

Production's set-up: `dare api` and N worker processes (`dare worker`'s command, each ``-c 1``
with one PyTorch thread) on Redis and PostgreSQL, the REAL engine, a reference LeNet on the
embedded ``digits`` dataset (`dare train-reference`). One job with ``compare: true`` and a handful
of methods on small grids is run per worker count, each on a fresh database and work directory.
Read from the service's own records (the job's events): compare's wall time, from its first
claim (the plan) to its end (the choice and evaluation done), and each method's time and worker.

    python -m bench.fanout [--workers 1,2] [--redis URL] [--subject DIR]

--redis names a Redis database this script may FLUSH (default db 9). Writes the table, with the
command and the load average before and after each run, to bench/results/fanout.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
from dare_client.client import wait_ready

from bench.chaos import DARE, PG_ADMIN, REPO, ensure_subject, free_port

REDIS_URL = "redis://127.0.0.1:6379/9"
RESULTS = REPO / "bench" / "results" / "fanout.md"
METHODS = ["dare_adv", "dare_s", "dare_rand", "finetune_mined", "at_fgsm", "at_bim"]
CONFIG = {"method": "dare", "compare": True, "seed": 0,
          "evaluation": {"n_samples": 64, "attacks": ["fgsm", "pgd"]},
          "baselines": {"max_train": 300},
          "selection": {"methods": METHODS,
                        "dare": {"epochs": [2, 4], "lr": [1e-3, 3e-3], "history_fraction": [0.5]},
                        "adversarial": {"epochs": [2, 4], "lr": [1e-3, 3e-3]}}}


def run_once(n_workers: int, subject: Path, redis_url: str, deadline: float) -> dict:
    """One job through `dare api` and ``n_workers`` workers; its compare figures."""
    import redis
    from sqlalchemy import create_engine, text

    from service.cli.main import worker_argv

    redis.Redis.from_url(redis_url).flushdb()
    db = f"dare_fanout_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    home = Path(tempfile.mkdtemp(prefix="dare-fanout-"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DARE_")},
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DARE_TORCH_THREADS": "1",
           "PYTHONPATH": str(REPO), "DARE_HOME": str(home), "DARE_AUTH": "open",
           "DARE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
           "DARE_BROKER_URL": redis_url}
    procs: list[subprocess.Popen] = []
    log = (home / "services.log").open("ab")
    load_before = os.getloadavg()
    try:
        subprocess.run([*DARE, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=REPO)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen([*DARE, "api", "--port", str(port)], env=env, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for i in range(n_workers):
            procs.append(subprocess.Popen(
                worker_argv(loglevel="WARNING", extra=["-n", f"w{i}@%h"]), env=env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_ready(base, procs[:1], what="the API")
        files = {"model": ("model.onnx", (subject / "model.onnx").read_bytes()),
                 "history": ("history.zip", (subject / "history.zip").read_bytes())}
        r = httpx.post(f"{base}/v1/jobs", files=files, timeout=60,
                       data={"dataset": "digits", "config": json.dumps(CONFIG)})
        r.raise_for_status()
        jid = r.json()["id"]
        t_end = time.monotonic() + deadline
        while True:
            job = httpx.get(f"{base}/v1/jobs/{jid}", timeout=10).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > t_end:
                raise SystemExit(f"job {jid} still {job['status']} after {deadline} s (log: {log.name})")
            time.sleep(1.0)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {jid} {job['status']}: {job['error']}")
        events = httpx.get(f"{base}/v1/jobs/{jid}/events", params={"limit": 1000},
                           timeout=10).json()["items"]
    finally:
        load_after = os.getloadavg()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        log.close()
        from service.store.db import dispose_engines

        dispose_engines()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
    return summarize(n_workers, events, load_before, load_after)


def _at(e: dict) -> float:
    return datetime.fromisoformat(e["at"]).timestamp()


def summarize(n_workers: int, events: list[dict], load_before, load_after) -> dict:
    def first(kind: str, stage: str) -> dict:
        return next(e for e in events if e["kind"] == kind and e["stage"] == stage)

    started = {e["stage"]: e for e in events if e["kind"] == "method_started"}
    finished = {e["stage"]: e for e in events if e["kind"] == "method_finished"}
    methods = {name.partition(":")[2]: {"seconds": _at(finished[name]) - _at(e),
                                        "worker": e["data"]["worker"]}
               for name, e in started.items()}
    t0, t1 = _at(first("stage_started", "compare")), _at(first("stage_finished", "compare"))
    sent = _at(first("methods_sent", "compare"))
    last = max(_at(e) for e in finished.values())
    job_t0, job_t1 = _at(first("created", None)), _at(events[-1])
    return {"workers": n_workers, "compare_s": t1 - t0, "plan_s": sent - t0,
            "methods_s": last - sent, "select_s": t1 - last, "job_s": job_t1 - job_t0,
            "methods": methods, "worker_processes": len({m["worker"] for m in methods.values()}),
            "load_before": load_before, "load_after": load_after}


def render(runs: list[dict], command: str) -> str:
    base = runs[0]["compare_s"]
    lines = [
        "# Fan-out: one compare's wall time with 1 and 2 workers",
        "",
        f"Command: `{command}`",
        "",
        ("Set-up: `dare api` + N Celery workers (`-c 1`, OMP_NUM_THREADS=1, one PyTorch thread "
         "each) on Redis and PostgreSQL, the real engine; reference LeNet on `digits` "
         "(`dare train-reference --arch lenet --epochs 10`); one job, config:"),
        "",
        f"```json\n{json.dumps(CONFIG)}\n```",
        "",
        (f"(`dare`, the shipped method, was chosen from its grid in the tune stage and is only "
         f"read back in compare; the other {len(METHODS)} methods train there.) Times from the "
         "job's events: compare = its first claim to its end; plan = claim to the methods' "
         "messages; methods = those messages to the last method's end; choice + evaluation = the "
         "rest (one worker: the test-point evaluation of every model is not fanned out)."),
        "",
        ("| workers | compare s | plan s | methods s | choice + evaluation s | job s | speed-up "
         "(compare) | worker processes used | load avg before (1/5/15 min) | after |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['workers']} | {r['compare_s']:.1f} | {r['plan_s']:.1f} | {r['methods_s']:.1f} "
            f"| {r['select_s']:.1f} | {r['job_s']:.1f} | {base / r['compare_s']:.2f}x "
            f"| {r['worker_processes']} | {' / '.join(f'{x:.2f}' for x in r['load_before'])} "
            f"| {' / '.join(f'{x:.2f}' for x in r['load_after'])} |")
    lines += ["", "Per method (seconds, and the worker process that trained it):", "",
              "| method | " + " | ".join(f"{r['workers']} worker(s)" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for m in sorted(runs[0]["methods"]):
        cells = [f"{r['methods'][m]['seconds']:.1f} ({r['methods'][m]['worker']})" for r in runs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", (f"Machine: {os.cpu_count()} CPU cores, shared with other work while this ran "
                   "(the load averages above); a figure, not a controlled measurement."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="worker counts, one run each")
    ap.add_argument("--redis", default=REDIS_URL, help="a Redis database this may flush")
    ap.add_argument("--subject", type=Path, default=Path(tempfile.gettempdir()) / "dare-chaos-subject")
    ap.add_argument("--deadline", type=float, default=1800.0, help="per job, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    subject = ensure_subject(args.subject)
    runs = []
    for n in (int(x) for x in args.workers.split(",")):
        r = run_once(n, subject, args.redis, args.deadline)
        print(f"{n} worker(s): compare {r['compare_s']:.1f} s (plan {r['plan_s']:.1f}, methods "
              f"{r['methods_s']:.1f}, choice + evaluation {r['select_s']:.1f}); "
              f"load {r['load_before']} -> {r['load_after']}", flush=True)
        runs.append(r)
    command = "python -m bench.fanout " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(runs, command.strip())
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
