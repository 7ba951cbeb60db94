"""Load a submission's inputs exactly as the engine will, in a throw-away process, and say
whether they are usable: ``python -m worker.engine.inspect_inputs --dir JOBDIR --config JSON``.

The API runs this before it accepts a job (service.api.inspection), in a child process under
resource limits, because the API must not import torch and must not parse a hostile file
itself. ``JOBDIR/inputs/`` holds model.onnx|model.pt2, history.zip and optionally data.npz, the
layout of a job directory, so :func:`worker.engine.stages.load_inputs` reads them with the very
code the validate stage runs: pickles only with ``weights_only=True``, .pt2 archives checked
before torch.export touches them, ONNX external data refused, history names, shapes and NaN/Inf
checked, data splits checked, and data against the model (channels, image size, labels below
the number of outputs). Then the graph analysis the slice stage needs, and the cut for ``p``.

Prints one JSON line on stdout: ``{"ok": true, ...summary}`` or
``{"ok": false, "code", "message", "hint"}``; exits 0 either way (a crash is the parent's to
report). Nothing is written: the inputs are read into memory. The process first enters the
sandbox of :mod:`worker.engine.inspect_sandbox` (no network, only JOBDIR visible, not root,
resource limits). The API normally runs :func:`inspect` in a child of the fork server
(:mod:`worker.engine.inspect_server`), which has torch imported already; this one-shot entry
point is the slow path (a torch import per inspection) kept for comparison and debugging.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def inspect(workdir: Path, config_json: str, dataset: str | None = None) -> dict:
    import torch

    from .config import parse_config
    from .errors import InputError
    from .stages import StageContext, _analysis, load_inputs

    torch.set_num_threads(1)
    try:
        raw = json.loads(config_json or "{}")
        if dataset:
            raw["dataset"] = dataset
        config = parse_config(raw)
        ctx = StageContext(workdir=workdir, config=config, device="cpu")
        model, history, splits = load_inputs(ctx)
        info = _analysis(ctx)
        k, cut = info.cut(config.p)
    except InputError as e:
        return {"ok": False, **e.to_dict()}
    return {"ok": True, "format": model.fmt, "input_shape": list(model.input_shape),
            "num_classes": model.num_outputs, "checkpoints": len(history),
            "mt_layers": k, "cut_node": cut,
            "data": {"train": len(splits.x_train), "val": len(splits.x_val),
                     "test": len(splits.x_test), "name": splits.name}}


def run(workdir: Path, config_json: str, dataset: str | None = None,
        target: Callable[[Path, str, str | None], dict] | None = None) -> dict:
    """``inspect`` (or ``target``, a test's stand-in) with stdout kept for the one result line;
    whatever it raises is still an answer about the input, never a crash of the caller."""
    out, sys.stdout = sys.stdout, sys.stderr  # libraries may print
    try:
        return (target or inspect)(workdir, config_json, dataset)
    except Exception as e:  # noqa: BLE001 - an input that breaks a loader is still bad input
        return {"ok": False, "code": "input_unreadable",
                "message": f"the inputs could not be loaded: {type(e).__name__}: {str(e)[:300]}",
                "hint": "check that the files are the ones described in the README's formats"}
    finally:
        sys.stdout = out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.engine.inspect_inputs", description=__doc__)
    ap.add_argument("--dir", required=True, type=Path, help="job directory holding inputs/")
    ap.add_argument("--dataset", default=None, help="embedded dataset instead of inputs/data.npz")
    ap.add_argument("--config", default="{}", help="the job's config as JSON")
    ap.add_argument("--cpu-s", type=int, default=None, help="RLIMIT_CPU")
    ap.add_argument("--memory-bytes", type=int, default=None, help="RLIMIT_AS")
    ap.add_argument("--max-write-bytes", type=int, default=None, help="RLIMIT_FSIZE")
    ap.add_argument("--max-uncompressed-bytes", type=int, default=None, help="zip total cap")
    ap.add_argument("--max-zip-ratio", type=float, default=None, help="zip member ratio cap")
    ap.add_argument("--hide", action="append", default=[], help="a folder to hide (repeatable)")
    args = ap.parse_args(argv)
    # Before torch is imported and before any input is opened.
    from .inspect_sandbox import enter

    box = enter(args.dir, hide=args.hide, cpu_s=args.cpu_s, memory=args.memory_bytes,
                max_write=args.max_write_bytes)
    if box.missing:
        print(f"inspector sandbox incomplete: {'; '.join(box.missing)}", file=sys.stderr)
    from .archive_safety import configure

    configure(args.max_uncompressed_bytes, args.max_zip_ratio)
    print(json.dumps(run(Path(box.workdir), args.config, args.dataset)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
