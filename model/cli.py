"""The `boltzformer` command: segment, cohort, evaluate, sample, testset, info, train, bench.

Every user error prints one line `boltzformer: error: <file>: <problem>` and exits with status 2
(`--debug` shows the traceback); so do bad option values, which are checked as the command line
is parsed. Output paths are checked before any inference, and the outputs of a run are written
as one `io.OutputSet` at the end (temporaries, checked, then renamed together), so a failed or
interrupted run (Ctrl-C, SIGTERM) leaves nothing behind and replaces nothing.
Heavy imports (torch) happen inside the commands, so `boltzformer --help` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from ._version import __version__
from .errors import ESTIMATE_NOTE, MEMORY_NEEDED, BoltzformerError, Terminated, out_of_memory
from .options import (DEFAULT_BATCH_ACCELERATOR, DEFAULT_BATCH_CPU, DEFAULT_MIN_LESION_MM3, DEFAULT_MIRROR,
                      DEFAULT_PLANES, MAX_SEED, PLANES)

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
MAX_RUNS = 100  # each run repeats the whole inference


BATCH_HELP = f"slices per batch (default: {DEFAULT_BATCH_CPU} CPU, {DEFAULT_BATCH_ACCELERATOR} GPU)"
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command killed by SIGPIPE
# Ctrl-C and SIGTERM, after the clean-up, exit as a shell reports a command they killed, so that a
# shell loop over scans stops (with status 2 it went on to the next scan)
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + 2, 128 + 15


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a captured stream): nothing to flush into a pipe
        pass


def _outputs_note(args) -> str:
    """What a stopped command leaves behind, for its one-line message."""
    return "the outputs were already written" if args.committed else "no output file was written"


def _err(msg: str) -> None:
    print(f"boltzformer: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"boltzformer: warning: {msg}", file=sys.stderr)


# -- option values, checked as the command line is parsed -----------------------------------------
def whole(low: int, high: int | None = None, why_high: str = ""):
    """argparse type: an integer in [low, high]; the message names the value (see _Parser.error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text}: must be at most {high}{why_high}")
        return value
    parse.__name__ = "whole number"
    return parse


def number(low: float | None = None, high: float | None = None, *, above: bool = False):
    """argparse type: a finite float in [low, high] (``above``: strictly above low)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        if low is not None and (value <= low if above else value < low):
            bound = f"between {low:g} and {high:g}" if high is not None else (f"above {low:g}" if above else f"at least {low:g}")
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text}: must be between {low:g} and {high:g}" if low is not None
                                             else f"{text}: must be at most {high:g}")
        return value
    parse.__name__ = "number"
    return parse


def prompt_text(text: str) -> str:
    """A prompt as typed. Under a C or POSIX locale with Python's UTF-8 mode off, argv is decoded
    as ASCII and a typed "lésion" arrives as surrogates; its bytes are UTF-8, so read them as such.
    Bytes that are not UTF-8 stay surrogates (options.check_prompt_text refuses them)."""
    try:
        return os.fsencode(text).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


SEED = whole(0, MAX_SEED, " (a 64-bit seed)")
RUNS = whole(1, MAX_RUNS, "; each run repeats the whole inference")
PROBABILITY = number(0.0, 1.0)


class _Parser(argparse.ArgumentParser):
    """One line for every command-line mistake: `boltzformer: error: --runs 0: must be at least 1`."""

    def error(self, message):
        message = re.sub(r"^argument (\S+): (\S+: (?:must|not) )", r"\1 \2", message)  # "--runs 0: must ..."
        message = re.sub(r"^argument (\S+): ", r"\1: ", message)
        self.exit(EXIT_USER_ERROR, f"boltzformer: error: {message} (see '{self.prog} --help')\n")


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
    from .errors import InputError, SliceSpacingError
    from .io import OutputSet, read_volume
    from .io.output import same_file
    from .postprocess import lesion_table_bytes

    from .options import check_prompt_text

    check_prompt_text(args.prompt)  # the library's checks, before any output or model is touched
    if args.window:
        intensity.check_window(args.window)
    if args.seed + args.runs - 1 > MAX_SEED:
        raise BoltzformerError(f"--seed {args.seed} with --runs {args.runs}: run seeds go up to seed + runs - 1, "
                               f"at most {MAX_SEED}")
    slices = parse_slices(args.slices)
    with OutputSet(overwrite=args.overwrite) as outputs:
        # every output is checked before any inference: a long run must not fail at the end
        outputs.add(args.output, "-o", kind="volume")
        for option, path, kind in (("--probabilities", args.probabilities, "volume"), ("--uncertainty", args.uncertainty, "volume"),
                                   ("--attention", args.attention, "npz"), ("--lesions", args.lesions, "table")):
            if path:
                outputs.add(path, option, kind=kind)
        for option in ("-o", "--probabilities", "--uncertainty", "--attention", "--lesions"):
            if option in outputs and same_file(outputs.path(option), args.input):
                raise BoltzformerError(f"{outputs.path(option)}: {option} would overwrite the input")

        try:
            volume = read_volume(args.input, series=args.series, allow_gaps=args.allow_gaps)
        except SliceSpacingError as exc:
            raise InputError(exc.path, f"{exc.problem}; --allow-gaps resamples it onto a uniform grid") from None
        for w in volume.metadata.get("warnings", []):
            _warn(w)
        if volume.metadata.get("series_note") and not args.quiet:
            print(volume.metadata["series_note"] + " Choose another with --series (index, UID or part of the description).",
                  file=sys.stderr)
        from .runtime import tune_allocator
        from .segmenter import Segmenter

        tune_allocator()  # a CLI process owns its heap: keeps large temporaries mapped (2.4x faster gathers)
        seg = Segmenter.from_pretrained(args.weights, device=args.device)
        modality = None if args.modality == "auto" else args.modality
        gen = seg.iter_segment(
            volume, args.prompt, window=args.window, modality=modality, slices=slices, runs=args.runs, seed=args.seed,
            threshold=args.threshold, min_lesion_mm3=args.min_lesion_mm3, return_attention=bool(args.attention),
            batch_size=args.batch_size, fp_reduction=not args.no_fp_filter, force_prompt=args.force_prompt,
            min_nodule_score=args.min_nodule_score, nodule_detector=args.nodule_detector, mirror=args.mirror,
            planes=args.planes,
        )
        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=None, unit="slice", desc="segmenting", file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        warned: set[str] = set()
        try:
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                for w in p.warnings:  # the input's, before the run (a long one must not keep them to its end)
                    if w not in warned:
                        warned.add(w)
                        if bar is None:
                            _warn(w)
                        else:  # above the progress bar, which stays at the bottom
                            bar.write(f"boltzformer: warning: {w}", file=sys.stderr)
                if bar is not None:
                    bar.total = p.slices_total
                    bar.update(p.slices_done - bar.n)
        finally:
            if bar is not None:
                bar.close()
        for w in result.warnings:
            if w not in warned:
                _warn(w)
        # all outputs to temporary files, checked; renamed together when the block ends
        outputs.write_volume("-o", result.mask_volume())
        if args.probabilities:
            outputs.write_volume("--probabilities", result.probability_volume())
        if args.uncertainty:
            if result.uncertainty is None:
                _warn("--uncertainty needs --runs 2 or more; writing zeros")
                import numpy as np

                outputs.write_volume("--uncertainty", volume.with_array(np.zeros(volume.shape, np.float32)))
            else:
                outputs.write_volume("--uncertainty", volume.with_array(result.uncertainty))
        if args.attention:
            with outputs.temporary("--attention") as tmp:
                result.attention.write_npz(tmp, volume)
        if args.lesions:
            outputs.write_bytes("--lesions", lesion_table_bytes(result.lesions, args.lesions))
    args.committed = True
    print(summary_line(result, time.perf_counter() - t0, seg.device, args.output))
    if not args.quiet and result.lesions:  # the numbers a reader takes away: say what they are
        print(f"boltzformer: note: {ESTIMATE_NOTE}", file=sys.stderr)
    return 0


def summary_line(result, seconds: float, device, output) -> str:
    """What `segment` prints when it is done: lesions, volume, what the filters dropped, time."""
    total_ml = sum(r["volume_mm3"] for r in result.lesions) / 1000
    n_slices = result.slices[1] - result.slices[0]
    axial = ""
    reo, frame = getattr(result, "reorientation", None), getattr(result, "frame", None)
    if reo is not None and not reo.keeps_slices and frame is not None:
        n_slices = frame.shape[0]  # a sagittal or coronal scan: the axial slices the network ran on
        axial = " axial"
    dropped = (f" ({len(result.rejected)} more dropped by the false-positive filter; --no-fp-filter keeps them)"
               if result.rejected else "")
    return (f"{len(result.lesions)} lesion(s) for '{result.prompt}', total {total_ml:.2f} mL{dropped}; "
            f"{n_slices}{axial} slice{'' if n_slices == 1 else 's'}{_passes_note(result)} in "
            f"{seconds:.1f} s on {device}; mask -> {output}")


def _passes_note(result) -> str:
    """What the network ran besides one pass per axial slice, for the summary line."""
    notes = (["each also mirrored"] if result.mirror else []) + (
        ["three planes: the coronal and sagittal slices too"] if result.planes == "three" else [])
    return f" ({'; '.join(notes)})" if notes else ""


# -- cohort ---------------------------------------------------------------------------------------
def cmd_cohort(args) -> int:
    from .cohort import REPORT_NAME, ScanOptions, run_cohort

    if args.seed + args.runs - 1 > MAX_SEED:
        raise BoltzformerError(f"--seed {args.seed} with --runs {args.runs}: run seeds go up to seed + runs - 1, "
                               f"at most {MAX_SEED}")
    options = ScanOptions(
        threshold=args.threshold, window=args.window, modality=None if args.modality == "auto" else args.modality,
        runs=args.runs, seed=args.seed, min_lesion_mm3=args.min_lesion_mm3, fp_reduction=not args.no_fp_filter,
        nodule_detector=args.nodule_detector, mirror=args.mirror, planes=args.planes,
        force_prompt=args.force_prompt, batch_size=args.batch_size, allow_gaps=args.allow_gaps, device=args.device,
    )
    summary = run_cohort(args.input, args.out_dir, args.prompt, options, weights=args.weights, workers=args.workers,
                         threads_per_worker=args.threads_per_worker, scheduler=args.scheduler, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet, warn=_warn)
    args.committed = True
    for line in summary.failures[:10]:
        _warn(f"failed: {line}")
    if len(summary.failures) > 10:
        _warn(f"... and {len(summary.failures) - 10} more failed scans; see {summary.out_dir / REPORT_NAME}")
    earlier = f", {summary.skipped} done before (--resume)" if summary.skipped else ""
    retried = f", {summary.retried} run again after a lost worker" if summary.retried else ""
    rate = (f"{summary.scans_per_minute:.1f} scans/min on {summary.workers} worker(s), {summary.device}"
            if summary.ok + summary.failed else "nothing left to run")
    print(f"{summary.total} scans: {summary.ok} ok, {summary.failed} failed{earlier}{retried}; {rate}; "
          f"masks, lesions.csv and report.csv in {summary.out_dir}")
    return summary.exit_status


# -- evaluate -------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from . import fp_classifier
    from .evaluate import evaluate_dir, format_table, json_bytes
    from .io import OutputSet
    from .segmenter import Segmenter
    from .weights import sha256

    if args.split and not args.split_file:
        raise BoltzformerError(f"--split {args.split} needs --split-file, the CSV (case_id,split) that defines it, "
                               "e.g. model/training/real_split.csv")
    if args.split_file and not args.split:
        raise BoltzformerError(f"--split-file {args.split_file} needs --split NAME: which of its splits to evaluate")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases is not None else None
    if cases == []:
        raise BoltzformerError(f"--cases {args.cases!r} names no case; give case ids separated by commas")
    with OutputSet(overwrite=args.overwrite) as outputs:
        if args.json:  # checked before the (long) evaluation; a .json, so never one of the inputs
            outputs.add(args.json, "--json", kind="json")
        from .runtime import tune_allocator

        tune_allocator()
        seg = Segmenter.from_pretrained(args.weights, device=args.device)
        summary = evaluate_dir(args.dir, seg, case_ids=cases, split=args.split, split_file=args.split_file,
                               progress=not args.quiet, seed=args.seed, threshold=args.threshold, runs=args.runs,
                               mirror=args.mirror, planes=args.planes, warn=_warn)
        print(format_table(summary))
        if args.json:
            summary["command"] = "boltzformer " + " ".join(sys.argv[1:]) if args.argv is None else "boltzformer " + " ".join(args.argv)
            summary["weights"] = seg.info.get("weights_source")
            summary["weights_sha256"] = sha256(seg.info["weights_path"])
            summary["fp_classifier_sha256"] = fp_classifier.bundled_sha256()
            summary["mirror"] = bool(args.mirror)
            summary["planes"] = args.planes
            outputs.write_bytes("--json", json_bytes(summary))
    args.committed = True
    return 0


# -- sample / testset -------------------------------------------------------------------------------
def cmd_sample(args) -> int:
    import csv
    import io as stdio

    from .errors import OutputError
    from .io import OutputSet
    from .synth.sample import SAMPLES

    names = list(SAMPLES) if args.name == "all" else [args.name]
    out = _case_folder(args.out_dir, "the sample cases")
    created = []  # folders this run makes, removed again if it fails
    folder = out
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot be created ({exc.strerror or exc})") from None
    try:
        with OutputSet(overwrite=args.overwrite) as outputs:
            for n in names:
                for kind in ("image", "mask"):
                    outputs.add(out / f"{n}_{kind}.nii.gz", kind="volume")
            outputs.add(out / "cases.csv", kind="csv")
            rows, lines = [], []
            for n in names:
                case = SAMPLES[n]()
                outputs.write_volume(out / f"{n}_image.nii.gz", case.volume())
                outputs.write_volume(out / f"{n}_mask.nii.gz", case.mask_volume())
                rows.append({"case_id": n, "prompt": case.prompt, "modality": case.modality})
                lines.append(f"{out / (n + '_image.nii.gz')}  ({case.modality}, {case.image.shape[0]} slices; prompt '{case.prompt}')")
            text = stdio.StringIO(newline="")
            w = csv.DictWriter(text, fieldnames=["case_id", "prompt", "modality"])
            w.writeheader()
            w.writerows(rows)
            outputs.write_bytes(out / "cases.csv", text.getvalue().encode("utf-8"))
    except BaseException:
        for folder in created:  # innermost first; only folders that are still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    args.committed = True
    for line in lines:
        print(line)
    return 0


def _case_folder(arg: str, what: str) -> Path:
    """The folder `sample` / `testset` write into, refused when it is a file or named like one
    (`sample out/x.nii.gz` would otherwise make a folder called x.nii.gz)."""
    from .errors import OutputError
    from .io.formats import extension_of, named_like_a_file

    out = Path(arg)
    if out.exists() and not out.is_dir():
        raise OutputError(out, f"exists and is not a folder; give a folder for {what}")
    if not out.exists() and named_like_a_file(out):
        raise OutputError(out, f"is named like a {extension_of(out.name)} file, but {what} are several files: "
                               "give a folder")
    return out


def cmd_testset(args) -> int:
    from .training.testset import write_testset

    _case_folder(args.out_dir, "the test cases")
    out = write_testset(args.out_dir, count=args.count, seed=args.seed, overwrite=args.overwrite)
    print(f"held-out synthetic cases -> {out}")
    return 0


# -- info -------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import torch

    from . import fp_classifier, weights
    from .devices import available_devices

    print(f"boltzformer {__version__}")
    print(f"torch {torch.__version__}; devices: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in available_devices().items()))
    try:
        src = weights.resolve(args.weights)
    except BoltzformerError as exc:
        if args.weights:  # asked-for weights that are not there are an error, on stderr
            raise
        print(f"weights: none ({exc})")
        return 0
    from .checkpoint import load_model

    load_model(src.weights_path)  # raises a one-line WeightsError (exit 2) when they cannot be loaded
    meta = weights.read_config(src.config_path)
    cfg = meta.get("config", {})
    print(f"weights: {src.weights_path} ({src.description})")
    print(f"sha256: {weights.sha256(src.weights_path)}")
    clf = fp_classifier.bundled()
    if clf is not None:
        print(f"3D false-positive classifier: {fp_classifier.WEIGHTS_NAME} (sha256 {fp_classifier.bundled_sha256()}, "
              f"threshold {clf.threshold:g})")
    train = meta.get("training", {})
    print(f"network: {train.get('parameters', '?')} parameters, {cfg.get('num_layers')} decoder layers, "
          f"{cfg.get('num_queries')} queries, sampling {cfg.get('sampling')} (ratio {cfg.get('token_ratio')}, "
          f"tau0 {cfg.get('tau0')}), input {cfg.get('image_size')}²; {_trained_words(meta)}")
    prompts = meta.get("prompts", [])
    print(f"prompts seen in training ({len(prompts)}): " + ", ".join(prompts))
    return 0


def _trained_words(meta: dict) -> str:
    """'trained N steps', or, for weights warm-started from others, what the last leg added
    (trained_steps counts that leg only; the model card has every stage)."""
    steps = meta.get("trained_steps", "?")
    start = ((meta.get("training") or {}).get("config") or {}).get("init_weights")
    if start:
        return f"its last training leg: {steps} steps, warm-started from {start} (stages: the model card)"
    return f"trained {steps} steps"


def cmd_train(args) -> int:
    from .training.train import run_train

    return run_train(args)


# -- bench --------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from .bench import decoder, volume
    from .devices import resolve_device
    from .errors import OutputError

    # checked before minutes of timing: the options, the device, the weights, where the results go
    other = {"decoder": ("--slices", "--weights", "--mirror"), "volume": ("--repeats", "--batch")}[args.what]
    given = [o for o in other if getattr(args, o[2:]) is not None]
    if given:
        raise BoltzformerError(f"bench {args.what}: {', '.join(given)} does not apply to it (it was ignored)")
    if args.what == "decoder":
        args.repeats, args.batch = args.repeats or 30, args.batch or 1
    else:
        args.slices = "100,300" if args.slices is None else args.slices
        args.mirror = DEFAULT_MIRROR if args.mirror is None else args.mirror
    resolve_device(args.device)
    if args.what == "volume" and args.weights:
        from . import weights

        weights.resolve(args.weights)
    if args.json:
        target = Path(args.json)
        if target.suffix.lower() != ".json":
            raise OutputError(target, "--json writes JSON: give a .json path (bench volume also writes the table "
                                      "beside it, as .md)")
        if not target.resolve().parent.is_dir():
            raise OutputError(target, f"its folder {target.parent} does not exist")
    return decoder.main(args) if args.what == "decoder" else volume.main(args)


# -- parser -------------------------------------------------------------------------------------------
def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    """--mirror / --no-mirror and --planes, as segment, cohort and evaluate share them."""
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=DEFAULT_MIRROR,
                        help="average each slice with its left-right mirror image (a second network pass per "
                             f"slice; {'on' if DEFAULT_MIRROR else 'off'} by default)")
    parser.add_argument("--planes", choices=PLANES, default=DEFAULT_PLANES,
                        help="segment the axial slices only; or three planes (also the coronal and sagittal slices, "
                             "the median of the three per voxel: two more network sweeps); or auto (three planes on "
                             f"nearly isotropic 3D MR, axial otherwise). Default: {DEFAULT_PLANES}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="boltzformer", description="Text-prompted lesion segmentation in CT and MRI (BoltzFormer).")
    p.add_argument("--version", action="version", version=f"boltzformer {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    devices = ("auto", "cpu", "cuda", "mps")

    s = sub.add_parser("segment", help="segment a volume for a text prompt")
    s.add_argument("input", help="NIfTI/NRRD/MHA file or DICOM series folder")
    s.add_argument("-p", "--prompt", required=True, type=prompt_text, help='what to segment, e.g. "lung nodule"')
    s.add_argument("-o", "--output", required=True, help="mask output (.nii.gz, .nii, .nrrd, .mha)")
    s.add_argument("--device", default="auto", choices=devices)
    s.add_argument("--seed", type=SEED, default=0, help="sampling seed, 0 to 2**63-1 (same seed, same result)")
    s.add_argument("--threshold", type=PROBABILITY, default=0.5, help="probability threshold, 0 to 1")
    s.add_argument("--window", default=None, help="CT window: lung, mediastinum, soft_tissue, liver, bone, brain")
    s.add_argument("--modality", default="auto", choices=("auto", "CT", "MR"))
    s.add_argument("--series", default=None, help="DICOM series (UID, index or description text)")
    s.add_argument("--allow-gaps", action="store_true",
                   help="DICOM series with missing slices or uneven spacing: resample onto a uniform grid (warns)")
    s.add_argument("--slices", default=None, help="slice range START:STOP (0-based, stop excluded)")
    s.add_argument("--runs", type=RUNS, default=1,
                   help=f"sampling runs, 1 to {MAX_RUNS}; > 1 gives mean probability and uncertainty")
    _add_inference_options(s)
    s.add_argument("--min-lesion-mm3", type=number(0.0), default=DEFAULT_MIN_LESION_MM3, help="drop components smaller than this (mm³, >= 0)")
    s.add_argument("--batch-size", type=whole(1, 4096), default=None, help=BATCH_HELP)
    s.add_argument("--weights", default=None, help="weights file/folder, or hf:owner/name from the local Hugging Face cache (default: bundled)")
    s.add_argument("--no-fp-filter", action="store_true",
                   help="keep every candidate: skip the false-positive filters (lung prompts on CT in HU: 3D "
                        "filter; MS lesion prompts on MR: candidates darker than their surroundings on FLAIR/T2)")
    s.add_argument("--min-nodule-score", type=number(0.0, 1.0), default=None,
                   help="drop lung candidates whose 3D classifier score is below this (default: 0.73, at most 4 "
                        "false positives per validation phantom; 0 keeps every candidate the lung rule keeps)")
    s.add_argument("--nodule-detector", action="store_true",
                   help="lung nodule prompts on CT in HU: take the lesions from the 3D nodule detector (blobs in the "
                        "lungs, outlined by the network where it found them too). Off by default: fewer false "
                        "positives and more nodules on phantom chests, but more false positives on a real chest CT")
    s.add_argument("--force-prompt", action="store_true",
                   help="run a prompt even when it names nothing the model was trained to find")
    s.add_argument("--probabilities", default=None,
                   help="also write the probability volume (float32, 0 to 1; 0 outside --slices)")
    s.add_argument("--uncertainty", default=None,
                   help="also write the variance of the probability across --runs (float32, divided by the number "
                        "of runs; zeros with a warning when --runs is 1)")
    s.add_argument("--attention", default=None,
                   help="also write per-layer attention maps (.npz; its arrays: README, 'The attention file')")
    s.add_argument("--lesions", default=None, help="also write the lesion table (.csv or .json)")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_segment)

    c = sub.add_parser(
        "cohort", help="segment a folder or CSV list of scans on Dask (a local cluster, or --scheduler)",
        description="Segment every scan of INPUT into OUT_DIR/<case_id>_mask.nii.gz, with OUT_DIR/lesions.csv and "
                    "OUT_DIR/report.csv. Exit status: 0 every scan ok, 3 some scans failed (report.csv says why), "
                    "2 bad arguments or interrupted (--resume goes on), 1 an internal error.")
    c.add_argument("input", help="a folder (NIfTI/NRRD/MHA files and DICOM folders, searched recursively) or a CSV "
                                 "with a 'path' column (optional: case_id, prompt)")
    c.add_argument("-p", "--prompt", default=None, type=prompt_text,
                   help='what to segment, e.g. "lung nodule" (a CSV row\'s prompt '
                        'comes first)')
    c.add_argument("-o", "--out-dir", required=True, help="folder for the masks, lesions.csv and report.csv")
    c.add_argument("--workers", type=whole(1, 4096), default=None,
                   help="local cluster: worker processes (default: one per CPU core or GPU, as memory allows)")
    c.add_argument("--threads-per-worker", type=whole(1, 256), default=None, help="local cluster: scans at once per "
                                                                                  "worker, sharing its model (default 1)")
    c.add_argument("--scheduler", default=None, help="a running Dask scheduler, e.g. tcp://host:8786, instead of a "
                                                     "local cluster (scans and OUT_DIR must be reachable by its workers)")
    c.add_argument("--device", default="auto", choices=devices)
    c.add_argument("--seed", type=SEED, default=0, help="sampling seed of every scan (same seed, same mask as segment)")
    c.add_argument("--threshold", type=PROBABILITY, default=0.5, help="probability threshold, 0 to 1")
    c.add_argument("--window", default=None, help="CT window: lung, mediastinum, soft_tissue, liver, bone, brain")
    c.add_argument("--modality", default="auto", choices=("auto", "CT", "MR"))
    c.add_argument("--runs", type=RUNS, default=1, help=f"sampling runs per scan, 1 to {MAX_RUNS}")
    _add_inference_options(c)
    c.add_argument("--min-lesion-mm3", type=number(0.0), default=DEFAULT_MIN_LESION_MM3, help="drop components smaller than this (mm³)")
    c.add_argument("--batch-size", type=whole(1, 4096), default=None, help=BATCH_HELP)
    c.add_argument("--weights", default=None, help="weights file/folder, or hf:owner/name from the local Hugging Face cache (default: bundled)")
    c.add_argument("--no-fp-filter", action="store_true", help="keep every candidate: skip the false-positive filters (see segment)")
    c.add_argument("--nodule-detector", action="store_true",
                   help="lung nodule prompts on CT in HU: lesions from the opt-in 3D nodule detector (see segment)")
    c.add_argument("--force-prompt", action="store_true", help="run prompts that name nothing the model knows")
    c.add_argument("--allow-gaps", action="store_true", help="resample DICOM series with missing slices (warns)")
    c.add_argument("--resume", action="store_true",
                   help="skip the scans whose mask and ok report row exist with the same weights and options")
    c.add_argument("--overwrite", action="store_true", help="start again in an OUT_DIR that holds a cohort")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_cohort)

    e = sub.add_parser("evaluate", help="Dice and lesion detection on a folder with cases.csv")
    e.add_argument("dir")
    e.add_argument("--json", default=None, help="write the results as JSON")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.add_argument("--device", default="auto", choices=devices)
    e.add_argument("--weights", default=None)
    e.add_argument("--cases", default=None, help="comma-separated case ids")
    e.add_argument("--split", default=None, choices=("train", "heldout"), help="only the cases of this split (needs --split-file)")
    e.add_argument("--split-file", default=None, help="CSV with the columns case_id,split (e.g. model/training/real_split.csv)")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--threshold", type=PROBABILITY, default=0.5, help="probability threshold, as in segment")
    e.add_argument("--runs", type=RUNS, default=1, help="sampling runs averaged per slice, as in segment")
    _add_inference_options(e)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    sm = sub.add_parser("sample", help="write the bundled synthetic sample volumes with ground truth")
    sm.add_argument("out_dir")
    sm.add_argument("--name", default="all", choices=("all", "chest_ct", "brain_mri"))
    sm.add_argument("--overwrite", action="store_true")
    sm.set_defaults(func=cmd_sample)

    t = sub.add_parser("testset", help="write a held-out synthetic evaluation set")
    t.add_argument("out_dir")
    t.add_argument("--count", type=whole(1, 100_000), default=300)
    t.add_argument("--seed", type=SEED, default=777)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_testset)

    i = sub.add_parser("info", help="version, weights, devices, known prompts")
    i.add_argument("--weights", default=None,
                   help="weights file/folder, or hf:owner/name from the local Hugging Face cache (default: bundled)")
    i.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train a BoltzFormer (Dice + BCE) on synthetic + real data")
    tr.add_argument("--config", required=True, help="training config JSON (e.g. resources/boltzformer-s.train.json)")
    tr.add_argument("--out", required=True, help="output folder (resumes from its last.pt)")
    tr.add_argument("--max-minutes", type=number(0.0, above=True), default=None,
                    help="stop after this many minutes of training (at least one step), exit status 75; the same "
                         "command goes on from there")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config entry, e.g. --set steps=200 (JSON values)")
    tr.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="speed benchmarks")
    b.add_argument("what", choices=("decoder", "volume"),
                   help="decoder: sparse vs dense cross-attention per token grid; volume: `segment` of a "
                        "synthetic 512 x 512 CT, end to end")
    b.add_argument("--json", default=None, help="also write the results here (.json; volume: a .md table beside it)")
    b.add_argument("--device", default="cpu", choices=devices)
    b.add_argument("--repeats", type=whole(1, 100_000), default=None,
                   help="decoder: timed calls per setting, after 3 untimed (default 30; the median is reported)")
    b.add_argument("--batch", type=whole(1, 4096), default=None, help="decoder: slices per call (default 1)")
    b.add_argument("--slices", default=None, help="volume: slice counts to time (default 100,300)")
    b.add_argument("--weights", default=None, help="volume: weights to time (default: bundled)")
    b.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="volume: with mirror averaging, as in segment")
    b.set_defaults(func=cmd_bench)
    return p


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a console that is not UTF-8 shows "mm\\xb3", it does not fail
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad command line (already reported in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    args.argv = argv
    args.committed = False  # set by a command once its outputs are in place
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)  # clean up instead of dying mid-write
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _out_of_memory(args) -> str:
    """The one line for a run the machine's memory cannot hold."""
    where = getattr(args, "input", None)
    batch = getattr(args, "batch_size", None)
    if batch and batch > DEFAULT_BATCH_CPU:  # the network's share grows with the batch
        advice = f"a smaller --batch-size (it is {batch}; the CPU default is {DEFAULT_BATCH_CPU}) or "
    else:
        advice = ""
    return (f"{where + ': ' if isinstance(where, str) else ''}out of memory ({MEMORY_NEEDED}); try {advice}segment "
            "part of it with --slices START:STOP, or use a machine with more memory")


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except BoltzformerError as exc:
        if args.debug:
            raise
        _err(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        terminated = isinstance(exc, Terminated)
        note = getattr(exc, "note", None) or _outputs_note(args)
        _err(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; {note}")
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went away (`boltzformer evaluate ... | head`)
        _silence_stdout()
        _err(f"standard output was closed by the program reading it; stopped, {_outputs_note(args)}")
        return EXIT_BROKEN_PIPE
    except MemoryError:
        if args.debug:
            raise
        _err(_out_of_memory(args))
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen failure: still no traceback by default
        if args.debug:
            raise
        if out_of_memory(exc) == "device":
            _err(f"{getattr(args, 'device', 'the device')} ran out of memory; try --batch-size 4 or --device cpu")
            return EXIT_USER_ERROR
        if out_of_memory(exc) == "machine":
            _err(_out_of_memory(args))
            return EXIT_USER_ERROR
        where = getattr(args, "input", None)  # a bug met on one scan: which one, for the report
        _err(f"{where + ': ' if isinstance(where, str) else ''}unexpected {type(exc).__name__}: {exc} "
             "(rerun with --debug for the traceback)")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
