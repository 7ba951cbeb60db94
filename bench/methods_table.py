"""Clean and PGD robust accuracy and wall time of the stronger hardening methods beside Madry PGD
training, on reference subjects trained here.

    python -m bench.methods_table                          # lenet on digits
    python -m bench.methods_table --subjects lenet:digits,lenet:mnist5k --out bench/results/methods.md

For each subject it trains the reference model (seeded, a checkpoint per epoch), runs the job's
validate, slice and mine stages (DARE and dare_trades need them), then chooses each method's model
exactly as a compare job does (``stages._selected``: the method's grid from ``selection``, every
point scored on the held-out selection points), timing the whole call. DARE runs first, so
dare_trades' time is its TRADES part only (it starts from DARE's chosen model). Test figures: clean accuracy on the whole test split, PGD-40 (the
evaluation's attack and budget) on ``--n`` seeded test points, each with its Wilson 95 % interval.
Benchmarks print tables; nothing here asserts.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("dare", "at_pgd_online", "trades", "nfgsm", "awp", "dare_trades")
REF_EPOCHS = {"digits": 12, "mnist5k": 8, "fashion": 8}


def _machine() -> str:
    import torch

    return (f"{platform.node() or 'host'}: {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s), "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def run_subject(arch: str, dataset: str, config: dict, n: int, root: Path, log) -> dict:
    import torch

    from worker.engine.attacks import make_attack
    from worker.engine.config import parse_config
    from worker.engine.evaluation import accuracy, run_batched, select_samples
    from worker.engine.reference.train import train_reference
    from worker.engine.selection import grid_size
    from worker.engine.stages import (
        StageContext,
        _selected,
        _selection_setup,
        load_inputs,
        run_stage,
    )
    from worker.engine.threat import linf_budget

    ref = root / f"{arch}-{dataset}" / "reference"
    trained = train_reference(arch, dataset, REF_EPOCHS[dataset], ref, seed=0)
    wd = root / f"{arch}-{dataset}" / "job"
    (wd / "inputs").mkdir(parents=True, exist_ok=True)
    for f in ("model.pt2", "history.zip"):
        shutil.copyfile(ref / f, wd / "inputs" / f)
    ctx = StageContext(wd, parse_config({**config, "dataset": dataset}))
    for stage in ("validate", "slice", "mine"):
        run_stage(stage, ctx)
    model, _, splits = load_inputs(ctx)
    eps = linf_budget(ctx.config.evaluation.eps, splits.name, splits.x_test)["eps"]
    idx = select_samples(len(splits.x_test), n, 0)
    x, y = splits.x_test[idx], splits.y_test[idx]

    def figures(m) -> dict:
        adv = run_batched(make_attack("pgd", m, dataset=dataset, eps=eps), x, y, batch_size=250,
                          device="cpu")
        return {"clean": accuracy(m, splits.x_test, splits.y_test), "n_clean": len(splits.x_test),
                "pgd": accuracy(m, adv, y), "n_pgd": len(y)}

    rows = {"original": {**figures(model.gm), "seconds": None, "runs": 0, "scored": 0, "chosen": "-"}}
    log(f"{arch}/{dataset}: reference test accuracy {trained['test_accuracy']:.3f}, eps {eps}")
    rows["plain CE fine-tune"] = _plain(model.gm, splits, ctx.config.baselines, figures)
    job, judge, original = _selection_setup(ctx)
    for method in METHODS:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        hardened, info = _selected(ctx, job, judge, original, method)
        job.models[method] = hardened
        wall = time.perf_counter() - t0
        chosen = {k: v for k, v in info["chosen"].items()
                  if k not in ("val_clean", "val_robust", "within_budget", "note")}
        rows[method] = {**figures(hardened), "seconds": wall,
                        "runs": grid_size(info["grid_values"])[0], "scored": len(info["grid"]),
                        "within_budget": info["within_budget"], "chosen": chosen}
        log(f"  {method}: {wall:.1f}s, clean {rows[method]['clean']:.3f}, "
            f"PGD {rows[method]['pgd']:.3f}")
    return {"subject": f"{arch}/{dataset}", "eps": eps, "n_train": len(splits.x_train),
            "n_val": judge.n, "rows": rows}


def _plain(gm, splits, cfg, figures) -> dict:
    """The cost yardstick: cross-entropy fine-tuning through the same epoch loop, no adversary
    (N-FGSM's paper puts its cost at about twice this)."""
    import copy

    from worker.engine import baselines

    m = copy.deepcopy(gm)
    xs, ys = baselines.train_subset(splits, cfg.max_train, 0)
    t0 = time.perf_counter()
    baselines._fit(m, xs, ys, lr=cfg.lr_grid[0], epochs=cfg.epochs, batch_size=cfg.batch_size)
    wall = time.perf_counter() - t0
    return {**figures(m), "seconds": wall, "runs": 1, "scored": 0,
            "chosen": {"epochs": cfg.epochs, "lr": cfg.lr_grid[0]}}


def _cell(p: float, n: int) -> str:
    from worker.engine.stats import wilson

    lo, hi = wilson(p, n)
    return f"{100 * p:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def render(results: list, config: dict, n: int, argv: list[str], seconds: float) -> str:
    command = (f"Command: `python -m bench.methods_table {' '.join(argv)}` ({seconds / 60:.1f} min; "
               f"{_machine()}).")
    settings = (f"Job config (besides `dataset`): `{config}`; everything else at its default "
                "(selection.adversarial: beta {1, 6}, awp_base {pgd, trades}; robust: eps ramp "
                "over 2 epochs (at most half the smallest epochs), 10 inner steps of eps/4, N-FGSM "
                "k = 2 and step eps, AWP gamma 0.01 on PGD-AT and 0.005 on TRADES (beta 6)). "
                "Each method chosen from its grid on the held-out selection points (validation "
                "PGD within the clean budget). Reference models trained here, seeded "
                f"({', '.join(f'{d} {e} epochs' for d, e in REF_EPOCHS.items())}). "
                "Clean: whole test split; PGD: the evaluation's PGD-40 (step eps/4, random start) "
                f"at the budget on min({n}, test split) seeded test points. Accuracies in %, with "
                "Wilson 95 % intervals. Wall time: the whole selection (every training of the grid "
                "plus the validation PGD that scores each of its points).")
    lines = ["# Stronger hardening methods vs Madry PGD training", "", command, "", settings, ""]
    for r in results:
        heading = (f"## {r['subject']} (eps {r['eps']}, {r['n_train']} training images, "
                   f"{r['n_val']} selection points, PGD on {r['rows']['original']['n_pgd']} test "
                   "points)")
        lines += [heading, "",
                  "| method | clean | PGD-40 robust | wall s | trainings | scored points | chosen | within budget |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            wall = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
            lines.append(f"| {name} | {_cell(row['clean'], row['n_clean'])} | "
                         f"{_cell(row['pgd'], row['n_pgd'])} | {wall} | {row['runs']} | "
                         f"{row.get('scored', 0)} | {row['chosen']} | {row.get('within_budget', '-')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", default="lenet:digits", help="e.g. lenet:digits,lenet:mnist5k")
    ap.add_argument("--epochs", type=int, default=5,
                    help="the adversarial grid's one epochs value (and the plain fine-tune's)")
    ap.add_argument("--lr", type=float, default=3e-3, help="the adversarial grid's one learning rate")
    ap.add_argument("--dare-epochs", type=int, default=10, help="DARE's grid's one epochs value")
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--n", type=int, default=500, help="test points attacked with PGD-40")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = ap.parse_args(argv)
    # compare: true so the selection points are held out of DARE's mining, as in a compare job
    config = {"seed": 0, "compare": True,
              "baselines": {"epochs": args.epochs, "lr_grid": [args.lr], "max_train": args.max_train},
              "selection": {"adversarial": {"epochs": [args.epochs], "lr": [args.lr]},
                            "dare": {"epochs": [args.dare_epochs], "lr": [3e-3],
                                     "history_fraction": [0.5]}}}
    root = Path(tempfile.mkdtemp(prefix="dare-methods-"))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    results = [run_subject(*s.split(":"), config, args.n, root, log)
               for s in args.subjects.split(",")]
    text = render(results, config, args.n, argv, time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
