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

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .config import STAGES, HardenConfig, stage_names  # noqa: F401 (re-exported)
from .errors import InputError

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


def _save_pt(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic: a killed stage never leaves half a file behind


def _load_pt(path: Path):
    return torch.load(path, weights_only=True)


def _save_state(gm: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in gm.state_dict().items()}, str(tmp))
    tmp.replace(path)


def _load_into(gm, path: Path):
    import copy

    from safetensors.torch import load_file

    m = copy.deepcopy(gm)
    m.load_state_dict(load_file(str(path)))
    return m


def _dataset_key(splits) -> str | None:
    return splits.name if splits.name != "upload" else None


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


def _mine(ctx: "StageContext", mode: str = "best"):
    from .mining import mine_oracles
    from .slicing import SliceResult

    model, history, splits = load_inputs(ctx)
    info = _analysis(ctx)
    sliced = SliceResult.from_state(_load_pt(ctx.path("state", "slice.pt")))
    return mine_oracles(model.gm, sliced.cut_node, info.output_node, history, splits.x_val,
                        splits.y_val, fraction=ctx.config.history_fraction, mode=mode,
                        seed=ctx.config.seed, device=ctx.device, progress=ctx.progress,
                        cancelled=ctx.cancelled)


def _mine_stage(ctx: "StageContext") -> dict:
    mined = _mine(ctx)
    _save_pt(mined.to_state(), ctx.path("state", "mined.pt"))
    classes = load_inputs(ctx)[0].num_outputs  # cached: the stage just loaded them
    return {"candidates": mined.candidates, "mined": len(mined.y), "window": mined.window,
            # how many samples got a tutor, per class: a class with few has little to tune on
            "mined_per_class": torch.bincount(mined.y, minlength=classes).tolist(),
            "tutors": {mined.window[i]: int(n) for i, n in
                       enumerate(torch.bincount(mined.tutor, minlength=len(mined.window)))}}


def harden(ctx: "StageContext", method: str, progress=None):
    """Build the model of one method: DARE, its variant/ablations or a baseline.

    Returns ``(model, info)``; every method starts from the same original model.
    """
    from . import baselines
    from .mining import MinedSet
    from .slicing import SliceResult, full_slice
    from .tuning import tune_dare, tune_full_model

    from .threat import linf_budget

    model, _, splits = load_inputs(ctx)
    cfg = ctx.config
    kw = dict(seed=cfg.seed, device=ctx.device, progress=progress or ctx.progress,
              cancelled=ctx.cancelled)
    # One threat model per job: every method trains against the budget the report attacks with.
    budget = linf_budget(cfg.evaluation.eps, splits.name, splits.x_test)["eps"]
    gm = model.gm
    if method in ("trades", "nfgsm", "awp"):
        from . import robust_training

        return getattr(robust_training, method)(gm, splits, cfg.baselines, cfg.robust, eps=budget,
                                                clean_drop_limit=cfg.clean_drop_limit, **kw)
    if method in ("dare", "dare_adv", "dare_s", "dare_rand", "dare_trades"):
        sliced = SliceResult.from_state(_load_pt(ctx.path("state", "slice.pt")))
        mined = MinedSet.from_state(_load_pt(ctx.path("state", "mined.pt")))
        adv = None
        if method == "dare_s":
            from .profiling import Profile

            prof = Profile(**_load_pt(ctx.path("state", "profile.pt")))
            sliced = full_slice(_analysis(ctx), prof, cfg.p)
        if method == "dare_rand":
            mined = _mine(ctx, mode="random")
        if method == "dare_adv":
            from .attacks import make_attack

            eps = cfg.tune.adv_eps if cfg.tune.adv_eps is not None else budget

            def adv(m):
                return make_attack("pgd", m, dataset=_dataset_key(splits), eps=eps, steps=5)
        if method == "dare_trades":
            from . import robust_training

            report = kw["progress"]
            dared, dare_info = tune_dare(gm, sliced, mined, cfg.tune,
                                         **{**kw, "progress": lambda f: report(0.1 * f)})
            return robust_training.dare_trades(
                gm, dared, dare_info, splits, cfg.baselines, cfg.robust, eps=budget,
                clean_drop_limit=cfg.clean_drop_limit,
                **{**kw, "progress": lambda f: report(0.1 + 0.9 * f)})
        return tune_dare(gm, sliced, mined, cfg.tune, adv_attack=adv, **kw)
    if method == "dare_sl":
        return tune_full_model(gm, MinedSet.from_state(_load_pt(ctx.path("state", "mined.pt"))),
                               cfg.tune, **kw)
    if method == "finetune_mined":
        mined = MinedSet.from_state(_load_pt(ctx.path("state", "mined.pt")))
        return baselines.finetune_mined(gm, mined.x, mined.y, cfg.tune, **kw)
    if method == "at_pgd_online":
        return baselines.pgd_online_training(gm, splits, cfg.baselines, eps=budget,
                                             clean_drop_limit=cfg.clean_drop_limit, **kw)
    if method.startswith("at_"):
        return baselines.adversarial_training(gm, method[3:], splits, cfg.baselines, eps=budget,
                                              clean_drop_limit=cfg.clean_drop_limit, **kw)
    raise ValueError(f"unknown method {method!r}")


def _tune(ctx: "StageContext") -> dict:
    method = "dare" if ctx.config.method == "auto" else ctx.config.method
    tuned, info = harden(ctx, method)
    _save_state(tuned, ctx.path("state", "tuned.safetensors"))
    return {"method": method, **{k: v for k, v in info.items() if _jsonable(v)}}


COMPARED = ("dare", "dare_adv", "at_fgsm", "at_bim", "at_pgd", "at_cw", "at_jsma", "at_pgd_online",
            "trades", "nfgsm", "awp", "dare_trades",
            "dare_s", "dare_sl", "dare_rand", "finetune_mined", "weight_noise")
# Controls are measured beside the methods but never recommended: they are not hardening.
CONTROLS = ("finetune_mined", "weight_noise")


def _compare(ctx: "StageContext") -> dict:
    from .evaluation import evaluate
    from .report import build_comparison

    model, _, splits = load_inputs(ctx)
    tuned_method = "dare" if ctx.config.method == "auto" else ctx.config.method
    models, infos, skipped = {}, {}, {}
    n = len(COMPARED)
    for i, method in enumerate(COMPARED):
        # Each method's model is saved as soon as it exists, so a compare stage that is killed
        # and re-run (or re-run under another protocol by the benchmark) resumes, not restarts.
        weights = ctx.path("state", f"method_{method}.safetensors")
        meta = ctx.path("state", f"method_{method}.json")
        if weights.exists() and meta.exists():
            models[method] = _load_into(model.gm, weights)
            infos[method] = json.loads(meta.read_text())
            continue
        t0 = time.perf_counter()
        if method == tuned_method:
            models[method] = _load_into(model.gm, ctx.path("state", "tuned.safetensors"))
            info = {"reused": "tune stage", **stage_done(ctx.workdir, "tune")["summary"]}
        elif method == "weight_noise":
            from .controls import weight_noise_like

            models[method], info = weight_noise_like(model.gm, models["dare"],
                                                     seed=ctx.config.seed, of="dare")
        else:
            from .robust_training import MethodUnavailable

            try:
                models[method], info = harden(ctx, method,
                                              progress=lambda f, i=i: ctx.progress(0.5 * (i + f) / n))
            except MethodUnavailable as e:  # e.g. AWP on a graph without weight parameters
                skipped[method] = e.reason
                continue
        info = {k: v for k, v in info.items() if _jsonable(v)}
        info.setdefault("seconds", time.perf_counter() - t0)
        infos[method] = info
        _save_state(models[method], weights)
        meta.write_text(json.dumps(info))
    cache = ctx.path("state", "sanity.json")  # left by a compare of the same models (bench)
    ev = evaluate(model.gm, models, splits, ctx.config.evaluation, seed=ctx.config.seed,
                  device=ctx.device, progress=lambda f: ctx.progress(0.5 + 0.5 * f),
                  cancelled=ctx.cancelled,
                  reuse_sanity=json.loads(cache.read_text()) if cache.exists() else None)
    cache.write_text(json.dumps(ev.pop("sanity")))
    if skipped:
        ev["skipped"] = skipped
    comp = build_comparison(ev, ctx.config.clean_drop_limit)
    if comp["recommended"] in CONTROLS:
        from .report import recommend

        comp["recommended"] = recommend({k: v for k, v in comp["methods"].items()
                                         if k not in CONTROLS}, ctx.config.clean_drop_limit)
    recommended = comp["recommended"] or tuned_method
    chosen = recommended if ctx.config.method == "auto" else tuned_method
    (ctx.path("state", "evaluation.json")).write_text(json.dumps(ev))
    return {"recommended": recommended, "chosen": chosen, "methods": list(models),
            "infos": infos, "skipped": skipped}


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
                "mined_per_class": mi.get("mined_per_class")},
        comparison=comparison)
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
    """Run one stage (idempotent: a finished stage returns its recorded summary)."""
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
    record = {"stage": name, "seconds": time.perf_counter() - t0, "summary": summary}
    tmp = ctx.path("state", f"{name}.done.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(ctx.path("state", f"{name}.done.json"))
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
