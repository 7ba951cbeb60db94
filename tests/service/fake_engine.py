"""A stand-in for ``worker.engine.stages.run_stage`` with the same contract, for plumbing tests
(selected with DARE_STAGE_RUNNER=tests.service.fake_engine:run_stage).

It honours the engine's rules: a finished stage (state/<name>.done.json) returns its summary
without work; progress goes from 0 to 1; ``cancelled()`` is polled between "batches". The job's
``seed`` picks a behaviour: FAIL_INPUT_SEED fails ``mine`` with an InputError, FAIL_BUG_SEED
raises a bug in ``slice``, SLOW_SEED makes every stage take ~SLOW_SECONDS (DARE_FAKE_SLOW_SECONDS
overrides it; DARE_FAKE_SLOW_STAGES=a,b limits it to those stages), CRASH_SEED kills the worker process in the middle of ``slice`` once, and
KILL_ALWAYS_SEED kills the worker's whole process group (main process and pool) in the middle of
``slice`` every time (both only where DARE_FAKE_ALLOW_CRASH=1).

``compare`` fans out as the engine's does: ``compare.plan`` names the methods (the config's
``selection.methods``, else FAKE_METHODS; weight_noise is made from dare), ``compare:<method>``
runs one (METHOD_SECONDS each for a SLOW_METHODS_SEED job, DARE_FAKE_METHOD_SECONDS overrides)
and leaves state/method_<m>.json saying which process ran it, and ``compare`` runs whatever is
left in order and summarises them: the same result whichever worker ran which method.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time

from worker.engine.errors import Cancelled, InputError

FAIL_INPUT_SEED = 1001
FAIL_BUG_SEED = 1002
SLOW_SEED = 1003
SLOW_SECONDS = 20.0
CRASH_SEED = 1004
KILL_ALWAYS_SEED = 1005
SLOW_METHODS_SEED = 1006
METHOD_SECONDS = 2.0
FAKE_METHODS = ["dare", "at_fgsm", "at_pgd_online", "weight_noise"]
FAKE_NEEDS = {"weight_noise": ["dare"]}
SECRET = "s3cr3t-internal-detail"

CALLS: list[str] = []  # in-process tests count real (not skipped) runs


def _write(path, obj) -> None:  # noqa: ANN001
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _plan(ctx) -> dict:  # noqa: ANN001
    path = ctx.workdir / "state" / "compare.plan.json"
    if not path.exists():
        methods = list(ctx.config.selection.methods or FAKE_METHODS)
        plan = {"methods": methods,
                "needs": {m: [d for d in FAKE_NEEDS.get(m, []) if d in methods] for m in methods}}
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, plan)
    return json.loads(path.read_text())


def _method(m: str, ctx) -> dict:  # noqa: ANN001
    path = ctx.workdir / "state" / f"method_{m}.json"
    if path.exists():
        return json.loads(path.read_text())
    CALLS.append(f"compare:{m}")
    plan = _plan(ctx)
    missing = [d for d in plan["needs"][m] if not (path.parent / f"method_{d}.json").exists()]
    if missing:
        raise RuntimeError(f"{m} ran before {missing}, which it is made from")
    seconds = float(os.environ.get("DARE_FAKE_METHOD_SECONDS", METHOD_SECONDS)) \
        if ctx.config.seed == SLOW_METHODS_SEED else 0.05
    steps = 20
    for i in range(steps):
        if ctx.cancelled():
            raise Cancelled()
        time.sleep(seconds / steps)
        ctx.progress((i + 1) / steps)
    result = {"method": m, "worker": f"{socket.gethostname()}/{os.getpid()}"}
    _write(path, result)
    return result


def run_stage(name: str, ctx) -> dict:  # noqa: ANN001
    state = ctx.workdir / "state"
    if name == "compare.plan":
        CALLS.append(name)
        return _plan(ctx)
    if name.startswith("compare:"):
        return _method(name.partition(":")[2], ctx)
    done = state / f"{name}.done.json"
    if done.exists():
        return json.loads(done.read_text())
    CALLS.append(name)
    seed = ctx.config.seed
    marker = state / "crashed-once"
    if seed == CRASH_SEED and name == "slice" and not marker.exists() \
            and os.environ.get("DARE_FAKE_ALLOW_CRASH") == "1":
        state.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
        os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer, mid-stage
    if seed == KILL_ALWAYS_SEED and name == "slice" \
            and os.environ.get("DARE_FAKE_ALLOW_CRASH") == "1":
        time.sleep(0.3)  # the claim is committed and the lease is being renewed
        os.killpg(os.getpgrp(), signal.SIGKILL)  # a machine that dies on this job, every time
    steps = 20
    slow = float(os.environ.get("DARE_FAKE_SLOW_SECONDS", SLOW_SECONDS))
    slow_stages = os.environ.get("DARE_FAKE_SLOW_STAGES")
    if slow_stages and name not in slow_stages.split(","):
        slow = 0.05
    per_step = (slow if seed == SLOW_SEED else 0.05) / steps
    for i in range(steps):
        if ctx.cancelled():
            raise Cancelled()
        time.sleep(per_step)
        ctx.progress((i + 1) / steps)
    if seed == FAIL_INPUT_SEED and name == "mine":
        raise InputError("no_oracles", "no validation sample has a tutor checkpoint",
                         "send more history checkpoints")
    if seed == FAIL_BUG_SEED and name == "slice":
        raise RuntimeError(f"boom {SECRET}")
    art = ctx.workdir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    if name == "export":
        model = next((ctx.workdir / "inputs").glob("model.*"))
        shutil.copyfile(model, art / ("hardened" + model.suffix))
        if model.suffix != ".onnx":
            shutil.copyfile(model, art / "hardened.onnx")
        (art / "hardened.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    if name == "evaluate":
        report = {"schema_version": 1, "config": ctx.config.model_dump(mode="json"),
                  "timings_s": {"slice": 0.1, "mine": 0.1, "tune": 0.1, "evaluate": 0.1},
                  "clean_accuracy": {"original": 0.9, "hardened": 0.88, "drop": 0.02,
                                     "budget": 0.1, "within_budget": True},
                  "attacks": {"fgsm": {"params": {"eps": 0.1}, "n": 10, "original_accuracy": 0.2,
                                       "transfer_er": 0.5, "adaptive_accuracy": 0.3}},
                  "sanity_checks": [{"name": "iterative_beats_single_step", "passed": True,
                                     "detail": ""}]}
        (art / "report.json").write_text(json.dumps(report))
        (art / "report.html").write_text("<html><body>report</body></html>")
    summary = {"stage": name, "device": ctx.device}
    if name == "compare":  # every method not yet run runs here, in order (the in-process path)
        summary["methods"] = {m: _method(m, ctx)["worker"] for m in _plan(ctx)["methods"]}
    state.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(summary))
    return summary
