"""Data splits: uploaded .npz files and the embedded datasets (nothing is downloaded)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

EMBEDDED = ("digits", "mnist5k")


@dataclass
class Splits:
    """x_*: float32 (N, C, H, W) in [0, 1]; y_*: int64 (N,)."""

    name: str  # "digits", "mnist5k" or "upload"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
