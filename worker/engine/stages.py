"""The job's stages, as the worker, the CLI and the benchmark run them.

A job lives in one directory::

    <workdir>/inputs/model.onnx | model.pt2     the user's classifier
    <workdir>/inputs/history.zip                 per-epoch checkpoints
    <workdir>/inputs/data.npz                    optional: else config.dataset names an embedded set
    <workdir>/state/                             intermediate results, one file set per stage
    <workdir>/state/resume/<method>/             checkpoints of the running stage's training
                                                 (worker.engine.resume), removed when it is done
    <workdir>/artifacts/                         hardened.onnx, hardened.pt2 (pt2 input),
                                                 hardened.safetensors, report.json, report.html

``run_stage(name, ctx)`` runs one stage. A stage that already finished (its
``state/<name>.done.json`` exists) returns its recorded summary without doing anything, so a
redelivered message is harmless.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .config import STAGES, HardenConfig, stage_names  # noqa: F401 (re-exported)
from .errors import InputError
from .methods import controls as _registry_controls


@dataclass
class StageContext:
    workdir: Path
    config: HardenConfig
    progress: Callable[[float], None] = lambda f: None  # stage progress in [0, 1]
    cancelled: Callable[[], bool] = lambda: False       # polled between batches
    device: str = "cpu"
    timings: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return Path(self.workdir).joinpath(*parts)


# ---------------------------------------------------------------------------------------------
# Loading the job's inputs (cached per process: every stage needs them, a worker runs one job
# at a time, and the key includes the files' mtimes so a new job never sees stale inputs).


def _model_file(workdir: Path) -> Path:
    found = [p for p in (workdir / "inputs").glob("model.*") if p.suffix in (".onnx", ".pt2")]
    if len(found) != 1:
        raise InputError("missing_model", "the job has no model.onnx or model.pt2 input",
                         "upload the classifier as .onnx or .pt2")
    return found[0]


def _stamp(p: Path) -> float:
    return p.stat().st_mtime if p.exists() else 0.0


@lru_cache(maxsize=2)
def _inputs_cached(workdir: str, dataset: str | None, seed: int, stamp: tuple,
                   val_fraction: float | None = None):
    from .data import check_data_against_model, load_data
    from .graph import plain_graph_module
    from .history import load_history
    from .modelio import load_model

    wd = Path(workdir)
    model = load_model(_model_file(wd))
    model.gm = plain_graph_module(model.gm)
    history = load_history(wd / "inputs" / "history.zip", model)
    npz = wd / "inputs" / "data.npz"
    splits = load_data(npz if npz.exists() else None, dataset, seed=seed, val_fraction=val_fraction)
    check_data_against_model(splits, model.input_shape, model.num_outputs)
    return model, history, splits


def load_inputs(ctx: "StageContext"):
    """``(LoadedModel, history checkpoints, Splits)`` for the job."""
    wd = Path(ctx.workdir)
    files = [_model_file(wd), wd / "inputs" / "history.zip", wd / "inputs" / "data.npz"]
    return _inputs_cached(str(wd.resolve()), ctx.config.dataset, ctx.config.seed,
                          tuple(_stamp(f) for f in files), ctx.config.val_fraction)


def _analysis(ctx: "StageContext"):
    from .graph import analyze

    model, _, _ = load_inputs(ctx)
    return analyze(model.gm)


def _tmp(path: Path) -> Path:
    # one name per process: two workers may write the same file (a mined set both need)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _save_pt(obj, path: Path) -> None:
    tmp = _tmp(path)
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic: a killed stage never leaves half a file behind


def _write_json(path: Path, obj) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _load_pt(path: Path):
    return torch.load(path, weights_only=True)


def _save_state(gm: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = _tmp(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in gm.state_dict().items()}, str(tmp))
    tmp.replace(path)


def _load_into(gm, path: Path):
    import copy

    from safetensors.torch import load_file

    m = copy.deepcopy(gm)
    m.load_state_dict(load_file(str(path)))
    return m


# ---------------------------------------------------------------------------------------------
# The stages. Each returns a small JSON summary; ``run_stage`` records it in state/<name>.done.json.


def _validate(ctx: "StageContext") -> dict:
    from .evaluation import accuracy

    model, history, splits = load_inputs(ctx)
    info = _analysis(ctx)
    ctx.progress(0.5)
    k, cut = info.cut(ctx.config.p)
    acc = accuracy(model.gm, splits.x_test, splits.y_test)
    return {"format": model.fmt, "input_shape": list(model.input_shape),
            "num_classes": model.num_outputs, "checkpoints": len(history),
            "layers": [layer.node for layer in info.layers], "mt_layers": k, "cut_node": cut,
            "data": {"train": len(splits.x_train), "val": len(splits.x_val),
                     "test": len(splits.x_test), "name": splits.name},
            "clean_accuracy": acc}


def _slice(ctx: "StageContext") -> dict:
    from .profiling import profile
    from .slicing import slice_model

    model, _, splits = load_inputs(ctx)
    info = _analysis(ctx)
    prof = profile(info, splits.x_train, splits.y_train, model.num_outputs, device=ctx.device,
                   progress=lambda f: ctx.progress(0.9 * f), cancelled=ctx.cancelled)
    res = slice_model(info, prof, ctx.config.q, ctx.config.p)
    _save_pt({"inp": prof.inp, "out": prof.out, "num_classes": prof.num_classes},
             ctx.path("state", "profile.pt"))
    _save_pt(res.to_state(), ctx.path("state", "slice.pt"))
    return {"q": res.q, "key_synapse_fraction": res.stats["key_synapse_fraction"],
            "nonzero_synapse_fraction": res.stats["nonzero_synapse_fraction"],
            "cut_node": res.cut_node, "layers_in_mt": res.stats["layers_in_mt"],
            "key_units_per_class": res.stats["key_units_per_class"],
            "frozen_share": res.stats["frozen_share"]}


def _mine(ctx: "StageContext", mode: str = "best", fraction: float | None = None):
    """Algorithm 1 on the mining pool (validation, less the selection points when the job
    selects); in a selecting job the set is capped at the baselines' sample count."""
    from .mining import mine_oracles
    from .selection import cap_mined, mining_pool, selects, tuning_target
    from .slicing import SliceResult

    model, history, splits = load_inputs(ctx)
    info = _analysis(ctx)
    cfg = ctx.config
    sliced = SliceResult.from_state(_load_pt(ctx.path("state", "slice.pt")))
    x, y = mining_pool(splits, cfg)
    mined = mine_oracles(model.gm, sliced.cut_node, info.output_node, history, x, y,
                         fraction=cfg.history_fraction if fraction is None else fraction,
                         mode=mode, seed=cfg.seed, device=ctx.device, progress=ctx.progress,
                         cancelled=ctx.cancelled)
    return cap_mined(mined, tuning_target(splits, cfg), cfg.seed) if selects(cfg) else mined


def _mine_stage(ctx: "StageContext") -> dict:
    from .selection import selects, tuning_target

    mined = _mine(ctx)
    _save_pt(mined.to_state(), ctx.path("state", "mined.pt"))
    _, _, splits = load_inputs(ctx)  # cached: the stage just loaded them
    classes = load_inputs(ctx)[0].num_outputs
    out = {"candidates": mined.candidates, "mined": len(mined.y), "window": mined.window,
           # how many samples got a tutor, per class: a class with few has little to tune on
           "mined_per_class": torch.bincount(mined.y, minlength=classes).tolist(),
           "tutors": {mined.window[i]: int(n) for i, n in
                      enumerate(torch.bincount(mined.tutor, minlength=len(mined.window)))}}
    if selects(ctx.config):
        # the paper's protocol: as many tuning samples as the adversarial-training baselines get
        out.update(pool="validation less the selection points",
                   baseline_samples=tuning_target(splits, ctx.config))
    return out


def _single_point(config, spec) -> dict:
    """A method's one configuration outside a selection: the job's own settings, and for a grid
    parameter the job has no setting of (TRADES' beta, AWP's base) the first value of its grid."""
    from .selection import grid_for

    if spec.family == "dare":
        own = {"epochs": config.tune.epochs, "lr": config.tune.lr, "q": config.q,
               "history_fraction": config.history_fraction}
    else:
        b = config.baselines
        own = {"epochs": b.epochs, "lr": b.lr_grid[0], "adv_fraction": b.adv_fraction_grid[0]}
    grid = grid_for(spec, config)
    return {p: own[p] if p in own else grid[p][0] for p in grid}


def harden(ctx: "StageContext", method: str, progress=None):
    """Train one method with the job's own settings (``_single_point``), no selection; a method
    made from another (``needs``) starts from that one trained the same way. Returns
    ``(model, info)``; every method starts from the same original model. Its training
    checkpoints each epoch under ``state/resume/<method>``, so a re-run after a crash resumes."""
    from .methods import REGISTRY, MethodJob, load_plugins

    load_plugins()
    if REGISTRY.get(method) is None or REGISTRY[method].train is None:
        raise ValueError(f"unknown method {method!r}")
    job = MethodJob(ctx)

    def train(name: str, progress):
        spec = REGISTRY[name]
        for d in spec.needs:
            if d not in job.models:
                job.models[d], _ = train(d, lambda f: None)
        _refuse_unavailable(spec, job)
        job.resume = job.method_resume(name)
        return spec.train(job, _single_point(ctx.config, spec), lambda e, m: None, progress)

    return train(method, progress or ctx.progress)


def _refuse_unavailable(spec, job) -> None:
    from .methods import MethodUnavailable

    reason = spec.unavailable(job) if spec.unavailable is not None else None
    if reason is not None:
        raise MethodUnavailable(spec.name, reason)


def _method_setup(ctx: "StageContext"):
    """``(MethodJob, Judge)``: what training and scoring one method reads."""
    from .methods import MethodJob
    from .selection import Judge, selection_points

    cfg = ctx.config
    job = MethodJob(ctx)
    job.original.to(ctx.device)
    x, y = selection_points(job.splits, cfg)
    judge = Judge(x, y, dataset=job.splits.name, eps=job.eps, device=ctx.device, seed=cfg.seed,
                  aa_version=cfg.evaluation.autoattack.version,
                  batch_size=cfg.evaluation.batch_size, cancelled=ctx.cancelled)
    return job, judge


def _selection_setup(ctx: "StageContext"):
    """``(MethodJob, Judge, the original's selection scores)``."""
    job, judge = _method_setup(ctx)
    return job, judge, judge.score(job.original)


def _selected(ctx: "StageContext", job, judge, original: dict, method: str, progress=None):
    """``method``'s model chosen from its grid, from state/ when an earlier run (the tune stage,
    a killed compare) left it there. The methods it is made from (``needs``) are chosen first
    when ``job.models`` does not hold them yet. The selection checkpoints under
    ``state/resume/<method>`` (``select_method``), removed once the model is saved."""
    from .methods import load_plugins
    from .selection import select_method

    REGISTRY = load_plugins()
    weights = ctx.path("state", f"method_{method}.safetensors")
    meta = ctx.path("state", f"method_{method}.json")
    if weights.exists() and meta.exists():
        return _load_into(job.original, weights), json.loads(meta.read_text())
    spec = REGISTRY[method]
    models = job.models
    for d in spec.needs:  # a method made from another: that one chosen first (kept in state/)
        if d not in models:
            models[d], _ = _selected(ctx, job, judge, original, d)
    _refuse_unavailable(spec, job)
    t0 = time.perf_counter()
    if spec.train is None:  # weight_noise: from DARE's chosen model, no data and no grid
        from .controls import weight_noise_like

        model, info = weight_noise_like(job.original, models["dare"], seed=ctx.config.seed, of="dare")
        info["chosen"] = judge.score(model)
    else:
        model, info = select_method(spec, job, judge, original["val_clean"],
                                    ctx.config.clean_drop_limit,
                                    progress=progress or ctx.progress,
                                    resume=job.method_resume(method))
    info = {k: v for k, v in info.items() if _jsonable(v)}
    info.setdefault("seconds", time.perf_counter() - t0)
    info["recipe"] = spec.recipe
    _save_state(model, weights)
    _write_json(meta, info)  # last: its presence with the weights marks the method done
    job.method_resume(method).clear()  # its model is saved: its checkpoints are not needed
    return model, info


def _tune(ctx: "StageContext") -> dict:
    from .selection import selects

    method = "dare" if ctx.config.method == "auto" else ctx.config.method
    if selects(ctx.config):
        # chosen from its grid on the selection split, as compare chooses every method
        job, judge, original = _selection_setup(ctx)
        tuned, info = _selected(ctx, job, judge, original, method)
    else:
        tuned, info = harden(ctx, method)
    _save_state(tuned, ctx.path("state", "tuned.safetensors"))
    return {"method": method, **{k: v for k, v in info.items() if _jsonable(v)}}


# ---------------------------------------------------------------------------------------------
# compare, in three parts so that every method can train on its own worker (the service sends
# each as its own message; ``_compare`` runs the same three in one process):
#   compare_plan    what every method shares: the original's selection scores, the methods in
#                   the order they start (cheapest first under budget_minutes), their estimates
#   compare_method  one method's grid, trained and scored; its result in state/ (atomically)
#   compare_select  the choice across methods and the evaluation of every model, from state/
# Each method starts from the same random state, so the result does not depend on which
# methods ran before it in the same process, or on which worker ran it.

PLAN = "compare.plan"       # run names the service's messages carry (run_stage takes them)
METHOD_RUN = "compare:"     # + the method's name


def method_run(name: str) -> str:
    return METHOD_RUN + name


def _final_attack(cfg) -> str:
    ev = cfg.evaluation
    return "autoattack" if "autoattack" in ev.attacks and ev.protocol == "fixed_eps" else "pgd"


def compare_plan(ctx: "StageContext") -> dict:
    """``{"methods": [...], "needs": {m: [methods it is made from]}, "original", "estimates",
    "reserve_s", "started_at"}``, computed once (state/compare.plan.json)."""
    from .methods import REGISTRY, compared
    from .schedule import Probe, order, scoring_cost
    from .selection import grid_for, grid_size

    path = ctx.path("state", "compare.plan.json")
    if path.exists():
        return json.loads(path.read_text())
    cfg = ctx.config
    started_at = time.time()  # wall clock: the budget is shared by every worker's process
    job, judge, original = _selection_setup(ctx)
    auto = cfg.method == "auto"
    tuned_method = "dare" if auto else cfg.method
    # the shipped model is always in its report's comparison
    names = compared(cfg, first=() if auto else (tuned_method,))
    ev_cfg = cfg.evaluation
    final_attack = _final_attack(cfg)
    n_test = min(ev_cfg.n_samples, len(job.splits.y_test))

    def cached(m):
        return (ctx.path("state", f"method_{m}.safetensors").exists()
                and ctx.path("state", f"method_{m}.json").exists())

    estimates: dict[str, dict] = {}
    reserve = 0.0
    if cfg.budget_minutes is not None:
        probe = Probe(job.original, judge.x, judge.y, dataset=job.splits.name, eps=job.eps,
                      device=ctx.device, aa_version=ev_cfg.autoattack.version, seed=cfg.seed)
        for m in names:
            spec = REGISTRY[m]
            grid = grid_for(spec, cfg) if spec.train is not None else None
            train = 0.0 if cached(m) else spec.cost(job, probe, grid)
            scored = 0 if cached(m) or grid is None else grid_size(grid)[1]
            during, after = scoring_cost(
                probe, scored_points=scored, n_val=judge.n,
                final_attack="pgd" if spec.control else final_attack,
                eval_attacks=list(ev_cfg.attacks), n_test=n_test, adaptive=ev_cfg.adaptive)
            estimates[m] = {"train_s": train, "scoring_s": during, "after_s": after}
        # the original's own evaluation (its attacks and sanity checks) is paid whatever runs
        reserve = (sum(probe.attack(a, n_test) for a in ev_cfg.attacks)
                   + scoring_cost(probe, scored_points=0, n_val=judge.n, final_attack=final_attack,
                                  eval_attacks=[], n_test=n_test, adaptive=False)[1])
    needs = {m: REGISTRY[m].needs for m in names}
    names = order(names, {m: sum(e.values()) for m, e in estimates.items()}, needs)
    plan = {"methods": names, "needs": {m: [d for d in needs[m] if d in names] for m in names},
            "original": original, "estimates": estimates, "reserve_s": reserve,
            "started_at": started_at, "final_attack": final_attack}
    _write_json(path, plan)
    return plan


def _method_result(ctx: "StageContext", m: str) -> dict | None:
    """A finished method's info (``{"skipped": {...}}`` when it did not run), else None."""
    meta = ctx.path("state", f"method_{m}.json")
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if "skipped" in info or ctx.path("state", f"method_{m}.safetensors").exists():
        return info
    return None


def _budget(ctx: "StageContext", plan: dict, but: str):
    """The budget as the methods started so far left it: each admitted method (but ``but``)
    has promised its end-of-stage scoring."""
    from .schedule import Budget

    budget = Budget(ctx.config.budget_minutes, clock=time.time, start=plan["started_at"])
    budget.reserve(plan["reserve_s"])
    for m in plan["methods"]:
        if m != but and ctx.path("state", f"budget_{m}.json").exists():
            budget.reserve(plan["estimates"][m]["after_s"])
    return budget


def _skip(ctx: "StageContext", m: str, reason: dict) -> dict:
    info = {"skipped": reason}
    _write_json(ctx.path("state", f"method_{m}.json"), info)
    return info


def compare_method(ctx: "StageContext", m: str, setup=None, progress=None) -> dict:
    """Train and score method ``m`` of the plan (idempotent: a finished method returns its
    result). ``setup``: a ``(MethodJob, Judge)`` to share between methods in one process."""
    from .methods import REGISTRY

    plan = compare_plan(ctx)
    done = _method_result(ctx, m)
    # one the tune stage chose still passes the budget, and gets its estimate beside it
    if done is not None and ("skipped" in done or "estimate_s" in done
                             or m not in plan["estimates"]):
        return done
    if m not in plan["methods"]:
        raise ValueError(f"{m!r} is not in this job's comparison {plan['methods']}")
    spec = REGISTRY[m]
    deps = {d: _method_result(ctx, d) for d in spec.needs}
    missing = [d for d, r in deps.items() if r is None or "skipped" in r]
    if missing:
        return _skip(ctx, m, {"reason": "needs_skipped",
                              "detail": f"made from {', '.join(missing)}, which did not run"})
    est = plan["estimates"].get(m)
    admitted = ctx.path("state", f"budget_{m}.json")
    if est is not None and not admitted.exists():  # a re-run of an admitted method goes on
        budget = _budget(ctx, plan, but=m)
        if not budget.fits(est["train_s"] + est["scoring_s"], est["after_s"]):
            left = budget.limit - budget.elapsed() - budget.reserved
            return _skip(ctx, m, {"reason": "time_budget", "detail": "does not fit in budget_minutes",
                                  "estimate_s": round(sum(est.values()), 3),
                                  "left_s": round(left, 3)})
        _write_json(admitted, est)
    job, judge = setup() if setup is not None else _method_setup(ctx)
    why = spec.unavailable(job) if spec.unavailable is not None else None
    if why is not None:  # e.g. AWP on a model whose weights cannot be perturbed
        return _skip(ctx, m, {"reason": "method_unavailable", "detail": why})
    torch.manual_seed(ctx.config.seed)
    for d in spec.needs:
        job.models[d] = _load_into(job.original, ctx.path("state", f"method_{d}.safetensors"))
    model, info = _selected(ctx, job, judge, plan["original"], m, progress=progress)
    if plan["final_attack"] == "autoattack" and not spec.control and "val_autoattack" not in info:
        info["val_autoattack"] = judge.autoattack(model)  # here, so the workers share its cost
    if est is not None:
        info["estimate_s"] = est
    _write_json(ctx.path("state", f"method_{m}.json"), info)
    return info


def _method_summary(m: str, info: dict) -> dict:
    """What the service records for one method run (the full info stays in state/)."""
    if "skipped" in info:
        return {"method": m, "skipped": info["skipped"]}
    ch = info.get("chosen") or {}
    return {"method": m, "seconds": info.get("seconds"),
            "val_clean": ch.get("val_clean"), "val_robust": ch.get("val_robust")}


def compare_select(ctx: "StageContext") -> dict:
    """The choice across methods on the selection points (the test points are not read here),
    then every model's evaluation on the test points; every method's result must be in state/."""
    import copy

    from .evaluation import evaluate
    from .methods import REGISTRY
    from .selection import RULE, choose, within

    cfg = ctx.config
    plan = compare_plan(ctx)
    names, original = plan["methods"], plan["original"]
    job, judge = _method_setup(ctx)
    auto = cfg.method == "auto"
    tuned_method = "dare" if auto else cfg.method
    final_attack = plan["final_attack"]
    models, infos, skipped = {}, {}, {}
    for m in names:
        info = _method_result(ctx, m)
        if info is None:
            raise RuntimeError(f"compare: method {m} has no result in state/")
        if "skipped" in info:
            skipped[m] = info["skipped"]
            continue
        models[m] = _load_into(job.original, ctx.path("state", f"method_{m}.safetensors"))
        infos[m] = info

    rows = {}
    for m, info in infos.items():
        ch = info["chosen"]
        row = {"val_clean": ch["val_clean"], "val_pgd": ch["val_robust"],
               "settings": {k: ch[k] for k in ch if k not in ("val_clean", "val_robust",
                                                              "within_budget", "note")},
               "n_samples": info.get("n_samples"), "control": REGISTRY[m].control,
               "seconds": info.get("seconds")}
        per_class = (info.get("training") or {}).get("mined_per_class")
        if per_class is not None:
            row["mined_per_class"] = per_class
        if "estimate_s" in info:
            row["estimate_s"] = info["estimate_s"]
        if final_attack == "autoattack" and not REGISTRY[m].control:
            if "val_autoattack" not in info:  # a result left by the tune stage
                info["val_autoattack"] = judge.autoattack(models[m])
                _write_json(ctx.path("state", f"method_{m}.json"), info)
            row["val_autoattack"] = info["val_autoattack"]
        row["val_robust"] = row.get("val_autoattack", row["val_pgd"])
        row["within_budget"] = within(original["val_clean"], row["val_clean"], cfg.clean_drop_limit)
        rows[m] = row
    orig_row = {"val_clean": original["val_clean"], "val_pgd": original["val_robust"]}
    if final_attack == "autoattack":
        orig_row["val_autoattack"] = judge.autoattack(job.original)
    orig_row["val_robust"] = orig_row.get("val_autoattack", orig_row["val_pgd"])
    candidates = {m: r for m, r in rows.items() if not r["control"]}
    outcome = choose(candidates, original["val_clean"], cfg.clean_drop_limit,
                     cfg.on_budget_miss if auto else "best_within")
    recommended = outcome["chosen"] if not outcome["budget_miss"] else None
    if auto:
        if outcome["chosen"] is None:
            raise InputError("no_method_ran", "auto had no method to choose from: "
                             + "; ".join(f"{k}: {v['detail']}" for k, v in skipped.items()),
                             "raise budget_minutes or list cheaper methods in selection.methods")
        chosen = outcome["chosen"]
    else:
        chosen = tuned_method
    if chosen == "unchanged":
        models["unchanged"] = copy.deepcopy(job.original)
        _save_state(models["unchanged"], ctx.path("state", "method_unchanged.safetensors"))

    model, _, splits = load_inputs(ctx)
    cache = ctx.path("state", "sanity.json")  # left by a compare of the same models (bench)
    torch.manual_seed(cfg.seed)  # the same evaluation whichever process trained the methods
    ev = evaluate(model.gm, models, splits, cfg.evaluation, seed=cfg.seed,
                  device=ctx.device, progress=lambda f: ctx.progress(0.5 + 0.5 * f),
                  cancelled=ctx.cancelled,
                  reuse_sanity=json.loads(cache.read_text()) if cache.exists() else None)
    _write_json(cache, ev.pop("sanity"))
    selection = {
        "split": "validation points held out from training and mining (never the test points)",
        "n": judge.n, "holdout_fraction": cfg.selection.holdout_fraction,
        "attack": final_attack, "pgd_params": judge.pgd_params(job.original),
        "rule": RULE.format(attack="AutoAttack" if final_attack == "autoattack" else "PGD"),
        "clean_drop_limit": cfg.clean_drop_limit, "on_budget_miss": cfg.on_budget_miss,
        "original": orig_row, "methods": rows, "outcome": outcome,
        "recommended": recommended, "chosen": chosen,
        "budget_minutes": cfg.budget_minutes, "elapsed_s": time.time() - plan["started_at"],
        "order": names if cfg.budget_minutes is not None else None}
    _write_json(ctx.path("state", "evaluation.json"), ev)
    _write_json(ctx.path("state", "selection.json"), selection)
    return {"recommended": recommended, "chosen": chosen, "methods": list(models),
            "infos": infos, "skipped": skipped, "selection": selection}


def _compare(ctx: "StageContext") -> dict:
    """The three parts in one process (the CLI, the benchmark; the service's last message, which
    finds every method done)."""
    plan = compare_plan(ctx)
    names = plan["methods"]
    setup = lru_cache(maxsize=1)(lambda: _method_setup(ctx))  # built only if a method trains
    for i, m in enumerate(names):
        compare_method(ctx, m, setup=setup,
                       progress=lambda f, i=i: ctx.progress(0.5 * (i + f) / len(names)))
    return compare_select(ctx)


# Controls are measured beside the methods but never recommended: they are not hardening.
CONTROLS = _registry_controls()


def _chosen(ctx: "StageContext") -> tuple[str, Path]:
    done = ctx.path("state", "compare.done.json")
    if done.exists():
        chosen = json.loads(done.read_text())["summary"]["chosen"]
        return chosen, ctx.path("state", f"method_{chosen}.safetensors")
    method = "dare" if ctx.config.method == "auto" else ctx.config.method
    return method, ctx.path("state", "tuned.safetensors")


def _export(ctx: "StageContext") -> dict:
    from safetensors.torch import load_file

    from .export import write_hardened

    model, _, splits = load_inputs(ctx)
    method, state_path = _chosen(ctx)
    out = ctx.path("artifacts")
    out.mkdir(parents=True, exist_ok=True)
    paths = write_hardened(model, load_file(str(state_path)), out, splits.x_test[:64])
    return {"method": method, "artifacts": sorted(Path(p).name for p in paths.values())}


def _evaluate(ctx: "StageContext") -> dict:
    from .evaluation import evaluate
    from .report import build_report, versions, write_report

    model, _, splits = load_inputs(ctx)
    method, state_path = _chosen(ctx)
    cached = ctx.path("state", "evaluation.json")
    if cached.exists():
        ev = json.loads(cached.read_text())  # the comparison already attacked every method
        comparison = ev
    else:
        hardened = _load_into(model.gm, state_path)
        ev = evaluate(model.gm, {method: hardened}, splits, ctx.config.evaluation,
                      seed=ctx.config.seed, device=ctx.device, progress=ctx.progress,
                      cancelled=ctx.cancelled)
        ev.pop("sanity")
        comparison = None
    done = {s: json.loads(ctx.path("state", f"{s}.done.json").read_text())
            for s in STAGES if ctx.path("state", f"{s}.done.json").exists()}
    timings = {s: d["seconds"] for s, d in done.items()}
    timings["evaluate"] = time.perf_counter() - ctx.timings.get("evaluate_start", time.perf_counter())
    sl, mi = done["slice"]["summary"], done["mine"]["summary"]
    report = build_report(
        config=ctx.config.model_dump(mode="json"), versions=versions(), timings_s=timings,
        evaluation=ev, chosen=method, clean_drop_limit=ctx.config.clean_drop_limit,
        slicing={"q": sl["q"], "key_synapse_fraction": sl["key_synapse_fraction"],
                 "nonzero_synapse_fraction": sl["nonzero_synapse_fraction"],
                 "layers_in_mt": sl["layers_in_mt"], "frozen_share": sl.get("frozen_share")},
        mining={"candidates": mi["candidates"], "mined": mi["mined"], "window": mi["window"],
                "mined_per_class": mi.get("mined_per_class"),
                **{k: mi[k] for k in ("pool", "baseline_samples") if k in mi}},
        comparison=comparison,
        selection=done["compare"]["summary"].get("selection") if "compare" in done else None,
        skipped=done["compare"]["summary"].get("skipped") if "compare" in done else None)
    write_report(report, ctx.path("artifacts"))
    ca = report["clean_accuracy"]
    return {"method": method, "clean_accuracy": ca,
            "mean_transfer_er": _mean(a["transfer_er"] for a in report["attacks"].values()),
            "mean_adaptive_accuracy": _mean(a["adaptive_accuracy"] for a in report["attacks"].values())}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


_RUNNERS: dict[str, Callable[[StageContext], dict]] = {
    "validate": _validate, "slice": _slice, "mine": _mine_stage, "tune": _tune,
    "compare": _compare, "export": _export, "evaluate": _evaluate,
}


def stage_done(workdir: Path, name: str) -> dict | None:
    """The recorded result of a finished stage, or None."""
    p = Path(workdir) / "state" / f"{name}.done.json"
    return json.loads(p.read_text()) if p.exists() else None


def run_stage(name: str, ctx: StageContext) -> dict:
    """Run one stage (idempotent: a finished stage returns its recorded summary). Also takes
    compare's parts (``PLAN``, ``method_run(m)``), which the service sends as their own messages;
    each keeps its result in state/ and returns a short summary."""
    if name == PLAN or name.startswith(METHOD_RUN):
        ctx.path("state").mkdir(parents=True, exist_ok=True)
        torch.manual_seed(ctx.config.seed)
        if name == PLAN:
            plan = compare_plan(ctx)
            return {"methods": plan["methods"], "needs": plan["needs"]}
        m = name[len(METHOD_RUN):]
        return _method_summary(m, compare_method(ctx, m))
    if name not in _RUNNERS:
        raise ValueError(f"unknown stage {name!r}; stages are {STAGES}")
    prev = stage_done(ctx.workdir, name)
    if prev is not None:
        return prev["summary"]
    ctx.path("state").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ctx.config.seed)
    t0 = time.perf_counter()
    ctx.timings[f"{name}_start"] = t0
    summary = _RUNNERS[name](ctx)
    seconds = time.perf_counter() - t0
    if name == "compare":  # its methods may have trained in other processes, since the plan
        seconds = max(seconds, summary["selection"]["elapsed_s"])
    record = {"stage": name, "seconds": seconds, "summary": summary}
    tmp = ctx.path("state", f"{name}.done.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(ctx.path("state", f"{name}.done.json"))
    shutil.rmtree(ctx.path("state", "resume"), ignore_errors=True)  # done: nothing to resume
    ctx.progress(1.0)
    return summary


def run_all(ctx: StageContext, on_stage: Callable[[str, int, int], None] = lambda s, i, n: None) -> dict:
    """Every stage in order (the CLI and the benchmark); returns the stages' summaries."""
    names = stage_names(ctx.config)
    out = {}
    for i, name in enumerate(names):
        on_stage(name, i, len(names))
        out[name] = run_stage(name, ctx)
    return out


def pick_device(requested: str = "auto") -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"
