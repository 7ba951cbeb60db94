"""The engine at the paper's scale: time and peak memory of each stage on a full-width VGG16.

Issue 10 item 7: slicing, mining and tuning must work within bounded memory on a 15-34 M
parameter network, and slicing should stay within 2x the time of one forward pass over the
training set. This trains a VGG16 (width 1.0 by default: 14.7 M parameters) on a stated subset of
Fashion-MNIST for a few epochs (one checkpoint each), then runs validate, slice, mine and tune
through the stage runner, each stage in a fresh process so that its peak RSS is its own, next to
one plain forward pass over the same training images. Prints a table.

    python -m bench.engine_scale [--width 1.0] [--train 2000] [--val 1000] [--epochs 4] [--device cpu]

On a 2-core CPU use the defaults (a subset; the numbers scale linearly with --train and --val);
on a GPU pass --device cuda and larger subsets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("validate", "slice", "mine", "tune")

# One stage per fresh process: the inputs (model, history, data) are loaded first, as the worker
# has them cached, so the time is the stage's own work; the peak RSS is the process's, the
# loaded inputs included.
_CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from worker.engine.config import parse_config
from worker.engine.stages import StageContext, load_inputs, run_stage
cfg = parse_config(json.loads(sys.argv[3]))
ctx = StageContext(sys.argv[1], cfg, device=cfg.device)
model, history, splits = load_inputs(ctx)
loaded = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak RSS, to now: the stage's own peak is measured below
t0 = time.perf_counter()
if sys.argv[2] == "forward":
    gm = model.gm.to(cfg.device).eval()
    with torch.no_grad():
        for i in range(0, len(splits.x_train), 256):
            gm(splits.x_train[i:i + 256].to(cfg.device))
else:
    run_stage(sys.argv[2], ctx)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak,
                  "loaded_rss_mib": loaded}))
"""


def subject(out: Path, width: float, n_train: int, n_val: int, n_test: int, epochs: int,
            device: str) -> dict:
    from worker.engine.data import load_embedded, save_npz
    from worker.engine.reference.train import train_reference

    s = load_embedded("fashion")
    s = dataclasses.replace(s, x_train=s.x_train[:n_train], y_train=s.y_train[:n_train],
                            x_val=s.x_val[:n_val], y_val=s.y_val[:n_val],
                            x_test=s.x_test[:n_test], y_test=s.y_test[:n_test])
    t0 = time.perf_counter()
    r = train_reference("vgg16", s, epochs, out / "subject", width=width, lr_schedule="cosine",
                        device=device)
    inputs = out / "job" / "inputs"
    inputs.mkdir(parents=True)
    (inputs / "model.onnx").write_bytes(Path(r["model_onnx"]).read_bytes())
    (inputs / "history.zip").write_bytes(Path(r["history_zip"]).read_bytes())
    save_npz(s, inputs / "data.npz")
    import torch

    from worker.engine.reference import build

    params = sum(p.numel() for p in build("vgg16", (1, 28, 28), 10, width=width).parameters())
    return {"train_s": time.perf_counter() - t0, "test_accuracy": r["test_accuracy"],
            "params": params, "torch": torch.__version__}


def run_child(job: Path, what: str, config: dict, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(job), what, json.dumps(config),
                          str(threads)], capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--train", type=int, default=2000, help="training images (profiling, slicing)")
    ap.add_argument("--val", type=int, default=1000, help="validation images (mining, tuning)")
    ap.add_argument("--epochs", type=int, default=4, help="reference training: checkpoints")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    config = {"dataset": None, "device": args.device, "tune": {"epochs": 1},
              "history_fraction": 1.0}
    with tempfile.TemporaryDirectory(prefix="dare-bench-scale-") as tmp:
        root = Path(tmp)
        info = subject(root, args.width, args.train, args.val, 200, args.epochs, args.device)
        job = root / "job"
        rows = [("forward pass over train", run_child(job, "forward", config, args.threads))]
        for st in STAGES:
            rows.append((st, run_child(job, st, config, args.threads)))
        mined = json.loads((job / "state" / "mine.done.json").read_text())["summary"]
    fwd = rows[0][1]["seconds"]
    print(f"\nVGG16 width {args.width:g} ({info['params'] / 1e6:.1f} M parameters) on Fashion-MNIST "
          f"subsets: {args.train} train, {args.val} val; {args.epochs} checkpoints "
          f"(trained in {info['train_s']:.0f} s, test accuracy {info['test_accuracy']:.3f}); "
          f"{args.device}, {args.threads} threads, torch {info['torch']}; each stage in its own "
          f"process with its inputs loaded first (RSS includes torch itself)")
    print(f"{'stage':<26}{'seconds':>9}{'x forward':>11}{'RSS inputs loaded MiB':>23}"
          f"{'peak RSS in stage MiB':>23}")
    for name, r in rows:
        print(f"{name:<26}{r['seconds']:>9.1f}{r['seconds'] / fwd:>11.2f}"
              f"{r['loaded_rss_mib']:>23.0f}{r['peak_rss_mib']:>23.0f}")
    print(f"mined {mined['mined']} of {mined['candidates']} validation samples; per class "
          f"{mined.get('mined_per_class')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
