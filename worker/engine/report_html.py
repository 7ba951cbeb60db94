"""``report.html``: one self-contained page for people (no scripts, fonts or images from anywhere).

Charts are inline SVG drawn here: per attack, bars for the original model on its own adversarial
set, the hardened model on that set (transfer) and the hardened model under the attack re-run
against it (adaptive); clean accuracy before and after against the budget; PGD accuracy over
epsilon. Sanity verdicts, timings and the method comparison are tables. A first version: layout
and styling are deliberately plain.
"""
from __future__ import annotations

import json
from html import escape

COLORS = {"original": "#7f7f7f", "transfer": "#1f77b4", "adaptive": "#d62728",
          "hardened": "#2ca02c", "budget": "#ff7f0e"}
LINE_COLORS = ("#7f7f7f", "#2ca02c", "#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#ff7f0e")
REDACTED_CONFIG_KEYS = ("webhook_url",)  # may carry a secret token; the page gets shared around


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _bars(items: list[tuple[str, float | None, str]], *, width: int = 360, marker: float | None = None,
          marker_label: str = "") -> str:
    """Horizontal bars for values in [0, 1]; ``marker`` draws a vertical reference line."""
    label_w, bar_w, row_h = 130, width - 130 - 60, 22
    h = row_h * len(items) + 20
    out = [f'<svg class="chart" width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img">']
    for i, (label, v, color) in enumerate(items):
        y = 4 + i * row_h
        out.append(f'<text x="0" y="{y + 14}" font-size="12">{escape(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="{row_h - 6}" fill="#eee"/>')
        if v is not None:
            out.append(f'<rect x="{label_w}" y="{y}" width="{bar_w * max(0.0, min(1.0, v)):.1f}" '
                       f'height="{row_h - 6}" fill="{color}"><title>{escape(label)}: {_pct(v)}</title></rect>')
        out.append(f'<text x="{label_w + bar_w + 4}" y="{y + 14}" font-size="12">{_pct(v)}</text>')
    if marker is not None:
        x = label_w + bar_w * max(0.0, min(1.0, marker))
        out.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{h - 14}" stroke="{COLORS["budget"]}" '
                   f'stroke-width="2" stroke-dasharray="4 2"/>')
        out.append(f'<text x="{x:.1f}" y="{h - 2}" font-size="11" text-anchor="middle" '
                   f'fill="{COLORS["budget"]}">{escape(marker_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _line_chart(curve: dict, *, width: int = 460, height: int = 260) -> str:
    """Accuracy (0..1) over eps for every model in ``curve`` ({"eps": [...], name: [...]})."""
    eps = curve.get("eps") or []
    series = {k: v for k, v in curve.items() if k != "eps" and v}
    if len(eps) < 2 or not series:
        return "<p>No PGD curve was recorded.</p>"
    left, right, top, bottom = 40, 110, 10, 30
    pw, ph = width - left - right, height - top - bottom
    xmax = max(eps) or 1.0

    def px(e):
        return left + pw * e / xmax

    def py(a):
        return top + ph * (1 - max(0.0, min(1.0, a)))

    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.2f}</text>')
    for e in eps:
        out.append(f'<text x="{px(e):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{e:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 2}" font-size="11" text-anchor="middle">'
               'L-inf epsilon (PGD)</text>')
    for i, (name, accs) in enumerate(series.items()):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        pts = " ".join(f"{px(e):.1f},{py(a):.1f}" for e, a in zip(eps, accs) if a is not None)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2">'
                   f'<title>{escape(name)}</title></polyline>')
        for e, a in zip(eps, accs):
            if a is not None:
                out.append(f'<circle cx="{px(e):.1f}" cy="{py(a):.1f}" r="2.5" fill="{color}">'
                           f'<title>{escape(name)} eps={e:g}: {_pct(a)}</title></circle>')
        ly = top + 14 + 16 * i
        out.append(f'<line x1="{left + pw + 8}" y1="{ly - 4}" x2="{left + pw + 24}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 28}" y="{ly}" font-size="11">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _verdict(ok) -> str:
    if ok is None:
        return '<span class="na">n/a</span>'
    return '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'


def _json_block(obj) -> str:
    return f"<pre>{escape(json.dumps(obj, indent=2, sort_keys=True, default=str))}</pre>"


def _redact(config):
    if not isinstance(config, dict):
        return config
    return {k: ("(redacted)" if k in REDACTED_CONFIG_KEYS and v else _redact(v)) for k, v in config.items()}


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}.pass{color:#2ca02c;font-weight:600}.fail{color:#d62728;font-weight:700}
.na{color:#999}.grid{display:flex;flex-wrap:wrap;gap:1.5em}.card{border:1px solid #eee;padding:.6em}
.legend span{display:inline-block;width:12px;height:12px;margin:0 .3em 0 1em;vertical-align:middle}
pre{background:#f8f8f8;padding:.6em;overflow:auto;font-size:.8em}tr.rec{background:#eef7ee}
.banner{padding:.6em;border-radius:4px}.bad{background:#fdecea}.good{background:#edf7ed}
"""


def render_html(report: dict) -> str:
    """The whole page as a string; ``report`` is a ``report.build_report`` result."""
    method = report.get("method") or "hardened"
    parts = [f"<h1>DARE robustness report: {escape(str(method))}</h1>",
             f"<p>Schema version {escape(str(report.get('schema_version')))}; threat setting "
             f"<b>{escape(str(report.get('protocol', 'n/a')))}</b>.</p>"]

    failed = [c for c in report.get("sanity_checks", []) if not c.get("passed")]
    ca = report.get("clean_accuracy") or {}
    if failed or ca.get("within_budget") is False:
        msgs = []
        if ca.get("within_budget") is False:
            msgs.append("the clean-accuracy budget is exceeded")
        if failed:
            msgs.append(f"{len(failed)} sanity check(s) failed: the robust accuracies below may "
                        "overstate robustness")
        parts.append(f'<p class="banner bad">Warning: {escape("; ".join(msgs))}.</p>')

    # Clean accuracy before and after, against the budget.
    if ca:
        floor = None if ca.get("original") is None else ca["original"] - ca.get("budget", 0)
        parts.append("<h2>Clean accuracy</h2>")
        parts.append(_bars([("original", ca.get("original"), COLORS["original"]),
                            (str(method), ca.get("hardened"), COLORS["hardened"])],
                           marker=floor, marker_label="budget floor"))
        parts.append(f"<p>Drop {_pct(ca.get('drop'))} of a {_pct(ca.get('budget'))} budget: "
                     f"{_verdict(ca.get('within_budget'))}</p>")

    # Per attack: original on its own set, hardened on that set, hardened re-attacked.
    attacks = report.get("attacks") or {}
    if attacks:
        parts.append("<h2>Attacks</h2>")
        parts.append('<p class="legend">'
                     f'<span style="background:{COLORS["original"]}"></span>original on its own '
                     'adversarial set'
                     f'<span style="background:{COLORS["transfer"]}"></span>hardened on that set '
                     '(transfer ER, the paper\'s number)'
                     f'<span style="background:{COLORS["adaptive"]}"></span>hardened, attack re-run '
                     'against it (adaptive)</p>')
        cards = []
        for name, a in attacks.items():
            cards.append(f'<div class="card"><b>{escape(name.upper())}</b> (n = {escape(str(a.get("n")))})'
                         + _bars([("original", a.get("original_accuracy"), COLORS["original"]),
                                  ("transfer ER", a.get("transfer_er"), COLORS["transfer"]),
                                  ("adaptive", a.get("adaptive_accuracy"), COLORS["adaptive"])])
                         + "</div>")
        parts.append(f'<div class="grid">{"".join(cards)}</div>')
        rows = [[escape(n), escape(json.dumps(a.get("params", {}), sort_keys=True, default=str))]
                for n, a in attacks.items()]
        parts.append("<h3>Attack parameters</h3>" + _table(["attack", "parameters"], rows))

    if report.get("pgd_curve"):
        parts.append("<h2>PGD accuracy over epsilon</h2>" + _line_chart(report["pgd_curve"]))

    checks = report.get("sanity_checks") or []
    parts.append("<h2>Sanity checks</h2>")
    if checks:
        parts.append(_table(["check", "verdict", "detail"],
                            [[escape(c["name"]), _verdict(c.get("passed")), escape(str(c.get("detail", "")))]
                             for c in checks]))
    else:
        parts.append("<p>No sanity checks were run.</p>")

    comp = report.get("comparison")
    if comp:
        parts.append("<h2>Method comparison</h2>")
        parts.append(f"<p>Recommended: <b>{escape(str(comp.get('recommended')))}</b> "
                     f"(rule: {escape(str(comp.get('rule', '')))}).</p>")
        methods = comp.get("methods") or {}
        names = list(next(iter(methods.values()), {}).get("attacks", {}))
        header = ["method", "clean", "within budget"]
        header += [f"{a} transfer / adaptive" for a in names] + ["mean transfer", "mean adaptive"]
        rows = []
        for m, s in methods.items():
            row = [escape(m), _pct(s.get("clean_accuracy")), _verdict(s.get("within_budget"))]
            row += [f"{_pct(s['attacks'].get(a, {}).get('transfer_er'))} / "
                    f"{_pct(s['attacks'].get(a, {}).get('adaptive_accuracy'))}" for a in names]
            row += [_pct(s.get("mean_transfer_er")), _pct(s.get("mean_adaptive_accuracy"))]
            rows.append(row)
        table = _table(header, rows, "comparison")
        rec = comp.get("recommended")
        if rec is not None:  # highlight the recommended row
            table = table.replace(f"<tr><td>{escape(rec)}</td>", f'<tr class="rec"><td>{escape(rec)}</td>', 1)
        parts.append(table)

    timings = report.get("timings_s") or {}
    if timings:
        parts.append("<h2>Timings</h2>" + _table(
            ["stage", "seconds"],
            [[escape(str(k)), "n/a" if v is None else f"{v:.2f}"] for k, v in timings.items()]))

    parts.append("<h2>Slicing and mining</h2>")
    parts.append(_table(["", "values"], [["slicing", escape(json.dumps(report.get("slicing"), default=str))],
                                         ["mining", escape(json.dumps(report.get("mining"), default=str))]]))
    parts.append("<h2>Configuration</h2>" + _json_block(_redact(report.get("config"))))
    parts.append("<h2>Versions</h2>" + _json_block(report.get("versions")))

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>DARE report: {escape(str(method))}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
