"""The job's stages, as the worker, the CLI and the benchmark run them.

A job lives in one directory::

    <workdir>/inputs/model.onnx | model.pt2     the user's classifier
    <workdir>/inputs/history.zip                 per-epoch checkpoints
    <workdir>/inputs/data.npz                    optional: else config.dataset names an embedded set
    <workdir>/state/                             intermediate results, one file set per stage
    <workdir>/artifacts/                         hardened.onnx, hardened.pt2 (pt2 input),
                                                 hardened.safetensors, report.json, report.html

``run_stage(name, ctx)`` runs one stage. A stage that already finished (its
``state/<name>.done.json`` exists) returns its recorded summary without doing anything, so a
redelivered message is harmless.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import HardenConfig

# compare (only when asked) runs before export: with method "auto" the artifacts come from the
# method it recommends, and evaluate reuses its attack results instead of attacking twice.
STAGES = ("validate", "slice", "mine", "tune", "compare", "export", "evaluate")


def stage_names(config: HardenConfig) -> list[str]:
    """The stages a job runs, in order (``compare`` only when asked for)."""
    wanted = config.compare or config.method == "auto"
    return [s for s in STAGES if s != "compare" or wanted]


@dataclass
class StageContext:
    workdir: Path
    config: HardenConfig
    progress: Callable[[float], None] = lambda f: None  # stage progress in [0, 1]
    cancelled: Callable[[], bool] = lambda: False       # polled between batches
    device: str = "cpu"
    timings: dict = field(default_factory=dict)
