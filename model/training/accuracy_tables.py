"""Markdown tables for the model card from `boltzformer evaluate --json` outputs.

    python benchmarks/accuracy_tables.py benchmarks/results/eval_synth.json \
        benchmarks/results/eval_real_heldout.json benchmarks/results/eval_real_train.json

Prints, per file: Dice (mean over cases with a target), lesion sensitivity (pooled over the
true lesions; the mean of the per-case ratios beside it) and false-positive components per
lesion-free case, overall and per target and size band, then the lesions found by their mean
axial diameter; the numbers are copied from the JSON, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from ..evaluate import summarise


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def group_rows(cases: list[dict], key: str) -> list[tuple[str, dict]]:
    """Per value of `key`: boltzformer.evaluate.summarise of that group's cases."""
    groups = defaultdict(list)
    for c in cases:
        groups[c.get(key, "all")].append(c)
    return [(name, summarise(cs)) for name, cs in sorted(groups.items())]


def table(summary: dict, key: str | None) -> str:
    rows = group_rows(summary["cases"], key or "all")  # no key: one group, "all"
    lines = [f"| {key or 'set'} | cases with target | Dice | lesion sensitivity (lesions) | per-case mean sensitivity "
             "| lesion-free cases | FP components / lesion-free case |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n_cases'] - r['n_lesion_free']} | {_fmt(r['mean_dice'])} | "
                     f"{_fmt(r['lesion_sensitivity'])} ({r['true_lesions']}) | {_fmt(r['mean_case_sensitivity'])} | "
                     f"{r['n_lesion_free']} | {_fmt(r['false_positives_per_lesion_free_case'])} |")
    return "\n".join(lines)


def size_table(summary: dict) -> str:
    """Lesions found by the true lesion's mean axial diameter, pooled over the cases."""
    by_size = summarise(summary["cases"]).get("lesion_sensitivity_by_size") or {}
    lines = ["| true lesion, mean axial diameter | lesions | found | sensitivity |", "|---|---|---|---|"]
    for name, v in by_size.items():
        lines.append(f"| {name} | {v['lesions']} | {v['detected']} | {_fmt(v['sensitivity'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="+")
    args = p.parse_args(argv)
    for path in args.json:
        s = json.loads(Path(path).read_text(encoding="utf-8"))
        print(f"### {Path(path).name}\n\n`{s.get('command', '?')}` (weights sha256 {s.get('weights_sha256', '?')[:12]})\n")
        print(table(s, None) + "\n")
        keys = [k for k in ("size_band", "target") if s["cases"] and k in s["cases"][0]] or ["prompt"]
        for key in keys:
            print(table(s, key) + "\n")
        print(size_table(s) + "\n")
    return 0
