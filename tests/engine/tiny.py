"""A tiny residual CNN on sklearn's digits with a per-epoch history: the engine tests' subject."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from sklearn.datasets import load_digits

from worker.engine.graph import plain_graph_module


class TinyNet(nn.Module):
    """conv-BN-ReLU, a residual conv, max-pool, flatten, dense-ReLU-dropout, dense."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = x + torch.relu(self.c2(x))
        x = torch.flatten(nn.functional.max_pool2d(x, 2), 1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


@lru_cache(maxsize=1)
def digits():
    d = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)[perm]
    y = torch.tensor(d.target, dtype=torch.long)[perm]
    return SimpleNamespace(name="digits", num_classes=10, x_train=x[:1000], y_train=y[:1000],
                           x_val=x[1000:1400], y_val=y[1000:1400], x_test=x[1400:], y_test=y[1400:])


def trained_once(key: str, train):
    """``train()``'s result (tensors, dicts, lists of them), kept on disk under
    ``$DARE_TEST_WEIGHTS`` when that is set. bench/mutation.py sets it: the subjects' training
    depends on no mutated module, and repeating it for every mutant was a third of each run."""
    where = os.environ.get("DARE_TEST_WEIGHTS")
    if not where:
        return train()
    f = Path(where) / f"{key}-torch{torch.__version__}.pt"
    if f.exists():
        return torch.load(f, weights_only=True)
    out = train()
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, f.with_suffix(".tmp"))
    f.with_suffix(".tmp").replace(f)
    return out


def _train_tiny(epochs: int) -> dict:
    torch.manual_seed(0)
    data = digits()
    m = TinyNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    history = []
    for e in range(epochs):
        m.train()
        for i in range(0, len(data.x_train), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(m(data.x_train[i:i + 32]), data.y_train[i:i + 32]).backward()
            opt.step()
        history.append({k: v.clone() for k, v in m.state_dict().items()})
    return {"final": m.state_dict(), "history": history}


@lru_cache(maxsize=1)
def trained(epochs: int = 8):
    """(GraphModule from torch.export, history of SimpleNamespace(name, state), data)."""
    data = digits()
    run = trained_once(f"tiny-{epochs}", lambda: _train_tiny(epochs))
    m = TinyNet()
    m.load_state_dict(run["final"])
    history = [SimpleNamespace(name=f"epoch_{e + 1}", state=s) for e, s in enumerate(run["history"])]
    m.eval()
    ep = torch.export.export(m, (data.x_train[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    return plain_graph_module(ep.module()), history, data


def only_classes(mined, classes: tuple[int, ...]):
    """The part of a ``MinedSet`` whose labels are in ``classes``."""
    from worker.engine.mining import MinedSet

    keep = torch.isin(mined.y, torch.tensor(classes))
    per_sample = ("x", "y", "target", "tutor", "tutor_logits")
    return MinedSet(**{**mined.to_state(), **{k: getattr(mined, k)[keep] for k in per_sample}})
