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

Then, inside training (``--training``, one job per method): the tune stage of a job whose tuning
runs many epochs (DARE's masked tuning; a baseline's grid selection) is killed --training-kills
times at random points while its loops train, and the job is compared with an uninterrupted job
of the same config. The stage runner traces every checkpoint the loops save and load
(``worker.engine.resume``), which gives, per kill, the work lost: the completed epochs that the
next attempt did again (0 when the checkpoint held) plus the part of the epoch that was running
(its elapsed time over the loop's median epoch time). Each loop checkpoints after every epoch, so
this must stay below one epoch. "same result" compares the two jobs' hardened.safetensors tensor
by tensor, bitwise.

    python -m bench.chaos --kills-per-stage 2 [--redis URL] [--database URL] [--subject DIR]

--redis names a Redis database this script may FLUSH (default db 7); --database an empty
PostgreSQL database to use (default: a scratch one on 127.0.0.1, dropped at the end). Writes the
tables to bench/results/chaos.md.
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
# Jobs whose tune stage trains for a while (about 10 s on one core each), to kill inside epochs.
TRAINING = {
    "dare": {"method": "dare", "tune": {"epochs": 40},
             "evaluation": {"n_samples": 32, "attacks": ["fgsm"]}},
    "at_pgd_online": {"method": "at_pgd_online", "baselines": {"max_train": 300},
                      "selection": {"adversarial": {"epochs": [4], "lr": [3e-4, 1e-3]}},
                      "evaluation": {"n_samples": 32, "attacks": ["fgsm"]}},
}


def slow_run_stage(name: str, ctx: Any) -> dict:
    """``worker.engine.stages.run_stage`` after a pause (DARE_CHAOS_STAGE_DELAY_S, default 3 s)
    that widens every stage so a kill can be aimed inside it. A stage the engine has finished
    already (a re-delivery) returns at once, as the real one does."""
    from worker.engine import stages

    if os.environ.get("DARE_CHAOS_TRACE_DIR"):
        ctx = _traced_context(ctx, Path(os.environ["DARE_CHAOS_TRACE_DIR"]))
    if stages.stage_done(ctx.workdir, name) is None:
        deadline = time.monotonic() + float(os.environ.get("DARE_CHAOS_STAGE_DELAY_S", "3"))
        while time.monotonic() < deadline:
            if ctx.cancelled():
                from worker.engine.errors import Cancelled

                raise Cancelled()
            time.sleep(0.1)
    return stages.run_stage(name, ctx)


_traced = False


def _append(trace_dir: Path, job: str, event: dict) -> None:
    trace_dir.mkdir(parents=True, exist_ok=True)
    with (trace_dir / f"{job}.jsonl").open("a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **event}) + "\n")


def _traced_context(ctx: Any, trace_dir: Path) -> Any:
    """``ctx`` with its cancel hook (polled before every training batch and attack batch) logged
    to ``<trace_dir>/<job id>.jsonl``, and every checkpoint a loop saves or loads logged there too
    (``Resume.save``/``load`` wrapped, once per worker process)."""
    import dataclasses

    _trace_checkpoints(trace_dir)
    job, poll = Path(ctx.workdir).name, ctx.cancelled

    def cancelled() -> bool:
        _append(trace_dir, job, {"op": "poll"})
        return poll()

    return dataclasses.replace(ctx, cancelled=cancelled)


def _trace_checkpoints(trace_dir: Path) -> None:
    global _traced
    if _traced:
        return
    _traced = True
    from worker.engine.resume import Resume

    save, load = Resume.save, Resume.load

    def record(self: Resume, op: str, state: dict | None) -> None:
        parts = self.root.parts
        if "jobs" not in parts or "resume" not in parts:
            return
        _append(trace_dir, parts[parts.index("jobs") + 1],
                {"op": op, "loop": "/".join(parts[parts.index("resume") + 1:]),
                 "epoch": None if state is None else state.get("epoch"),
                 "runs": len(state["runs"]) if state and "runs" in state else None})

    def traced_save(self: Resume, state: dict) -> None:
        save(self, state)
        record(self, "save", state)

    def traced_load(self: Resume) -> dict | None:
        state = load(self)
        record(self, "load", state)
        return state

    Resume.save, Resume.load = traced_save, traced_load


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


# --- kills inside training epochs ---------------------------------------------------------------

@dataclass
class TrainingOutcome:
    method: str
    run: Outcome                      # the killed job (its audit, as for the stage table)
    ref_job_id: str = ""
    ref_status: str = "?"
    same_result: bool | None = None   # hardened weights bitwise equal to the uninterrupted job's
    lost: list[dict] = field(default_factory=list)  # per landed kill, see work_lost
    epoch_s: float = float("nan")     # median epoch time of the tune stage's loops


def _submit(base: str, subject: Path, config: dict) -> str:
    with (subject / "model.onnx").open("rb") as m, (subject / "history.zip").open("rb") as h:
        r = httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", m),
                                                 "history": ("history.zip", h)},
                       data={"dataset": "digits", "config": json.dumps(config)}, timeout=120)
    r.raise_for_status()
    return r.json()["id"]


def _wait_end(base: str, jid: str, end: float) -> str:
    status = "?"
    while time.monotonic() < end:
        status = _job_status(base, jid)
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    return status


def _hardened(base: str, jid: str) -> dict:
    from safetensors.torch import load

    r = httpx.get(f"{base}/v1/jobs/{jid}/artifacts/hardened.safetensors", timeout=60)
    r.raise_for_status()
    return load(r.content)


def _trace(trace_dir: Path, jid: str) -> list[dict]:
    f = trace_dir / f"{jid}.jsonl"
    if not f.exists():
        return []
    return sorted((json.loads(line) for line in f.read_text().splitlines() if line.strip()),
                  key=lambda e: e["t"])


def epochs_of(events: list[dict]) -> dict[str, list[tuple[float, int]]]:
    """Per loop, ``(seconds, batches)`` of each epoch an attempt trained: from one checkpoint of
    the loop (its load, or epoch k) to the next (epoch k + 1) in the same process, counting the
    cancel polls (one per batch) between them."""
    out: dict[str, list[tuple[float, int]]] = {}
    prev: dict[int, dict] = {}    # pid -> its last checkpoint event
    polls: dict[int, int] = {}    # pid -> polls since then
    for e in events:
        pid = e["pid"]
        if e["op"] == "poll":
            polls[pid] = polls.get(pid, 0) + 1
            continue
        p = prev.get(pid)
        if e["op"] == "save" and e["epoch"] is not None and p is not None \
                and p["loop"] == e["loop"] and (p["epoch"] or 0) + 1 == e["epoch"]:
            out.setdefault(e["loop"], []).append((e["t"] - p["t"], polls.get(pid, 0)))
        prev[pid], polls[pid] = e, 0
    return out


def work_lost(events: list[dict], kill_t: float, prev_kill_t: float) -> dict:
    """What one kill cost, in epochs: ``whole``, the epochs the killed attempt had checkpointed
    that the next attempt trained again, and ``partial``, the batches of the running epoch that
    the killed attempt had started, over the loop's batches per epoch (0 when the kill landed
    after the loop's last epoch, e.g. in a grid run's validation)."""
    before = [e for e in events if prev_kill_t < e["t"] < kill_t]
    after = [e for e in events if e["t"] > kill_t and e["op"] != "poll"]
    marks = [e for e in before if e["op"] != "poll"]
    if not marks or not after:
        return {"whole": 0, "partial": 0.0, "loop": "-"}
    nxt = [e for e in after if e["pid"] == after[0]["pid"]]
    saved: dict[str, int] = {}
    for e in marks:
        if e["op"] == "save" and e["epoch"] is not None:
            saved[e["loop"]] = max(saved.get(e["loop"], 0), e["epoch"])
    resumed: dict[str, int] = {}
    for e in nxt:
        if e["op"] == "load":
            resumed.setdefault(e["loop"], e["epoch"] or 0)
    whole = sum(max(0, n - resumed[loop]) for loop, n in saved.items() if loop in resumed)
    last = marks[-1]
    continued = any(e["op"] == "save" and e["loop"] == last["loop"] and e["epoch"] is not None
                    for e in nxt)
    partial = 0.0
    if continued:
        started = sum(e["op"] == "poll" and e["t"] > last["t"] for e in before)
        per_epoch = [b for _, b in epochs_of(events).get(last["loop"], [])]
        partial = started / statistics.median(per_epoch) if per_epoch else float("nan")
    return {"whole": whole, "partial": partial, "loop": last["loop"]}


def attack_training(base: str, subject: Path, factory, worker: Supervised, method: str,  # noqa: ANN001
                    kills: int, deadline_s: float, rng: random.Random,
                    trace_dir: Path) -> TrainingOutcome:
    """An uninterrupted job of ``TRAINING[method]``, then the same job with ``kills`` kills
    landed inside its tune stage's training loops; compared and costed."""
    config = TRAINING[method]
    ref = _submit(base, subject, config)
    out = TrainingOutcome(method, Outcome("tune", ""), ref_job_id=ref)
    out.ref_status = _wait_end(base, ref, time.monotonic() + deadline_s)
    if out.ref_status != "succeeded":
        return out
    ref_events = _trace(trace_dir, ref)
    marks = [e["t"] for e in ref_events if e["op"] != "poll"]
    span = marks[-1] - marks[0]  # the tune stage's training loops, uninterrupted

    jid = _submit(base, subject, config)
    out.run = Outcome("tune", jid)
    end = time.monotonic() + deadline_s
    attempt, last_kill = 1, 0.0
    while len(out.run.kills) < kills and time.monotonic() < end:
        if _job_status(base, jid) in ("succeeded", "failed", "cancelled"):
            break
        run = _run_row(factory, jid, "tune")
        if run is None or run.status.value != "running" or run.attempts < attempt \
                or not any(e["t"] > last_kill and e["op"] != "poll"
                           for e in _trace(trace_dir, jid)):
            time.sleep(0.05)  # this attempt's loops have not started yet
            continue
        time.sleep(rng.uniform(0.1, 0.6) * span / kills)
        t = worker.kill()
        after = _run_row(factory, jid, "tune")
        if after.status.value == "running" and after.attempts == run.attempts:
            out.run.kills.append(t)
        else:
            out.run.missed += 1
        attempt, last_kill = run.attempts + 1, t
    out.run.status = _wait_end(base, jid, end)
    if out.run.status == "succeeded":
        a, b = _hardened(base, ref), _hardened(base, jid)
        out.same_result = a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    events = _trace(trace_dir, jid)
    prev = 0.0
    for k in out.run.kills:
        out.lost.append(work_lost(events, k, prev))
        prev = k
    times = [t for ep in epochs_of(ref_events).values() for t, _ in ep]
    out.epoch_s = statistics.median(times) if times else float("nan")
    return out


def torch_equal(a, b) -> bool:  # noqa: ANN001
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


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
    ap.add_argument("--stages", default="validate,slice,mine,tune,export,evaluate",
                    help="stages to kill at random points ('' for none)")
    ap.add_argument("--training", default=",".join(TRAINING),
                    help=f"methods whose tuning is killed inside epochs, of {list(TRAINING)}")
    ap.add_argument("--training-kills", type=int, default=3)
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
    trace_dir = home / "trace"
    settings = {
        "DARE_STAGE_RUNNER": "bench.chaos:slow_run_stage", "DARE_CHAOS_STAGE_DELAY_S": str(args.stage_delay),
        "DARE_STAGE_STALE_AFTER_S": str(args.stale_after), "DARE_HEARTBEAT_INTERVAL_S": "1",
        "DARE_REQUEUE_AFTER_S": "5", "DARE_RECONCILE_INTERVAL_S": "1",
        "DARE_STAGE_MAX_ATTEMPTS": str(max(args.kills_per_stage, args.training_kills) + 2),
        "DARE_TORCH_THREADS": "1",
    }
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DARE_")},
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "DARE_HOME": str(home), "DARE_DATABASE_URL": db_url, "DARE_BROKER_URL": args.redis,
           "DARE_AUTH": "open", "DARE_CHAOS_TRACE_DIR": str(trace_dir), **settings}
    log = home / "services.log"
    api = worker = None
    outcomes: list[Outcome] = []
    trained: list[TrainingOutcome] = []
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
        for stage in filter(None, args.stages.split(",")):
            for _ in range(args.jobs_per_stage):
                o = attack(base, subject, factory, worker, stage, args.kills_per_stage,
                           args.stage_delay, args.deadline, rng)
                audit(factory, o, worker.deaths)
                outcomes.append(o)
                print(f"{stage:<9} job {o.job_id[:8]}: {o.status}, {len(o.kills)} kills landed, "
                      f"{o.missed} missed, {o.attempts} attempts", flush=True)
        for method in filter(None, args.training.split(",")):
            t = attack_training(base, subject, factory, worker, method, args.training_kills,
                                args.deadline, rng, trace_dir)
            if t.run.job_id:
                audit(factory, t.run, worker.deaths)
            trained.append(t)
            print(f"training {method}: {t.run.status}, same result {t.same_result}, lost "
                  f"{[round(x['whole'] + x['partial'], 2) for x in t.lost]} epochs", flush=True)
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
    if trained:
        table += "\n" + render_training(trained, args)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    ok = all(o.status == "succeeded" and not o.finished_twice and not o.overlaps
             for o in outcomes + [t.run for t in trained])
    ok = ok and all(t.same_result and all(x["whole"] + x["partial"] <= 1 for x in t.lost)
                    for t in trained)
    return 0 if ok else 1


def render(outcomes: list[Outcome], args: argparse.Namespace, settings: dict[str, str],
           wall_s: float) -> str:
    lines = [
        "# Chaos: SIGKILL of the whole worker inside each stage",
        "",
        f"`python -m bench.chaos --kills-per-stage {args.kills_per_stage} "
        f"--jobs-per-stage {args.jobs_per_stage} --training {args.training} "
        f"--training-kills {args.training_kills}` on {os.cpu_count()} CPUs (load average "
        f"{os.getloadavg()[2]:.1f} over the last 15 min at the end), "
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


def render_training(trained: list[TrainingOutcome], args: argparse.Namespace) -> str:
    lines = [
        "## Kills inside training epochs (resume from the last completed epoch)",
        "",
        "Same run as above. Per method, an uninterrupted job, then the same job whose tune stage is SIGKILLed at random "
        "points while its loops train; each kill's work lost is read from the checkpoints the "
        "loops saved and loaded and the batches they started (traced in the worker): completed "
        "epochs trained again + the share of the running epoch's batches. Configs: "
        + "; ".join(f"{t.method} `{json.dumps(TRAINING[t.method])}`" for t in trained) + ".",
        "",
        "| method | kills landed | missed | finished | same result as uninterrupted (bitwise) "
        "| epochs redone per kill (whole + partial) | max lost (epochs) | median epoch (s) "
        "| attempts | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trained:
        per_kill = ", ".join(f"{x['whole']} + {x['partial']:.2f}" for x in t.lost) or "-"
        worst = max((x["whole"] + x["partial"] for x in t.lost), default=float("nan"))
        same = {True: "yes", False: "NO", None: "-"}[t.same_result]
        cells = [t.method, len(t.run.kills), t.run.missed,
                 "yes" if t.run.status == "succeeded" else t.run.status, same, per_kill,
                 f"{worst:.2f}", f"{t.epoch_s:.3f}", t.run.attempts,
                 "yes" if (t.run.finished_twice or t.run.overlaps) else "no"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "whole = epochs the killed attempt had checkpointed that the next attempt trained again "
        "(0: every checkpoint held); partial = batches the killed attempt had started since the "
        "running loop's last checkpoint over the loop's batches per epoch (0 when the kill came "
        "after the loop's last epoch). A method's grid selection also keeps its finished "
        "combinations (their scores and the kept weights), so a kill in combination 2 does not "
        "repeat combination 1; an epoch that is scored is checkpointed after its scoring (the "
        "scoring's attack batches count in partial).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
