"""The `boltzformer` command: segment, evaluate, sample, testset, info, train, bench.

Every user error prints one line `boltzformer: error: <file>: <problem>` and exits with status 2
(`--debug` shows the traceback). Output paths are checked before any inference, and outputs
are written atomically at the end, so a failed or interrupted run leaves nothing behind.
Heavy imports (torch) happen inside the commands, so `boltzformer --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ._version import __version__
from .errors import BoltzformerError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def _err(msg: str) -> None:
    print(f"boltzformer: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"boltzformer: warning: {msg}", file=sys.stderr)


def parse_slices(text: str | None, name: str = "--slices") -> tuple[int, int] | None:
    """'A:B' -> (A, B) half-open; 'A:' and ':B' allowed; one number 'A' -> (A, A+1)."""
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else 1 << 31
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise BoltzformerError(f"{name} {text!r}: expected START:STOP slice indices, e.g. 10:40") from None
    if start < 0 or stop <= start:
        raise BoltzformerError(f"{name} {text!r}: need 0 <= START < STOP")
    return start, stop


# -- segment --------------------------------------------------------------------------------------
def cmd_segment(args) -> int:
    from . import intensity
    from .io import check_output_path, read_volume, write_volume
    from .postprocess import write_lesion_table

    if not args.prompt or not args.prompt.strip():
        raise BoltzformerError("the prompt is empty; give one with -p, e.g. -p \"lung nodule\"")
    if args.window and args.window not in intensity.WINDOWS:
        raise BoltzformerError(f"--window {args.window!r}: unknown; choose one of {', '.join(intensity.WINDOWS)}")
    if not 0.0 <= args.threshold <= 1.0:
        raise BoltzformerError(f"--threshold {args.threshold}: must be between 0 and 1")
    if args.runs < 1:
        raise BoltzformerError(f"--runs {args.runs}: must be at least 1")
    slices = parse_slices(args.slices)
    outputs = [args.output, args.probabilities, args.uncertainty, args.attention, args.lesions]
    named = [Path(p) for p in outputs if p]
    if len({p.resolve() for p in named}) != len(named):
        raise BoltzformerError("two outputs name the same file")
    if Path(args.input).resolve() in {p.resolve() for p in named}:
        raise BoltzformerError(f"{args.output}: would overwrite the input")
    for p in named:  # before any inference: a long run must not fail at the end
        check_output_path(p, overwrite=args.overwrite)
    if args.lesions and Path(args.lesions).suffix.lower() not in (".csv", ".json"):
        raise BoltzformerError(f"{args.lesions}: lesion table must end in .csv or .json")
    if args.attention and not str(args.attention).endswith(".npz"):
        raise BoltzformerError(f"{args.attention}: attention maps are written as .npz")

    volume = read_volume(args.input, series=args.series)
    if volume.metadata.get("series_note") and not args.quiet:
        print(volume.metadata["series_note"], file=sys.stderr)
    from .segmenter import Segmenter

    seg = Segmenter.from_pretrained(args.weights, device=args.device)
    modality = None if args.modality == "auto" else args.modality
    gen = seg.iter_segment(
        volume, args.prompt, window=args.window, modality=modality, slices=slices, runs=args.runs, seed=args.seed,
        threshold=args.threshold, min_lesion_mm3=args.min_lesion_mm3, return_attention=bool(args.attention),
        batch_size=args.batch_size,
    )
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="slice", desc="segmenting", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if bar is not None:
                bar.total = p.slices_total
                bar.update(p.slices_done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    for w in result.warnings:
        _warn(w)
    write_volume(result.mask_volume(), args.output, overwrite=args.overwrite)
    if args.probabilities:
        write_volume(result.probability_volume(), args.probabilities, overwrite=args.overwrite)
    if args.uncertainty:
        if result.uncertainty is None:
            _warn("--uncertainty needs --runs 2 or more; writing zeros")
            import numpy as np

            write_volume(volume.with_array(np.zeros(volume.shape, np.float32)), args.uncertainty, overwrite=args.overwrite)
        else:
            write_volume(volume.with_array(result.uncertainty), args.uncertainty, overwrite=args.overwrite)
    if args.attention:
        _write_attention(result, args.attention, args.overwrite)
    if args.lesions:
        write_lesion_table(result.lesions, args.lesions, overwrite=args.overwrite)
    total_ml = sum(r["volume_mm3"] for r in result.lesions) / 1000
    print(f"{len(result.lesions)} lesion(s) for '{result.prompt}', total {total_ml:.2f} mL; "
          f"{result.slices[1] - result.slices[0]} slices in {time.perf_counter() - t0:.1f} s on {seg.device}; "
          f"mask -> {args.output}")
    return 0


def _write_attention(result, path, overwrite) -> None:
    import numpy as np

    from .io import atomic_output

    att = result.attention
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, counts=att.counts, probabilities=att.probabilities, strides=np.array(att.strides),
                temperatures=np.array(att.temperatures), tokens_per_query=np.array(att.tokens_per_query),
                slice_start=att.slice_start, grid_scale_yx=np.array(att.grid_scale_yx), num_queries=att.num_queries,
            )


# -- evaluate -------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_dir, format_table
    from .io import atomic_output, check_output_path
    from .segmenter import Segmenter
    from .weights import sha256

    if not 0.0 <= args.threshold <= 1.0:
        raise BoltzformerError(f"--threshold {args.threshold}: must be between 0 and 1")
    if args.runs < 1:
        raise BoltzformerError(f"--runs {args.runs}: must be at least 1")
    if args.json:
        check_output_path(args.json, overwrite=True)
    seg = Segmenter.from_pretrained(args.weights, device=args.device)
    cases = [c for c in args.cases.split(",") if c] if args.cases else None
    summary = evaluate_dir(args.dir, seg, case_ids=cases, split=args.split, progress=not args.quiet, seed=args.seed,
                           threshold=args.threshold, runs=args.runs)
    print(format_table(summary))
    if args.json:
        summary["command"] = "boltzformer " + " ".join(sys.argv[1:]) if args.argv is None else "boltzformer " + " ".join(args.argv)
        summary["weights"] = seg.info.get("weights_source")
        summary["weights_sha256"] = sha256(seg.info["weights_path"])
        with atomic_output(args.json, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=2, default=float))
    return 0


# -- sample / testset -------------------------------------------------------------------------------
def cmd_sample(args) -> int:
    import csv

    from .io import check_output_path, write_volume
    from .synth.sample import SAMPLES

    names = list(SAMPLES) if args.name == "all" else [args.name]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{n}_{kind}.nii.gz" for n in names for kind in ("image", "mask")] + [out / "cases.csv"]
    for p in paths:
        check_output_path(p, overwrite=args.overwrite)
    rows = []
    for n in names:
        case = SAMPLES[n]()
        write_volume(case.volume(), out / f"{n}_image.nii.gz", overwrite=args.overwrite)
        write_volume(case.mask_volume(), out / f"{n}_mask.nii.gz", overwrite=args.overwrite)
        rows.append({"case_id": n, "prompt": case.prompt, "modality": case.modality})
        print(f"{out / (n + '_image.nii.gz')}  ({case.modality}, {case.image.shape[0]} slices; prompt '{case.prompt}')")
    from .io import atomic_output

    with atomic_output(out / "cases.csv", overwrite=args.overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case_id", "prompt", "modality"])
            w.writeheader()
            w.writerows(rows)
    return 0


def cmd_testset(args) -> int:
    from .synth.testset import write_testset

    out = write_testset(args.out_dir, count=args.count, seed=args.seed, overwrite=args.overwrite)
    print(f"held-out synthetic cases -> {out}")
    return 0


# -- info -------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import torch

    from . import weights
    from .segmenter import available_devices

    print(f"boltzformer {__version__}")
    print(f"torch {torch.__version__}; devices: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in available_devices().items()))
    try:
        src = weights.resolve(args.weights)
    except BoltzformerError as exc:
        print(f"weights: none ({exc})")
        return 0
    meta = weights.read_config(src.config_path)
    cfg = meta.get("config", {})
    print(f"weights: {src.weights_path} ({src.description})")
    print(f"sha256: {weights.sha256(src.weights_path)}")
    train = meta.get("training", {})
    print(f"network: {train.get('parameters', '?')} parameters, {cfg.get('num_layers')} decoder layers, "
          f"{cfg.get('num_queries')} queries, sampling {cfg.get('sampling')} (ratio {cfg.get('token_ratio')}, "
          f"tau0 {cfg.get('tau0')}), input {cfg.get('image_size')}²; trained {meta.get('trained_steps', '?')} steps")
    prompts = meta.get("prompts", [])
    print(f"prompts seen in training ({len(prompts)}): " + ", ".join(prompts))
    return 0


def cmd_train(args) -> int:
    from .train import run_train

    return run_train(args)


# -- bench --------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from . import bench

    return bench.main_decoder(args) if args.what == "decoder" else bench.main_volume(args)


# -- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="boltzformer", description="Text-prompted lesion segmentation in CT and MRI (BoltzFormer).")
    p.add_argument("--version", action="version", version=f"boltzformer {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    devices = ("auto", "cpu", "cuda", "mps")

    s = sub.add_parser("segment", help="segment a volume for a text prompt")
    s.add_argument("input", help="NIfTI/NRRD/MHA file or DICOM series folder")
    s.add_argument("-p", "--prompt", required=True, help='what to segment, e.g. "lung nodule"')
    s.add_argument("-o", "--output", required=True, help="mask output (.nii.gz, .nii, .nrrd, .mha)")
    s.add_argument("--device", default="auto", choices=devices)
    s.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same result)")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--window", default=None, help="CT window: lung, mediastinum, soft_tissue, liver, bone, brain")
    s.add_argument("--modality", default="auto", choices=("auto", "CT", "MR"))
    s.add_argument("--series", default=None, help="DICOM series (UID, index or description text)")
    s.add_argument("--slices", default=None, help="slice range START:STOP (0-based, stop excluded)")
    s.add_argument("--runs", type=int, default=1, help="sampling runs; > 1 gives mean probability and uncertainty")
    s.add_argument("--min-lesion-mm3", type=float, default=5.0, help="drop components smaller than this")
    s.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: 8 CPU, 32 GPU)")
    s.add_argument("--weights", default=None, help="weights file/folder or Hugging Face repo id (default: bundled)")
    s.add_argument("--probabilities", default=None, help="also write the probability volume")
    s.add_argument("--uncertainty", default=None, help="also write the variance across runs")
    s.add_argument("--attention", default=None, help="also write per-layer attention maps (.npz)")
    s.add_argument("--lesions", default=None, help="also write the lesion table (.csv or .json)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="Dice and lesion detection on a folder with cases.csv")
    e.add_argument("dir")
    e.add_argument("--json", default=None, help="write the results as JSON")
    e.add_argument("--device", default="auto", choices=devices)
    e.add_argument("--weights", default=None)
    e.add_argument("--cases", default=None, help="comma-separated case ids")
    e.add_argument("--split", default=None, choices=("train", "heldout"), help="only this split of ../shared/data/real")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threshold", type=float, default=0.5, help="probability threshold, as in segment")
    e.add_argument("--runs", type=int, default=1, help="sampling runs averaged per slice, as in segment")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    sm = sub.add_parser("sample", help="write the bundled synthetic sample volumes with ground truth")
    sm.add_argument("out_dir")
    sm.add_argument("--name", default="all", choices=("all", "chest_ct", "brain_mri"))
    sm.add_argument("--overwrite", action="store_true")
    sm.set_defaults(func=cmd_sample)

    t = sub.add_parser("testset", help="write a held-out synthetic evaluation set")
    t.add_argument("out_dir")
    t.add_argument("--count", type=int, default=300)
    t.add_argument("--seed", type=int, default=777)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_testset)

    i = sub.add_parser("info", help="version, weights, devices, known prompts")
    i.add_argument("--weights", default=None)
    i.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train a BoltzFormer (Dice + BCE) on synthetic + real data")
    tr.add_argument("--config", required=True, help="training config JSON (e.g. resources/boltzformer-s.train.json)")
    tr.add_argument("--out", required=True, help="output folder (resumes from its last.pt)")
    tr.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes (resume later)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config entry, e.g. --set steps=200 (JSON values)")
    tr.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="speed benchmarks")
    b.add_argument("what", choices=("decoder", "volume"))
    b.add_argument("--json", default=None)
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeats", type=int, default=30)
    b.add_argument("--slices", default="100,300", help="volume: slice counts to time")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except BoltzformerError as exc:
        if args.debug:
            raise
        _err(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        _err("interrupted; no output was written")
        return EXIT_USER_ERROR
    except MemoryError:
        if args.debug:
            raise
        _err("out of memory; try --slices to process part of the volume, or a smaller --batch-size")
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen failure: still no traceback by default
        if args.debug:
            raise
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError on an accelerator
            _err(f"{args.device} ran out of memory; try --batch-size 4 or --device cpu")
            return EXIT_USER_ERROR
        _err(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
