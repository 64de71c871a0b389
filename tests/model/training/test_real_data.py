"""The real cases of ../shared/data/real: the patient split, and the shipped model on them.

The data are never copied into the repository. Tests that read them look beside the checkout
(or at $BOLTZFORMER_REAL_DATA) and are skipped, with that reason, where they are absent.
"""

import os
from pathlib import Path

import pytest

from boltzformer import weights
from boltzformer.evaluate import read_cases, read_split
from boltzformer.training.data import REAL_SPLIT, real_examples

REAL_DIR = Path(os.environ.get("BOLTZFORMER_REAL_DATA")
                or Path(__file__).resolve().parents[3].parent / "shared" / "data" / "real")
SPLIT = read_split(REAL_SPLIT)


def real_split(case_id: str) -> str:
    return SPLIT[case_id]
needs_real_data = pytest.mark.skipif(
    not (REAL_DIR / "cases.csv").is_file(),
    reason=f"real cases not found: no {REAL_DIR / 'cases.csv'} (set BOLTZFORMER_REAL_DATA to their folder)",
)

# Measured with the bundled weights (MODEL_CARD.md, table b): lung tumour 0.449 on the 11
# held-out cases. The threshold leaves room for floating-point differences between platforms,
# and still fails if the shipped model stops finding real lung tumours.
MIN_HELDOUT_LUNG_DICE = 0.38


def _patient(case_id: str) -> str:
    """The patient / source image a case comes from: what the split must never divide. Groups
    the data's README names: msT1_pPP_sSSS is patient 1PP of the ms_flair_1PPSSS slices;
    lungjpg_100NN is patient 100NN of msd_lung_slice_100NN; an open_ms brain's FLAIR and T2;
    the ts_chest01 crops of one CT."""
    if case_id.startswith("msd_lung_slice_"):
        return "msd_lung_" + case_id.split("_")[3]
    if case_id.startswith("lungjpg_"):
        return "msd_lung_" + case_id.split("_")[1]
    if case_id.startswith("ms_flair_"):
        return "ms_flair_" + case_id.split("_")[2][:3]
    if case_id.startswith("msT1_p"):
        return "ms_flair_1" + case_id.split("_")[1][1:]
    if case_id.startswith("openms_"):
        return "_".join(case_id.split("_")[:2])
    if case_id.startswith("ts_chest01"):
        return "ts_chest01"
    if case_id.startswith("sammed2d_"):
        return "_".join(case_id.split("_")[:4])  # e.g. sammed2d_amos_0006_90: one image, several prompts
    return case_id


def test_split_file_follows_patients_not_slices():
    # Two slices of one patient always share a split; the held-out patients are fixed.
    assert real_split("msd_lung_slice_10006_250") == real_split("msd_lung_slice_10006_257") == "heldout"
    assert real_split("msd_lung_slice_10005_454") == "train"
    assert real_split("ms_flair_105006") == real_split("ms_flair_105008") == "heldout"
    assert real_split("ms_flair_106021") == "train"
    assert real_split("msd_lung_patch_test_021") == "heldout"
    assert real_split("msd_lung_patch_val_109") == "train"
    for prompt in ("liver", "spleen", "inferior_vena_cava"):
        assert real_split(f"sammed2d_amos_0006_90_{prompt}") == "heldout"
    # T1 and FLAIR slices of one patient (the same image number): one side (they were split)
    assert real_split("msT1_p13_s019") == real_split("ms_flair_113019") == "train"
    assert real_split("msT1_p05_s003") == real_split("ms_flair_105006") == "heldout"
    assert real_split("lungjpg_10001_s231") == real_split("msd_lung_slice_10001_234") == "train"


def test_every_case_of_the_split_file_groups_with_its_patient():
    """Without the data: the split file's own case ids, grouped by patient, never on two sides."""
    sides: dict[str, set] = {}
    for case_id, split in SPLIT.items():
        sides.setdefault(_patient(case_id), set()).add(split)
    mixed = {p: s for p, s in sides.items() if len(s) > 1}
    assert not mixed, f"patients on two sides of the split: {mixed}"


@needs_real_data
def test_every_patient_is_in_exactly_one_split_and_both_splits_have_lung_and_ms_cases():
    rows = read_cases(REAL_DIR)
    splits_of_patient: dict[str, set] = {}
    for row in rows:
        splits_of_patient.setdefault(_patient(row["case_id"]), set()).add(real_split(row["case_id"]))
    mixed = {p: s for p, s in splits_of_patient.items() if len(s) > 1}
    assert not mixed, f"patients in both splits: {mixed}"
    for split in ("train", "heldout"):
        prompts = {r["prompt"] for r in rows if real_split(r["case_id"]) == split}
        assert {"lung tumor", "multiple sclerosis lesion"} <= prompts, (split, prompts)


@needs_real_data
def test_training_examples_come_only_from_the_train_split():
    """`train` reads real cases through real_examples: the held-out cases must not be among them."""
    train = real_examples(REAL_DIR, "train", size=64, negatives=False)
    heldout = real_examples(REAL_DIR, "heldout", size=64, negatives=False)
    assert len(train) > 0 and len(heldout) > 0
    # No held-out slice appears among the training slices (compared as 64² thumbnails).
    train_images = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_images for img in heldout.images)


@needs_real_data
@pytest.mark.skipif(weights.bundled_weights() is None, reason="no trained weights bundled in this checkout")
def test_bundled_model_finds_real_heldout_lung_tumours():
    from boltzformer.evaluate import evaluate_dir
    from boltzformer.segmenter import Segmenter

    lung_ids = [r["case_id"] for r in read_cases(REAL_DIR)
                if r["prompt"] == "lung tumor" and real_split(r["case_id"]) == "heldout"]
    summary = evaluate_dir(REAL_DIR, Segmenter.from_pretrained(device="cpu"), case_ids=lung_ids,
                           split="heldout", split_file=REAL_SPLIT, progress=False)
    dices = [c["dice"] for c in summary["cases"]]
    assert len(dices) == 11
    assert sum(dices) / len(dices) >= MIN_HELDOUT_LUNG_DICE, dices
