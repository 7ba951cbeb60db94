"""``dare harden`` and ``dare train-reference``: the engine on the command line, no service needed."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("harden", help="harden a model locally (every stage) and write the artifacts")
    h.add_argument("--model", required=True, type=Path, help=".onnx or .pt2 classifier")
    h.add_argument("--history", required=True, type=Path, help="zip of per-epoch checkpoints")
    src = h.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help=".npz with x_train, y_train, x_val, y_val, x_test, y_test")
    src.add_argument("--dataset", help="embedded dataset: digits, mnist5k or fashion")
    h.add_argument("--out", required=True, type=Path, help="directory for the artifacts")
    h.add_argument("--config", default=None, help="JSON config (a string, or @file.json)")
    h.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    h.set_defaults(func=harden_cmd)

    t = sub.add_parser("train-reference", help="train a reference subject with per-epoch checkpoints")
    t.add_argument("--arch", default="lenet",
                   choices=["mlp", "lenet", "vgg", "resnet", "vgg16", "vgg19", "alexnet", "resnet18"],
                   help="small reference nets, or the paper's VGG16/VGG19/AlexNet and ResNet-18")
    t.add_argument("--dataset", default="digits", choices=["digits", "mnist5k", "fashion"])
    # The paper mines a checkpoint per epoch of a full training: 50 epochs with a decaying
    # learning rate give a history of early, still-improving and settled checkpoints.
    t.add_argument("--epochs", type=int, default=50,
                   help="training epochs, one history checkpoint each (default 50)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier of vgg16/vgg19/alexnet/resnet18 (1 = full width)")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                   help="cosine (default) decays the learning rate to 0 over the epochs")
    t.add_argument("--max-train", type=int, default=None,
                   help="train on the first N training images only (CPU runs)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="share of the non-test data used as validation (0.5: the paper's split); "
                        "jobs on this subject must set the same val_fraction")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    t.add_argument("--out", required=True, type=Path)
    t.set_defaults(func=train_reference_cmd)


class _Progress:
    """One status line per stage on stderr, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.stage, self.i, self.n, self.t0, self.last = "", 0, 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def on_stage(self, name: str, i: int, n: int) -> None:
        if self.stage:
            self._draw(1.0, final=True)
        self.stage, self.i, self.n, self.t0 = name, i, n, time.perf_counter()
        self._draw(0.0)

    def __call__(self, f: float) -> None:
        now = time.perf_counter()
        if now - self.last > 0.5 or f >= 1.0:
            self.last = now
            self._draw(f)

    def _draw(self, f: float, final: bool = False) -> None:
        bar = "#" * int(24 * f) + "-" * (24 - int(24 * f))
        line = (f"[{self.i + 1}/{self.n}] {self.stage:<9} [{bar}] {100 * f:5.1f}% "
                f"{time.perf_counter() - self.t0:6.1f}s")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        elif final or f == 0.0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.stage:
            self._draw(1.0, final=True)


def harden_cmd(args: argparse.Namespace) -> int:
    from .engine.config import parse_config
    from .engine.errors import InputError
    from .engine.stages import StageContext, pick_device, run_all

    raw = args.config
    if raw and raw.startswith("@"):
        raw = Path(raw[1:]).read_text()
    try:
        config = parse_config(raw)
        if args.dataset:
            config = config.model_copy(update={"dataset": args.dataset})
        if args.device:
            config = config.model_copy(update={"device": args.device})
        for f, what in ((args.model, "--model"), (args.history, "--history"), (args.data, "--data")):
            if f is not None and not f.is_file():
                raise InputError("missing_file", f"{what} {f} does not exist", "check the path")
        if args.model.suffix not in (".onnx", ".pt2"):
            raise InputError("bad_model_format", f"--model must be .onnx or .pt2, not {args.model.name}",
                             "export with torch.export (.pt2) or torch.onnx.export(opset_version=17)")
        work = args.out / "work"
        inputs = work / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.model, inputs / f"model{args.model.suffix}")
        shutil.copyfile(args.history, inputs / "history.zip")
        if args.data:
            shutil.copyfile(args.data, inputs / "data.npz")
        prog = _Progress()
        ctx = StageContext(work, config, progress=prog, device=pick_device(config.device))
        t0 = time.perf_counter()
        summaries = run_all(ctx, on_stage=prog.on_stage)
        prog.close()
    except InputError as e:
        print(f"error [{e.code}]: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 2
    for p in (work / "artifacts").iterdir():
        shutil.copyfile(p, args.out / p.name)
    ev = summaries["evaluate"]
    ca = ev["clean_accuracy"]
    print(json.dumps({
        "out": str(args.out), "seconds": round(time.perf_counter() - t0, 1), "method": ev["method"],
        "clean_accuracy": {k: ca[k] for k in ("original", "hardened", "within_budget")},
        "mean_transfer_er": ev["mean_transfer_er"], "mean_adaptive_accuracy": ev["mean_adaptive_accuracy"],
        "artifacts": sorted(p.name for p in (work / "artifacts").iterdir()),
    }, indent=2))
    return 0


def train_reference_cmd(args: argparse.Namespace) -> int:
    from .engine.reference.train import train_reference

    info = train_reference(args.arch, args.dataset, args.epochs, args.out, seed=args.seed,
                           width=args.width, lr_schedule=args.lr_schedule, max_train=args.max_train,
                           val_fraction=args.val_fraction, device=args.device)
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}, indent=2,
                     default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Engine-only entry point (``python -m worker.cli``); ``dare`` adds the service commands."""
    parser = argparse.ArgumentParser(prog="dare")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
