"""MS lesion polarity: on a scan where the candidates are mostly bright (FLAIR, T2), the dark ones go."""

import numpy as np
import pytest

from boltzformer import polarity_filter as pf, postprocess
from boltzformer.io import Volume
from boltzformer.results import SegmentationResult


def _brain(lesion_value: float, putamen_value: float, n_bright: int = 3):
    """A skull-stripped brain (0 outside, white matter 60) with `n_bright` spots of `lesion_value`
    and one larger region of `putamen_value`; -> (volume, candidate mask, mask of the bright spots)."""
    z, y, x = np.mgrid[0:24, 0:64, 0:64].astype(np.float32)
    image = np.zeros((24, 64, 64), np.float32)
    brain = ((z - 12) / 11) ** 2 + ((y - 32) / 30) ** 2 + ((x - 32) / 30) ** 2 <= 1
    image[brain] = 60.0
    spots = np.zeros(image.shape, bool)
    for cy, cx in [(18, 20), (27, 20), (32, 5)][:n_bright]:  # the last at the brain's edge: its shell meets the 0s
        spots |= (z - 12) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 2.0**2
    putamen = (z - 12) ** 2 + ((y - 32) / 2) ** 2 + (x - 44) ** 2 <= 3.0**2
    image[spots] = lesion_value
    image[putamen] = putamen_value
    return Volume(image, (1.0, 1.0, 1.0), modality="MR"), spots | putamen, spots


def _labelled(volume, candidates):
    labels, n = postprocess.label_components(candidates, volume.spacing_mm)
    return labels, postprocess.lesion_table(labels, volume)


def test_on_a_bright_lesion_scan_the_dark_candidate_is_dropped():
    vol, candidates, spots = _brain(lesion_value=100.0, putamen_value=45.0)
    labels, rows = _labelled(vol, candidates)
    assert len(rows) == 4
    out, kept, rejected = pf.filter_candidates(labels, rows, vol)
    assert len(kept) == 3 and len(rejected) == 1 and rejected[0]["fp_verdict"] == pf.DARKER
    assert rejected[0]["local_contrast"] == pytest.approx(45.0 - 60.0)
    assert all(r["local_contrast"] == pytest.approx(40.0) for r in kept)  # the brain's 0 is not the shell
    np.testing.assert_array_equal(out > 0, spots)
    assert sorted(np.unique(out[out > 0])) == [r["lesion_id"] for r in kept] == [1, 2, 3]


def test_on_a_dark_lesion_scan_nothing_is_dropped():
    """T1: most candidates are dark (lesions), one is bright: either polarity may be a lesion."""
    vol, candidates, _ = _brain(lesion_value=30.0, putamen_value=80.0)
    labels, rows = _labelled(vol, candidates)
    out, kept, rejected = pf.filter_candidates(labels, rows, vol)
    assert rejected == [] and len(kept) == 4 and out is labels
    assert sum(r["local_contrast"] < 0 for r in kept) == 3


def test_too_few_candidates_say_nothing_about_the_scan():
    vol, candidates, _ = _brain(lesion_value=100.0, putamen_value=45.0, n_bright=1)
    labels, rows = _labelled(vol, candidates)
    assert len(rows) == 2 < pf.MIN_CANDIDATES
    assert pf.filter_candidates(labels, rows, vol)[2] == []


def test_a_single_slice_uses_an_in_plane_shell():
    vol, candidates, spots = _brain(lesion_value=100.0, putamen_value=45.0)
    one = Volume(vol.array[12:13], (1.0, 1.0, 5.0), modality="MR")
    labels, rows = _labelled(one, candidates[12:13])
    out, kept, rejected = pf.filter_candidates(labels, rows, one)
    assert len(kept) == 3 and len(rejected) == 1
    np.testing.assert_array_equal(out > 0, spots[12:13])


@pytest.mark.parametrize("prompt, modality, expected", [
    ("multiple sclerosis lesion", "MR", True), ("MS lesion", "MR", True), ("white matter lesion", "MR", True),
    ("demyelinating plaques of multiple sclerosis", "MR", True), ("multiple sclerosis lesion", "CT", False),
    ("brain tumor", "MR", False), ("lung nodule", "CT", False), ("multiple sclerosis lesion", None, False),
])
def test_applies_to_ms_lesion_prompts_on_mr_only(prompt, modality, expected):
    assert pf.applies(prompt, modality) is expected


def test_the_result_filters_by_default_and_the_switch_turns_it_off():
    vol, candidates, spots = _brain(lesion_value=100.0, putamen_value=45.0)
    probabilities = np.where(candidates, 0.9, 0.0).astype(np.float32)
    result = SegmentationResult(volume=vol, prompt="multiple sclerosis lesion", probabilities=probabilities, mask=None,
                                threshold=0.5, min_lesion_mm3=0.0, slices=(0, vol.shape[0]), runs=1, modality="MR")
    result.rethreshold(0.5)
    np.testing.assert_array_equal(result.mask > 0, spots)
    assert len(result.lesions) == 3 and [r["fp_verdict"] for r in result.rejected] == [pf.DARKER]
    result.rethreshold(0.5, fp_reduction=False)
    np.testing.assert_array_equal(result.mask > 0, candidates)
    assert len(result.lesions) == 4 and result.rejected == []
    brain_tumour = SegmentationResult(volume=vol, prompt="brain tumor", probabilities=probabilities, mask=None,
                                      threshold=0.5, min_lesion_mm3=0.0, slices=(0, vol.shape[0]), runs=1, modality="MR")
    assert len(brain_tumour.rethreshold(0.5).lesions) == 4


def test_a_scan_whose_candidates_are_mostly_dark_is_warned_about_as_t1_like():
    """On a T1 slice the model outlined sulci and the fissure, all darker than their surroundings,
    and nothing was said: the filter drops nothing there (neither polarity can be ruled out)."""
    def run(lesion_value, description=None):
        vol, candidates, _ = _brain(lesion_value=lesion_value, putamen_value=45.0)
        if description:
            vol = Volume(vol.array, vol.spacing_mm, modality="MR", metadata={"SeriesDescription": description})
        return SegmentationResult(volume=vol, prompt="multiple sclerosis lesion", mask=None, threshold=0.5,
                                  probabilities=np.where(candidates, 0.9, 0.0).astype(np.float32), min_lesion_mm3=0.0,
                                  slices=(0, vol.shape[0]), runs=1, modality="MR").rethreshold(0.5)

    def warned(result):
        return [w for w in result.warnings if w.startswith("most candidates are darker than the tissue around them")]

    dark = run(lesion_value=20.0)
    assert len(dark.lesions) == 4 and len(warned(dark)) == 1
    dark.rethreshold(0.6)
    assert len(warned(dark)) == 1  # said once
    assert warned(run(lesion_value=100.0)) == []  # bright lesions: FLAIR-like, the dark one dropped, no warning
    assert warned(run(lesion_value=20.0, description="t1_mprage_sag")) == []  # the file says T1: warned elsewhere


def test_a_free_text_prompt_takes_the_filter_of_its_nearest_known_prompt():
    """'lesion' is nearest 'ms lesion' (0.80 with the bundled model), and the network finds what
    'ms lesion' finds; the MS contrast filter, keyed to the literal text, did not run."""
    vol, candidates, spots = _brain(lesion_value=100.0, putamen_value=45.0)
    probabilities = np.where(candidates, 0.9, 0.0).astype(np.float32)

    def result(rules_prompt):
        return SegmentationResult(volume=vol, prompt="lesion", rules_prompt=rules_prompt, probabilities=probabilities,
                                  mask=None, threshold=0.5, min_lesion_mm3=0.0, slices=(0, vol.shape[0]), runs=1,
                                  modality="MR").rethreshold(0.5)

    assert len(result(None).lesions) == 4  # no known target, no filter
    near = result("ms lesion")
    np.testing.assert_array_equal(near.mask > 0, spots)
    assert near.prompt == "lesion" and [r["fp_verdict"] for r in near.rejected] == [pf.DARKER]


def test_a_series_the_file_calls_t1_keeps_every_candidate():
    vol, candidates, _ = _brain(lesion_value=100.0, putamen_value=45.0)
    labels, rows = _labelled(vol, candidates)
    assert pf.filter_candidates(labels, rows, vol, sequence="T1")[2] == []
    assert len(pf.filter_candidates(labels, rows, vol, sequence="FLAIR")[2]) == 1
    t1 = Volume(vol.array, vol.spacing_mm, modality="MR", metadata={"SeriesDescription": "t1_mprage_sag"})
    result = SegmentationResult(volume=t1, prompt="multiple sclerosis lesion", mask=None, threshold=0.5,
                                probabilities=np.where(candidates, 0.9, 0.0).astype(np.float32), min_lesion_mm3=0.0,
                                slices=(0, vol.shape[0]), runs=1, modality="MR")
    assert len(result.rethreshold(0.5).lesions) == 4 and result.rejected == []


def test_ms_lesions_on_a_t1_series_are_warned_about():
    from boltzformer.segmenter import _warn_untrained_sequence

    image = np.zeros((1, 4, 4), np.float32)
    cases = {("t1_mprage_sag", "multiple sclerosis lesion", "MR"): True, ("AX T2 FLAIR", "multiple sclerosis lesion", "MR"): False,
             (None, "multiple sclerosis lesion", "MR"): False, ("t1_mprage_sag", "brain tumor", "MR"): False}
    for (description, prompt, modality), warned in cases.items():
        vol = Volume(image, (1.0, 1.0, 1.0), metadata={"SeriesDescription": description} if description else {})
        warnings = []
        _warn_untrained_sequence(vol, prompt, prompt, modality, warnings)
        assert bool(warnings) == warned, (description, prompt)
        if warned:
            assert "t1_mprage_sag" in warnings[0] and "FLAIR or T2 series" in warnings[0]
