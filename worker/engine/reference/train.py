"""Train a reference subject and write everything a DARE job takes as input.

``out_dir`` receives::

    model.pt2         torch.export of the final model (eval mode, dynamic batch)
    model.onnx        the same model, ONNX opset 17, dynamic batch, initializers named as the
                      state dict (so one history serves both formats)
    history/epoch_{k}.safetensors   the state dict after epoch k = 1..epochs
    history.zip       those files plus manifest.json (arch, dataset, in_shape, num_classes, seed,
                      and the checkpoints in order): self-describing, like nanoGPT's checkpoints
    data.npz          the splits it trained on (the upload format)

Run as ``python -m worker.engine.reference.train --arch lenet --dataset digits --out DIR``: by
default 50 epochs with a cosine-decayed learning rate, a checkpoint per epoch (the paper's kind of
history); the function ``train_reference`` keeps its explicit arguments (tests pass short runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Splits, load_embedded, save_npz
from ..export import export_onnx, export_pt2
from .models import ALL_ARCHS, PAPER_ARCHS, build

DEFAULT_LR = {"adam": 3e-3, "sgd": 0.05}
# "cosine" decays the learning rate to 0 over the run (per epoch), so the history the paper mines
# spans a real training: early, still-improving checkpoints and settled late ones.
LR_SCHEDULES = ("constant", "cosine")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size].to(dev)).argmax(1).cpu()
            correct += int((out == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def train_reference(arch: str, dataset: str | Splits, epochs: int, out_dir, seed: int = 0,
                    lr: float | None = None, batch_size: int = 64, optimizer: str = "adam",
                    weight_decay: float = 0.0, width: float = 1.0, lr_schedule: str = "constant",
                    max_train: int | None = None, val_fraction: float | None = None,
                    device: str = "cpu") -> dict:
    """Train ``arch`` on ``dataset`` (an embedded name, or ready ``Splits``) and write the files
    listed in the module docstring. Seeded: the same arguments give bit-identical checkpoints
    (on the same machine and thread count).

    Returns {"arch", "dataset", "in_shape", "num_classes", "epochs", "seed", "test_accuracy",
    "val_accuracy", "train_accuracy", "seconds", "model_pt2", "model_onnx", "history_zip",
    "history_dir", "data_npz", "checkpoints"} (paths as ``Path``).

    ``val_fraction`` splits an embedded dataset as the job's config will (``load_embedded``);
    a job must use the same seed and val_fraction, or its val and test would overlap the
    subject's training images. ``width`` scales the paper architectures (``PAPER_ARCHS``); ``max_train`` keeps the first
    that many training images (the splits are shuffled and stratified, so a prefix is a fair
    sample), for CPU runs that cannot afford the whole set.
    """
    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ALL_ARCHS)}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {', '.join(DEFAULT_LR)}, got {optimizer!r}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    hist_dir = out_dir / "history"
    hist_dir.mkdir(parents=True, exist_ok=True)
    splits = (load_embedded(dataset, seed=seed, val_fraction=val_fraction)
              if isinstance(dataset, str) else dataset)
    if max_train is not None and max_train < len(splits.y_train):
        splits = dataclasses.replace(splits, x_train=splits.x_train[:max_train].clone(),
                                     y_train=splits.y_train[:max_train].clone())
    in_shape = tuple(int(d) for d in splits.x_train.shape[1:])

    torch.manual_seed(seed)
    model = build(arch, in_shape, splits.num_classes,
                  **({"width": width} if arch in PAPER_ARCHS else {})).to(device)
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
             if lr_schedule == "cosine" else None)
    gen = torch.Generator().manual_seed(seed)
    x, y = splits.x_train, splits.y_train
    meta = {"arch": arch, "dataset": splits.name, "in_shape": list(in_shape),
            "num_classes": splits.num_classes, "seed": seed,
            **({"val_fraction": val_fraction} if val_fraction is not None else {}),
            **({"width": width} if arch in PAPER_ARCHS else {})}

    from safetensors.torch import save_file

    checkpoints = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                continue  # BatchNorm cannot train on a batch of one
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
            opt.step()
        if sched is not None:
            sched.step()
        name = f"epoch_{epoch}.safetensors"
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
                  str(hist_dir / name),
                  metadata={k: json.dumps(v) for k, v in {**meta, "epoch": epoch}.items()})
        checkpoints.append({"file": name, "epoch": epoch})

    model.eval()
    accs = {f"{s}_accuracy": accuracy(model, getattr(splits, f"x_{s}"), getattr(splits, f"y_{s}"))
            for s in ("test", "val", "train")}
    model.cpu()  # exported on the CPU
    example = splits.x_test[:2].clone()
    pt2 = out_dir / "model.pt2"
    export_pt2(model, example, pt2)
    onnx_path = export_onnx(model, example, out_dir / "model.onnx")

    manifest = {"format": "dare-history", "version": 1, **meta, "checkpoints": checkpoints}
    hist_zip = out_dir / "history.zip"
    with zipfile.ZipFile(hist_zip, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2))
        for c in checkpoints:
            zf.write(hist_dir / c["file"], arcname=c["file"])
    data_npz = save_npz(splits, out_dir / "data.npz")

    return {
        **meta,
        "in_shape": in_shape,
        "epochs": epochs,
        **accs,
        "seconds": time.perf_counter() - t0,
        "model_pt2": pt2,
        "model_onnx": onnx_path,
        "history_zip": hist_zip,
        "history_dir": hist_dir,
        "data_npz": data_npz,
        "checkpoints": [hist_dir / c["file"] for c in checkpoints],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=ALL_ARCHS, default="lenet")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--optimizer", choices=tuple(DEFAULT_LR), default="adam")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training only)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    r = train_reference(a.arch, a.dataset, a.epochs, a.out, seed=a.seed, lr=a.lr,
                        batch_size=a.batch_size, optimizer=a.optimizer, width=a.width,
                        lr_schedule=a.lr_schedule, max_train=a.max_train,
                        val_fraction=a.val_fraction, device=a.device)
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()
                      if k != "checkpoints"}, indent=2))


if __name__ == "__main__":
    main()
