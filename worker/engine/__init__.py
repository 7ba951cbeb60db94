"""The hardening engine: pure PyTorch, no web, queue or database imports.

Stages (see ``worker.engine.stages``): validate -> slice -> mine -> tune
[-> compare] -> export -> evaluate. Each stage reads its inputs from a job directory and writes its outputs there, so
the same code runs from the command line, the Celery worker and the benchmark.

Every file the engine loads came from a user, so no pickle it reads may run code: importing
this package forces ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` in this process and its children (the
submit-time inspector, the Celery worker, ``dare harden``). torch reads the variable on every
``torch.load`` call and then loads weights-only *even where the caller passes
``weights_only=False``*, as ``torch.export.load`` does for pickled weights, constants and sample
inputs (torch/serialization.py, 2.14); a pickle that needs code then fails before any of it
runs. The opposite variable would make every load raise, so it is removed. The ``.pt2`` paths
that unpickle without ``torch.load`` (or run code otherwise) are refused by
:mod:`worker.engine.pt2_layout`.
"""
import os as _os

_os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
_os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
