"""``report.html``: one self-contained page a person takes in at a glance.

No scripts, fonts, images or styles from anywhere: CSS is inline and every chart is an inline SVG
drawn here, so the page works offline, inside a strict Content-Security-Policy
(``default-src 'none'; style-src 'unsafe-inline'``) and as an e-mail attachment.

Top to bottom: a headline (did hardening raise the adaptive robust accuracy, is the clean-accuracy
budget kept, did the sanity checks pass), grouped bars per attack (original model on its own
adversarial set, hardened model on that set = transfer ER, hardened model re-attacked = adaptive),
clean accuracy before and after against the budget floor, PGD accuracy over epsilon, the method
comparison when there is one, the sanity verdicts, stage timings, and the settings folded away.

Every string that can come from a user (config values, file names, method names) goes through
``_e``. Every number may be missing (``None`` in report.json, or the key absent in an older or
partial report): the page then says "n/a" instead of failing.

Colours are the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), distinguishable
with the common colour-vision deficiencies; series also differ in lightness and every verdict is
spelled out in words, so nothing depends on colour alone.
"""
from __future__ import annotations

import json
import math
from html import escape

from .report import headline_attack
from .stats import overlaps, wilson

# Okabe-Ito. The hardened model is always blue: light for transfer, dark for adaptive.
ORIGINAL = "#E69F00"  # orange
TRANSFER = "#56B4E9"  # sky blue
ADAPTIVE = "#0072B2"  # blue
HARDENED = ADAPTIVE
BUDGET = "#D55E00"    # vermillion
PASS = "#009E73"      # bluish green
FAIL = "#D55E00"      # vermillion
TIMING = "#7A8B99"    # neutral slate: timings are not good or bad
RECOMMENDED = "#CC79A7"  # reddish purple
OTHER = "#A7B0B9"     # grey: the compared methods that are neither reported nor recommended
INK, MUTED, GRID = "#1d2530", "#5b6673", "#e3e7eb"

SERIES = (("original_accuracy", "original model, attacked itself", ORIGINAL),
          ("transfer_er", "hardened, same adversarial examples (transfer ER)", TRANSFER),
          ("adaptive_accuracy", "hardened, attack re-run against it (adaptive)", ADAPTIVE))

REDACTED_CONFIG_KEYS = ("webhook_url",)  # may carry a secret token; the page gets shared around
_RAISE_TOL = 0.0005  # below 0.05 points a change is reported as "no change"
_SIZE_TOL = 0.05  # minimal protocol: a median perturbation within 5 % counts as unchanged


# --- small helpers --------------------------------------------------------------------------

def _e(v: object) -> str:
    """HTML-escape anything (quotes too: values also land in attributes)."""
    return escape(str(v), quote=True)


def _num(v: object) -> float | None:
    """A finite number, or None for missing/NaN/non-numeric values (bool is not a number here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _pct(v: object, digits: int = 1) -> str:
    x = _num(v)
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _pts(v: float) -> str:
    return f"{100 * v:+.1f} points"


def _clamp01(v: float) -> float:
    return max(0.0, min(1.0, v))


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _dict(v: object) -> dict:
    return v if isinstance(v, dict) else {}


def _badge(ok: object, yes: str = "PASS", no: str = "FAIL") -> str:
    if ok is None:
        return '<span class="badge na">n/a</span>'
    return (f'<span class="badge pass">&#10003; {_e(yes)}</span>' if ok
            else f'<span class="badge fail">&#10007; {_e(no)}</span>')


def _redact(config: object) -> object:
    if isinstance(config, dict):
        return {k: ("(redacted)" if k in REDACTED_CONFIG_KEYS and v else _redact(v))
                for k, v in config.items()}
    if isinstance(config, list):
        return [_redact(v) for v in config]
    return config


def _svg_open(chart: str, width: int, height: int, label: str) -> str:
    # data-chart names the plot for tests that look at the rendered page.
    return (f'<svg class="chart" data-chart="{chart}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">')


def _text(x: float, y: float, s: str, *, size: int = 12, anchor: str = "start", fill: str = INK,
          weight: str = "normal", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{fill}" font-weight="{weight}"{extra}>{_e(s)}</text>')


def _legend(items: list[tuple[str, str]], *, line: bool = False) -> str:
    spans = "".join(f'<span class="key"><i class="{"ln" if line else "sw"}" '
                    f'style="background:{c}"></i>{_e(label)}</span>' for label, c in items)
    return f'<div class="legend">{spans}</div>'


# --- charts ---------------------------------------------------------------------------------

def attack_chart(attacks: dict) -> str:
    """Grouped vertical bars: per attack, original / transfer / adaptive accuracy in [0, 1]."""
    names = list(attacks)
    width, height = 1080, 330
    left, right, top, bottom = 64, 12, 22, 64
    pw, ph = width - left - right, height - top - bottom
    gw = pw / max(1, len(names))
    bw = min(56.0, gw * 0.78 / 3)
    out = [_svg_open("attacks", width, height, "accuracy per attack, before and after hardening")]
    for t in range(0, 101, 20):
        y = top + ph * (1 - t / 100)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(_text(left - 6, y + 4, f"{t}%", size=11, anchor="end", fill=MUTED))
    out.append(_text(16, top + ph / 2, "accuracy on adversarial examples", size=12, anchor="middle",
                     fill=MUTED, extra=f' transform="rotate(-90 16 {top + ph / 2:.1f})"'))
    for i, name in enumerate(names):
        a = _dict(attacks[name])
        x0 = left + gw * i + (gw - 3 * bw) / 2
        for j, (key, label, color) in enumerate(SERIES):
            v = _num(a.get(key))
            x = x0 + j * bw
            if v is None:  # e.g. adaptive attacks switched off, or the attack failed
                out.append(f'<rect x="{x + 2:.1f}" y="{top + ph - 40:.1f}" width="{bw - 4:.1f}" '
                           f'height="40" fill="none" stroke="{MUTED}" stroke-dasharray="3 3"/>')
                out.append(_text(x + bw / 2, top + ph - 46, "n/a", size=11, anchor="middle",
                                 fill=MUTED))
                continue
            h = ph * _clamp01(v)
            ci = wilson(v, a.get("n") if isinstance(a.get("n"), int) else None)
            ci_txt = "" if ci is None else f" (95% interval {_pct(ci[0])} to {_pct(ci[1])})"
            out.append(f'<rect x="{x + 2:.1f}" y="{top + ph - h:.1f}" width="{bw - 4:.1f}" '
                       f'height="{h:.1f}" fill="{color}"><title>{_e(name.upper())}, '
                       f'{_e(label)}: {_pct(v)}{_e(ci_txt)}</title></rect>')
            label_y = top + ph - h - 5
            if ci is not None:  # the Wilson 95 % interval as a whisker
                y_lo, y_hi = top + ph * (1 - ci[0]), top + ph * (1 - ci[1])
                cx_ = x + bw / 2
                out.append(f'<g class="ci" stroke="{INK}" stroke-width="1.2">'
                           f'<line x1="{cx_:.1f}" y1="{y_lo:.1f}" x2="{cx_:.1f}" y2="{y_hi:.1f}"/>'
                           f'<line x1="{cx_ - 4:.1f}" y1="{y_lo:.1f}" x2="{cx_ + 4:.1f}" y2="{y_lo:.1f}"/>'
                           f'<line x1="{cx_ - 4:.1f}" y1="{y_hi:.1f}" x2="{cx_ + 4:.1f}" y2="{y_hi:.1f}"/></g>')
                label_y = min(label_y, y_hi - 4)
            out.append(_text(x + bw / 2, label_y, _pct(v, 0), size=11, anchor="middle"))
        cx = left + gw * (i + 0.5)
        out.append(_text(cx, top + ph + 20, name.upper(), size=13, anchor="middle", weight="bold"))
        n = a.get("n")
        out.append(_text(cx, top + ph + 36, f"n = {n}" if n is not None else "n = ?", size=11,
                         anchor="middle", fill=MUTED))
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="{INK}"/>')
    out.append(_text(left + pw / 2, height - 6, "attack", size=12, anchor="middle", fill=MUTED))
    out.append("</svg>")
    return "".join(out)


def clean_chart(ca: dict, method: str) -> str:
    """Horizontal bars, clean accuracy of the original and the hardened model, with the budget
    floor (original minus the allowed drop) as a dashed line."""
    orig, hard, budget = _num(ca.get("original")), _num(ca.get("hardened")), _num(ca.get("budget"))
    width, height = 520, 170
    left, right, top, bottom = 120, 70, 26, 40
    pw = width - left - right
    rows = [("original", orig, ORIGINAL), (method, hard, HARDENED)]
    out = [_svg_open("clean", width, height, "clean accuracy before and after, against the budget")]
    for t in range(0, 101, 25):
        x = left + pw * t / 100
        out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - bottom}" '
                   f'stroke="{GRID}"/>')
        out.append(_text(x, height - bottom + 14, f"{t}%", size=11, anchor="middle", fill=MUTED))
    for i, (label, v, color) in enumerate(rows):
        y = top + 8 + i * 44
        out.append(_text(left - 8, y + 19, label if len(label) <= 16 else label[:15] + "…",
                         size=12, anchor="end"))
        if v is None:
            out.append(_text(left + 4, y + 19, "n/a", size=12, fill=MUTED))
            continue
        w = pw * _clamp01(v)
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="28" fill="{color}">'
                   f'<title>{_e(label)}: {_pct(v)}</title></rect>')
        out.append(_text(left + w + 6, y + 19, _pct(v), size=12, weight="bold"))
    if orig is not None and budget is not None:
        x = left + pw * _clamp01(orig - budget)
        out.append(f'<line x1="{x:.1f}" y1="{top - 10}" x2="{x:.1f}" y2="{height - bottom}" '
                   f'stroke="{BUDGET}" stroke-width="2.5" stroke-dasharray="6 3"/>')
        out.append(_text(x, top - 12, f"budget floor {_pct(orig - budget)}", size=11,
                         anchor="middle", fill=BUDGET, weight="bold"))
    out.append(_text(left + pw / 2, height - 4, "clean test accuracy", size=12, anchor="middle",
                     fill=MUTED))
    out.append("</svg>")
    return "".join(out)


def tick_rows(xs: list[float], labels: list[str], char_px: float = 6.5, gap: float = 6) -> list[int | None]:
    """The row (0 or 1) of each axis label so that no two on a row overlap (close epsilons such
    as 0.0157 and 0.0275 would print on top of each other), None for a label that fits on
    neither row (its tick stays)."""
    ends = [-1e9, -1e9]  # right edge of the last label on each row
    rows: list[int | None] = []
    for x, label in zip(xs, labels):
        half = len(label) * char_px / 2
        row = next((r for r in (0, 1) if x - half >= ends[r] + gap), None)
        if row is not None:
            ends[row] = x + half
        rows.append(row)
    return rows


def pgd_chart(curve: dict, method: str, attack_eps: float | None,
              recommended: str | None = None, *, chart: str = "pgd",
              xlabel: str = "L∞ epsilon (PGD)") -> str:
    """Robust accuracy over the L-inf epsilon of PGD. The original model and the reported method
    are bold lines, the recommended method (when another one) a third colour; any other compared
    methods share one thin grey dashed style, so a dozen of them stay readable as background."""
    eps = [_num(e) for e in curve.get("eps") or []]
    series = {str(k): v for k, v in curve.items() if k != "eps" and isinstance(v, list)}
    if len(eps) < 2 or any(e is None for e in eps) or not series:
        return '<p class="muted">No PGD curve was recorded.</p>'
    styles = {"original": (ORIGINAL, 3.0, ""), method: (HARDENED, 3.0, "")}
    if recommended and recommended not in styles:
        styles[recommended] = (RECOMMENDED, 2.5, "")
    width, height = 520, 312
    left, right, top, bottom = 56, 14, 14, 62
    pw, ph = width - left - right, height - top - bottom
    xmax = max(eps) or 1.0

    def px(e: float) -> float:
        return left + pw * e / xmax

    def py(a: float) -> float:
        return top + ph * (1 - _clamp01(a))

    out = [_svg_open(chart, width, height, f"robust accuracy over {xlabel}")]
    for t in range(0, 101, 25):
        out.append(f'<line x1="{left}" y1="{py(t / 100):.1f}" x2="{left + pw}" y2="{py(t / 100):.1f}" '
                   f'stroke="{GRID}"/>')
        out.append(_text(left - 6, py(t / 100) + 4, f"{t}%", size=11, anchor="end", fill=MUTED))
    for e, row in zip(eps, tick_rows([px(e) for e in eps], [f"{e:g}" for e in eps])):
        out.append(f'<line x1="{px(e):.1f}" y1="{top + ph}" x2="{px(e):.1f}" y2="{top + ph + 4}" '
                   f'stroke="{MUTED}"/>')
        if row is not None:
            out.append(_text(px(e), top + ph + 16 + 13 * row, f"{e:g}", size=11, anchor="middle",
                             fill=MUTED))
    if attack_eps is not None and 0 < attack_eps <= xmax:
        out.append(f'<line x1="{px(attack_eps):.1f}" y1="{top}" x2="{px(attack_eps):.1f}" '
                   f'y2="{top + ph}" stroke="{MUTED}" stroke-dasharray="2 3"/>')
        out.append(_text(px(attack_eps) + 4, top + 12, f"ε of the attacks above = {attack_eps:g}",
                         size=10, fill=MUTED))
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="{INK}"/>')
    out.append(_text(left + pw / 2, height - 8, xlabel, size=12, anchor="middle",
                     fill=MUTED))
    out.append(_text(14, top + ph / 2, "robust accuracy", size=12, anchor="middle", fill=MUTED,
                     extra=f' transform="rotate(-90 14 {top + ph / 2:.1f})"'))
    # Background lines first, the highlighted ones on top of them.
    order = [k for k in series if k not in styles] + [k for k in reversed(styles) if k in series]
    drawn: list[str] = []
    for name in order:
        color, width_px, dash = styles.get(name, (OTHER, 1.5, ' stroke-dasharray="5 3"'))
        pts = [(px(e), py(a)) for e, a in zip(eps, (_num(v) for v in series[name])) if a is not None]
        if not pts:
            continue
        out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" fill="none" '
                   f'stroke="{color}" stroke-width="{width_px}"{dash}><title>{_e(name)}</title></polyline>')
        if name in styles:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>' for x, y in pts]
        drawn.append(name)
    out.append("</svg>")
    legend = [(("original" if n == "original" else f"{n} (recommended)" if n == recommended and
                n != method else n), styles[n][0]) for n in styles if n in drawn]
    others = [n for n in drawn if n not in styles]
    if others:
        legend.append((f"other compared methods ({len(others)}): {', '.join(others)}", OTHER))
    return "".join(out) + _legend(legend, line=True)


def timing_chart(timings: dict) -> str:
    """Horizontal bars, seconds per stage, longest first, with the total."""
    rows = [(str(k), _num(v)) for k, v in timings.items()]
    known = [v for _, v in rows if v is not None]
    top_v = max(known, default=0.0) or 1.0
    width, row_h = 520, 26
    left, right, top = 96, 80, 6
    height = top + row_h * len(rows) + 34
    pw = width - left - right
    out = [_svg_open("timings", width, height, "stage timings in seconds")]
    for i, (name, v) in enumerate(sorted(rows, key=lambda r: -(r[1] or -1))):
        y = top + i * row_h
        out.append(_text(left - 8, y + 15, name, size=12, anchor="end"))
        if v is None:
            out.append(_text(left + 4, y + 15, "n/a", size=12, fill=MUTED))
            continue
        w = max(1.0, pw * v / top_v)
        out.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row_h - 8}" '
                   f'fill="{TIMING}"><title>{_e(name)}: {v:.2f} s</title></rect>')
        out.append(_text(left + w + 6, y + 15, _secs(v), size=12))
    y = top + row_h * len(rows) + 4
    out.append(f'<line x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}" stroke="{INK}"/>')
    out.append(_text(left + pw / 2, y + 24, f"seconds (total {_secs(sum(known))})", size=12,
                     anchor="middle", fill=MUTED))
    out.append("</svg>")
    return "".join(out)


def _secs(v: float) -> str:
    return f"{v:.2f} s" if v < 10 else f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"


def _mini_bar(v: float | None, color: str) -> str:
    if v is None:
        return ""
    return (f'<svg class="mini" width="80" height="10" viewBox="0 0 80 10">'
            f'<rect width="80" height="10" fill="{GRID}"/>'
            f'<rect width="{80 * _clamp01(v):.1f}" height="10" fill="{color}"/></svg>')


# --- sections -------------------------------------------------------------------------------

def headline(report: dict) -> str:
    """Three verdict tiles and one sentence that says it all."""
    method = str(report.get("method") or "hardened")
    attacks = {k: _dict(v) for k, v in _dict(report.get("attacks")).items()}
    ca = _dict(report.get("clean_accuracy"))
    checks = [c for c in report.get("sanity_checks") or [] if isinstance(c, dict)]

    # Robustness: the original under its own white-box attack vs the hardened model under its own
    # (adaptive), over the attacks where both were measured.
    pairs = [(_num(a.get("original_accuracy")), _num(a.get("adaptive_accuracy"))) for a in attacks.values()]
    pairs = [(o, h) for o, h in pairs if o is not None and h is not None]
    aa = attacks.get("autoattack", {})
    rob_title = "Robustness (adaptive attack)"
    sizes = minimal_sizes(attacks)
    if sizes:
        # Under the minimal protocol every attack is unbounded and nearly always succeeds, so the
        # adaptive accuracy says little (an attack that failed on a few points moves it): the
        # headline is how much larger the hardened model's median minimal perturbation is.
        rob_title = "Robustness (minimal perturbation size)"
        larger = [n for n, (o, h) in sizes.items() if h > o * (1 + _SIZE_TOL)]
        smaller = [n for n, (o, h) in sizes.items() if h < o * (1 - _SIZE_TOL)]
        word = ("LARGER" if len(larger) > len(sizes) / 2 else
                "SMALLER" if len(smaller) > len(sizes) / 2 else "NO CLEAR CHANGE")
        detail = "; ".join(f"{n.upper()} {_size(o)} → {_size(h)}" for n, (o, h) in sizes.items())
        rob = ({"LARGER": True, "SMALLER": False}.get(word), word,
               f"Median minimal perturbation, original → hardened: {detail}. Larger in "
               f"{len(larger)} and smaller in {len(smaller)} of {len(sizes)} attacks (a change "
               f"under {_SIZE_TOL:.0%} counts as none). Adaptive accuracy is not the measure "
               "here: unbounded attacks succeed almost always.")
        rob_sentence = (f"made the minimal perturbation larger in {len(larger)} of {len(sizes)} "
                        f"attacks and smaller in {len(smaller)}")
    elif headline_attack(attacks) or pairs:
        if headline_attack(attacks):
            # AutoAttack's robust accuracy is the headline: the field's standard number.
            before, after = _num(aa["original_accuracy"]), _num(aa["adaptive_accuracy"])
            n = aa.get("n") if isinstance(aa.get("n"), int) else None
            what = "AutoAttack robust accuracy"
            rob_title = f"Robustness (AutoAttack, {_dict(aa.get('params')).get('version', 'standard')})"
            where = f" on {n if n is not None else 'n/a'} points"
        else:
            before, after = _mean([o for o, _ in pairs]), _mean([h for _, h in pairs])
            # the mean over attacks pools their points (an approximation: the same points recur)
            ns = [a.get("n") for a in attacks.values() if isinstance(a.get("n"), int)
                  and _num(a.get("adaptive_accuracy")) is not None]
            n = sum(ns) if ns else None
            what = "mean adaptive robust accuracy"
            where = f" over {len(pairs)} attack{'s' if len(pairs) != 1 else ''}"
        delta = after - before
        ci_b, ci_a = wilson(before, n), wilson(after, n)
        tie = overlaps(ci_b, ci_a)
        raised = delta > _RAISE_TOL and not tie
        word = ("TIE" if tie else "RAISED" if raised else
                "NO CHANGE" if delta >= -_RAISE_TOL else "LOWERED")
        ci_txt = ("" if ci_b is None else
                  f" 95% intervals {_pct(ci_b[0])}–{_pct(ci_b[1])} and {_pct(ci_a[0])}–{_pct(ci_a[1])}"
                  + (" overlap: the difference is within the sampling noise." if tie else " do not overlap."))
        rob = (None if tie else raised, word,
               f"{what[0].upper()}{what[1:]} {_pct(before)} → {_pct(after)} ({_pts(delta)}){where}."
               + ci_txt)
        rob_sentence = (f"raised {what} from {_pct(before)} to {_pct(after)}" if raised else
                        f"changed {what} by no more than the sampling noise ({_pct(before)} → "
                        f"{_pct(after)}, overlapping 95% intervals)" if tie else
                        f"did not raise {what} ({_pct(before)} → {_pct(after)})")
    else:
        transfer = _mean([_num(a.get("transfer_er")) for a in attacks.values()])
        rob = (None, "NOT MEASURED", "Adaptive attacks were not run, so robustness against an "
               "attacker who knows the hardened model is unknown"
               + (f"; mean transfer ER {_pct(transfer)}." if transfer is not None else "."))
        rob_sentence = "has no adaptive robustness measurement"

    drop, budget, within = _num(ca.get("drop")), _num(ca.get("budget")), ca.get("within_budget")
    if isinstance(within, bool):
        clean = (within, "WITHIN BUDGET" if within else "OVER BUDGET",
                 f"Clean accuracy {_pct(ca.get('original'))} → {_pct(ca.get('hardened'))}: a drop of "
                 f"{_pct(drop)} against an allowed {_pct(budget)}.")
        clean_sentence = ("kept clean accuracy within the budget" if within
                          else "lost more clean accuracy than the budget allows")
    else:
        clean = (None, "UNKNOWN", "Clean accuracy was not recorded.")
        clean_sentence = "has no clean-accuracy record"

    failed = [c for c in checks if c.get("passed") is False]
    if checks:
        san = (not failed, f"{len(checks) - len(failed)} / {len(checks)} PASSED",
               "All sanity checks passed: the attacks behave as attacks should." if not failed else
               f"{len(failed)} check(s) failed: the robust accuracies may overstate robustness "
               "(see Sanity checks).")
    else:
        san = (None, "NONE RUN", "No sanity checks were run.")

    tiles = []
    for title, (ok, word, text) in ((rob_title, rob),
                                    ("Clean accuracy", clean), ("Sanity checks", san)):
        cls = "na" if ok is None else "good" if ok else "bad"
        tiles.append(f'<div class="tile {cls}"><div class="tt">{_e(title)}</div>'
                     f'<div class="verdict">{_e(word)}</div><div class="tx">{_e(text)}</div></div>')
    # The method name is user-chosen text: it is not capitalised, only escaped.
    comp = _dict(report.get("comparison"))
    rec = comp.get("recommended")
    also = (f' The method comparison recommends <b>{_e(rec)}</b> instead.'
            if rec is not None and str(rec) != method else "")
    return (f'<p class="lede">Verdict: <b>{_e(method)}</b> {_e(rob_sentence)} and '
            f'{_e(clean_sentence)}.{also}</p>'
            f'<div class="tiles">{"".join(tiles)}</div>')


def sanity_section(checks: list) -> str:
    """A pass/fail matrix (one row per model, one column per check) and the failures spelled out
    in full; every check's detail is folded away below and in each badge's tooltip."""
    checks = [c for c in checks if isinstance(c, dict)]
    if not checks:
        return '<p class="muted">No sanity checks were run.</p>'
    models: list[str] = []
    kinds: list[str] = []
    grid: dict[tuple[str, str], dict] = {}
    for c in checks:
        model, _, kind = str(c.get("name", "")).rpartition(": ")
        model = model or "all models"
        models += [model] if model not in models else []
        kinds += [kind] if kind not in kinds else []
        grid[(model, kind)] = c
    head = "".join(f"<th>{_e(k.replace('_', ' '))}</th>" for k in kinds)
    rows = []
    for m in models:
        cells = []
        for k in kinds:
            c = grid.get((m, k))
            cells.append("<td></td>" if c is None else
                         f'<td title="{_e(c.get("detail", ""))}">{_badge(c.get("passed"))}</td>')
        rows.append(f'<tr><th class="rowh">{_e(m)}</th>{"".join(cells)}</tr>')
    out = [f'<table class="matrix"><thead><tr><th>model</th>{head}</tr></thead>'
           f'<tbody>{"".join(rows)}</tbody></table>']
    failed = [c for c in checks if c.get("passed") is False]
    if failed:
        out.append('<ul class="fails">' + "".join(
            f'<li>{_badge(False)} <b>{_e(c.get("name"))}</b>: {_e(c.get("detail", ""))}</li>'
            for c in failed) + "</ul>")
    out.append('<details><summary>Details of every check</summary><ul class="details">' + "".join(
        f'<li>{_badge(c.get("passed"))} <b>{_e(c.get("name"))}</b>: {_e(c.get("detail", ""))}</li>'
        for c in checks) + "</ul></details>")
    return "".join(out)


def cw_note(cw: dict, method: str) -> str:
    """Bounded C&W: its radius, where the radius comes from, and how large the successful
    perturbations of the unbounded attack were."""
    params = _dict(cw.get("params"))
    if _num(params.get("l2_radius")) is None:
        return ""

    def q(d):
        d = _dict(d)
        if _num(d.get("median")) is None:
            return "none succeeded"
        return (f"median L2 {d['median']:.3f} (quartiles {_num(d.get('q1')) or 0:.3f} to "
                f"{_num(d.get('q3')) or 0:.3f}) over {_e(d.get('n_successful'))} points")

    st = _dict(cw.get("l2_perturbation"))
    return (f'<p class="help" id="cw-bound">C&amp;W (L2) counts an example as broken only within '
            f'L2 radius {params["l2_radius"]:.3f} ({_e(params.get("l2_radius_source", ""))}). '
            f'Successful perturbations, original: {_e(q(st.get("original")))}; {_e(method)}: '
            f'{_e(q(st.get("hardened")))}.</p>')


def _size(v: object) -> str:
    """A perturbation size; None stands for infinity (the attack failed on that share of the
    points, and JSON has no infinity)."""
    n = _num(v)
    return "∞" if n is None else f"{n:.4g}"


def minimal_sizes(attacks: dict) -> dict[str, tuple[float, float]]:
    """{attack: (original median, hardened median)} where the minimal protocol measured both;
    a median the attack could not reach (None) counts as infinite."""
    out = {}
    for name, a in attacks.items():
        mp = _dict(_dict(a).get("minimal_perturbation"))
        o, h = _dict(mp.get("original")), _dict(mp.get("hardened"))
        if not o.get("n") or not h.get("n"):
            continue
        out[name] = tuple(float("inf") if _num(d.get("median")) is None else float(d["median"])
                          for d in (o, h))
    return out


def minimal_section(attacks: dict, method: str) -> str:
    """Minimal protocol: per attack, the distribution of minimal perturbation sizes (median,
    quartiles) and robust accuracy as a function of the budget, original and hardened."""
    out = []
    for name, a in attacks.items():
        mp = _dict(_dict(a).get("minimal_perturbation"))
        curve = _dict(mp.get("curve"))
        if not mp:
            continue

        def q(d):
            d = _dict(d)
            if not d.get("n"):
                return "n/a"
            return (f"median {_size(d.get('median'))} (quartiles {_size(d.get('q1'))} to "
                    f"{_size(d.get('q3'))}; attack failed on {d.get('failed', 0)})")

        norm = {"linf": "L∞", "l2": "L2", "l0": "L0 (changed values)"}.get(mp.get("norm"), "size")
        out.append(f'<h3>{_e(name.upper())}: minimal {_e(norm)} perturbation</h3>'
                   f'<p class="help">original: {_e(q(mp.get("original")))}; {_e(method)}: '
                   f'{_e(q(mp.get("hardened")))}. Larger is more robust.</p>')
        if isinstance(curve.get("budget"), list):
            c = {"eps": curve["budget"], "original": curve.get("original")}
            if isinstance(curve.get("hardened"), list):
                c[method] = curve["hardened"]
            out.append(pgd_chart(c, method, None, chart=f"minimal-{name}",
                                 xlabel=f"{norm} budget ({name.upper()})"))
    return "".join(out)


def autoattack_section(aa: dict, method: str) -> str:
    """Robust accuracy after each AutoAttack sub-attack (cumulative: each attacks only the points
    the previous ones left robust), original and hardened side by side."""
    params = _dict(aa.get("params"))
    bd = _dict(aa.get("breakdown"))
    cols = [("original", _dict(bd.get("original"))), (method, _dict(bd.get("hardened")))]
    steps: list[str] = []
    for _, d in cols:
        steps += [k for k in d if k not in steps]
    head = "".join(f"<th>{_e(m)}</th>" for m, _ in cols)
    rows = "".join(f"<tr><th class=\"rowh\">{_e('clean' if k == 'clean' else 'after ' + k.upper())}"
                   f"</th>{''.join(f'<td>{_pct(d.get(k))}</td>' for _, d in cols)}</tr>"
                   for k in steps)
    return (f'<p class="help">{_e(params.get("note", "AutoAttack"))}; L-inf eps '
            f'{_e(params.get("eps", "n/a"))}, {_e(params.get("n_target_classes", "n/a"))} target '
            f'classes, seed {_e(params.get("seed", "n/a"))}, {_e(params.get("implementation", ""))}. '
            'Each sub-attack attacks only the points the previous ones left robust.</p>'
            f'<table class="matrix" data-table="autoattack"><thead><tr><th>robust accuracy</th>'
            f'{head}</tr></thead><tbody>{rows}</tbody></table>')


def comparison_section(comp: dict, method: str = "", n: int | None = None) -> str:
    """The methods side by side. ``n``: the points behind a mean adaptive accuracy (pooled over
    the attacks); with it, a method whose 95 % interval overlaps the best one's is marked a tie."""
    methods = {str(k): _dict(v) for k, v in _dict(comp.get("methods")).items()}
    if not methods:
        return '<p class="muted">The comparison holds no methods.</p>'
    rec = comp.get("recommended")
    names: list[str] = []
    for s in methods.values():
        names += [a for a in _dict(s.get("attacks")) if a not in names]
    best = max((v for v in (_num(s.get("mean_adaptive_accuracy")) for s in methods.values())
                if v is not None), default=None)
    head = ("<tr><th>method</th><th>clean</th><th>clean budget</th>"
            + "".join(f"<th>{_e(a.upper())}<br><small>transfer / adaptive</small></th>" for a in names)
            + "<th>mean transfer</th><th>mean adaptive</th></tr>")
    rows = []
    for m, s in methods.items():
        is_rec = rec is not None and m == str(rec)
        star = ' <span class="star">&#9733; recommended</span>' if is_rec else ""
        star += ' <span class="this">this report</span>' if m == method else ""
        cells = [f'<td class="m">{_e(m)}{star}</td>',
                 f"<td>{_pct(s.get('clean_accuracy'))}</td>",
                 f"<td>{_badge(s.get('within_budget'), 'within', 'over')}</td>"]
        for a in names:
            r = _dict(_dict(s.get("attacks")).get(a))
            cells.append(f"<td>{_pct(r.get('transfer_er'), 0)} / "
                         f"<b>{_pct(r.get('adaptive_accuracy'), 0)}</b></td>")
        mad = _num(s.get("mean_adaptive_accuracy"))
        top = ' class="best"' if best is not None and mad == best else ""
        tie = (best is not None and mad is not None and mad != best
               and overlaps(wilson(mad, n), wilson(best, n)))
        cells.append(f"<td>{_pct(s.get('mean_transfer_er'))}</td>")
        cells.append(f"<td{top}>{_mini_bar(mad, HARDENED if is_rec else TRANSFER)} {_pct(mad)}"
                     + (' <span class="tie" title="95% intervals overlap with the best">'
                        '&#8776; tie with the best</span>' if tie else "") + "</td>")
        rec_cls = ' class="rec"' if is_rec else ""
        rows.append(f'<tr{rec_cls}>{"".join(cells)}</tr>')
    note = (f'<p>Recommended: <b>{_e(rec)}</b>, by the rule: {_e(comp.get("rule", "n/a"))}.</p>'
            if rec is not None else
            f'<p class="warn">No method is recommended: none kept clean accuracy within the budget '
            f'(rule: {_e(comp.get("rule", "n/a"))}).</p>')
    return (note + f'<table class="comparison"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')


def _settings(d: dict) -> str:
    return ", ".join(f"{_e(k)} {_e(_plain(v))}" for k, v in d.items()) or "&ndash;"


def selection_section(sel: dict, skipped: dict | None = None) -> str:
    """How the method was chosen: each method's chosen grid point with its validation figures,
    the sample counts side by side, and the methods compare skipped (``comparison.skipped``),
    each with its reason."""
    rows_in = {str(k): _dict(v) for k, v in _dict(sel.get("methods")).items()}
    outcome = _dict(sel.get("outcome"))
    chosen = sel.get("chosen")
    has_aa = any(r.get("val_autoattack") is not None for r in rows_in.values())
    head = ("<tr><th>method</th><th>chosen settings</th><th>tuning samples</th>"
            "<th>val clean</th><th>val PGD</th>" + ("<th>val AutoAttack</th>" if has_aa else "")
            + "<th>clean budget</th><th>seconds</th></tr>")
    orig = _dict(sel.get("original"))
    rows = [f'<tr><td class="m">original</td><td>&ndash;</td><td>&ndash;</td>'
            f"<td>{_pct(orig.get('val_clean'))}</td><td>{_pct(orig.get('val_pgd'))}</td>"
            + (f"<td>{_pct(orig.get('val_autoattack'))}</td>" if has_aa else "")
            + "<td></td><td></td></tr>"]
    for m, r in rows_in.items():
        tags = ' <span class="star">&#9733; chosen</span>' if m == chosen else ""
        tags += ' <span class="this">control</span>' if r.get("control") else ""
        per_class = r.get("mined_per_class")
        samples = "n/a" if r.get("n_samples") is None else _e(r["n_samples"])
        if isinstance(per_class, list):
            samples += f'<br><small>per class {_e(" ".join(str(c) for c in per_class))}</small>'
        est = _dict(r.get("estimate_s"))
        secs = _secs(_num(r.get("seconds")) or 0.0) if r.get("seconds") is not None else "n/a"
        if est:
            secs += f' <small>(est. {_secs(sum(_num(v) or 0.0 for v in est.values()))})</small>'
        rec = ' class="rec"' if m == chosen else ""
        rows.append(f'<tr{rec}><td class="m">{_e(m)}{tags}</td>'
                    f"<td>{_settings(_dict(r.get('settings')))}</td><td>{samples}</td>"
                    f"<td>{_pct(r.get('val_clean'))}</td><td>{_pct(r.get('val_pgd'))}</td>"
                    + (f"<td><b>{_pct(r.get('val_autoattack'))}</b></td>" if has_aa else "")
                    + f"<td>{_badge(r.get('within_budget'), 'within', 'over')}</td>"
                    f"<td>{secs}</td></tr>")
    skipped = {str(k): _dict(v) for k, v in _dict(skipped).items()}
    skip = ""
    if skipped:
        items = "".join(f"<li><b>{_e(k)}</b>: {_e(v.get('detail', v.get('reason', '')))}"
                        + (f" (estimate {_secs(_num(v['estimate_s']) or 0.0)}, "
                           f"{_secs(max(_num(v.get('left_s')) or 0.0, 0.0))} left)"
                           if v.get("estimate_s") is not None else "") + "</li>"
                        for k, v in skipped.items())
        timed = any(v.get("reason") == "time_budget" for v in skipped.values())
        budget = sel.get("budget_minutes") if timed else None
        skip = (f'<p class="warn">Skipped{f" (time budget {_e(budget)} min)" if budget else ""}:'
                f'</p><ul class="fails" data-list="skipped">{items}</ul>')
    miss = outcome.get("budget_miss") is True
    warn = ' class="warn"' if miss else ""
    note = (f'<p{warn}>{_e(outcome.get("note", ""))}</p>'
            f'<p class="help">Chosen on {_e(sel.get("n", "n/a"))} validation points that no method '
            f'trained or mined on; the test points below only report. Rule: '
            f'{_e(sel.get("rule", "n/a"))}. Attack for the choice: {_e(sel.get("attack", "n/a"))}; '
            f'on_budget_miss: {_e(sel.get("on_budget_miss", "n/a"))}.</p>')
    return (note + f'<table class="comparison" data-table="selection"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table>' + skip)


def _pooled_n(attacks: dict) -> int | None:
    ns = [a.get("n") for a in map(_dict, attacks.values()) if isinstance(a.get("n"), int)
          and _num(a.get("adaptive_accuracy")) is not None]
    return sum(ns) if ns else None


def _plain(v: object) -> str:
    """Strings as they are, everything else as JSON (lists read as ["a", "b"], not Python)."""
    return v if isinstance(v, str) else json.dumps(v, default=str)


def settings_section(report: dict) -> str:
    config = _dict(_redact(report.get("config")))
    attacks = _dict(report.get("attacks"))
    facts = [("method", report.get("method")), ("threat setting (protocol)", report.get("protocol")),
             ("seed", config.get("seed")), ("dataset", config.get("dataset")),
             ("clean-accuracy budget", _pct(_dict(report.get("clean_accuracy")).get("budget"))),
             ("schema version", report.get("schema_version"))]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e('n/a' if v is None else v)}</td></tr>" for k, v in facts)
    for key in ("slicing", "mining"):
        d = _dict(report.get(key))
        if d:
            rows += (f"<tr><th>{key}</th><td>"
                     + ", ".join(f"{_e(k)} = {_e(_plain(v))}" for k, v in d.items()) + "</td></tr>")
    params = "".join(
        f"<tr><th>{_e(str(a).upper())}</th><td>"
        + ", ".join(f"{_e(k)} = {_e(_plain(v))}" for k, v in _dict(_dict(p).get("params")).items())
        + "</td></tr>" for a, p in attacks.items())
    return ("<details><summary>Settings: attack parameters, protocol, seed, configuration, versions"
            f"</summary><table class=\"kv\">{rows}</table>"
            + (f"<h3>Attack parameters</h3><table class=\"kv\">{params}</table>" if params else "")
            + "<h3>Configuration (as validated, defaults filled in)</h3>"
            + f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>"
            + "<h3>Versions</h3>"
            + f"<pre>{_e(json.dumps(report.get('versions'), indent=2, sort_keys=True, default=str))}</pre>"
            + "</details>")


CSS = """
*{box-sizing:border-box}
body{font-family:'DejaVu Sans','Liberation Sans',system-ui,-apple-system,'Segoe UI',sans-serif;
margin:0;background:#f4f6f8;color:#1d2530;font-size:14px;line-height:1.45}
main{max-width:1160px;margin:0 auto;padding:20px 24px 40px}
header h1{font-size:22px;margin:0 0 2px}header .sub{color:#5b6673;margin:0 0 14px}
h2{font-size:16px;margin:0 0 4px}h3{font-size:14px;margin:14px 0 4px}
.card{background:#fff;border:1px solid #dde2e7;border-radius:8px;padding:14px 16px;margin:0 0 16px}
.card .help{color:#5b6673;margin:0 0 8px;font-size:13px}
.row{display:flex;gap:16px;flex-wrap:wrap}
.row>.col{flex:1 1 500px;min-width:0;display:flex;flex-direction:column}.row>.col>.card{flex:1 1 auto}
.lede{font-size:17px;font-weight:600;margin:0 0 10px}
.tiles{display:flex;gap:12px;margin:0 0 16px}
.tie{color:#5b6673;font-size:12px}
.tile{flex:1;background:#fff;border:1px solid #dde2e7;border-left:8px solid #999;border-radius:8px;
padding:10px 14px}
.tile.good{border-left-color:#009E73}.tile.bad{border-left-color:#D55E00}.tile.na{border-left-color:#999}
.tile .tt{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5b6673}
.tile .verdict{font-size:22px;font-weight:700;margin:2px 0}
.tile.good .verdict{color:#00795a}.tile.bad .verdict{color:#b34d00}.tile .tx{font-size:13px}
svg.chart{display:block;max-width:100%;height:auto}svg.mini{vertical-align:middle}
.legend{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 6px;font-size:13px}
.legend i{display:inline-block;margin-right:6px;vertical-align:middle}
.legend i.sw{width:14px;height:14px;border-radius:2px}.legend i.ln{width:22px;height:4px}
table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #e3e7eb;padding:5px 8px;text-align:left;vertical-align:top}
thead th{background:#f0f3f6;font-weight:600}
table.comparison td{white-space:nowrap}
tr.rec td{background:#e4f1fa;font-weight:600}tr.rec td.m{border-left:4px solid #0072B2}
.star{display:inline-block;margin-left:6px;padding:0 6px;border-radius:9px;background:#0072B2;
color:#fff;font-size:11px}
.this{display:inline-block;margin-left:6px;padding:0 6px;border-radius:9px;border:1px solid #5b6673;
color:#5b6673;font-size:11px}
td.best{outline:2px solid #0072B2;outline-offset:-2px}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:11px;font-weight:700;
white-space:nowrap}
.badge.pass{background:#009E73;color:#fff}.badge.fail{background:#D55E00;color:#fff}
.badge.na{background:#e3e7eb;color:#5b6673}
table.matrix th.rowh{font-weight:normal}
ul.fails{margin:8px 0;padding-left:18px}ul.details{padding-left:18px;font-size:12px}
.muted{color:#5b6673}.warn{color:#b34d00;font-weight:600}
details summary{cursor:pointer;color:#0072B2;font-weight:600}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}
table.kv th{width:220px;font-weight:600}
"""


def render_html(report: dict) -> str:
    """The whole page as a string; ``report`` is a ``report.build_report`` result (or any part
    of one: missing sections are left out or marked n/a)."""
    report = report if isinstance(report, dict) else {}
    method = str(report.get("method") or "hardened")
    config = _dict(report.get("config"))
    attacks = _dict(report.get("attacks"))
    ca = _dict(report.get("clean_accuracy"))
    n_values = sorted({a.get("n") for a in map(_dict, attacks.values()) if a.get("n") is not None},
                      key=str)
    sub = [f"method <b>{_e(method)}</b>", f"threat setting <b>{_e(report.get('protocol', 'n/a'))}</b>"]
    if config.get("dataset"):
        sub.append(f"dataset <b>{_e(config['dataset'])}</b>")
    if n_values:
        sub.append(f"{_e(', '.join(map(str, n_values)))} attacked test points")
    if config.get("seed") is not None:
        sub.append(f"seed {_e(config['seed'])}")

    parts = [f'<header><h1>DARE robustness report</h1><p class="sub">{" · ".join(sub)}</p></header>',
             headline(report)]

    pgd_eps = _num(_dict(_dict(attacks.get("pgd")).get("params")).get("eps"))
    if attacks:
        parts.append('<section class="card" id="attacks"><h2>Accuracy under attack</h2>'
                     '<p class="help">Higher is more robust. Orange: the original model against '
                     'attacks made for it. Light blue: the hardened model on those same examples '
                     "(transfer, the paper's Empirical Robustness). Dark blue: the attack re-run "
                     'against the hardened model itself (adaptive; the honest number).</p>'
                     + _legend([(label, c) for _, label, c in SERIES]) + attack_chart(attacks)
                     + cw_note(_dict(attacks.get("cw")), method) + "</section>")
    else:
        parts.append('<section class="card"><h2>Accuracy under attack</h2>'
                     '<p class="muted">No attack results were recorded.</p></section>')

    if any("minimal_perturbation" in _dict(a) for a in attacks.values()):
        parts.append('<section class="card" id="minimal"><h2>Minimal perturbation sizes</h2>'
                     '<p class="help">Under the minimal protocol every attack is unbounded and '
                     'succeeds almost always; what tells models apart is how large a perturbation '
                     'it needs. Curves: robust accuracy over the kept points as the budget grows.</p>'
                     + minimal_section(attacks, method) + "</section>")
    if headline_attack(attacks):
        parts.append('<section class="card" id="autoattack"><h2>AutoAttack, sub-attack by '
                     'sub-attack</h2>' + autoattack_section(_dict(attacks["autoattack"]), method)
                     + "</section>")

    comp = report.get("comparison")
    comp = comp if isinstance(comp, dict) and comp else None
    recommended = None if comp is None or comp.get("recommended") is None else str(comp["recommended"])

    # Clean accuracy and timings stacked on the left, the PGD curve on the right.
    left = []
    if ca:
        left.append('<section class="card" id="clean"><h2>Clean accuracy and its budget</h2>'
                    f'<p class="help">The hardened model must stay right of the dashed budget floor '
                    f'(original minus the allowed drop of {_pct(ca.get("budget"))}).</p>'
                    + _legend([("original", ORIGINAL), (method, HARDENED),
                               ("budget floor", BUDGET)]) + clean_chart(ca, method) + "</section>")
    timings = _dict(report.get("timings_s"))
    left.append('<section class="card" id="timings"><h2>Stage timings</h2>'
                + (timing_chart(timings) if timings else
                   '<p class="muted">No timings were recorded.</p>') + "</section>")
    curve = _dict(report.get("pgd_curve"))
    right = ('<section class="card" id="pgd"><h2>PGD robust accuracy over epsilon</h2>'
             '<p class="help">A larger perturbation budget should push accuracy towards zero; the '
             'higher the hardened line, the more robust.</p>'
             + (pgd_chart(curve, method, pgd_eps, recommended) if curve else
                '<p class="muted">No PGD curve was recorded.</p>') + "</section>")
    parts.append(f'<div class="row"><div class="col">{"".join(left)}</div>'
                 f'<div class="col">{right}</div></div>')

    if comp is not None and isinstance(comp.get("selection"), dict):
        parts.append('<section class="card" id="selection"><h2>Method selection (validation)</h2>'
                     + selection_section(comp["selection"], comp.get("skipped")) + "</section>")
    if comp is not None:
        title = ("Final figures (test)" if isinstance(comp.get("selection"), dict)
                 else "Method comparison")
        parts.append(f'<section class="card" id="comparison"><h2>{title}</h2>'
                     + comparison_section(comp, method, _pooled_n(attacks)) + "</section>")

    parts.append('<section class="card" id="sanity"><h2>Sanity checks</h2>'
                 '<p class="help">Checks from the robustness literature; a failure means the attack '
                 'numbers above may be too kind. Hover a badge for its detail.</p>'
                 + sanity_section(report.get("sanity_checks") or []) + "</section>")

    parts.append(f'<section class="card" id="settings">{settings_section(report)}</section>')

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>DARE report: {_e(method)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts) + "</main></body></html>\n")
