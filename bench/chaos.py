"""Chaos: kill the worker (SIGKILL to its whole process group) N times inside each stage of real
jobs, and count per stage the jobs that finished, were lost, or ran a stage twice.

The set-up is production's: `dare api` (uvicorn, which runs the reconciler) and one Celery worker
(`dare worker`'s command, restarted whenever it dies, like docker's `restart: always`) on Redis
and PostgreSQL, the REAL engine on the embedded `digits` dataset and a reference LeNet subject
(`dare train-reference`). The stage runner is :func:`slow_run_stage`: it waits
DARE_CHAOS_STAGE_DELAY_S before the real `worker.engine.stages:run_stage`, so that a kill aimed
at a stage lands inside it even when the stage itself takes a fraction of a second.

For each stage, one job (or --jobs-per-stage) is submitted; each time the stage's attempt k is
running, the controller kills the worker at a random point within it, until N kills landed; then
the job runs to its end. Counted, from the service's own records (stage_runs, job_events):

- finished:   the job succeeded before the deadline;
- lost:       it did not (still running, or failed);
- duplicated: a stage completed twice (two stage_finished events), or a stage attempt started
              while the previous attempt's worker was still alive (two workers on one stage).

    python -m bench.chaos --kills-per-stage 2 [--redis URL] [--database URL] [--subject DIR]

--redis names a Redis database this script may FLUSH (default db 7); --database an empty
PostgreSQL database to use (default: a scratch one on 127.0.0.1, dropped at the end). Writes the
table to bench/results/chaos.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from dare_client.client import wait_ready

DARE = [sys.executable, "-c", "from service.cli.main import main; raise SystemExit(main())"]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/7"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "chaos.md"
# Small enough for two CPU cores, large enough that every stage does real work.
CONFIG = {"evaluation": {"n_samples": 64, "attacks": ["fgsm", "pgd"]}, "tune": {"epochs": 3}}


def slow_run_stage(name: str, ctx: Any) -> dict:
    """``worker.engine.stages.run_stage`` after a pause (DARE_CHAOS_STAGE_DELAY_S, default 3 s)
    that widens every stage so a kill can be aimed inside it. A stage the engine has finished
    already (a re-delivery) returns at once, as the real one does."""
    from worker.engine import stages

    if stages.stage_done(ctx.workdir, name) is None:
        deadline = time.monotonic() + float(os.environ.get("DARE_CHAOS_STAGE_DELAY_S", "3"))
        while time.monotonic() < deadline:
            if ctx.cancelled():
                from worker.engine.errors import Cancelled

                raise Cancelled()
            time.sleep(0.1)
    return stages.run_stage(name, ctx)


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervised:
    """The worker under a restart policy; :meth:`kill` SIGKILLs its process group."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log.open("ab")
        self.lock = threading.Lock()
        self.starts: list[float] = []
        self.deaths: list[float] = []  # wall-clock times (UTC epoch) a generation was gone
        self.stopping = threading.Event()
        self.p = self._spawn()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _spawn(self) -> subprocess.Popen:
        self.starts.append(time.time())
        return subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=self.log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> float:
        with self.lock:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(30)
            t = time.time()
            self.deaths.append(t)
            self.p = self._spawn()
            return t

    def _watch(self) -> None:
        while not self.stopping.wait(0.3):
            with self.lock:
                if self.p.poll() is not None:  # died on its own: restart too, and note it
                    self.deaths.append(time.time())
                    self.p = self._spawn()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        with self.lock:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGTERM)
                try:
                    self.p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.p.pid, signal.SIGKILL)
                    self.p.wait()
        self.log.close()


def ensure_subject(path: Path) -> Path:
    if (path / "model.onnx").is_file() and (path / "history.zip").is_file():
        return path
    print(f"training a reference subject into {path} ...", flush=True)
    subprocess.run([*DARE, "train-reference", "--arch", "lenet", "--dataset", "digits",
                    "--epochs", "10", "--out", str(path)], check=True, capture_output=True,
                   cwd=REPO)
    return path


# --- one job under fire ------------------------------------------------------------------------

@dataclass
class Outcome:
    stage: str
    job_id: str
    kills: list[float] = field(default_factory=list)  # times of kills that landed in the stage
    missed: int = 0                                   # kills that found the stage already done
    status: str = "?"
    finished_twice: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    attempts: int = 0
    recovery_s: list[float] = field(default_factory=list)  # kill -> next attempt started
    resends: int = 0  # stage messages the reconciler sent again


def _run_row(factory, jid: str, stage: str):  # noqa: ANN001, ANN202
    from sqlalchemy import select

    from service.store.models import StageRun

    with factory() as s:
        return s.scalars(select(StageRun).where(StageRun.job_id == uuid.UUID(jid),
                                                StageRun.name == stage)).one_or_none()


def attack(base: str, subject: Path, factory, worker: Supervised, stage: str, kills: int,  # noqa: ANN001
           delay_s: float, deadline_s: float, rng: random.Random) -> Outcome:
    with (subject / "model.onnx").open("rb") as m, (subject / "history.zip").open("rb") as h:
        r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", m),
                                                 "history": ("history.zip", h)},
                       data={"dataset": "digits", "config": json.dumps(CONFIG)}, timeout=120)
    r.raise_for_status()
    out = Outcome(stage, r.json()["id"])
    end = time.monotonic() + deadline_s
    attempt = 1
    while len(out.kills) < kills and time.monotonic() < end:
        run = _run_row(factory, out.job_id, stage)
        status = _job_status(base, out.job_id)
        if status in ("succeeded", "failed", "cancelled"):
            break
        if run is None or run.status.value != "running" or run.attempts < attempt:
            time.sleep(0.05)
            continue
        time.sleep(rng.uniform(0.1, 0.8) * delay_s)  # somewhere inside the attempt
        t = worker.kill()
        after = _run_row(factory, out.job_id, stage)
        if after.status.value == "running" and after.attempts == run.attempts:
            out.kills.append(t)  # the attempt died unfinished: the kill landed inside the stage
        else:
            out.missed += 1
        attempt = run.attempts + 1
    while time.monotonic() < end:
        out.status = _job_status(base, out.job_id)
        if out.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    return out


def _job_status(base: str, jid: str) -> str:
    try:
        return httpx.get(f"{base}/v1/jobs/{jid}", timeout=10).json()["status"]
    except (httpx.HTTPError, ValueError, KeyError):
        return "?"


def audit(factory, out: Outcome, deaths: list[float]) -> None:  # noqa: ANN001
    """Read what the service recorded: stages finished twice, attempts that overlapped."""
    from sqlalchemy import select

    from service.store.models import JobEvent

    with factory() as s:
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(out.job_id))
                                .order_by(JobEvent.id)))
    finished: dict[str, int] = {}
    starts: dict[str, list[datetime]] = {}
    for e in events:
        if e.kind == "stage_finished":
            finished[e.stage] = finished.get(e.stage, 0) + 1
        elif e.kind == "stage_started":
            starts.setdefault(e.stage, []).append(e.at)
    out.finished_twice = [s for s, n in finished.items() if n > 1]
    out.resends = sum(e.kind == "requeued" for e in events)
    out.attempts = len(starts.get(out.stage, []))
    for stage, ts in starts.items():
        for a, b in zip(ts, ts[1:]):
            # attempt b may start only after attempt a's worker died (a kill or a crash between)
            if not any(a.timestamp() <= d <= b.timestamp() for d in deaths):
                out.overlaps.append(stage)
    for k in out.kills:
        nxt = [t.timestamp() for t in starts.get(out.stage, []) if t.timestamp() > k]
        if nxt:
            out.recovery_s.append(min(nxt) - k)


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills-per-stage", type=int, default=2)
    ap.add_argument("--jobs-per-stage", type=int, default=1)
    ap.add_argument("--redis", default=REDIS_URL, help="a Redis database this may flush")
    ap.add_argument("--database", default=None, help="an empty PostgreSQL database (default: scratch)")
    ap.add_argument("--subject", type=Path, default=Path(tempfile.gettempdir()) / "dare-chaos-subject")
    ap.add_argument("--stage-delay", type=float, default=3.0, help="seconds added to every stage")
    ap.add_argument("--stale-after", type=int, default=4, help="DARE_STAGE_STALE_AFTER_S")
    ap.add_argument("--deadline", type=float, default=600.0, help="per job, seconds")
    ap.add_argument("--stages", default="validate,slice,mine,tune,export,evaluate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import redis
    from sqlalchemy import create_engine, text

    from service.cli.main import worker_argv
    from service.store.db import engine_for, session_factory

    subject = ensure_subject(args.subject)
    redis.Redis.from_url(args.redis).flushdb()
    admin = scratch_db = None
    db_url = args.database
    if db_url is None:
        scratch_db = f"dare_chaos_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{scratch_db}"'))
        db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{scratch_db}"
    home = Path(tempfile.mkdtemp(prefix="dare-chaos-"))
    settings = {
        "DARE_STAGE_RUNNER": "bench.chaos:slow_run_stage", "DARE_CHAOS_STAGE_DELAY_S": str(args.stage_delay),
        "DARE_STAGE_STALE_AFTER_S": str(args.stale_after), "DARE_HEARTBEAT_INTERVAL_S": "1",
        "DARE_REQUEUE_AFTER_S": "5", "DARE_RECONCILE_INTERVAL_S": "1",
        "DARE_STAGE_MAX_ATTEMPTS": str(args.kills_per_stage + 2), "DARE_TORCH_THREADS": "1",
    }
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DARE_")},
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "DARE_HOME": str(home), "DARE_DATABASE_URL": db_url, "DARE_BROKER_URL": args.redis,
           "DARE_AUTH": "open", **settings}
    log = home / "services.log"
    api = worker = None
    outcomes: list[Outcome] = []
    t_start = time.monotonic()
    try:
        subprocess.run([*DARE, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=REPO)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with log.open("ab") as fh:
            api = subprocess.Popen([*DARE, "api", "--port", str(port)], env=env, cwd=REPO,
                                   stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        worker = Supervised(worker_argv(loglevel="WARNING"), env, log)
        wait_ready(base, [api], what="the API")
        factory = session_factory(engine_for(db_url))
        rng = random.Random(args.seed)
        for stage in args.stages.split(","):
            for _ in range(args.jobs_per_stage):
                o = attack(base, subject, factory, worker, stage, args.kills_per_stage,
                           args.stage_delay, args.deadline, rng)
                audit(factory, o, worker.deaths)
                outcomes.append(o)
                print(f"{stage:<9} job {o.job_id[:8]}: {o.status}, {len(o.kills)} kills landed, "
                      f"{o.missed} missed, {o.attempts} attempts", flush=True)
    finally:
        if worker is not None:
            worker.stop()
        if api is not None and api.poll() is None:
            api.terminate()
            api.wait(30)
        if admin is not None:
            from service.store.db import dispose_engines

            dispose_engines()
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{scratch_db}" WITH (FORCE)'))
            admin.dispose()
    table = render(outcomes, args, settings, time.monotonic() - t_start)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0 if all(o.status == "succeeded" and not o.finished_twice and not o.overlaps
                    for o in outcomes) else 1


def render(outcomes: list[Outcome], args: argparse.Namespace, settings: dict[str, str],
           wall_s: float) -> str:
    lines = [
        "# Chaos: SIGKILL of the whole worker inside each stage",
        "",
        f"`python -m bench.chaos --kills-per-stage {args.kills_per_stage} "
        f"--jobs-per-stage {args.jobs_per_stage}` on {os.cpu_count()} CPUs, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {wall_s:.0f} s in all. Real engine "
        f"(digits, reference LeNet, config `{json.dumps(CONFIG)}`), Redis broker, PostgreSQL, "
        "`dare api` running the reconciler, one worker restarted after each kill.",
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
        "",
        "| stage | jobs | kills landed in stage | kills missed | finished | lost | duplicated "
        "| attempts of the stage | re-sends | kill -> stage restarted (s, mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in dict.fromkeys(o.stage for o in outcomes):
        group = [o for o in outcomes if o.stage == stage]
        rec = [r for o in group for r in o.recovery_s]
        cells = [stage, len(group), sum(len(o.kills) for o in group), sum(o.missed for o in group),
                 sum(o.status == "succeeded" for o in group),
                 sum(o.status != "succeeded" for o in group),
                 sum(bool(o.finished_twice or o.overlaps) for o in group),
                 ", ".join(str(o.attempts) for o in group), sum(o.resends for o in group),
                 f"{statistics.mean(rec):.1f}" if rec else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "lost = not succeeded within the deadline; duplicated = a stage finished twice, or an "
        "attempt started while the previous attempt's worker was alive. Recovery is dominated by "
        "the lease (`DARE_STAGE_STALE_AFTER_S`) plus the worker's restart.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
