"""Tests for boltzformer.intensity: windows, prompt rules, unit detection, normalisation, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from boltzformer import intensity
from boltzformer.errors import BoltzformerError
from boltzformer.intensity import (
    WINDOWS, Window, classify_units, detect_modality, prepare_slices, window_for_prompt,
)
from boltzformer.io import Volume


def test_window_presets():
    assert WINDOWS["lung"] == Window(-600, 1500)
    assert (WINDOWS["lung"].lower_hu, WINDOWS["lung"].upper_hu) == (-1350, 150)
    assert (WINDOWS["brain"].lower_hu, WINDOWS["brain"].upper_hu) == (0, 80)
    assert set(WINDOWS) == {"lung", "mediastinum", "soft_tissue", "liver", "bone", "brain"}


@pytest.mark.parametrize("prompt, window", [
    ("lung nodule", "lung"),
    ("Pulmonary nodules", "lung"),
    ("ground-glass opacity in the airway", "lung"),
    ("bronchial wall thickening", "lung"),
    ("nodule", "lung"),
    ("liver lesion", "soft_tissue"),
    ("hepatic metastasis", "soft_tissue"),
    ("liver nodule", "soft_tissue"),
    ("renal cyst", "soft_tissue"),
    ("pancreatic tumour", "soft_tissue"),
    ("adrenal adenoma", "soft_tissue"),
    ("vertebral metastasis", "bone"),
    ("rib fracture", "bone"),
    ("lytic bone lesion", "bone"),
    ("enlarged mediastinal lymph node", "mediastinum"),
    ("aortic aneurysm", "mediastinum"),
    ("intracranial hemorrhage", "brain"),
    ("cerebral haemorrhage", "brain"),
    ("describe the tumour", "soft_tissue"),  # "rib" inside a word is not a rib
    ("", "soft_tissue"),
    ("tumor", "soft_tissue"),
])
def test_window_for_prompt(prompt, window):
    assert window_for_prompt(prompt) == window


def test_classify_units():
    rng = np.random.default_rng(0)
    assert classify_units(rng.integers(-1024, 1200, (4, 8, 8)).astype(np.int16)) == "HU"
    assert classify_units(np.array([0, 100, 3000], np.int16)) == "HU"  # dense bone, no air
    assert classify_units(rng.normal(-500, 300, (4, 8, 8)).astype(np.float32)) == "HU"  # resampled CT
    assert classify_units(rng.random((4, 8, 8)).astype(np.float32)) == "normalized"
    assert classify_units(rng.integers(0, 256, (4, 8, 8)).astype(np.uint8)) == "8bit"
    assert classify_units(rng.integers(0, 256, (4, 8, 8)).astype(np.float32)) == "8bit"
    assert classify_units(rng.random((4, 8, 8)) * 900 + 0.5) == "raw"
    assert classify_units(np.array([0.0, 1200.5, 2400.25])) == "raw"  # large but not integers


def test_ct_windowing():
    hu = np.array([[[-2000, -1350, -600, 150, 3000]]], np.int16)
    out, info = prepare_slices(hu, modality="CT", window="lung")
    assert out.dtype == np.float32 and out.shape == hu.shape
    np.testing.assert_allclose(out[0, 0], [0, 0, 0.5, 1, 1], atol=1e-6)
    assert info == {"window": "lung", "units": "HU", "warnings": []}
    # window from the prompt, else soft tissue (-160..240)
    assert prepare_slices(hu, modality="CT", prompt="rib fracture")[1]["window"] == "bone"
    out, info = prepare_slices(np.array([[[-1000, -160, 40, 240]]], np.int16), modality="ct")
    assert info["window"] == "soft_tissue"
    np.testing.assert_allclose(out[0, 0], [0, 0, 0.5, 1], atol=1e-6)
    out, info = prepare_slices(hu, modality="CT", window=Window(0, 100))
    np.testing.assert_allclose(out[0, 0], [0, 0, 0, 1, 1])
    with pytest.raises(BoltzformerError, match="unknown CT window"):
        prepare_slices(hu, modality="CT", window="lungs")


@pytest.mark.parametrize("array, units, expected", [
    (np.array([[[0, 51, 255]]], np.uint8), "8bit", [0, 0.2, 1]),
    (np.array([[[0.0, 0.25, 1.0]]], np.float32), "normalized", [0, 0.25, 1]),
])
def test_ct_not_in_hu_is_rescaled_with_warning(array, units, expected):
    out, info = prepare_slices(array, modality="CT", window="lung")
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
    assert info["units"] == units and info["window"] is None
    (warning,) = info["warnings"]
    assert "not Hounsfield units" in warning and "windowing is skipped" in warning and "'lung'" in warning


def test_ct_raw_uses_percentiles():
    raw = np.random.default_rng(1).random((2, 64, 64)) * 900 + 0.5
    out, info = prepare_slices(raw, modality="CT")
    assert info["units"] == "raw" and "raw intensities" in info["warnings"][0]
    assert out.min() == 0 and out.max() == 1
    assert 0.004 < np.mean(out == 0) < 0.006  # 0.5 % clipped at each end


def test_mr_normalisation():
    rng = np.random.default_rng(2)
    mr = np.zeros((8, 64, 64), np.float32)  # 50 % background
    mr[:, 16:48] = rng.normal(500, 100, (8, 32, 64))
    out, info = prepare_slices(mr, modality="MRI")
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert info["window"] is None and info["warnings"] == []
    tissue = out[:, 16:48]
    # percentiles ignore the background: 0.5 % of the tissue clips at each end, its median ~ 0.5
    assert 0.003 < np.mean(tissue == 0) < 0.008 and 0.003 < np.mean(tissue == 1) < 0.008
    assert abs(np.median(tissue) - 0.5) < 0.02
    assert np.all(out[:, :16] == 0)
    # the same scaling for every slice: a dimmer slice stays dimmer
    mr[0, 16:48] *= 0.5
    out, _ = prepare_slices(mr, modality="MR")
    assert np.median(out[0, 16:48]) < np.median(out[1, 16:48]) - 0.2
    with pytest.raises(ValueError, match="modality must be 'CT' or 'MR', got 'PET'"):
        prepare_slices(mr, modality="PET")


def test_detect_modality():
    rng = np.random.default_rng(3)
    ct = np.full((4, 32, 32), -1000, np.int16)
    ct[:, 8:24, 8:24] = rng.integers(-100, 100, (4, 16, 16))
    mr = rng.integers(0, 2000, (4, 32, 32)).astype(np.int16)
    assert detect_modality(Volume(ct, (1, 1, 1))) == "CT"
    assert detect_modality(Volume(ct.astype(np.float32) + 0.3, (1, 1, 1))) == "CT"  # resampled
    assert detect_modality(Volume(np.array([[[-800, 0, 40]]], np.int16), (1, 1, 1))) == "CT"
    assert detect_modality(Volume(mr, (1, 1, 1))) == "MR"
    assert detect_modality(Volume(ct, (1, 1, 1), modality="MR")) == "MR"  # the file's word wins
    assert detect_modality(Volume(mr, (1, 1, 1), metadata={"Modality": "CT"})) == "CT"


def test_prepare_is_fast():
    hu = np.random.default_rng(4).integers(-1024, 2000, (100, 512, 512)).astype(np.int16)
    start = time.perf_counter()
    out, _ = prepare_slices(hu, modality="CT", prompt="lung nodule")
    assert time.perf_counter() - start < 2.0
    start = time.perf_counter()
    prepare_slices(hu, modality="MR")
    assert time.perf_counter() - start < 2.0
    assert out.dtype == np.float32


def test_ct_stored_as_hu_plus_1024_is_recognised_and_shifted_back():
    from boltzformer.synth.sample import SAMPLES

    ct = SAMPLES["chest_ct"]().volume()
    shifted = (ct.array.astype(np.int32) + 1024).clip(0).astype(np.uint16)
    assert intensity.shifted_hu_offset(shifted) == 1024
    assert intensity.detect_modality(Volume(shifted, ct.spacing_mm)) == "CT"
    assert intensity.shifted_hu_offset(ct.array) == 0  # real HU: nothing to shift
    mr = SAMPLES["brain_mri"]().volume().array
    for scale in (1.0, 1000.0 / mr.max(), 4000.0 / mr.max()):  # MR at any gain is not taken for it
        assert intensity.shifted_hu_offset(np.round(mr * scale).astype(np.uint16)) == 0


@pytest.mark.parametrize("description, path, weighting", [
    ("t1_mprage_sag_p2", None, "T1"), ("MPRAGE", None, "T1"), ("T1 FLAIR SAG", None, "T1"),
    ("AX T2 FLAIR", None, "FLAIR"), ("t2_tirm_tra_dark-fluid", None, "FLAIR"), ("AX T2 FSE", None, "T2"),
    ("AX T2* GRE", None, "T2*"), ("SWI_Images", None, "T2*"), ("PD TSE", None, "PD"), ("ep2d_diff_b1000", None, None),
    (None, "/data/sub-01/anat/sub-01_ses-1_T1w.nii.gz", "T1"), (None, "/d/sub-02_FLAIR.nii.gz", "FLAIR"),
    (None, "/d/sub-02_T2w.nii", "T2"), (None, "/d/sub-02_PDw.nii.gz", "PD"), (None, "/d/sub-02_T2starw.nii.gz", "T2*"),
    ("ep2d_diff", "/d/sub-02_FLAIR.nii.gz", "FLAIR"),  # a description that says nothing: the file name
    (None, "/d/openms_p07_flair_image.nii.gz", None),  # not a BIDS suffix: not guessed from a name
    ("Progress report", None, None), (None, None, None),
])
def test_mr_sequence_from_the_series_description_or_a_bids_name(description, path, weighting):
    vol = Volume(np.zeros((1, 4, 4), np.float32), (1.0, 1.0, 1.0), path=path,
                 metadata={"SeriesDescription": description} if description else {})
    assert intensity.mr_sequence(vol) == weighting
    said = intensity.stated_mr_sequence(vol)[1]
    assert (said is None) == (weighting is None) and (said is None or said in (description, (path or "").rsplit("/", 1)[-1]))


def test_a_ct_window_asked_for_on_mr_is_checked_and_said_to_be_unused():
    """It was ignored silently on MR, even a misspelt name ('lungs') that CT refuses."""
    from boltzformer.errors import BoltzformerError
    from boltzformer.intensity import prepare_slices

    mr = np.random.default_rng(0).normal(300, 50, (2, 16, 16)).astype(np.float32)
    with pytest.raises(BoltzformerError, match="unknown CT window 'lungs'"):
        prepare_slices(mr, modality="MR", window="lungs")
    _, info = prepare_slices(mr, modality="MR", window="lung")
    assert info["warnings"] == ["the CT window 'lung' is not applied: MR has no Hounsfield units and is normalised "
                                "per volume"]
    assert prepare_slices(mr, modality="MR")[1]["warnings"] == []


def test_a_custom_window_is_named_by_its_values_in_warnings():
    """A custom Window used to appear as its dataclass repr in the MR and non-HU warnings."""
    from boltzformer.intensity import Window, prepare_slices

    mr = np.random.default_rng(0).normal(300, 50, (2, 16, 16)).astype(np.float32)
    _, info = prepare_slices(mr, modality="MR", window=Window(40, 400))
    assert info["warnings"][0].startswith("the CT window custom (center 40 HU, width 400 HU) is not applied")
    _, info = prepare_slices(np.linspace(0, 1, 512, dtype=np.float32).reshape(2, 16, 16), modality="CT",
                             window=Window(-600, 1500))
    assert info["warnings"][0].endswith("; the requested window custom (center -600 HU, width 1500 HU) is not applied")


def test_a_mask_or_label_map_is_told_from_a_scan():
    """The napari reader opens masks as labels: few whole values in [0, 255], mostly 0."""
    from boltzformer.intensity import looks_like_label_map

    rng = np.random.default_rng(0)
    mask = np.zeros((4, 32, 32), np.uint8)
    mask[1:3, 5:9, 5:9] = 1
    labels = mask.astype(np.int16) * rng.integers(1, 6, mask.shape).astype(np.int16)
    assert looks_like_label_map(mask) and looks_like_label_map(labels)
    assert looks_like_label_map(np.zeros((2, 8, 8), np.uint8))  # an empty mask (no lesion found)
    ct = rng.normal(-600, 300, (4, 32, 32)).astype(np.int16)
    grey = rng.integers(0, 256, (4, 32, 32)).astype(np.uint8)  # an 8-bit image: hundreds of grey levels
    assert not looks_like_label_map(ct) and not looks_like_label_map(grey)
    assert not looks_like_label_map(np.ones((2, 8, 8), np.uint8))  # mostly 1: not a lesion mask
    assert not looks_like_label_map(mask.astype(np.float32))  # floats: probabilities, not labels
