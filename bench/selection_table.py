"""A compare/auto job's methods side by side, from its report.json: the settings each was chosen
with, its validation figures (what the choice saw) and its test figures (what the report
measures), its time, and which one auto shipped.

    python -m bench.selection_table OUT/report.json [--out bench/results/auto_selection.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def render(report: dict) -> str:
    comp = report["comparison"]
    sel = comp["selection"]
    final = sel["attack"]
    rows = ["| method | chosen settings | val clean | val PGD | val AutoAttack | test clean | "
            f"test {final} (adaptive) | test PGD (adaptive) | s |",
            "|---|---|---|---|---|---|---|---|---|"]
    o = sel["original"]
    orig_attacks = report["attacks"]
    rows.append(f"| original | | {_pct(o['val_clean'])} | {_pct(o['val_pgd'])} | "
                f"{_pct(o.get('val_autoattack'))} | {_pct(report['clean_accuracy']['original'])} | "
                f"{_pct(orig_attacks[final]['original_accuracy'])} | "
                f"{_pct(orig_attacks['pgd']['original_accuracy'])} | |")
    for m, row in sel["methods"].items():
        test = comp["methods"].get(m, {})
        attacks = test.get("attacks") or {}
        a, p = attacks.get(final, {}), attacks.get("pgd", {})
        name = f"**{m}** (shipped)" if m == report["method"] else m
        if row.get("control"):
            name += " (control)"
        settings = ", ".join(f"{k} {v}" for k, v in (row.get("settings") or {}).items())
        rows.append(f"| {name} | {settings} | {_pct(row['val_clean'])} | {_pct(row['val_pgd'])} | "
                    f"{_pct(row.get('val_autoattack'))} | {_pct(test.get('clean_accuracy'))} | "
                    f"{_pct(a.get('adaptive_accuracy'))}{_ci((a.get('ci95') or {}).get('adaptive_accuracy'))} | "
                    f"{_pct(p.get('adaptive_accuracy'))} | {row.get('seconds', 0):.0f} |")
    skipped = comp.get("skipped") or {}
    best_test = max(((m, (t.get("attacks") or {}).get(final, {}).get("adaptive_accuracy"))
                     for m, t in comp["methods"].items()
                     if not sel["methods"].get(m, {}).get("control")
                     and t.get("within_budget")), key=lambda mv: mv[1] or -1)
    return "\n".join([
        f"Selection on {sel['n']} held-out validation points by {final}; test: "
        f"{orig_attacks[final]['n']} test points. Outcome: {sel['outcome']['note']}.",
        f"Best single method on test ({final}, within the clean budget): {best_test[0]} "
        f"({_pct(best_test[1])}); shipped: {report['method']}.",
        "Skipped: " + (", ".join(f"{k} ({v.get('reason')})" for k, v in skipped.items()) or "none"),
        "", *rows, ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    text = render(json.loads(args.report.read_text()))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
