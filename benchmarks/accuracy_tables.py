"""Markdown tables for the model card from `boltzformer evaluate --json` outputs.

    python benchmarks/accuracy_tables.py benchmarks/results/eval_synth.json \
        benchmarks/results/eval_real_heldout.json benchmarks/results/eval_real_train.json

Prints, per file: Dice (mean over cases with a target), lesion-wise sensitivity and
false-positive components per lesion-free slice, overall and per target and size band; the
numbers are copied from the JSON, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _mean(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def group_rows(cases: list[dict], key: str) -> list[tuple[str, dict]]:
    """Per value of `key`: n with a target, mean Dice, mean sensitivity, FP per lesion-free case."""
    groups = defaultdict(list)
    for c in cases:
        groups[c.get(key, "all")].append(c)
    out = []
    for name, cs in sorted(groups.items()):
        pos = [c for c in cs if c["true_lesions"] > 0]
        neg = [c for c in cs if c["true_lesions"] == 0]
        out.append((name, {"n": len(pos), "n_free": len(neg), "dice": _mean(c["dice"] for c in pos),
                           "sensitivity": _mean(c["sensitivity"] for c in pos),
                           "fp_free": _mean(c["false_positive_components"] for c in neg)}))
    return out


def table(summary: dict, key: str | None) -> str:
    cases = summary["cases"]
    rows = group_rows(cases, key) if key else group_rows([{**c, "all": "all"} for c in cases], "all")
    lines = [f"| {key or 'set'} | cases with target | Dice | lesion sensitivity | lesion-free cases | FP components / lesion-free slice |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n']} | {_fmt(r['dice'])} | {_fmt(r['sensitivity'])} | {r['n_free']} | {_fmt(r['fp_free'])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="+")
    args = p.parse_args()
    for path in args.json:
        s = json.loads(Path(path).read_text())
        print(f"### {Path(path).name}\n\n`{s.get('command', '?')}` (weights sha256 {s.get('weights_sha256', '?')[:12]})\n")
        print(table(s, None) + "\n")
        keys = [k for k in ("size_band", "target") if s["cases"] and k in s["cases"][0]] or ["prompt"]
        for key in keys:
            print(table(s, key) + "\n")


if __name__ == "__main__":
    main()
