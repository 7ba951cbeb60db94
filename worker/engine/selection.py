"""Honest, symmetric method selection: every method's grid is judged by one rule on one split.

The split: a seeded part of the validation split (``selection.holdout_fraction``) is held out.
No method trains on it and, when the job selects (``compare`` or ``auto``), DARE does not mine it
either, so a method is never judged on points it was tuned on. The test points are never read
here: they only report (``evaluation.evaluate`` after the choice).

The rule, within a method's grid (``select_run``): the highest validation robust accuracy (PGD
at the job's L-inf budget, re-run against each grid point) among the points whose validation
clean accuracy stays within ``clean_drop_limit`` of the original's; ties go to the higher clean
accuracy. Across methods (``choose``): the same rule on each method's chosen point, judged by
AutoAttack where the job runs it (fixed_eps), else by that PGD figure. When no method keeps the
budget, ``on_budget_miss`` decides: fail, the method closest to the budget, or the original.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import Callable

import torch
from torch import nn

from .errors import InputError
from .evaluation import accuracy, attack_kwargs, model_device, run_batched, set_eval
from .report import within_budget
from .resume import Resume, rng_state, set_rng_state

ATTACK_BATCH = 250
# The grid parameters every method takes; a registry entry lists the others it takes.
COMMON_PARAMS = ("epochs", "lr")


class NoMethodWithinBudget(InputError):
    """``auto`` with ``on_budget_miss: fail`` found no method that keeps the clean budget."""

    def __init__(self, message: str) -> None:
        super().__init__("no_method_within_budget", message,
                         "raise clean_drop_limit, widen the grids in selection, or set "
                         'on_budget_miss to "best_within" or "original"')


def selects(config) -> bool:
    """Whether the job chooses on the selection split (compare, auto, or a method that is always
    chosen from its grid: ``config.GRID_ONLY_METHODS``), and so holds those points out of mining."""
    from .config import GRID_ONLY_METHODS

    return bool(config.compare or config.method == "auto" or config.method in GRID_ONLY_METHODS)


def split_validation(n_val: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(holdout, rest)``: sorted indices into the validation split, seeded; the holdout has at
    least one point and leaves at least one."""
    g = torch.Generator().manual_seed(seed + 7919)  # not select_samples' stream: other points
    perm = torch.randperm(n_val, generator=g)
    k = min(max(1, round(n_val * holdout_fraction)), max(n_val - 1, 1))
    return perm[:k].sort().values, perm[k:].sort().values


def selection_points(splits, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation points every selection is judged on: (x, y), at most ``selection.n_val``."""
    hold, _ = split_validation(len(splits.y_val), config.selection.holdout_fraction, config.seed)
    hold = hold[:config.selection.n_val]
    return splits.x_val[hold], splits.y_val[hold]


def mining_pool(splits, config) -> tuple[torch.Tensor, torch.Tensor]:
    """What DARE mines: the validation split, less the selection points when the job selects."""
    if not selects(config):
        return splits.x_val, splits.y_val
    _, rest = split_validation(len(splits.y_val), config.selection.holdout_fraction, config.seed)
    return splits.x_val[rest], splits.y_val[rest]


def tuning_target(splits, config) -> int:
    """How many samples the adversarial-training baselines tune on (one adversarial example per
    training point): the number DARE collects too, where the validation split allows (paper 4.2:
    'DARE will correspondingly collect the same number of samples (if possible)')."""
    return min(config.baselines.max_train, len(splits.y_train))


def cap_mined(mined, target: int, seed: int):
    """At most ``target`` of the mined samples (seeded choice, order kept)."""
    from .mining import MinedSet

    if len(mined.y) <= target:
        return mined
    g = torch.Generator().manual_seed(seed + 104729)
    keep = torch.randperm(len(mined.y), generator=g)[:target].sort().values
    per_sample = ("x", "y", "target", "tutor_logits", "tutor")
    return MinedSet(**{**mined.to_state(), **{k: getattr(mined, k)[keep] for k in per_sample}})


# ---------------------------------------------------------------------------------------------
# Scoring


class Judge:
    """Clean and robust accuracy of a model on the selection points (never the test split).

    ``robust`` is PGD with the dataset's parameters at the job's L-inf budget, re-run against
    the model itself; ``autoattack`` AutoAttack on the same points, for the choice across methods.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, dataset: str | None, eps: float,
                 device, seed: int, aa_version: str = "standard", batch_size: int = ATTACK_BATCH,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.x, self.y, self.dataset, self.eps = x, y, dataset, eps
        self.device, self.seed, self.aa_version = torch.device(device), seed, aa_version
        self.batch_size, self.cancelled = batch_size, cancelled

    @property
    def n(self) -> int:
        return len(self.y)

    def pgd_params(self, model: nn.Module) -> dict:
        from .attacks import make_attack

        return make_attack("pgd", model, dataset=self.dataset, **attack_kwargs("pgd", self.eps)).params()

    def score(self, model: nn.Module) -> dict:
        """``{"val_clean", "val_robust"}``; the global random state is left as it was, so a
        training run scored between epochs goes on exactly as it would have."""
        from .attacks import make_attack

        dev = _device_of(model, self.device)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            set_eval(model)
            clean = accuracy(model, self.x, self.y)
            atk = make_attack("pgd", model, dataset=self.dataset, **attack_kwargs("pgd", self.eps))
            adv = run_batched(atk, self.x, self.y, batch_size=self.batch_size, device=dev,
                              cancelled=self.cancelled)
            robust = accuracy(model, adv, self.y)
        return {"val_clean": clean, "val_robust": robust}

    def autoattack(self, model: nn.Module) -> float:
        from .attacks import autoattack as aa

        dev = _device_of(model, self.device)
        res = aa.run_autoattack(model, self.x, self.y, eps=self.eps, version=self.aa_version,
                                seed=self.seed, batch_size=self.batch_size, device=dev,
                                cancelled=self.cancelled)
        return int(res["robust"].sum()) / self.n


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    return model_device(model) if any(True for _ in model.parameters()) else fallback


# ---------------------------------------------------------------------------------------------
# The rule


def select_run(runs: list[dict]) -> dict:
    """The grid run to keep: the highest ``val_robust`` among runs ``within_budget``.

    Ties go to the higher validation clean accuracy. When no run keeps the budget, the run with the
    highest validation clean accuracy is returned (its ``within_budget`` stays False, so the report
    shows the violation instead of hiding it).
    """
    if not runs:
        raise ValueError("empty grid")
    ok = [r for r in runs if r["within_budget"]]
    if ok:
        return max(ok, key=lambda r: (r["val_robust"], r["val_clean"]))
    return max(runs, key=lambda r: (r["val_clean"], r["val_robust"]))


def within(original_clean: float, clean: float, limit: float) -> bool:
    return within_budget(original_clean, clean, limit)


RULE = ("on the selection split (validation points no method trained or mined on): per method, "
        "the grid point with the highest PGD robust accuracy among those within the clean budget; "
        "across methods, the highest {attack} robust accuracy among methods within the clean "
        "budget (ties: higher clean accuracy)")


def choose(rows: dict[str, dict], original_clean: float, limit: float, on_budget_miss: str) -> dict:
    """The choice across methods. rows: ``{name: {"val_clean", "val_robust"}}`` (controls already
    left out). Returns ``{"chosen": name | "unchanged" | None, "within_budget", "budget_miss",
    "note"}``; raises ``NoMethodWithinBudget`` when nothing keeps the budget and the policy is
    ``fail``. ``chosen`` is None only when there are no rows."""
    if not rows:
        return {"chosen": None, "within_budget": None, "budget_miss": False,
                "note": "no method ran, so none was chosen"}
    ok = {k: r for k, r in rows.items() if within(original_clean, r["val_clean"], limit)}
    if ok:
        best = max(ok, key=lambda k: (ok[k]["val_robust"], ok[k]["val_clean"], _name_key(k)))
        return {"chosen": best, "within_budget": True, "budget_miss": False,
                "note": f"{best}: the most robust of the {len(ok)} method(s) within the clean budget"}
    drops = ", ".join(f"{k} {original_clean - r['val_clean']:.3f}" for k, r in rows.items())
    msg = (f"no method kept validation clean accuracy within {limit:.3f} of the original's "
           f"{original_clean:.3f} (drops: {drops})")
    if on_budget_miss == "fail":
        raise NoMethodWithinBudget(msg)
    if on_budget_miss == "original":
        return {"chosen": "unchanged", "within_budget": True, "budget_miss": True,
                "note": msg + "; on_budget_miss 'original': the original model is returned unchanged"}
    closest = max(rows, key=lambda k: (rows[k]["val_clean"], rows[k]["val_robust"], _name_key(k)))
    return {"chosen": closest, "within_budget": False, "budget_miss": True,
            "note": msg + f"; on_budget_miss 'best_within': {closest}, the smallest drop, is "
                          "returned and marked over budget"}


def _name_key(name: str) -> list[int]:
    return [-ord(c) for c in name]  # ties after the figures: alphabetical


# ---------------------------------------------------------------------------------------------
# A method's grid


def grid_for(spec, config) -> dict[str, list]:
    """The lists ``spec`` is trained with: its family's grid in ``config.selection`` (defaults
    filling what a user's partial grid leaves null), then ``selection.overrides[spec.name]``."""
    from .config import SelectionConfig

    sel = config.selection
    family = getattr(sel, spec.family)
    default = getattr(SelectionConfig(), spec.family)
    override = sel.overrides.get(spec.name)
    out = {}
    for p in COMMON_PARAMS + tuple(spec.params):
        v = None if override is None else getattr(override, p, None)
        v = v if v is not None else getattr(family, p, None)
        v = v if v is not None else getattr(default, p, None)
        if v is None:
            raise ValueError(f"{spec.name}: no grid values for {p!r}")
        out[p] = list(v)
    return out


def grid_size(grid: dict[str, list]) -> tuple[int, int]:
    """``(trainings, scored points)``: one training per non-epoch combination, scored at each
    epochs value."""
    trainings = 1
    for p, v in grid.items():
        if p != "epochs":
            trainings *= len(v)
    return trainings, trainings * len(grid["epochs"])


def select_method(spec, job, judge: Judge, original_clean: float, limit: float, *,
                  progress: Callable[[float], None] = lambda f: None,
                  resume: Resume | None = None) -> tuple[nn.Module, dict]:
    """Train ``spec``'s grid (``grid_for``), score every point on ``judge``, keep ``select_run``'s.

    One training per combination of the non-epoch parameters runs for the largest epochs value
    and is scored after each epoch in the grid (a snapshot equals a shorter run: the same seed,
    no learning-rate schedule, the scoring leaves the random state alone).

    ``resume`` (``worker.engine.resume``): the finished combinations (their scores and
    the kept weights) are checkpointed after each one, and each combination's training
    checkpoints its epochs below, with the scores collected so far, so a re-run after a crash
    goes on from the last epoch and chooses as an uninterrupted run would.
    """
    grid = grid_for(spec, job.config)
    others = [p for p in grid if p != "epochs"]
    combos = [dict(zip(others, vals)) for vals in itertools.product(*(grid[p] for p in others))]
    epochs = grid["epochs"]
    runs: list[dict] = []
    kept: dict = {}
    train_infos: list[dict] = []
    seen: set = set()  # the epochs of the running combination scored so far
    t0 = time.perf_counter()
    dev = torch.device(job.ctx.device)
    # Every method starts from the same global random state, whichever method ran (or was loaded
    # from state/) before it, so a resumed compare trains each method as an uninterrupted one.
    torch.manual_seed(job.config.seed)

    def get() -> dict:
        return {"runs": runs, "kept": kept, "seen": sorted(seen), "train_infos": train_infos,
                "elapsed": time.perf_counter() - t0}

    def put(state: dict) -> None:
        nonlocal t0
        runs[:], train_infos[:] = state["runs"], state["train_infos"]
        kept.clear()
        kept.update(state["kept"])
        seen.clear()
        seen.update(state["seen"])
        t0 = time.perf_counter() - state["elapsed"]

    if resume is not None:
        resume = resume.child("select", spec.name, grid, judge.x, judge.y, judge.eps,
                              original_clean, limit, job.original)
        saved = resume.load()
        if saved is not None:
            put(saved)
            set_rng_state(saved["rng"], dev)
            progress(len(train_infos) / len(combos))

    def record(combo: dict, e: int, model: nn.Module, note: str | None = None) -> None:
        s = judge.score(model)
        run = {**combo, "epochs": e, **s,
               "within_budget": within(original_clean, s["val_clean"], limit)}
        if note:
            run["note"] = note
        runs.append(run)
        if select_run(runs) is run:
            kept.update(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                        combo=len(train_infos))

    for i in range(len(train_infos), len(combos)):
        combo = combos[i]
        seen.clear()

        def on_epoch(e: int, model: nn.Module, combo=combo) -> None:
            if e in epochs:
                seen.add(e)
                record(combo, e, model)

        point = {**combo, "epochs": max(epochs)}
        ck = resume.child(f"combo{i}", point).with_state(get, put) if resume is not None else None
        job.resume = ck
        try:
            model, info = spec.train(job, point, on_epoch,
                                     lambda f, i=i: progress((i + f) / len(combos)))
        finally:
            job.resume = None
        if not seen:
            # no epoch completed (nothing to tune on, or a diverged first epoch): the returned
            # model is what this combination gives
            record(combo, int(info.get("epochs") or 0), model, note="no epoch snapshot")
        train_infos.append({k: v for k, v in info.items() if _plain(v)})
        if resume is not None:
            resume.save({**get(), "rng": rng_state(dev)})
            ck.clear()  # the record above holds this combination now
    chosen = select_run(runs)
    model = copy.deepcopy(job.original)
    model.load_state_dict(kept["state"])
    set_eval(model)
    out = {"method": spec.name, "grid_values": grid, "grid": runs, "chosen": chosen,
           "within_budget": chosen["within_budget"], "n_val": judge.n,
           "selection": "highest validation PGD robust accuracy among grid points within the "
                        "clean budget (else the cleanest)",
           "training": train_infos[kept["combo"]], "seconds": time.perf_counter() - t0}
    n = train_infos[kept["combo"]].get("n_samples")
    if n is not None:
        out["n_samples"] = n
    progress(1.0)
    return model, out


def _plain(v) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
