"""Tables from `ab_bench.py`'s files: `python benchmarks/gpu/ab_report.py FOLDER --before LABEL --after LABEL`.

FOLDER holds ab_<round>_<version>.json as a lease returned them. Writes into benchmarks/results/:
- decoder_cuda_batch1.{json,md}, decoder_cuda_batch8.{json,md}: the "new" version's first round
  (its full decoder result), with every round of both versions summed up below the table;
- volume_cuda_ab.{json,md}: every `segment_volume` run and post-processing time of both versions.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model.bench.decoder import decoder_markdown  # noqa: E402  (the checkout's package, not an installed one)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def load(folder: Path) -> dict:
    runs = {}
    for f in sorted(folder.glob("ab_*_*.json")):
        _, rnd, label = f.stem.split("_", 2)
        runs[(int(rnd), label)] = json.loads(f.read_text())
    return runs


def ratio_lines(runs: dict, batch: str, names: dict) -> list[str]:
    """One line per round and version: dense / (gather + sampling) at each token map."""
    lines = ["| round | code | " + " | ".join(f"{r['side']}²" for r in next(iter(runs.values()))["decoder"][batch]["rows"])
             + " |", "|---|---|" + "---|" * len(next(iter(runs.values()))["decoder"][batch]["rows"])]
    for (rnd, label), res in sorted(runs.items()):
        cells = []
        for r in res["decoder"][batch]["rows"]:
            t = r["time_ms"]
            cells.append(f"{t['dense'] / t['sparse_gather+sampling']:.2f}× ({t['sparse_gather+sampling']:.3f} vs {t['dense']:.3f} ms)")
        lines.append(f"| {rnd + 1} | {names[label]} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--before", required=True, help="what 'old' was (a commit)")
    ap.add_argument("--after", required=True, help="what 'new' was (a commit or 'this change')")
    ap.add_argument("--date", required=True)
    args = ap.parse_args(argv)
    runs = load(args.folder)
    names = {"old": args.before, "new": args.after}
    first_new = runs[(0, "new")]
    gpu = first_new["gpu"]
    for batch in ("batch1", "batch8"):
        res = first_new["decoder"][batch]
        (RESULTS / f"decoder_cuda_{batch}.json").write_text(json.dumps(res, indent=2) + "\n")
        text = decoder_markdown(res)
        text += (f"\n\nMeasured {args.date} on an {gpu} lent through the device tool (16 host cores), 100 "
                 f"repeats per cell (median), {names['new']}, round 1. Both code versions ran in turn in their "
                 f"own processes, twice, on the same machine (`benchmarks/gpu/ab_bench.py`). Speed-up of "
                 f"sparse attention with its sampling over dense attention (dense ms / sparse ms) in every run:\n\n")
        text += "\n".join(ratio_lines(runs, batch, names)) + "\n"
        (RESULTS / f"decoder_cuda_{batch}.md").write_text(text)
    rows = []
    for (rnd, label), res in sorted(runs.items()):
        for i, v in enumerate(res["volume"]):
            rows.append({"round": rnd + 1, "code": names[label], "run_in_process": i + 1, **v})
    post = {f"{names[label]} round {rnd + 1}": res["rethreshold_s"] for (rnd, label), res in sorted(runs.items())}
    (RESULTS / "volume_cuda_ab.json").write_text(json.dumps({"gpu": gpu, "date": args.date, "runs": rows,
                                                             "postprocess_alone_s": post}, indent=2) + "\n")
    md = [f"# 300 × 512² CT on one GPU ({gpu}, 16 host cores), {args.date}: {names['old']} vs {names['new']}", "",
          "`Segmenter.segment_volume` in memory on `bench_ct(300, 512)` (the `bench volume` CT), prompt "
          "'lung nodule', bundled weights, false-positive filter on. Both versions ran in turn in their own "
          "processes, twice (`benchmarks/gpu/ab_bench.py`); run 1 of each process includes CUDA's first-use "
          "costs. Reading and writing NIfTI are not timed here (no SimpleITK on that machine): 0.79 s on "
          "the 2-core CPU machine (`volume_cpu.json`).", "",
          "| round | code | run | attention_impl | segment s | preprocess s | inference s | post-process s | GPU peak MB | lesions |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings_s"]
        md.append(f"| {r['round']} | {r['code']} | {r['run_in_process']} | {r['attention_impl']} | {r['seconds_segment']:.2f} | "
                  f"{t['preprocess']:.2f} | {t['inference']:.2f} | {t['postprocess']:.2f} | {r['gpu_peak_mb']:.0f} | {r['lesions']} |")
    md += ["", "Post-processing alone (`rethreshold` of the last result, three times):", ""]
    md += [f"- {k}: " + ", ".join(f"{x:.2f}" for x in v) + " s" for k, v in post.items()]
    warm = {label: [r["seconds_segment"] for r in rows if r["code"] == names[label] and r["run_in_process"] in (2, 3)]
            for label in ("old", "new")}
    md += ["", "Warm runs with the default attention_impl (runs 2 and 3): " + "; ".join(
        f"{names[k]} {min(v):.2f}-{max(v):.2f} s (median {statistics.median(v):.2f})" for k, v in warm.items()), ""]
    (RESULTS / "volume_cuda_ab.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
