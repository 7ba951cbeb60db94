"""The job configuration: one validated object shared by the CLI, the worker and the API.

Defaults follow the paper (q = 95 %, p = 1, the latest half of the history) and DESIGN.md
(10-point clean-accuracy budget, fixed-epsilon evaluation of all five attacks on 500 samples).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EMBEDDED = ("digits", "mnist5k", "fashion")  # datasets shipped in installed (Python or Debian) packages
ATTACKS = ("fgsm", "bim", "pgd", "cw", "jsma")
AT_METHODS = tuple(f"at_{a}" for a in ATTACKS) + ("at_pgd_online",)
ROBUST_METHODS = ("trades", "nfgsm", "awp", "dare_trades")  # worker/engine/robust_training.py
ABLATIONS = ("dare_s", "dare_sl", "dare_rand", "finetune_mined", "weight_noise")
METHODS = ("dare", "dare_adv") + AT_METHODS + ROBUST_METHODS + ("auto",)
# Everything compare can train, in the report's order (methods.REGISTRY holds how).
COMPARE_METHODS = ("dare", "dare_adv") + AT_METHODS + ROBUST_METHODS + ABLATIONS
# Methods without one setting in the job's config: a job that ships one always chooses its
# grid point on the selection split.
GRID_ONLY_METHODS = AT_METHODS + ROBUST_METHODS


class _Strict(BaseModel):
    # Unknown keys are refused so a typo ("hisotry_fraction") is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=False)


class TuneConfig(_Strict):
    # A pilot on lenet/digits (bench/results/paper_tables.md has the settings): 10 epochs at 3e-3
    # reach the robustness of 30 at 1e-3 in a third of the time; 1e-2 costs clean accuracy.
    epochs: int = Field(10, ge=1, le=1000, description="passes over the mined set")
    lr: float = Field(3e-3, gt=0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    weight_decay: float = Field(0.0, ge=0)
    adv_eps: float | None = Field(
        None, gt=0, le=1, description="DARE-adv: L-inf budget of the PGD examples (default: the dataset's)")


class BaselineConfig(_Strict):
    """Adversarial training (paper 4.2 baselines). ``batch_size`` and ``max_train`` apply to every
    job; ``epochs``, ``lr_grid`` and ``adv_fraction_grid`` are the grid of the standalone
    ``baselines.adversarial_training`` / ``pgd_online_training`` functions only: a job trains the
    grid in ``selection.adversarial``."""

    epochs: int = Field(5, ge=1, le=200)
    lr_grid: list[float] = Field(default_factory=lambda: [1e-3, 3e-4])
    adv_fraction_grid: list[float] = Field(default_factory=lambda: [0.5])
    batch_size: int = Field(64, ge=1, le=4096)
    max_train: int = Field(2000, ge=10, description="training examples used to make adversarial ones")


class RobustConfig(_Strict):
    """The recipe constants of TRADES, N-FGSM, AWP and dare_trades (adversarial fine-tuning of the
    uploaded model; recipes and sources in worker/engine/robust_training.py). What is searched
    (epochs, lr, TRADES' beta, AWP's base) is their grid in ``selection.adversarial``; batch size
    and max_train are the ``baselines`` ones, so every adversarial method trains like for like."""

    eps_ramp_epochs: float = Field(
        2.0, ge=0, le=100, description="eps grows linearly from 0 to the budget over these first "
        "epochs (at most half of the grid's smallest epochs value, so every scored snapshot "
        "trains half its epochs at the full budget); 0: the full budget from the first step")
    attack_steps: int = Field(10, ge=1, le=100, description="TRADES and PGD-AT inner steps (size eps/4)")
    nfgsm_noise: float = Field(2.0, ge=0, le=10, description="N-FGSM noise U(-k eps, k eps): k")
    nfgsm_step: float = Field(1.0, gt=0, le=10, description="N-FGSM step: this times eps")
    awp_gamma: float | None = Field(
        None, ge=0, le=1, description="AWP's relative weight-perturbation size; null: the AWP paper's "
        "(0.01 on PGD-AT, 0.005 on TRADES)")
    awp_trades_beta: float = Field(6.0, ge=0, description="beta of AWP's TRADES base (the AWP paper's)")


def _nonempty_sorted(v):
    if v is None:
        return None
    if not v:
        raise ValueError("a grid needs at least one value")
    return sorted(dict.fromkeys(v))


class GridConfig(_Strict):
    """The values a method is trained with when it is selected (compare, auto, and jobs that ship
    a ``GRID_ONLY_METHODS`` method): every combination is trained and judged on the selection
    split. A parameter the method does not take is ignored for it; null in ``selection.overrides``
    keeps the family's list."""

    epochs: list[int] | None = Field(None, description="training epochs (one run per lr, snapshots "
                                                       "at each value)")
    lr: list[float] | None = Field(None, description="Adam learning rates")
    q: list[float] | None = Field(None, description="DARE: fraction of key synapses (top_fraction)")
    history_fraction: list[float] | None = Field(None, description="DARE: latest share of the "
                                                                   "history mined")
    adv_fraction: list[float] | None = Field(None, description="offline adversarial training: "
                                                               "weight of the adversarial loss")
    beta: list[float] | None = Field(None, description="TRADES (trades, dare_trades): weight of "
                                                       "the KL term (1/lambda)")
    awp_base: list[Literal["pgd", "trades"]] | None = Field(
        None, description="AWP: the method whose loss the weights are perturbed against")

    @field_validator("awp_base")
    @classmethod
    def _bases(cls, v):
        return _nonempty_sorted(v)

    @field_validator("epochs", "lr", "q", "history_fraction", "adv_fraction", "beta")
    @classmethod
    def _values(cls, v, info):
        v = _nonempty_sorted(v)
        if v is None:
            return v
        lo, hi, lo_ok = _GRID_RANGES[info.field_name]
        bad = [x for x in v if not ((lo <= x if lo_ok else lo < x) and x <= hi)]
        if bad:
            raise ValueError(f"{info.field_name} values must lie in {'[' if lo_ok else '('}{lo}, "
                             f"{hi}]: {bad}")
        return v


# (low, high, low included) per grid parameter
_GRID_RANGES = {"epochs": (1, 1000, True), "lr": (0, 1, False), "q": (0, 1, False),
                "history_fraction": (0, 1, False), "adv_fraction": (0, 1, True),
                "beta": (0, 100, True)}


def _dare_grid() -> GridConfig:
    # Two schedules (5 and 10 epochs: one 10-epoch run, snapshot at 5) at the two learning rates
    # of the lenet/digits pilot, the paper's q, and the latest half or all of the history.
    return GridConfig(epochs=[5, 10], lr=[1e-3, 3e-3], q=[0.95], history_fraction=[0.5, 1.0])


def _adversarial_grid() -> GridConfig:
    # TRADES' beta: the paper's MNIST (1) and CIFAR-10 (6) settings; AWP on both bases, as the
    # AWP paper reports both.
    return GridConfig(epochs=[3, 5], lr=[3e-4, 1e-3], adv_fraction=[0.5], beta=[1.0, 6.0],
                      awp_base=["pgd", "trades"])


ON_BUDGET_MISS = ("fail", "best_within", "original")


class SelectionConfig(_Strict):
    """How methods are trained and chosen: per-family grids, judged on a held-out part of the
    validation split that no method trains or mines on (never on the test points)."""

    dare: GridConfig = Field(default_factory=_dare_grid,
                             description="the DARE family's grid (dare, dare_adv, the ablations, "
                                         "finetune_mined)")
    adversarial: GridConfig = Field(default_factory=_adversarial_grid,
                                    description="the adversarial-training baselines' grid and "
                                                "the robust_training methods' (trades, nfgsm, awp, "
                                                "dare_trades)")
    overrides: dict[str, GridConfig] = Field(
        default_factory=dict, description="per-method replacements of single grid lists, e.g. "
                                          '{"at_pgd_online": {"epochs": [3]}}')
    methods: list[str] | None = Field(None, description="the methods compare runs (null: all)")
    holdout_fraction: float = Field(
        0.3, gt=0, lt=1, description="share of the validation split held out for selection "
                                     "(DARE mines the rest when the job selects)")
    n_val: int = Field(500, ge=10, le=100000, description="selection points (at most the holdout)")

    @field_validator("methods")
    @classmethod
    def _known(cls, v):
        if v is None:
            return v
        unknown = [m for m in v if m not in COMPARE_METHODS]
        if unknown or not v:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(COMPARE_METHODS)}")
        return list(dict.fromkeys(v))

    @field_validator("overrides")
    @classmethod
    def _known_keys(cls, v):
        unknown = [m for m in v if m not in COMPARE_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(COMPARE_METHODS)}")
        return v


# What the evaluation can run: the five attacks (each also an adversarial-training baseline) and
# AutoAttack, the field's standard robust accuracy (evaluation only; fixed_eps protocol only).
EVAL_ATTACKS = ATTACKS + ("autoattack",)


class AutoAttackConfig(_Strict):
    version: Literal["standard", "fast"] = Field(
        "standard", description="standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE + APGD-T only")


class EvaluationConfig(_Strict):
    protocol: Literal["fixed_eps", "minimal"] = "fixed_eps"
    attacks: list[Literal["fgsm", "bim", "pgd", "cw", "jsma", "autoattack"]] = Field(
        default_factory=lambda: list(EVAL_ATTACKS))
    autoattack: AutoAttackConfig = Field(default_factory=AutoAttackConfig)
    n_samples: int = Field(500, ge=1, le=100000)
    adaptive: bool = True
    eps: float | None = Field(None, gt=0, le=1, description="override the dataset's L-inf budget")
    cw_l2_radius: float | None = Field(
        None, gt=0, le=1000, description="fixed_eps: a C&W example counts only within this L2 "
                                         "distance (default: the dataset's, see attacks/budgets.py)")
    batch_size: int = Field(250, ge=1, le=8192)

    @field_validator("attacks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one attack is needed")
        return list(dict.fromkeys(v))


class MlflowOptions(_Strict):
    """A job's MLflow run: in which experiment, under which name (the tracking server is the
    operator's, never a job's: a job-supplied URL would make the worker call any address)."""
    experiment: str | None = Field(None, min_length=1, max_length=256,
                                   description="default: DARE_MLFLOW_EXPERIMENT ('dare')")
    run_name: str | None = Field(None, min_length=1, max_length=256,
                                 description="default: dare-<job id prefix>")


class HardenConfig(_Strict):
    q: float = Field(0.95, gt=0, le=1, description="fraction of key synapses kept per class and layer")
    p: int = Field(1, ge=1, le=16, description="parametric layers removed to make M_T")
    history_fraction: float = Field(0.5, gt=0, le=1, description="latest fraction of checkpoints mined")
    seed: int = Field(0, ge=0)
    clean_drop_limit: float = Field(0.10, ge=0, le=1)
    method: Literal["dare", "dare_adv", "at_fgsm", "at_bim", "at_pgd", "at_cw", "at_jsma",
                    "at_pgd_online", "trades", "nfgsm", "awp", "dare_trades", "auto"] = "dare"
    compare: bool = False
    dataset: str | None = Field(None, description="embedded dataset name instead of an uploaded .npz")
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="embedded datasets: the share of the non-test data used as "
        "validation (DARE mines it; baselines select on it); null: the dataset's default "
        "(digits, mnist5k 0.25, i.e. 60/20/20; fashion 0.5, the paper's 50/50)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tune: TuneConfig = Field(default_factory=TuneConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    on_budget_miss: Literal["fail", "best_within", "original"] = Field(
        "best_within", description="auto, when no method keeps the clean budget on the selection "
        "split: fail the job (no_method_within_budget), ship the method that comes closest to it "
        "(the smallest validation clean drop), or ship the original model unchanged")
    budget_minutes: float | None = Field(
        None, gt=0, le=100000, description="bound on the whole compare stage: methods run "
        "cheapest-first by an estimate from one timed batch; those that do not fit are skipped")
    # Service-level fields (the engine ignores them): where service.jobs.webhooks POSTs this job's
    # events. Only the shape is checked here; the API refuses private addresses at submission.
    webhook_url: str | None = Field(None, max_length=2048,
                                    description="http(s) URL that receives signed job events")
    webhook_stage_events: bool = Field(False, description="also send job.stage_started/finished")
    # Where service.jobs.mlflow_log records this job (the operator's DARE_MLFLOW_TRACKING_URI):
    # false opts out; an object names the experiment and the run.
    mlflow: bool | MlflowOptions = Field(True, description="log the finished job to MLflow "
                                         "(when the server has DARE_MLFLOW_TRACKING_URI)")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError as e:
            raise ValueError(f"not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL, e.g. "
                             "https://hooks.example.com/dare")
        return v


def parse_config(raw: dict | str | None) -> HardenConfig:
    """Validate a user config; raise ``InputError('invalid_config', ...)`` naming the bad field."""
    import json

    from pydantic import ValidationError

    from .errors import InputError

    if raw is None or raw == "":
        return HardenConfig()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError("invalid_config", f"config is not valid JSON: {e}",
                             'send a JSON object, e.g. {"q": 0.95}') from None
    if not isinstance(raw, dict):
        raise InputError("invalid_config", "config must be a JSON object", 'e.g. {"q": 0.95}')
    try:
        return HardenConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise InputError("invalid_config", f"config field {loc!r}: {first['msg']}",
                         "see the configuration table in the README") from None


# The job's stages live here, not in stages.py, so the API can plan a job without importing torch.
# compare (only when asked) runs before export: with method "auto" the artifacts come from the
# method it recommends, and evaluate reuses its attack results instead of attacking twice.
STAGES = ("validate", "slice", "mine", "tune", "compare", "export", "evaluate")


def stage_names(config: HardenConfig) -> list[str]:
    """The stages a job runs, in order (``compare`` only when asked for)."""
    wanted = config.compare or config.method == "auto"
    return [s for s in STAGES if s != "compare" or wanted]
