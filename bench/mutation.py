"""Mutation testing of the core modules with cosmic-ray: does the suite notice a one-line bug?

    python -m bench.mutation                      # every module in MODULES (hours)
    python -m bench.mutation worker/engine/tuning.py service/api/quotas.py --budget-min 20
    DARE_TEST_REDIS=redis://127.0.0.1:6379/7 python -m bench.mutation service/api/uploads.py &
                                                  # modules in parallel: one Redis db each

Why cosmic-ray (8.x): it mutates one module on disk and runs any shell command as the test, so
each module is checked against exactly the test files that cover it (MODULES below), with the
real PostgreSQL, Redis and subprocesses those tests use; its sessions are SQLite files that a
later run resumes, which matters when a module takes longer than one sitting. mutmut 3 runs
mutants in forked copies of one pytest process, which does not mix well with tests that start
servers and workers.

Each module is mutated in its own scratch copy of the repository (``--scratch``, outside the
work tree), so the checkout is never touched. Only operators that make a plausible one-line bug
are used (OPERATORS); cosmic-ray's full set adds every binary operator for every other, which
multiplies the count by ten with mutants nobody would write. A timed-out run counts as killed
by cosmic-ray; it is shown in its own column. The per-module table is printed and written to
bench/results/mutation.md, with the mutants judged equivalent (EQUIVALENT) left out of the score.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP = "<!-- kept by bench/mutation.py: hand-written below -->"

# module -> the tests that cover it (files or pytest node ids; the ones a reviewer would expect to
# catch a bug there), fastest first: a killed mutant stops at its first failing test (-x).
_B = "tests/engine/test_behaviours.py::test_"
_SB = "tests/service/test_behaviours.py::test_"
_ATTACKS = ["tests/engine/test_attack_params.py", "tests/engine/test_attacks.py"]
MODULES: dict[str, list[str]] = {
    "worker/engine/tuning.py": [f"{_B}weight_decay_never_moves_a_weight_outside_every_class_mask",
                                f"{_B}tuning_progress_ends_at_one_and_an_empty_mined_set_changes_nothing",
                                f"{_B}dare_sl_reports_the_mean_loss_of_its_first_epoch",
                                "tests/engine/test_tuning.py"],
    "worker/engine/mining.py": [f"{_B}a_wrong_final_model_counts_as_confidence_zero",
                                "tests/engine/test_mining.py", "tests/engine/test_tuning.py"],
    "worker/engine/slicing.py": ["tests/engine/test_slicing.py", "tests/engine/test_tuning.py"],
    "worker/engine/transform.py": ["tests/engine/test_transform.py", "tests/engine/test_tuning.py"],
    "worker/engine/evaluation.py": ["tests/engine/test_evaluation_bookkeeping.py",
                                    f"{_B}the_adaptive_attack_is_built_against_each_hardened_model",
                                    f"{_B}adaptive_accuracy_is_the_hardened_model_on_its_own_attack",
                                    f"{_B}evaluation_eps_reaches_every_linf_attack",
                                    "tests/engine/test_perturbation_stats.py",
                                    "tests/engine/test_evaluation.py"],
    "worker/engine/report.py": [f"{_B}a_drop_exactly_at_the_budget_is_within_it",
                                f"{_B}a_method_without_an_adaptive_score_ranks_last",
                                f"{_B}report_files_take_numpy_and_torch_scalars_and_can_be_rewritten",
                                "tests/engine/test_report.py"],
    "worker/engine/attacks/base.py": _ATTACKS,
    "worker/engine/attacks/fgsm.py": _ATTACKS,
    "worker/engine/attacks/bim.py": _ATTACKS,
    "worker/engine/attacks/pgd.py": _ATTACKS,
    "worker/engine/attacks/sign_steps.py": _ATTACKS,
    "worker/engine/attacks/cw.py": ["tests/engine/test_cw_edges.py", *_ATTACKS,
                                    "tests/engine/test_bounded_cw.py"],
    "worker/engine/attacks/jsma.py": ["tests/engine/test_jsma_edges.py", *_ATTACKS],
    "worker/engine/attacks/minimal.py": _ATTACKS,
    "worker/engine/attacks/__init__.py": _ATTACKS,
    "worker/engine/archive_safety.py": ["tests/engine/test_archive_safety.py",
                                        "tests/service/test_hostile.py",
                                        "tests/engine/test_modelio.py", "tests/service/test_uploads.py"],
    "service/api/idempotency.py": [f"{_SB}a_same_size_change_of_a_file_is_another_request",
                               "tests/service/test_idempotency.py"],
    "service/api/quotas.py": ["tests/service/test_quotas.py"],
    "service/api/auth.py": ["tests/service/test_auth_edges.py",
                            "tests/service/test_read_cost.py::test_the_cache_expires_forgets_on_"
                            "revocation_and_stays_bounded",
                            "tests/service/test_auth.py", "tests/service/test_isolation.py"],
    "service/api/uploads.py": ["tests/service/test_upload_edges.py", "tests/service/test_uploads.py",
                               "tests/service/test_hostile.py",
                               "tests/service/test_upload_deadlines.py"],
    "service/jobs/reconciler.py": [f"{_SB}a_long_stage_with_a_fresh_heartbeat_keeps_its_lease",
                              "tests/service/test_reconciler.py",
                              *[f"tests/service/test_fanout.py::test_{t}" for t in (
                                  "reconciler_resends_only_the_method_whose_worker_died",
                                  "a_live_method_beside_a_dead_one_does_not_hold_back_the_resend",
                                  "a_young_queued_method_does_not_end_the_look_at_the_ones_after_it",
                                  "a_cancel_that_no_worker_will_see_is_ended_at_the_first_waiting_"
                                  "method",
                                  "methods_wait_from_the_plans_end_not_from_the_jobs_last_update",
                                  "a_cancel_with_a_dead_method_worker_is_ended_by_the_reconciler",
                                  "a_method_still_waiting_in_the_queue_does_not_end_the_look_at_the_"
                                  "others",
                                  "a_throttled_method_does_not_end_the_look_at_the_others",
                                  "a_method_that_keeps_losing_its_worker_fails_the_job_and_ends_"
                                  "the_others")]],
    "service/jobs/pipeline.py": ["tests/service/test_pipeline_edges.py", "tests/service/test_pipeline.py",
                            *[f"tests/service/test_fanout.py::test_{t}" for t in (
                                "compare_sends_each_method_and_the_last_one_sends_the_choice",
                                "cancel_during_the_fan_out_runs_no_further_method",
                                "a_method_that_keeps_losing_its_worker_fails_the_job_and_ends_"
                                "the_others")],
                            "tests/service/test_behaviours.py",
                            "tests/service/test_reconciler.py"],
}

# cosmic-ray operator names kept (core/<name>): each is a bug someone could write in one line.
OPERATORS = [
    "ReplaceBinaryOperator_Add_Sub", "ReplaceBinaryOperator_Sub_Add",
    "ReplaceBinaryOperator_Mul_Div", "ReplaceBinaryOperator_Div_Mul",
    "ReplaceBinaryOperator_FloorDiv_Mul", "ReplaceBinaryOperator_Mod_FloorDiv",
    "ReplaceBinaryOperator_Pow_Mul", "ReplaceBinaryOperator_BitAnd_BitOr",
    "ReplaceBinaryOperator_BitOr_BitAnd",
    "ReplaceComparisonOperator_Eq_NotEq", "ReplaceComparisonOperator_NotEq_Eq",
    "ReplaceComparisonOperator_Lt_LtE", "ReplaceComparisonOperator_LtE_Lt",
    "ReplaceComparisonOperator_Gt_GtE", "ReplaceComparisonOperator_GtE_Gt",
    "ReplaceComparisonOperator_Lt_GtE", "ReplaceComparisonOperator_LtE_Gt",
    "ReplaceComparisonOperator_Gt_LtE", "ReplaceComparisonOperator_GtE_Lt",
    "ReplaceComparisonOperator_Is_IsNot", "ReplaceComparisonOperator_IsNot_Is",
    "ReplaceUnaryOperator_USub_UAdd", "ReplaceUnaryOperator_Delete_Not",
    "ReplaceUnaryOperator_Delete_Invert",
    "AddNot", "ReplaceTrueWithFalse", "ReplaceFalseWithTrue", "ReplaceAndWithOr",
    "ReplaceOrWithAnd", "ReplaceBreakWithContinue", "ReplaceContinueWithBreak",
    "NumberReplacer", "ZeroIterationForLoop", "ExceptionReplacer",
]

# Surviving mutants judged equivalent (no behaviour changes), left out of the score:
# (module or "*", operator, a piece of the line as committed or as mutated, why).
EQUIVALENT: list[tuple[str, str, str, str]] = [
    ("worker/engine/attacks/minimal.py", "ReplaceBreakWithContinue", "break",
     "with no sample left to attack, the remaining radii run on empty batches and change "
     "nothing (only time)"),
    ("worker/engine/attacks/minimal.py", "NumberReplacer", "batch_size: int = 250",
     "harmless: a default batch size; the search's result does not depend on it (every caller "
     "passes the job's)"),
    ("worker/engine/attacks/minimal.py", "NumberReplacer", "if todo.numel() == -1:",
     "never true: like break made continue, the remaining radii run on empty batches and change "
     "nothing (only time)"),
    *[("worker/engine/attacks/minimal.py", "NumberReplacer", f"round({term}, {digits})",
       "EPS_GRID's values have at most two decimals past 0.2 and three below: rounding them to "
       "one more digit, or to two past 0.2, gives the same floats")
      for term, digits in [("0.005 * i", 4), ("0.2 + 0.02 * i", 4), ("0.2 + 0.02 * i", 2),
                           ("0.5 + 0.05 * i", 4), ("0.5 + 0.05 * i", 2)]],
    ("worker/engine/attacks/pgd.py", "ReplaceBinaryOperator_Add_Sub",
     "start = (x - torch.empty_like(x).uniform_(-self.eps, self.eps))",
     "U(-eps, eps) is symmetric: x - u has the distribution of x + u (the random start's "
     "samples differ for a seed, their law does not)"),
    ("worker/engine/attacks/pgd.py", "NumberReplacer",
     "start = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(",
     "harmless: the random start's clamp to [0, 1] made wider; every step projects onto [0, 1] "
     "again, so only where the first gradient is taken moves, for pixels within eps of 0 or 1"),
    ("worker/engine/attacks/sign_steps.py", "ReplaceBinaryOperator_Mul_Div",
     "x_start: Tensor, /, eps: float",
     "the keyword-only marker `*` made `/`: every caller passes the four tensors by position "
     "and eps, alpha and steps by keyword, which both signatures accept"),
    ("service/jobs/reconciler.py", "NumberReplacer", "socket_timeout=5, socket_connect_timeout=5",
     "harmless: how long the look into the broker waits on a hung Redis; any few seconds behave "
     "alike, and a failed look falls back to the age rule"),
    ("*", "ReplaceBinaryOperator_BitOr_BitAnd", "| None",
     "a type annotation: with `from __future__ import annotations` it is never evaluated"),
    ("worker/engine/report.py", "ReplaceComparisonOperator_LtE_Lt",
     "original - hardened <= clean_drop_limit + _EPS",
     "with the 1e-12 tolerance '<' and '<=' differ only when the drop is exactly budget + 1e-12"),
    ("worker/engine/report.py", "NumberReplacer", "else - 2.0, m[\"clean_accuracy\"]",
     "a missing adaptive score ranks last with any negative stand-in: accuracies are >= 0"),
    ("worker/engine/report.py", "NumberReplacer", "json.dumps(report, indent=2, allow_nan=False)",
     "harmless: report.json's indentation; every reader parses the same object"),
    ("worker/engine/report.py", "ReplaceBinaryOperator_Mul_Div",
     "clean_drop_limit: float, /, original_clean",
     "the keyword-only marker `*` made `/`: every caller passes methods and the limit by "
     "position and original_clean by keyword, which both signatures accept"),
    ("worker/engine/report.py", "ReplaceFalseWithTrue", "allow_nan=False",
     "_jsonable has already turned NaN and inf into null, so there is no NaN left to allow"),
    ("service/api/idempotency.py", "ReplaceTrueWithFalse", "sort_keys=True",
     "the canonical dicts are built from sorted items, and a hash is only ever compared with one "
     "made by the same code: sort_keys and ensure_ascii change no comparison"),
    ("worker/engine/tuning.py", "NumberReplacer", "seed: int = 0,",
     "harmless: a default seed (tune_dare, tune_full_model); the stages always pass the job's"),
    ("worker/engine/tuning.py", "NumberReplacer", "c = int(y[b[0]])",
     "every batch holds one class, so any of its samples names the batch's class (b[1] differs "
     "only for a one-sample batch, where it raises)"),
    ("worker/engine/tuning.py", "ZeroIterationForLoop", "for p in model.parameters():",
     "_freeze_all: what it would leave trainable is M_T's parameters, made trainable right after, "
     "or the removed layers', which M_T's graph never reaches: no gradient, no change"),
    ("worker/engine/tuning.py", "ReplaceTrueWithFalse", "opt.zero_grad(set_to_none=False)",
     "every parameter in the optimiser is in M_T's graph, so each backward writes every .grad: "
     "zeroed or None beforehand, the step is the same"),
    ("worker/engine/tuning.py", "NumberReplacer", "total / max(count, 0)",
     "an empty mined set returns before the loop, so every epoch counts at least one sample"),
    ("worker/engine/tuning.py", "NumberReplacer", "if len(x) else -1)",
     "range(-1) is as empty as range(0)"),
    ("worker/engine/mining.py", "NumberReplacer", "tutor = torch.full_like(y, - 2)",
     "the 'no tutor' mark: any negative value is left out by `tutor >= 0`"),
    ("worker/engine/mining.py", "NumberReplacer", "fraction: float = 1.5",
     "t - ceil(1.5 t) = -ceil(0.5 t): the negative start index picks the same latest half"),
    ("worker/engine/mining.py", "ReplaceBinaryOperator_Mul_Div", "y: torch.Tensor, /, fraction",
     "the keyword-only marker `*` made `/` (x, y positional-only): every caller passes x and y by "
     "position and the rest by keyword, which both signatures accept"),
    ("worker/engine/mining.py", "NumberReplacer", "seed: int = 0, batch_size: int = 500,",
     "harmless defaults: the mine stage passes the job's seed, and the batch size changes no "
     "result (test_mining_does_not_depend_on_the_batch_size)"),
    ("worker/engine/mining.py", "NumberReplacer", "len(targets) / max(len(idx), 0))",
     "the tutors' loop runs only when some sample has a tutor, so len(idx) is never 0 there"),
    ("worker/engine/mining.py", "NumberReplacer", "the model lacks: {unexpected[:",
     "harmless: how many of the unknown tensor names the error message quotes"),
    ("worker/engine/slicing.py", "NumberReplacer", "/ total, 5)",
     "harmless: the frozen share's reported rounding (5 digits instead of 6)"),
    ("worker/engine/slicing.py", "NumberReplacer", "/ total, 7)",
     "harmless: the frozen share's reported rounding (7 digits instead of 6)"),
    ("worker/engine/slicing.py", "NumberReplacer", ".mean()), 5)",
     "harmless: the per-layer frozen share's reported rounding (5 digits instead of 6)"),
    ("worker/engine/slicing.py", "NumberReplacer", ".mean()), 7)",
     "harmless: the per-layer frozen share's reported rounding (7 digits instead of 6)"),
    ("worker/engine/slicing.py", "NumberReplacer", "nrm.bias_key].shape[ -1]",
     "a norm's weight and bias are 1-D: their last dimension is their first"),
    ("worker/engine/slicing.py", "ReplaceOrWithAnd", "nrm.weight_key and nrm.bias_key",
     "a norm has both an affine weight and bias or neither, and both have its channel count"),
    ("worker/engine/slicing.py", "NumberReplacer", "if w.dim() > 3 else w",
     "the graph analysis takes only conv2d (4-D weights) and linear (2-D) layers: > 2 and > 3 "
     "split them the same way (a conv1d model is refused, checked)"),
    ("worker/engine/slicing.py", "NumberReplacer", "contrib_acc[layers[-1].node][c] = 2.0",
     "formula 2 is linear in the output neuron's CONTRIB: a positive scale changes no ranking "
     "and no sign, so no mask"),
    ("worker/engine/slicing.py", "NumberReplacer", ".shape[0] if masks else 0",
     "frozen_shares always gets M_T's masks, never none (graph.cut keeps k >= 1 layers)"),
    ("worker/engine/slicing.py", "NumberReplacer", ".shape[0] if masks else 2",
     "frozen_shares always gets M_T's masks, never none (graph.cut keeps k >= 1 layers)"),
    ("worker/engine/slicing.py", "NumberReplacer", "total = max(1, sum(m[0].numel() for m in",
     "every class's mask has the same shape (m[1], m[-1] are as big as m[0]), and M_T's masks "
     "hold far more than 2 elements, so max(0 or 2, ...) is the sum too"),
    ("worker/engine/slicing.py", "NumberReplacer", "kept / max(total, ",
     "total counts every synapse of M_T for every class: never below 2"),
    ("worker/engine/slicing.py", "NumberReplacer", "sum(nonzero_frac) / max(len(nonzero_frac), ",
     "one entry per class and M_T layer: never below 2"),
    ("worker/engine/slicing.py", "NumberReplacer", "slice_model(info, prof, 2.0, p)",
     "full_slice: q = 2 gives a negative frozen count, and argsort[:-n] of n values freezes "
     "nothing, exactly as q = 1; the masks are then set to all-true anyway"),
    ("worker/engine/transform.py", "NumberReplacer", "(out - target).flatten( 3)",
     "M_T's outputs are 2-D or 4-D: flattening a 4-D one from dim 3 keeps (N, U, H, W), and the "
     "mean over the selected channels is over the same numbers"),
    ("worker/engine/transform.py", "NumberReplacer", "if out.dim() > 3 else",
     "a 3-D output would take the other branch, whose unsqueeze keeps the same numbers per "
     "neuron: the selection and the mean are unchanged"),
    ("worker/engine/attacks/base.py", "NumberReplacer", "*, batch_size: int = 250) -> None:",
     "the base class's default is never used: every attack class passes its own batch_size"),
    ("worker/engine/attacks/base.py", "ReplaceBinaryOperator_Mul_Div",
     "model: nn.Module, /, batch_size: int = 250",
     "the keyword-only marker `*` made `/`: subclasses pass model by position and batch_size by "
     "keyword, which both signatures accept"),
    ("worker/engine/attacks/base.py", "NumberReplacer",
     "x: Tensor, batch_size: int = 250) -> Tensor:",
     "harmless default: predict's result does not depend on its batch size (test_attack_params)"),
    ("worker/engine/attacks/base.py", "NumberReplacer", "y.shape[ -1] != x.shape[0]",
     "y is checked to be 1-D just before, so its last dimension is its first"),
    ("worker/engine/evaluation.py", "ReplaceBinaryOperator_Mul_Div", "y: torch.Tensor, /,",
     "the keyword-only marker `*` made `/` (run_batched, run_minimal_batched): every caller "
     "passes the tensors by position and the rest by keyword, which both signatures accept"),
    ("worker/engine/evaluation.py", "ReplaceBinaryOperator_Mul_Div", "cfg: EvaluationConfig, /,",
     "the keyword-only marker `*` made `/` (evaluate): every caller passes the original, the "
     "hardened models, the splits and the config by position, the rest by keyword"),
    ("worker/engine/evaluation.py", "NumberReplacer", "batch_size: int = 500) ->",
     "harmless default (predict, accuracy): a prediction does not depend on the batch size "
     "(test_attack_params), and the evaluation always passes the job's"),
    ("worker/engine/evaluation.py", "NumberReplacer", "seed: int = 0, device=\"cpu\", progress",
     "harmless default: both stages that evaluate pass the job's seed"),
    ("worker/engine/evaluation.py", "NumberReplacer", "out else x[: 1].clone()",
     "the empty result of an empty input: x[:1] of an empty x is as empty as x[:0]"),
    ("worker/engine/evaluation.py", "NumberReplacer", "out else x[: -1].clone()",
     "the empty result of an empty input: x[:-1] of an empty x is as empty as x[:0]"),
    ("worker/engine/evaluation.py", "NumberReplacer", "return x[: 1].clone(), torch.zeros(0",
     "the empty result of an empty input: x[:1] of an empty x is as empty as x[:0]"),
    ("worker/engine/evaluation.py", "NumberReplacer", "return x[: -1].clone(), torch.zeros(0",
     "the empty result of an empty input: x[:-1] of an empty x is as empty as x[:0]"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "_K_START = ",
     "only speed: the candidate rounds stop only where the bound proves the pair exact, from any "
     "first list length (test_best_pairs_is_exact)"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "_PAIR_ELEMS = ",
     "only memory: the exhaustive search's chunk size (max(1, ...) keeps it a positive count)"),
    ("worker/engine/attacks/jsma.py", "ReplaceComparisonOperator_Lt_LtE", "while 2 * k < nf:",
     "only speed: where the candidate rounds hand over to the exhaustive search, which is exact"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "while 2 * k < nf:",
     "only speed: where the candidate rounds hand over to the exhaustive search, which is exact"),
    ("worker/engine/attacks/jsma.py", "AddNot", "if todo.numel() == 0:",
     "only speed: leaving the candidate rounds early sends the rows left to the exact exhaustive "
     "search"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "if todo.numel() == 0:",
     "only speed: leaving the candidate rounds early sends the rows left to the exact exhaustive "
     "search"),
    ("worker/engine/attacks/jsma.py", "ReplaceComparisonOperator_Eq_NotEq", "if todo.numel() == 0:",
     "only speed: leaving the candidate rounds while rows remain sends them to the exact "
     "exhaustive search"),
    ("worker/engine/attacks/jsma.py", "ReplaceComparisonOperator_LtE_Lt", "exact = bound <= sc",
     "only speed: a row whose bound equals its best candidate score goes on to a larger round or "
     "the exhaustive search, which find the same score"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "k *= 4",
     "only speed: the candidate lists grow 3x or 5x a round instead of 4x; each round is exact "
     "where the bound says so"),
    ("worker/engine/attacks/jsma.py", "ReplaceBinaryOperator_Sub_Add",
     "chunk = max(1, _PAIR_ELEMS // (nf * (nf - 1) // 2))",
     "only memory: the chunk of rows sized for nf(nf+1)/2 pairs instead of nf(nf-1)/2"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "a.index_select(1, j)).clamp_(min= -1)",
     "a pair's score with its a-sum clamped at -1 instead of 0 is negative exactly where the "
     "original is 0 (the c-sum is clamped at 0): every positive score is unchanged"),
    ("worker/engine/attacks/jsma.py", "ReplaceBreakWithContinue", "break",
     "the attack loop's early exit (no image left): the remaining rounds run on empty batches "
     "and change nothing (only time); the pair search's `break` made `continue` loops forever "
     "and is killed by the timeout"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "(y.shape[ -1],)",
     "y is 1-D (checked by the base class): its last dimension is its first"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "c.index_select(1, j)).clamp_(min= -1))",
     "a pair's score with its c-sum clamped at -1 instead of 0 is negative exactly where the "
     "original is 0 (the a-sum is clamped at 0 first): every positive score, hence the best "
     "pair and whether one exists, is unchanged"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer",
     "clamp_(min=0) * (tc[:, -1:] + rc).clamp_(min=0)",
     "the pruning bound's clamps at 1 or -1 instead of 0: a factor above 0 is unchanged, and a "
     "term with a factor below 0 only rises (more rounds) or stays below the candidates' score"),
    ("worker/engine/attacks/jsma.py", "ReplaceBinaryOperator_FloorDiv_Mul",
     "chunk = max(1, _PAIR_ELEMS // (nf * (nf - 1) // 2))",
     "only memory: the exhaustive search's chunk of rows made larger or smaller (never 0)"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "max( 2, _PAIR_ELEMS",
     "only memory: two rows per chunk of the exhaustive search instead of one at the least"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "(nf - 0) // 2))",
     "only memory: the chunk of rows sized for nf^2/2 pairs instead of nf(nf-1)/2"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "(nf - 1) // 1))",
     "only memory: the chunk of rows sized for twice the pairs"),
    ("worker/engine/attacks/jsma.py", "ReplaceComparisonOperator_Gt_GtE",
     "s = 1.0 if self.theta > 0 else -1.0",
     "theta 0 is refused by the constructor, so > 0 and >= 0 split the same values"),
    ("worker/engine/attacks/jsma.py", "ReplaceComparisonOperator_Gt_GtE",
     "domain = xf < 1 - _MIN_MOVE if s > 0 else xf > _MIN_MOVE",
     "s is 1.0 or -1.0, never 0"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "s = 2.0 if self.theta",
     "s only scales the saliency terms: (2a)(2c) ranks the pairs as ab does, with the same signs"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "else - 2.0",
     "s only scales the saliency terms: (2a)(2c) ranks the pairs as ab does, with the same signs"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", ")[ -1]",
     "autograd.grad of one input returns a 1-tuple: its element -1 is its element 0"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "seed: int = 0, *, batch_size: int = 250)",
     "harmless defaults: make_attack passes default_params' seed, and the result does not depend "
     "on the batch size (test_jsma_result_does_not_depend_on_batch_size)"),
    ("worker/engine/evaluation.py", "NumberReplacer", "max(finite, default= 1.0) or 1.0",
     "with nothing finite the top is 1.0 either way (the default 1.0, or 0.0 made 1.0 by `or`)"),
    ("worker/engine/archive_safety.py", "NumberReplacer", "_READ_CHUNK = ",
     "harmless: the read size (512 KiB to 2 MiB instead of 1 MiB); the caps are checked on the "
     "running total after every read, so only how far past a limit a bomb is read changes"),
    ("worker/engine/archive_safety.py", "ReplaceBinaryOperator_Mul_Div", "what: str, /, max_total",
     "the keyword-only marker `*` made `/` (check_members): both callers pass the archive and "
     "its name by position and the limits by keyword"),
    ("service/jobs/reconciler.py", "NumberReplacer", "JobEvent.at >= run.since)) or ",
     "COUNT() never returns NULL, so the `or 0` fallback is never taken"),
    ("service/api/auth.py", "NumberReplacer", "KEY_CACHE_SIZE = 4096",
     "harmless rather than equivalent: how many keys one API process remembers is a tuning "
     "constant (the bound itself is tested with a cache of size 2)"),
    ("service/api/auth.py", "NumberReplacer", "KEY_CACHE_TTL_S = 5.0",
     "harmless rather than equivalent: the cache's lifetime is a tuning constant (expiry at the "
     "TTL is tested with a TTL of 5 given explicitly)"),
    ("service/api/auth.py", "NumberReplacer", "_revocations = 0",
     "the revocation counter's starting value: only whether it changed between a lookup and its "
     "use matters"),
    ("service/api/auth.py", "ReplaceBinaryOperator_Mul_Div", "tenant: str, /, max_active_jobs",
     "the keyword-only marker `*` made `/` (create_api_key): every caller passes the session and "
     "tenant by position and the quota by keyword"),
    ("service/api/auth.py", "ReplaceComparisonOperator_Gt_GtE",
     "now - api_key.last_used_at > LAST_USED_RESOLUTION",
     "differs only for a key used again exactly one minute later to the microsecond: one write "
     "more or less of last_used_at"),
    ("service/api/uploads.py", "NumberReplacer", "rsplit(\"/\", 2)[-1]",
     "the last of at most three pieces is the last of two: the same final path component"),
    ("service/api/uploads.py", "NumberReplacer", "rsplit(\"\\\\\", 2)[-1]",
     "the last of at most three pieces is the last of two: the same final path component"),
    ("service/api/uploads.py", "NumberReplacer", "MAX_PART_HEADER_BYTES = ",
     "python-multipart refuses a part header over 4,224 bytes before the service's own 16 KiB "
     "bound is reached, so moving that bound by a KiB changes nothing (a header far over both "
     "is refused: test_an_endless_part_header_is_refused_as_a_bad_form)"),
    ("service/api/uploads.py", "NumberReplacer", "DRAIN_BYTES = ",
     "harmless rather than equivalent: how much of a refused body is read away so the client "
     "sees the answer is a tuning constant (the cap itself is tested against the constant)"),
    ("service/jobs/pipeline.py", "ReplaceTrueWithFalse", "exc_info=True)",
     "harmless: whether a warning (an object that could not be deleted, a lost heartbeat, "
     "progress write or cancel poll) carries its traceback"),
    ("service/jobs/pipeline.py", "NumberReplacer", "planned: int = ",
     "the default is never read: only a method's claim reads planned, and it is always made "
     "with the plan's count"),
    ("service/jobs/pipeline.py", "NumberReplacer", "overall_progress(claim.stages, claim.index, 2.0)",
     "overall_progress clamps the stage's fraction to [0, 1]: 2.0 reads as 1.0"),
    ("service/jobs/pipeline.py", "NumberReplacer", "self._thread.join(timeout=",
     "harmless: how long a finished stage waits for its heartbeat thread, which stops within one "
     "heartbeat interval (seconds below either bound)"),
    ("service/jobs/pipeline.py", "NumberReplacer", "func.sum(StageRun.progress), ",
     "the sum is never NULL there: a method's own row is among the rows summed"),
    ("service/jobs/pipeline.py", "NumberReplacer", "kind, planned = \"stage\", ",
     "planned is read only for kind method: a stage's value is never read"),
    ("service/jobs/pipeline.py", "NumberReplacer", "max(job.stage_progress or ",
     "frac (done methods over planned ones) is never negative, so the fallback for a job with no "
     "stage progress yet may be 0 or -1 alike"),
    ("service/jobs/pipeline.py", "NumberReplacer", "for block in iter(lambda: f.read(",
     "harmless: the block size of the artifact hash's reads; the digest is the same"),
    ("service/jobs/pipeline.py", "NumberReplacer", "i.uri.rsplit(\"/\", 2)[-1]",
     "the last of at most three pieces of the uri is the last of two: the same file name"),
    ("service/jobs/pipeline.py", "NumberReplacer", "w = [STAGE_WEIGHTS.get(s, ",
     "the default weight is never used: STAGE_WEIGHTS names every stage a job can have "
     "(worker.engine.config.STAGES)"),
    ("service/jobs/pipeline.py", "NumberReplacer", "return min( 2.0, done / sum(w))",
     "done never exceeds sum(w): each stage's fraction is clamped to 1 the line before"),
    ("service/jobs/pipeline.py", "ReplaceComparisonOperator_Lt_LtE",
     "if index + 1 <= len(job.stages)",
     "the last stage finished means the job succeeded, and a message for a finished job is "
     "dropped before this line: index + 1 < len(stages) wherever it is reached"),
    *[("service/jobs/pipeline.py", op, "run.worker if run is not None else None",
       "a log line's content (the lost lease's new holder); run is never None there: a claimed "
       "stage's row is never deleted while its job runs") for op in (
        "AddNot", "ReplaceComparisonOperator_IsNot_Is")],
    ("service/jobs/pipeline.py", "NumberReplacer", "self.value = -1.0",
     "the writer flushes only from a progress call, which first raises value to the clamped "
     "fraction (at least 0): the starting value is never written"),
    ("service/jobs/pipeline.py", "ReplaceAndWithOr", "if not messages or self.workdir(",
     "only adds a status read: with messages to send the job goes on (nothing is removed), and "
     "removing a work directory that is not there is a no-op"),
    *[("service/jobs/pipeline.py", "NumberReplacer", f"StageStatus.waiting, {p}, 0",
       "the compare row's own progress while it waits is read by nothing (the stage's progress "
       "comes from its methods' rows, and the choice's claim sets it to 0)") for p in ("-1.0", "1.0")],
    ("service/jobs/pipeline.py", "NumberReplacer", "max( 0, c.planned)",
     "a plan has at least one method (an empty selection is refused), so planned >= 1"),
    ("service/jobs/pipeline.py", "NumberReplacer", "self.last = 0.0",
     "the cancel poll's 'never polled' mark: time.monotonic() is seconds since boot, far above "
     "the poll interval, so 1.0 or -1.0 also makes the first call poll"),
    ("service/api/auth.py", "NumberReplacer", "_revocations += ",
     "the revocation counter's step: only whether it changed between a lookup and its use "
     "matters"),
    ("service/api/auth.py", "NumberReplacer", "key = matches[ -1]",
     "reached only with exactly one match (none and several raise first): its last is its first"),
    ("service/api/auth.py", "ReplaceTrueWithFalse", "_note_revocation, once=True)",
     "harmless: the listener then also fires on the same session's later commits, emptying the "
     "key caches once more (a cache miss, never a stale key)"),
    ("service/jobs/reconciler.py", "ReplaceTrueWithFalse", "populate_existing=True",
     "each job is decided in a fresh session (Pipeline.transaction), whose identity map holds "
     "no earlier copy of the row to refresh"),
    ("service/jobs/reconciler.py", "ReplaceComparisonOperator_GtE_Gt", "JobEvent.at >= run.since",
     "differs only for a re-send recorded at the very microsecond the run started waiting: one "
     "doubling of the backoff more or less"),
    ("service/jobs/pipeline.py", "NumberReplacer", "STAGE_WEIGHTS = ",
     "harmless rather than equivalent: how much of the overall progress bar each stage takes "
     "(the bar is tested to be monotone and to end at 1 with any weights)"),
    ("service/jobs/pipeline.py", "ReplaceTrueWithFalse", "target=self._loop, daemon=",
     "the heartbeat thread is always stopped and joined by __exit__, so whether it is a daemon "
     "never matters"),
    ("service/api/uploads.py", "ReplaceComparisonOperator_Gt_GtE",
     "len(self._hname) + len(self._hvalue) > MAX_PART_HEADER_BYTES",
     "python-multipart refuses a part header over 4,224 bytes first: this 16 KiB bound is never "
     "reached, at 16 KiB exactly or otherwise"),
    ("service/api/uploads.py", "ReplaceBinaryOperator_Add_Sub",
     "len(self._hname) + len(self._hvalue) > MAX_PART_HEADER_BYTES",
     "python-multipart refuses a part header over 4,224 bytes first: this 16 KiB bound is never "
     "reached, whichever way the two lengths are combined"),
    ("service/api/uploads.py", "ReplaceUnaryOperator_USub_UAdd", "name.rsplit(\".\", 1)[-1]",
     "with a dot in the name rsplit(., 1) gives exactly two pieces: [1] is [-1]"),
    *[("service/api/uploads.py", op, "if error is None:",
       "MultipartParser.finalize() is a no-op in python-multipart (0.0.34: a TODO to check the "
       "end state one day); calling it or not changes nothing, and a body that ends inside a "
       "part is caught by the service's own check right after")
      for op in ("AddNot", "ReplaceComparisonOperator_Is_IsNot")],
    ("service/api/uploads.py", "ReplaceTrueWithFalse",
     "(staging / \"inputs\").mkdir(parents=True, exist_ok=False)",
     "the staging folder is new for every request (upload_tmp_dir / a fresh job id), so its "
     "inputs folder never exists already"),
    ("worker/engine/attacks/cw.py", "ReplaceComparisonOperator_Lt_LtE", "(l2 <= best_l2)",
     "differs only when a later iterate's squared L2 distance equals the best one's bitwise; "
     "either is then a smallest-L2 adversarial example of the run"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "if s > -1 else xf > _MIN_MOVE",
     "s is 1.0 or -1.0: `s > -1` splits them as `s > 0` does"),
    ("worker/engine/attacks/jsma.py", "NumberReplacer", "if active.numel() == -1:",
     "never true: like the loop's break made continue, the remaining rounds run on empty "
     "batches and change nothing (only time)"),
    ("service/jobs/pipeline.py", "ReplaceUnaryOperator_USub_UAdd", "i.uri.rsplit(\"/\", 1)[+1]",
     "every stored input's URI has a '/', so rsplit('/', 1) gives exactly two pieces: [1] is [-1]"),
    ("service/jobs/pipeline.py", "NumberReplacer", "min(1.0, max( -1.0, float(fraction))))",
     "the progress value starts at 0.0 and only rises (max with the value before): a negative "
     "fraction clamped at -1 instead of 0 leaves it where it was either way"),
    ("service/jobs/reconciler.py", "AddNot", "if any(k != \"throttled\" for k in result):",
     "harmless: whether a pass that did something is logged at info level"),
    ("service/jobs/reconciler.py", "ReplaceComparisonOperator_NotEq_Eq",
     "if any(k != \"throttled\" for k in result):",
     "harmless: whether a pass that did something is logged at info level"),
    ("service/jobs/pipeline.py", "NumberReplacer", "return nxt[ -1] if nxt else None",
     "run() reaches this line with at most one message (more raise just before): its last is "
     "its first"),
    ("service/jobs/pipeline.py", "NumberReplacer", "METHODS_SHARE * min( 2.0,",
     "each planned method's progress is at most 1 and there are `planned` of them, so the mean "
     "never exceeds 1 for the cap to act on"),
    ("service/jobs/pipeline.py", "ReplaceBinaryOperator_Add_Sub",
     "nrun = self._stage_run(s, job, nxt, index + 1)",
     "the index is used only to create a missing row, and the next stage's row was created in "
     "the same transaction that finished this one, so it is always found by name"),
    ("service/api/uploads.py", "NumberReplacer", "return max( -1.0, end - time.monotonic())",
     "a wait below zero times out at once, as a wait of zero does"),
    ("service/api/uploads.py", "ReplaceAndWithOr",
     "if len(buf) >= settings.upload_chunk_bytes or over or (buf or not more):",
     "only how the body is buffered: every non-empty piece is handed to the parser at once "
     "instead of in upload_chunk_bytes; what is parsed, charged and refused is the same"),
    ("service/jobs/pipeline.py", "NumberReplacer", "overall_progress(job.stages, index, -1.0)",
     "overall_progress clamps a stage's progress into [0, 1]: -1 is 0"),
    ("service/jobs/pipeline.py", "NumberReplacer", "run.duration_s = round(duration, ",
     "harmless: the reported stage duration's rounding (3 or 5 decimals instead of 4)"),
    ("service/jobs/pipeline.py", "NumberReplacer", "{\"progress\": round(f, ",
     "harmless: the progress event's rounding (3 or 5 decimals instead of 4)"),
    ("service/api/uploads.py", "NumberReplacer", "drained = 0",
     "harmless: a refused body is drained one byte more or less before the answer"),
    ("service/jobs/pipeline.py", "ReplaceBinaryOperator_BitOr_BitAnd", "job_id: uuid.UUID | str",
     "a type annotation: with `from __future__ import annotations` it is never evaluated"),
    ("service/jobs/pipeline.py", "ReplaceTrueWithFalse", "(workdir / \"artifacts\").mkdir(parents=False",
     "the work directory exists by then: every job has a model input, fetched into "
     "workdir/inputs just before"),
    ("service/jobs/pipeline.py", "NumberReplacer", "if index + 0 < len(job.stages) else None",
     "the last stage finished means the job succeeded, and a message for a finished job is "
     "dropped before this line: index + 1 < len and index < len agree wherever it is reached"),
    ("service/jobs/pipeline.py", "NumberReplacer", "\"compare\": ",
     "harmless rather than equivalent: compare's share of the overall progress bar"),
    ("service/jobs/pipeline.py", "ReplaceBinaryOperator_Add_Sub", "if index - 1 < len(job.stages)",
     "the last stage finished means the job succeeded, and a message for a finished job is "
     "dropped before this line: the bound is true wherever it is reached"),
    ("service/jobs/pipeline.py", "NumberReplacer", "nrun = self._stage_run(s, job, nxt, index + ",
     "the index is used only to create a missing row, and the next stage's row was created in "
     "the same transaction that finished this one"),
    ("service/jobs/pipeline.py", "ReplaceComparisonOperator_GtE_Gt",
     "now - self.last >= self.p.settings.cancel_poll_interval_s",
     "differs only when two calls are exactly one poll interval apart on the monotonic clock"),
    ("service/api/uploads.py", "NumberReplacer", "name.rsplit(\".\", 2)[-1]",
     "the last of at most three pieces is the last of two: the same extension"),
    ("service/jobs/reconciler.py", "NumberReplacer", "BATCH = 500",
     "harmless rather than equivalent: how many active jobs one pass looks at is a tuning "
     "constant (the rest wait for the next pass, a few seconds later)"),
    ("service/api/quotas.py", "NumberReplacer", "RETRY_AFTER_S = 30",
     "harmless rather than equivalent: the Retry-After hint's value is a tuning constant (the "
     "README promises the header, which test_quotas checks, not its number)"),
    ("service/api/quotas.py", "NumberReplacer", "Job.status.in_(ACTIVE))) or 0",
     "COUNT() never returns NULL, so the `or 0` fallback is never taken"),
]


@dataclass
class Row:
    module: str
    total: int = 0
    killed: int = 0
    survived: int = 0
    timed_out: int = 0
    incompetent: int = 0
    pending: int = 0
    equivalent: int = 0
    seconds: float = 0.0
    survivors: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def score(self) -> float | None:
        done = self.killed + self.timed_out + self.survived
        return (self.killed + self.timed_out) / done if done else None


def _scratch_copy(scratch: Path) -> None:
    """The committed tree (HEAD): what is mutated is what the commit holds, and edits made in the
    work tree meanwhile cannot leak into a run."""
    if scratch.exists():
        return  # resume: the session file lives beside it
    scratch.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    # DARE_TEST_WEIGHTS: the engine tests' subjects are trained once and kept beside the sessions
    # (tests/engine/tiny.py: trained_once); their training uses no mutated module.
    env.update(PYTHONPATH=str(scratch), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               DARE_TEST_WEIGHTS=str(scratch.parent / "weights"))
    return env


def _pytest(module: str) -> list[str]:
    # schemathesis's plugin imports a few seconds of modules that no engine test uses
    skip = ["-p", "no:schemathesis"] if module.startswith("worker/") else []
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *skip]


def _config(module: str, tests: list[str], timeout: float, sock: Path | None = None) -> str:
    if sock is None:
        cmd = " ".join([*_pytest(module), *tests])
    else:
        cmd = " ".join([sys.executable, "-S", str(REPO / "bench" / "pytest_fork.py"), "run",
                        str(sock), *_pytest(module)[3:], "--assert=plain", *tests])
    ops = ", ".join(f'"core/{o}"' for o in OPERATORS)
    return (f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = {timeout:.0f}\n'
            f'excluded-modules = []\ntest-command = "{cmd}"\n\n'
            f'[cosmic-ray.distributor]\nname = "local"\n\n'
            # the filter takes regular expressions of operators to drop: all but OPERATORS
            f'[cosmic-ray.filters.operators-filter]\nexclude-operators = ["^(?!core/({"|".join(OPERATORS)})$)"]\n'
            f'# kept: [{ops}]\n')


@functools.lru_cache(maxsize=None)
def _committed_lines(module: str) -> tuple[str, ...]:
    """The module as HEAD holds it (the scratch copy may hold a live mutant right now); read once
    per module, not once per mutant."""
    return tuple(subprocess.run(["git", "show", f"HEAD:{module}"], cwd=REPO, capture_output=True,
                                text=True).stdout.splitlines())


def _mutated_line(module: str, start: tuple[int, int]) -> str:
    """The line as committed."""
    lines = _committed_lines(module)
    return lines[start[0] - 1].strip() if 0 < start[0] <= len(lines) else ""


def _equivalent(module: str, operator: str, line: str, mutant: str) -> bool:
    """Whether an EQUIVALENT entry covers this mutant (by its line as committed or as mutated)."""
    return any(e[0] in (module, "*") and operator.endswith(e[1]) and (e[2] in line or e[2] in mutant)
               for e in EQUIVALENT)


NOT_RUN_EQUIVALENT = "not run: an EQUIVALENT entry names its line"


def _skip_equivalent(module: str, session: Path) -> None:
    """Record the pending mutants that an EQUIVALENT entry covers by their committed line as
    equivalent without running them. Had one run, the report would leave it out as a survivor
    all the same (a kill would only add one to both sides of the score); each costs the whole
    test list, a minute or more for a service module. An entry that names only one of a line's
    mutants must name it by its mutated text: a line entry skips them all. Mutants skipped by an
    earlier run that no entry covers any more are put back in the queue."""
    import sqlite3

    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    def covered(item) -> bool:  # noqa: ANN001 (cosmic-ray's WorkItem)
        m = item.mutations[0]
        return _equivalent(module, m.operator_name, _mutated_line(module, m.start_pos), "")

    with use_db(str(session), WorkDB.Mode.open) as db:
        stale = [item.job_id for item, result in db.completed_work_items
                 if result.output == NOT_RUN_EQUIVALENT and not covered(item)]
        for item in list(db.pending_work_items):
            if covered(item):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                      output=NOT_RUN_EQUIVALENT))
    with sqlite3.connect(session) as sql:
        sql.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in stale])


def _retest_survivors(scratch: Path, session: Path) -> None:
    """After the tests were improved: take the tests from HEAD again and put every survivor back
    in the queue (the killed ones stay killed: better tests do not un-kill a mutant)."""
    import sqlite3

    archive = subprocess.run(["git", "archive", "HEAD", "tests"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    with sqlite3.connect(session) as db:
        db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")


def run_module(module: str, scratch_root: Path, budget_s: float, *, execute: bool = True,
               retest_survivors: bool = False) -> Row:
    """Mutate ``module`` for at most ``budget_s`` (resuming its session), or with ``execute``
    False only read what an earlier run of this session recorded."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    row = Row(module)
    tests = MODULES[module]
    scratch = scratch_root / module.replace("/", "_").removesuffix(".py")
    session = scratch / "session.sqlite"
    if not execute and not session.exists():
        row.note = "not run yet"
        return row
    _scratch_copy(scratch)
    t0 = time.perf_counter()
    env = _env(scratch)
    if not session.exists():
        # the baseline (unmutated) run both checks the tests pass and sizes the timeout
        b0 = time.perf_counter()
        base = subprocess.run([*_pytest(module), *tests], cwd=scratch, env=env,
                              capture_output=True, text=True)
        if base.returncode != 0:
            row.note = "baseline failed: " + (base.stdout.strip().splitlines() or ["?"])[-1]
            return row
        timeout = max(60.0, 3 * (time.perf_counter() - b0))
        (scratch / "cr.toml").write_text(_config(module, tests, timeout))
        for cmd in (["cosmic-ray", "init", "cr.toml", "session.sqlite"],
                    ["cr-filter-operators", "session.sqlite", "cr.toml"]):
            subprocess.run([str(Path(sys.executable).with_name(cmd[0])), *cmd[1:]], cwd=scratch,
                           env=env, check=True, capture_output=True)
    if execute and retest_survivors and session.exists():
        _retest_survivors(scratch, session)
    left = budget_s - (time.perf_counter() - t0)
    if execute and left > 0:
        # a run stopped in the middle of a mutant leaves that mutant on disk: start from HEAD's
        (scratch / module).write_bytes(subprocess.run(["git", "show", f"HEAD:{module}"], cwd=REPO,
                                                      check=True, capture_output=True).stdout)
        # the test command from MODULES as it is now (a resumed session may have been made with
        # a shorter list), with the timeout the baseline sized
        timeout = float(re.search(r"^timeout = (\d+)", (scratch / "cr.toml").read_text(),
                                  re.MULTILINE).group(1))
        # every module's tests run from the fork server (pytest_fork.py), which holds the
        # third-party imports of the engine's and the service's tests: a child imports the
        # project afresh and starts whatever servers and workers its tests need as its own
        # subprocesses (its process group, killed with it). test_auth.py: 16 s a run instead of
        # 45 s in a fresh interpreter on the loaded machine.
        _skip_equivalent(module, session)
        sock = scratch / "pytest.sock"
        (scratch / "cr.toml").write_text(_config(module, tests, timeout, sock))
        sock.unlink(missing_ok=True)
        server = subprocess.Popen([sys.executable, str(REPO / "bench" / "pytest_fork.py"),
                                   "serve", str(sock)], cwd=scratch, env=env)
        while not sock.exists() and server.poll() is None:
            time.sleep(0.5)
        try:
            subprocess.run([str(Path(sys.executable).with_name("cosmic-ray")), "exec", "cr.toml",
                            "session.sqlite"], cwd=scratch, env=env,
                           timeout=budget_s - (time.perf_counter() - t0), capture_output=True)
        except subprocess.TimeoutExpired:
            pass
        finally:
            server.kill()
            server.wait()
    row.seconds = time.perf_counter() - t0
    row.seconds += _recorded_seconds(scratch, row.seconds if execute else 0.0)
    with use_db(str(session), WorkDB.Mode.open) as db:
        done = {item.job_id for item, _ in db.completed_work_items}
        for item, result in db.completed_work_items:
            m = item.mutations[0]
            line = _mutated_line(module, m.start_pos)
            where = f"{module}:{m.start_pos[0]} {m.operator_name.removeprefix('core/')} `{line}`"
            row.total += 1
            if result.output == NOT_RUN_EQUIVALENT:
                row.equivalent += 1
                continue
            if result.test_outcome is None or result.worker_outcome == WorkerOutcome.SKIPPED:
                row.total -= 1  # filtered out
                continue
            # the mutant's own line: the piece of an EQUIVALENT entry may name the mutation
            mutant = " ".join(x[1:].strip() for x in (result.diff or "").splitlines()
                              if x.startswith("+") and not x.startswith("+++"))
            if result.test_outcome == TestOutcome.INCOMPETENT:
                row.incompetent += 1
            elif result.test_outcome == TestOutcome.SURVIVED and _equivalent(
                    module, m.operator_name, line, mutant):
                row.equivalent += 1  # judged equivalent: only a survivor can be
            elif result.test_outcome == TestOutcome.SURVIVED:
                row.survived += 1
                row.survivors.append(where)
            elif result.output == "timeout":
                row.timed_out += 1
            else:
                row.killed += 1
        row.pending = sum(1 for item in db.pending_work_items if item.job_id not in done)
        row.total += row.pending
    if row.pending:
        row.note = f"{row.pending} mutants not run yet (budget spent; run again to resume)"
    return row


def _recorded_seconds(scratch: Path, add: float) -> float:
    """Minutes spent on this module by earlier runs of its session (kept beside it)."""
    f = scratch / "seconds.txt"
    before = float(f.read_text()) if f.exists() else 0.0
    f.write_text(str(before + add))
    return before


def earlier_rows(text: str) -> dict[str, tuple[str, list[str]]]:
    """From a report this script wrote before: module -> (its table line, its survivor lines),
    so that a module whose session is not on this machine keeps what its last run found rather
    than showing as never run. A row of a module that has since moved (service/quotas.py ->
    service/api/quotas.py) is found by the file's name."""
    rows: dict[str, tuple[str, list[str]]] = {}
    text = text.partition(KEEP)[0]  # the hand-written part has tables of its own
    survivors = [ln for ln in text.splitlines() if re.match(r"- \S+\.py:\d+ ", ln)]
    first_table = text.partition("\n| module |")[2].partition("\n\n")[0]
    for ln in first_table.splitlines():
        cells = ln.split("|")
        if len(cells) < 4 or not cells[1].strip().endswith((".py", "run)")) or cells[2].strip() == "-":
            continue
        old = cells[1].strip().split(" ")[0]
        for module in MODULES:
            if module == old or (Path(module).name == Path(old).name
                                 and module.split("/")[0] == old.split("/")[0]):
                mine = [x for x in survivors if x[2:].startswith(old + ":")]
                rows[module] = (ln, mine)
    return rows


def table(rows: list[Row], earlier: dict[str, tuple[str, list[str]]] | None = None) -> str:
    out = ["| module | mutants | killed | survived | timed out | incompetent | equivalent "
           "| not run | killed % | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{100 * r.score:.0f}" if r.score is not None else "-"
        if r.note == "not run yet" and earlier and r.module in earlier:
            line = earlier[r.module][0]
            out.append(line if "run)" in line.split("|")[1] else
                       line.replace(" |", " (earlier run) |", 1))
            continue
        if r.note == "not run yet" or r.note.startswith("baseline"):
            out.append(f"| {r.module} | - | - | - | - | - | - | all | - | - |")
            continue
        out.append(f"| {r.module} | {r.total} | {r.killed} | {r.survived} | {r.timed_out} | "
                   f"{r.incompetent} | {r.equivalent} | {r.pending} | {score} | "
                   f"{r.seconds / 60:.1f} |")
    return "\n".join(out)


def report(rows: list[Row], earlier: dict[str, tuple[str, list[str]]] | None = None) -> str:
    """The markdown for bench/results/mutation.md: table, survivors, equivalents, notes.
    ``earlier``: rows of modules not run here, from the report before (``earlier_rows``)."""
    earlier = earlier or {}
    lines = ["# Mutation testing (cosmic-ray, `make mutation`)", "",
             "Killed % = (killed + timed out) / (killed + timed out + survived); equivalent "
             "mutants are left out. Produced by `python -m bench.mutation`; a row marked as an "
             "earlier run is what that run found (its session is not on the machine that wrote "
             "this file).", "", table(rows, earlier), ""]
    survivors = [(r.module, s) for r in rows for s in r.survivors]
    survivors += [(r.module, s[2:]) for r in rows if r.note == "not run yet"
                  for s in earlier.get(r.module, ("", []))[1]]
    if survivors:
        lines += ["## Survivors", ""] + [f"- {s}" for _, s in survivors] + [""]
    lines += ["## Equivalent mutants (left out of the score)", ""]
    lines += [f"- {m} {o} `{frag}`: {why}" for m, o, frag, why in EQUIVALENT] + [""]
    # a module shown by its earlier run's row needs no "not run yet" note
    notes = [f"- {r.module}: {r.note}" for r in rows
             if r.note and not (r.note == "not run yet" and r.module in earlier)]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help=f"default: all {len(MODULES)} in MODULES")
    ap.add_argument("--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp"))
                    / "dare-mutation", help="where the per-module copies and sessions live")
    ap.add_argument("--budget-min", type=float, default=60.0, help="per module; resumable")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the report here (make mutation: bench/results/mutation.md)")
    ap.add_argument("--retest-survivors", action="store_true",
                    help="after improving the tests: run the survivors of the chosen modules again")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tabulate the sessions earlier runs left in --scratch")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"not in MODULES: {', '.join(unknown)}")
    chosen = [] if args.report_only else (args.modules or list(MODULES))
    earlier = earlier_rows(args.out.read_text()) if args.out and args.out.exists() else {}
    rows = []
    for module in MODULES:  # modules not chosen: what an earlier run of their session found
        if module in chosen:
            print(f"mutating {module} (at most {args.budget_min:.0f} min) ...", flush=True)
        rows.append(run_module(module, args.scratch, args.budget_min * 60,
                               execute=module in chosen, retest_survivors=args.retest_survivors))
        if module in chosen:
            print(table(rows[-1:]), flush=True)
    text = report(rows, earlier)
    print(text)
    if args.out:
        # a hand-written part below KEEP (e.g. mutants applied by hand) survives a re-run
        kept = args.out.read_text().partition(KEEP)[2] if args.out.exists() else ""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + ("\n" + KEEP + kept if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
