"""`boltzformer cohort` on a LocalCluster of 2 in-process workers: every good scan segmented as
`segment` would (same seed, same mask), broken scans reported, --resume after an interruption,
CSV inputs with per-row prompts, lost workers, and bad arguments as one line with exit 2.

The cluster is started once for the module (processes=False keeps it fast); the CLI reaches it
with --scheduler, so the command line is tested as users call it on a cluster.
"""

from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np
import pytest

from boltzformer import cohort, weights
from boltzformer.errors import BoltzformerError, InputError, OutputError
from boltzformer.cohort import EXIT_SOME_FAILED, ScanOptions, run_cohort
from boltzformer.io import Volume, read_volume, write_volume
from boltzformer.synth import ct

from ..test_cli import PROMPT, run, tiny_weights  # noqa: F401 - fixture
from ..io.test_io import write_ct_series

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                                  silence_logs=logging.ERROR) as c:
        yield c


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster) as c:
        yield c


def small_ct(seed: int, oblique: bool = False) -> Volume:
    """A 6 x 40 x 48 HU CT with a bright blob, anisotropic voxels, optionally rotated in plane."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-700, 60, size=(6, 40, 48)).astype(np.int16)
    hu[2:4, 15:22, 20:27] = 30
    direction = np.eye(3)
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return Volume(hu, (0.7, 0.8, 2.5), (-12.5, 30.0, 101.0 + seed), direction, "CT")


@pytest.fixture
def scans(tmp_path):
    """scans/: two NIfTI files, one oblique NRRD in a sub-folder, a DICOM series folder and a
    truncated NIfTI file."""
    root = tmp_path / "scans"
    (root / "p2").mkdir(parents=True)
    write_volume(small_ct(0), root / "a.nii.gz")
    write_volume(small_ct(1), root / "b.nii.gz")
    write_volume(small_ct(2, oblique=True), root / "p2" / "c.nrrd")
    write_ct_series(root / "p3" / "series", small_ct(3).array, thickness=2.5)
    data = (root / "a.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not a scan")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def segment_mask(capsys, tmp_path, source, weights, prompt=PROMPT, *extra):
    """The mask and lesion rows of `boltzformer segment` with the same options."""
    out, les = tmp_path / "seg_mask.nii.gz", tmp_path / "seg_lesions.csv"
    code, _, err = run(["segment", source, "-p", prompt, "-o", out, "--lesions", les, "--device", "cpu", "--quiet",
                        "--overwrite", *(["--weights", weights] if weights else []), *extra], capsys)
    assert code == 0, err
    return read_volume(out), read_csv(les)


def cohort_args(source, out, weights, *extra, cluster=None):
    args = ["cohort", source, "-o", out, "--device", "cpu", "--quiet", *(["--weights", weights] if weights else []), *extra]
    if cluster is not None:
        args += ["--scheduler", cluster.scheduler_address]
    return args


# -- a folder with a broken scan ----------------------------------------------------------------------
def test_folder_segments_every_good_scan_like_segment_and_reports_the_broken_one(scans, tmp_path, tiny_weights,
                                                                                 cluster, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(cohort_args(scans, out, tiny_weights, "-p", PROMPT, "--seed", "3", cluster=cluster), capsys)
    assert code == EXIT_SOME_FAILED == 3, err
    assert "5 scans: 4 ok, 1 failed" in stdout
    report = {r["case_id"]: r for r in read_csv(out / "report.csv")}
    assert sorted(report) == ["a", "b", "broken", "p2_c", "p3_series"]  # notes.txt is no scan
    broken = report.pop("broken")
    assert broken["status"] == "failed" and broken["mask"] == "" and not (out / "broken_mask.nii.gz").exists()
    assert broken["reason"].startswith(str(scans / "broken.nii.gz") + ": ") and "truncated" in broken["reason"]
    assert "failed: broken: " in err and "Traceback" not in err
    lesions = read_csv(out / "lesions.csv")
    sources = {"a": scans / "a.nii.gz", "b": scans / "b.nii.gz", "p2_c": scans / "p2" / "c.nrrd",
               "p3_series": scans / "p3" / "series"}
    for case_id, row in report.items():
        assert row["status"] == "ok" and row["reason"] == "" and float(row["seconds"]) > 0
        assert row["weights_sha256"] == weights.sha256(tiny_weights)
        assert "seed=3" in row["options"] and row["device"] == "cpu"
        mask = read_volume(out / f"{case_id}_mask.nii.gz")
        expected, expected_lesions = segment_mask(capsys, tmp_path, sources[case_id], tiny_weights, PROMPT, "--seed", "3")
        assert mask.same_geometry(expected, atol=1e-6) and mask.same_geometry(read_volume(sources[case_id]), atol=1e-5)
        np.testing.assert_array_equal(mask.array, expected.array)
        assert 0 < mask.array.sum() < mask.array.size  # a partial mask: equality means something
        mine = [r for r in lesions if r["case_id"] == case_id]
        assert int(row["lesions"]) == len(mine) == len(expected_lesions)
        for got, want in zip(mine, expected_lesions):
            for column in ("volume_mm3", "longest_axial_diameter_mm", "centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm",
                           "slice_start", "slice_end"):
                assert got[column] == want[column], column
            assert 0.0 <= float(got["score"]) <= 1.0 and got["score"] == want["mean_probability"]


# -- --resume after an interruption ------------------------------------------------------------------
def test_resume_after_an_interrupted_run_finishes_the_rest_without_duplicates(scans, tmp_path, tiny_weights, client):
    (scans / "broken.nii.gz").unlink()
    out = tmp_path / "out"
    options = ScanOptions(device="cpu", seed=1)
    seen = []

    def stop_after_two(row):
        seen.append(row["case_id"])
        if len(seen) == 2:  # the interrupt comes once a third scan's worker has written its mask
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not [p for p in out.glob("*_mask*") if p.name.split("_mask")[0] not in seen]:
                time.sleep(0.05)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False,
                   on_result=stop_after_two)
    assert "2 of 4 scans are recorded" in info.value.note and "--resume" in info.value.note
    first = read_csv(out / "report.csv")
    assert [r["case_id"] for r in first] == seen
    # a mask under its final name is one the report lists; a scan finished but not recorded is not one
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == sorted(f"{c}_mask.nii.gz" for c in seen)
    (out / "p9_late_mask.unrecorded.nii.gz").write_bytes(b"a scan still running at the interrupt, written late")
    done_masks = {c: (out / f"{c}_mask.nii.gz").stat().st_mtime_ns for c in seen}
    # A kill in the middle of the next scan's appends: its lesion rows are in, its report row half written.
    with open(out / "lesions.csv", "a") as f:
        f.write(",".join(["p9_ghost"] + ["1"] * (len(cohort.run.LESION_COLUMNS) - 1)) + "\n")
    with open(out / "report.csv", "a") as f:
        f.write("p9_ghost,ok,,1.0,1,/nowhere")

    # Without --resume or --overwrite the folder's cohort is kept.
    with pytest.raises(OutputError, match="--resume"):
        run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False)

    summary = run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False, resume=True)
    assert (summary.total, summary.skipped, summary.ok, summary.failed) == (4, 2, 2, 0) and summary.exit_status == 0
    assert not list(out.glob("*unrecorded*"))  # the interrupted run's unrecorded masks are gone
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == [f"{c}_mask.nii.gz" for c in ("a", "b", "p2_c", "p3_series")]
    rows = read_csv(out / "report.csv")
    assert sorted(r["case_id"] for r in rows) == ["a", "b", "p2_c", "p3_series"]  # each once, the torn row gone
    assert rows[:2] == first
    lesions = read_csv(out / "lesions.csv")
    assert "p9_ghost" not in {r["case_id"] for r in lesions}
    for r in rows:
        assert int(r["lesions"]) == sum(1 for x in lesions if x["case_id"] == r["case_id"])
    assert {c: (out / f"{c}_mask.nii.gz").stat().st_mtime_ns for c in seen} == done_masks  # not redone

    # Other options or a missing mask: those scans are done again, still one row each.
    (out / f"{seen[0]}_mask.nii.gz").unlink()
    summary = run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False, resume=True)
    assert (summary.skipped, summary.ok) == (3, 1)
    summary = run_cohort(scans, out, PROMPT, ScanOptions(device="cpu", seed=2), weights=tiny_weights, client=client,
                         progress=False, resume=True)
    assert (summary.skipped, summary.ok) == (0, 4)
    rows = read_csv(out / "report.csv")
    assert len(rows) == 4 and all("seed=2" in r["options"] for r in rows)


def test_overwrite_removes_the_earlier_cohorts_masks(scans, tmp_path, tiny_weights, client):
    """--overwrite starts again: no mask is left of a scan no longer in the input, nor beside a
    scan that fails this time; files the cohort did not write stay."""
    (scans / "broken.nii.gz").unlink()
    out = tmp_path / "out"
    options = ScanOptions(device="cpu", seed=1)
    summary = run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False)
    assert summary.ok == 4
    (out / "notes_mask.nii.gz").write_bytes(b"someone else's file")
    (scans / "b.nii.gz").unlink()  # gone from the input
    (scans / "a.nii.gz").write_bytes(b"now broken")  # fails this time
    summary = run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False, overwrite=True)
    assert (summary.total, summary.ok, summary.failed) == (3, 2, 1)
    report = {r["case_id"]: r for r in read_csv(out / "report.csv")}
    assert sorted(report) == ["a", "p2_c", "p3_series"] and report["a"]["status"] == "failed"
    assert sorted(p.name for p in out.glob("*_mask.nii.gz")) == ["notes_mask.nii.gz", "p2_c_mask.nii.gz",
                                                                   "p3_series_mask.nii.gz"]


# -- a CSV with per-row prompts (the bundled model) -----------------------------------------------------
def test_csv_input_with_per_row_prompts(tmp_path, cluster, capsys):
    synth = ct.ct_volume(5, shape_zyx=(8, 80, 80), spacing_mm=(3.2, 3.2, 2.5), region="chest", n_nodules=(2, 3))
    (tmp_path / "data").mkdir()
    write_volume(Volume(synth.image, synth.spacing_mm, (0.0, 0.0, 0.0), np.eye(3), "CT"), tmp_path / "data" / "chest.nii.gz")
    table = tmp_path / "cases.csv"
    table.write_text("path,case_id,prompt\n"
                     "data/chest.nii.gz,nodules,\n"  # no prompt in the row: -p
                     f"{tmp_path / 'data' / 'chest.nii.gz'},heart,heart\n"
                     "data/missing.nii.gz,gone,heart\n", encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, err = run(cohort_args(table, out, None, "-p", "lung nodule", cluster=cluster), capsys)
    assert code == EXIT_SOME_FAILED, err
    report = {r["case_id"]: r for r in read_csv(out / "report.csv")}
    assert report["nodules"]["prompt"] == "lung nodule" and report["heart"]["prompt"] == "heart"
    assert report["gone"]["status"] == "failed" and "missing.nii.gz: does not exist" in report["gone"]["reason"]
    masks = {}
    for case_id, prompt in (("nodules", "lung nodule"), ("heart", "heart")):
        assert report[case_id]["status"] == "ok"
        masks[case_id] = read_volume(out / f"{case_id}_mask.nii.gz").array
        expected, _ = segment_mask(capsys, tmp_path, tmp_path / "data" / "chest.nii.gz", None, prompt)
        np.testing.assert_array_equal(masks[case_id], expected.array)
    assert masks["heart"].sum() > 5 * max(1, masks["nodules"].sum())  # the row's prompt was the one used

    # A row whose prompt names nothing stops the cohort before any scan, naming the line.
    table.write_text("path,case_id,prompt\ndata/chest.nii.gz,a,lung nodule\ndata/chest.nii.gz,b,banana\n", encoding="utf-8")
    code, _, err = run(cohort_args(table, tmp_path / "out2", None, cluster=cluster), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{table}: line 3: prompt 'banana' names nothing" in err and not (tmp_path / "out2" / "report.csv").exists()


# -- a lost worker ------------------------------------------------------------------------------------
class LastWorker:  # what KilledWorker names (the scheduler's WorkerState)
    address = "tcp://10.0.0.9:4000"


RUNS: dict[str, int] = {}  # module level: tasks pickle a module-level function by reference, so they share it
REAL_SEGMENT_SCAN = cohort.worker.segment_scan


def dying(plugin_name, scan, options, out_dir):
    """segment_scan whose worker 'dies' under scan a every time and under scan b the first time."""
    RUNS[scan.case_id] = RUNS.get(scan.case_id, 0) + 1
    if scan.case_id == "a" or (scan.case_id == "b" and RUNS["b"] == 1):
        raise distributed.scheduler.KilledWorker(f"scan-{scan.case_id}", LastWorker(), 0)
    return REAL_SEGMENT_SCAN(plugin_name, scan, options, out_dir)


def test_a_scan_whose_worker_dies_runs_once_more_then_fails(scans, tmp_path, tiny_weights, client, monkeypatch):
    (scans / "broken.nii.gz").unlink()
    RUNS.clear()
    monkeypatch.setattr(cohort.run, "segment_scan", dying)  # the name run_cohort submits
    out = tmp_path / "out"
    summary = run_cohort(scans, out, PROMPT, ScanOptions(device="cpu"), weights=tiny_weights, client=client,
                         progress=False)
    assert RUNS == {"a": 2, "b": 2, "p2_c": 1, "p3_series": 1}
    assert (summary.ok, summary.failed, summary.retried, summary.exit_status) == (3, 1, 2, EXIT_SOME_FAILED)
    report = {r["case_id"]: r for r in read_csv(out / "report.csv")}
    assert len(report) == 4 and report["b"]["status"] == "ok"
    assert report["a"]["status"] == "failed" and "worker was lost twice (KilledWorker" in report["a"]["reason"]


def test_a_cohort_keeps_a_bounded_number_of_scans_in_flight(scans, tmp_path, tiny_weights, client, monkeypatch):
    """100 000 scans submitted at once lost the Dask scheduler after 42 s; now each recorded scan
    sends the next, and every scan is still done once."""
    (scans / "broken.nii.gz").unlink()
    monkeypatch.setattr(cohort.run, "SCANS_IN_FLIGHT", 1)
    out = tmp_path / "out"
    summary = run_cohort(scans, out, PROMPT, ScanOptions(device="cpu", seed=1), weights=tiny_weights, client=client,
                         progress=False)
    assert (summary.total, summary.ok, summary.failed) == (4, 4, 0)
    assert sorted(r["case_id"] for r in read_csv(out / "report.csv")) == ["a", "b", "p2_c", "p3_series"]


# -- bad arguments: one line, exit 2, nothing written -----------------------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("missing input", "does not exist"),
    ("folder without prompt", "needs a prompt"),
    ("csv without path", "needs a 'path' column"),
    ("duplicate case id", "list.csv: line 4: case_id 'x' is also on line 2"),  # the blank line 3 counts
    ("case id with a slash", "cannot name a file"),
    ("workers with scheduler", "--workers and --threads-per-worker size the local cluster"),
    ("too many workers", "use at most"),
    ("resume and overwrite", "choose one"),
    ("empty folder", "holds no scan"),
    ("output is the input folder", "is the input folder"),
])
def test_bad_arguments_are_one_line_and_exit_2(case, expected, scans, tmp_path, tiny_weights, cluster, capsys):
    table = tmp_path / "list.csv"
    source, extra = scans, ["-p", PROMPT]
    if case == "missing input":
        source = tmp_path / "nowhere"
    elif case == "folder without prompt":
        extra = []
    elif case == "csv without path":
        table.write_text("file\na.nii.gz\n")
        source = table
    elif case == "duplicate case id":
        table.write_text(f"path,case_id\n{scans / 'a.nii.gz'},x\n\n{scans / 'b.nii.gz'},x\n")
        source = table
    elif case == "case id with a slash":
        table.write_text(f"path,case_id\n{scans / 'a.nii.gz'},../x\n")
        source = table
    elif case == "workers with scheduler":
        extra += ["--workers", "2", "--scheduler", cluster.scheduler_address]
    elif case == "too many workers":
        extra += ["--workers", "4000"]
    elif case == "resume and overwrite":
        extra += ["--resume", "--overwrite"]
    elif case == "empty folder":
        source = tmp_path / "empty"
        source.mkdir()
    out = scans if case == "output is the input folder" else tmp_path / "out"
    code, stdout, err = run(cohort_args(source, out, tiny_weights, *extra), capsys)
    assert code == 2, err
    assert err.startswith("boltzformer: error: ") and len(err.strip().splitlines()) == 1 and expected in err
    assert not (out / "report.csv").exists()


def test_memory_bound_names_the_numbers():
    with pytest.raises(BoltzformerError) as info:
        cohort.cluster.check_memory(8, 1, memory_mb=8 * 1024)
    message = str(info.value)
    assert "--workers 8" in message and "GB per scan in flight" in message and "8.0 GB" in message
    assert f"use at most {int(8 * 1024 // cohort.cluster.WORKER_PEAK_MB_512x512x300)} workers" in message
    cohort.cluster.check_memory(1, 1, memory_mb=8 * 1024)  # fits
    assert cohort.cluster.default_workers(1, "cpu", memory_mb=64 * 1024, cpus=16) == 16
    assert cohort.cluster.default_workers(1, "cpu", memory_mb=3 * cohort.cluster.WORKER_PEAK_MB_512x512x300, cpus=16) == 3
    assert cohort.cluster.default_workers(2, "cpu", memory_mb=64 * 1024, cpus=16) == 8


def test_folder_case_ids_and_what_is_a_scan(scans, tmp_path):
    listed = cohort.list_scans(scans, PROMPT)
    assert [(s.case_id, os.path.relpath(s.path, scans)) for s in listed] == [
        ("a", "a.nii.gz"), ("b", "b.nii.gz"), ("broken", "broken.nii.gz"), ("p2_c", os.path.join("p2", "c.nrrd")),
        ("p3_series", os.path.join("p3", "series"))]
    (scans / "p2_c.nii.gz").write_bytes(b"")  # the same case id as p2/c.nrrd
    with pytest.raises(InputError, match="both give case id 'p2_c'"):
        cohort.list_scans(scans, PROMPT)
    # OUT_DIR inside the input folder is not searched
    (scans / "p2_c.nii.gz").unlink()
    (scans / "out").mkdir()
    write_volume(small_ct(0), scans / "out" / "a_mask.nii.gz")
    assert len(cohort.list_scans(scans, PROMPT, exclude=[scans / "out"])) == 5


def test_threads_of_one_worker_share_its_model_and_give_the_same_masks(scans, tmp_path, tiny_weights, client):
    (scans / "broken.nii.gz").unlink()
    options = ScanOptions(device="cpu", seed=4)
    run_cohort(scans, tmp_path / "two", PROMPT, options, weights=tiny_weights, client=client, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                                  silence_logs=logging.ERROR) as one, distributed.Client(one) as shared:
        summary = run_cohort(scans, tmp_path / "one", PROMPT, options, weights=tiny_weights, client=shared, progress=False)
        plugins = [p for p in one.workers[0].plugins.values() if isinstance(p, cohort.worker.SegmenterPlugin)]
        assert len(plugins) == 1 and plugins[0].load_seconds is not None  # loaded once, used by both threads
    assert (summary.ok, summary.workers) == (4, 1)
    for case_id in ("a", "b", "p2_c", "p3_series"):
        np.testing.assert_array_equal(read_volume(tmp_path / "one" / f"{case_id}_mask.nii.gz").array,
                                      read_volume(tmp_path / "two" / f"{case_id}_mask.nii.gz").array)


@pytest.mark.parametrize("prompt, window, message", [
    ("  ", None, 'the prompt is empty; type what to segment, e.g. "lung nodule"'),
    ("x" * 501, None, "the prompt is 501 characters long; at most 500"),
    (PROMPT, "disco", "unknown CT window 'disco'; choose one of lung,"),
])
def test_prompt_and_window_are_checked_by_the_library_rules_before_any_scan(tmp_path, prompt, window, message):
    """The same checks (and messages) as `segment`: options.check_prompt_text, intensity.check_window."""
    with pytest.raises(BoltzformerError, match=message.replace("(", r"\(")):
        run_cohort(tmp_path / "nothing", tmp_path / "out", prompt, ScanOptions(window=window), progress=False)
    assert not (tmp_path / "out").exists()


def test_options_key_names_the_filter_rules_and_the_nodule_detector():
    """--resume compares the key: other filter rules or the detector give other masks."""
    plain, detector = ScanOptions(), ScanOptions(nodule_detector=True)
    assert "nodule>=14.1mm3" in plain.key() and "nodule_detector" not in plain.key()
    assert ":ms_polarity" in plain.key() and "ms_polarity" not in ScanOptions(fp_reduction=False).key()
    assert "nodule_detector=on" in detector.key() and detector.key() != plain.key()
    assert "nodule" not in ScanOptions(fp_reduction=False).key()


def test_options_key_names_mirror_averaging():
    """Mirror averaging changes every probability: --resume must not keep masks made without it."""
    on, off = ScanOptions(mirror=True), ScanOptions(mirror=False)
    assert "mirror=on" in on.key() and "mirror=off" in off.key()


def test_options_key_names_the_planes():
    """Three planes change the probabilities of the volumes they run on: --resume must not skip."""
    keys = {p: ScanOptions(planes=p).key() for p in ("axial", "three", "auto")}
    assert all(f"planes={p}" in k for p, k in keys.items()) and len(set(keys.values())) == 3


# -- a review on a realistic archive ---------------------------------------------------------------------
def test_resume_redoes_a_replaced_file_and_a_failure_keeps_no_old_mask(scans, tmp_path, tiny_weights, client):
    """--resume skipped a scan whose file had been replaced (the path was all it compared), and a
    scan redone that now failed kept the earlier run's mask beside its failed row."""
    (scans / "broken.nii.gz").unlink()
    out = tmp_path / "out"
    options = ScanOptions(device="cpu", seed=1)
    assert run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False).ok == 4
    write_volume(small_ct(7), scans / "a.nii.gz", overwrite=True)  # another scan under the same name
    time.sleep(0.01)
    data = (scans / "b.nii.gz").read_bytes()
    (scans / "b.nii.gz").write_bytes(data[: len(data) // 2])  # now truncated: it fails
    summary = run_cohort(scans, out, PROMPT, options, weights=tiny_weights, client=client, progress=False, resume=True)
    assert (summary.skipped, summary.ok, summary.failed) == (2, 1, 1)
    report = {r["case_id"]: r for r in read_csv(out / "report.csv")}
    assert report["a"]["status"] == "ok" and report["b"]["status"] == "failed"
    assert read_volume(out / "a_mask.nii.gz").shape == small_ct(7).shape
    assert not (out / "b_mask.nii.gz").exists()  # no mask of the earlier file beside the failed row


def test_a_second_cohort_on_the_same_folder_is_refused(scans, tmp_path, tiny_weights, client):
    """Both ran, and the second replaced the first's report.csv while the first was writing."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / cohort.run.LOCK_NAME, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write("pid 12345 on elsewhere")
        held.flush()
        with pytest.raises(OutputError, match=r"another cohort is writing to it \(pid 12345 on elsewhere\)"):
            run_cohort(scans, out, PROMPT, ScanOptions(device="cpu"), weights=tiny_weights, client=client,
                       progress=False)
    (scans / "broken.nii.gz").unlink()
    assert run_cohort(scans, out, PROMPT, ScanOptions(device="cpu"), weights=tiny_weights, client=client,
                      progress=False).ok == 4  # released: it runs


def test_a_full_disk_stops_the_cohort_with_its_message(scans, tmp_path, tiny_weights, client, monkeypatch):
    """It went on through every scan, each 'failed: no space left', and the error of closing the
    tables replaced the cohort's message with 'unexpected OSError'."""
    def full(*args, **kwargs):
        raise OutputError(kwargs.get("path", "mask"), "could not be written: no space left on device")

    monkeypatch.setattr(cohort.worker, "write_volume", full, raising=False)
    import boltzformer.io

    monkeypatch.setattr(boltzformer.io, "write_volume", full)
    with pytest.raises(OutputError, match="the disk is full .* rerun with --resume once there is room"):
        run_cohort(scans, tmp_path / "out", PROMPT, ScanOptions(device="cpu"), weights=tiny_weights, client=client,
                   progress=False)
    assert len(read_csv(tmp_path / "out" / "report.csv")) == 1  # stopped at the first


def test_closing_a_table_returns_its_error_instead_of_raising(tmp_path):
    table = cohort.tables.Table(tmp_path / "t.csv", ("a",))
    table.start([])

    class Full:
        def close(self):
            raise OSError(28, "No space left on device")

    table._f = Full()
    error = table.close()
    assert isinstance(error, OutputError) and "no space left on device" in str(error)
    assert table.close() is None


def test_what_a_folder_walk_takes_for_scans(scans, tmp_path, tiny_weights, client):
    """A DICOMDIR made its folder a failed 'series'; an earlier cohort's output folder inside the
    input was segmented as scans; linked folders were skipped silently; `-o x.nii.gz` made a folder."""
    (scans / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (scans / "broken.nii.gz").unlink()
    run_cohort(scans, scans / "results", PROMPT, ScanOptions(device="cpu"), weights=tiny_weights, client=client,
               progress=False)
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    write_volume(small_ct(5), linked / "d.nii.gz")
    (scans / "link").symlink_to(linked, target_is_directory=True)
    (scans / "loop").symlink_to(scans, target_is_directory=True)  # followed once, never in circles
    notes = []
    listed = cohort.list_scans(scans, PROMPT, exclude=[scans / "results_v2"], warn=notes.append)
    assert [s.case_id for s in listed] == ["a", "b", "link_d", "p2_c", "p3_series"]
    assert notes == [f"{scans / 'results'}: holds an earlier cohort's masks (report.csv); left out"]
    # a Latin-1 name (an old archive): no reader opens it and report.csv cannot hold it; the whole
    # cohort stopped with 'unexpected UnicodeEncodeError' after cancelling the good scans
    os.link(scans / "a.nii.gz", scans / os.fsdecode(b"r\xe9sum\xe9.nii.gz"))
    notes.clear()
    listed = cohort.list_scans(scans, PROMPT, exclude=[scans / "results_v2"], warn=notes.append)
    assert [s.case_id for s in listed] == ["a", "b", "link_d", "p2_c", "p3_series"]
    assert any("r\\xe9sum\\xe9.nii.gz: its name is not valid UTF-8" in n and "left out" in n for n in notes), notes
    with pytest.raises(OutputError, match="is named like a file, but a cohort writes a folder"):
        run_cohort(scans, tmp_path / "result.nii.gz", PROMPT, ScanOptions(device="cpu"), weights=tiny_weights,
                   client=client, progress=False)
    assert not (tmp_path / "result.nii.gz").exists()


def test_ctrl_c_in_a_terminal_gives_one_line_not_the_workers_tracebacks(tmp_path, tiny_weights):
    """A terminal sends Ctrl-C to the whole process group: each Dask worker process printed its
    own KeyboardInterrupt traceback before the cohort's one-line message."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "scans"
    root.mkdir()
    for i in range(30):  # enough that the cohort is still running when the Ctrl-C comes
        write_volume(small_ct(i), root / f"s{i}.nii.gz")
    out = tmp_path / "out"
    err = tmp_path / "err.txt"
    cmd = [sys.executable, "-m", "boltzformer.cli", "cohort", str(root), "-p", PROMPT, "-o", str(out), "--workers", "2",
           "--device", "cpu", "--weights", tiny_weights, "--quiet"]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "report.csv").exists() and proc.poll() is None:
            time.sleep(0.1)  # the workers are up once the report is started
        assert proc.poll() is None, err.read_text()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130  # as a shell reports Ctrl-C
    text = err.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.strip().splitlines()[-1].startswith("boltzformer: error: interrupted;")


def test_a_scan_failing_after_its_mask_was_written_leaves_no_file(tmp_path, monkeypatch):
    """A failure after the staged mask was written (a bug building the lesion rows) reported the
    scan as failed and left its finished mask in the output folder."""
    from types import SimpleNamespace

    from boltzformer.cohort import worker
    from boltzformer.cohort.scans import Scan, ScanOptions
    from boltzformer.io import Volume, write_volume

    volume = Volume(np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), modality="CT")
    scan = write_volume(volume, tmp_path / "ct.nii.gz")
    result = SimpleNamespace(warnings=[], mask_volume=lambda: volume.with_array(np.zeros(volume.shape, np.uint8)))
    segmenter = SimpleNamespace(device="cpu", segment_volume=lambda *a, **k: result)
    monkeypatch.setattr(worker, "_plugin", lambda name: SimpleNamespace(worker=None, segmenter=lambda: (segmenter, "x")))
    monkeypatch.setattr(worker, "_lesion_rows", lambda case_id, result: {}["centroid_mm"])
    (tmp_path / "out").mkdir()
    done = worker.segment_scan("p", Scan("case1", str(scan), "liver lesion"), ScanOptions(), str(tmp_path / "out"))
    assert done["report"]["status"] == "failed" and "unexpected KeyError" in done["report"]["reason"]
    assert done["staged"] == "" and list((tmp_path / "out").iterdir()) == []
