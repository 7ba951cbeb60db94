"""What does AutoAttack cost next to PGD-40? Prints a table (CPU, one torch thread).

    dare train-reference --arch lenet --dataset digits --epochs 10 --out /tmp/lenet-digits
    OMP_NUM_THREADS=1 .venv/bin/python bench/autoattack_cost.py --subject /tmp/lenet-digits

On the subject's test points chosen as the evaluation chooses them (``select_samples``, seed 0),
at the evaluation's L-inf budget (the dataset's, or ``--eps``), it runs the report's PGD-40 and
AutoAttack (fast: APGD-CE + APGD-T; standard: + FAB-T + Square) as the evaluation runs them, and
reports robust accuracy, wall and process CPU time, and the cost as a multiple of PGD-40's CPU
time. AutoAttack stops on points already broken, so its cost grows with the robust accuracy: an
undefended model is the cheap case, a hardened one costs more (point ``--subject`` at a directory
holding a hardened ``model.onnx`` and the same ``data.npz`` to measure that).
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subject", required=True, help="a train-reference output directory")
    ap.add_argument("--n", type=int, default=100, help="test points attacked")
    ap.add_argument("--eps", type=float, default=None, help="L-inf budget (default: the dataset's)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--versions", nargs="+", default=["fast", "standard"])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from worker.engine.attacks import default_params, make_attack
    from worker.engine.attacks.autoattack import run_autoattack
    from worker.engine.data import load_npz
    from worker.engine.evaluation import accuracy, run_batched, select_samples
    from worker.engine.modelio import load_model

    subject = Path(a.subject)
    model_file = next(p for p in (subject / "model.pt2", subject / "model.onnx") if p.is_file())
    model = load_model(model_file).gm
    splits = load_npz(subject / "data.npz")
    dataset = "digits" if tuple(splits.x_test.shape[1:]) == (1, 8, 8) else None
    eps = a.eps if a.eps is not None else float(default_params("pgd", dataset)["eps"])
    idx = select_samples(len(splits.x_test), a.n, 0)
    x, y = splits.x_test[idx], splits.y_test[idx]

    rows = []
    pgd = make_attack("pgd", model, dataset=dataset, eps=eps)
    x_adv, w, c = _timed(lambda: run_batched(pgd, x, y, batch_size=a.batch_size, device="cpu"))
    base = c
    rows.append(("PGD-40 (report's)", accuracy(model, x_adv, y), w, c))
    for v in a.versions:
        res, w, c = _timed(lambda: run_autoattack(model, x, y, eps=eps, version=v, seed=0,
                                                  batch_size=a.batch_size))
        rows.append((f"AutoAttack {v}", int(res["robust"].sum()) / len(x), w, c))

    print(f"subject {subject} ({model_file.name}), {len(x)} test points, L-inf eps {eps:g}, "
          f"clean accuracy {accuracy(model, x, y):.3f}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread")
    print()
    print("| attack | robust accuracy | wall s | CPU s | CPU x PGD-40 |")
    print("|---|---|---|---|---|")
    for name, acc, w, c in rows:
        print(f"| {name} | {acc:.3f} | {w:.1f} | {c:.1f} | {c / base:.1f} |")


if __name__ == "__main__":
    main()
