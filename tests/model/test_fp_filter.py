"""3D false-positive reduction: a nodule is kept, a vessel and a candidate outside the lung go."""

import numpy as np
import pytest

from boltzformer import fp_filter, postprocess
from boltzformer.io import Volume


def _lung_with_nodule_vessel_and_fat():
    z, y, x = np.mgrid[0:40, 0:64, 0:64].astype(np.float32)
    hu = np.full((40, 64, 64), -850.0, np.float32)
    nodule = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 4.0 ** 2  # 8 mm sphere at 1 mm
    vessel = (y - 44) ** 2 + (x - 44) ** 2 <= 2.5 ** 2  # a 5 mm tube through every slice
    hu[nodule | vessel] = 30.0
    hu[:, :, 56:] = -100.0  # a slab of soft tissue (fat) at the side
    fat_blob = (z - 20) ** 2 + (y - 50) ** 2 + (x - 60) ** 2 <= 3.0 ** 2
    candidates = nodule | (vessel & (z >= 15) & (z < 25)) | fat_blob  # what a slice-wise model might mark
    vol = Volume(hu.astype(np.int16), (1.0, 1.0, 1.0), modality="CT")
    return vol, candidates, nodule


def test_features_tell_a_nodule_from_a_vessel_and_from_fat():
    vol, candidates, nodule = _lung_with_nodule_vessel_and_fat()
    labels, n = postprocess.label_components(candidates, vol.spacing_mm)
    rows = postprocess.lesion_table(labels, vol)
    feats = fp_filter.candidate_features(labels, rows, vol, candidates.astype(np.float32))
    by_kind = {}
    for row, f in zip(rows, feats):
        region = labels == row["lesion_id"]
        kind = "nodule" if (region & nodule).any() else "fat" if row["centroid_voxel_zyx"][2] > 55 else "vessel"
        by_kind[kind] = f
    assert by_kind["nodule"]["blobness"] > 0.5 > by_kind["vessel"]["blobness"]
    assert by_kind["vessel"]["z_continuation"] > 0.9 > 0.1 > by_kind["nodule"]["z_continuation"]
    assert by_kind["nodule"]["lung_shell"] > 0.9 and by_kind["vessel"]["lung_shell"] > 0.8  # its own continuation is not air
    assert by_kind["fat"]["lung_shell"] < fp_filter.MIN_LUNG_SHELL


def test_filter_keeps_the_nodule_and_drops_vessel_and_fat(monkeypatch):
    # the vessel rule with thresholds that switch it on (the bundled ones leave it off, see fp_filter)
    monkeypatch.setattr(fp_filter, "MIN_BLOBNESS", 0.25)
    monkeypatch.setattr(fp_filter, "MAX_CONTINUATION", 0.5)
    vol, candidates, nodule = _lung_with_nodule_vessel_and_fat()
    labels, n = postprocess.label_components(candidates, vol.spacing_mm)
    assert n == 3
    rows = postprocess.lesion_table(labels, vol)
    prob = candidates.astype(np.float32)
    kept_labels, kept, rejected = fp_filter.filter_candidates(labels, rows, vol, prob)
    assert len(kept) == 1 and len(rejected) == 2
    assert np.array_equal(kept_labels > 0, nodule)
    verdicts = sorted(r["fp_verdict"] for r in rejected)
    assert verdicts[0] == "outside the lungs" and verdicts[1].startswith("vessel-like")
    assert kept[0]["blobness"] > 0.5 and kept[0]["lung_shell"] > 0.9
    assert all(k in kept[0] for k in fp_filter.FEATURES)


def test_with_the_vessel_rule_off_blobness_is_measured_for_kept_candidates_only():
    """No verdict depends on blobness while MIN_BLOBNESS is 0: dropped candidates skip the Hessian
    (NaN), kept ones get the same value as when every candidate is measured."""
    assert fp_filter.MIN_BLOBNESS == 0
    vol, candidates, nodule = _lung_with_nodule_vessel_and_fat()
    labels, n = postprocess.label_components(candidates, vol.spacing_mm)
    rows = postprocess.lesion_table(labels, vol)
    full = fp_filter.candidate_features(labels, rows, vol, candidates.astype(np.float32))
    _, kept, rejected = fp_filter.filter_candidates(labels, [dict(r) for r in rows], vol, candidates.astype(np.float32))
    assert kept and rejected
    assert all(np.isnan(r["blobness"]) for r in rejected)
    for r in kept:
        original = next(f for row, f in zip(rows, full) if row["centroid_voxel_zyx"] == r["centroid_voxel_zyx"])
        assert r["blobness"] == round(original["blobness"], 4) > 0.5


def test_filter_applies_to_lung_prompts_on_hu_ct_only():
    assert fp_filter.applies("lung nodule", "CT", "lung")
    assert fp_filter.applies("pulmonary nodules in the left lung", "CT", "lung")
    assert not fp_filter.applies("lung nodule", "CT", None)  # not HU: thresholds mean nothing
    assert not fp_filter.applies("aorta", "CT", "mediastinum")
    assert not fp_filter.applies("multiple sclerosis lesion", "MR", None)


def test_classifier_threshold_drops_by_nodule_score_only_when_asked():
    from boltzformer import fp_classifier

    if fp_classifier.bundled() is None:
        import pytest

        pytest.skip("no bundled 3D classifier in boltzformer.resources")
    vol, candidates, nodule = _lung_with_nodule_vessel_and_fat()
    labels, n = postprocess.label_components(candidates, vol.spacing_mm)
    rows = postprocess.lesion_table(labels, vol)
    prob = candidates.astype(np.float32)
    # By default the classifier's shipped threshold decides on the score.
    threshold = fp_classifier.bundled().threshold
    _, kept_d, rejected_d = fp_filter.filter_candidates(labels, [dict(r) for r in rows], vol, prob)
    assert all(r["nodule_score"] >= threshold for r in kept_d)
    assert all(r["nodule_score"] < threshold for r in rejected_d if r["fp_verdict"] == "vessel-like (3D classifier)")
    # At 0 the score drops nothing: the lung rule alone decides.
    _, kept, _ = fp_filter.filter_candidates(labels, [dict(r) for r in rows], vol, prob, min_nodule_score=0.0)
    assert all(r["fp_verdict"] != "vessel-like (3D classifier)" for r in kept)
    assert len(kept) >= len(kept_d)
    scores = sorted(r["nodule_score"] for r in kept)
    cut = scores[-1] + 1e-3 if scores[-1] < 1.0 else None
    if cut is None:  # a score of exactly 1.0 cannot be cut below 1: use the lowest one
        cut = scores[0] + 1e-4
    _, kept2, rejected2 = fp_filter.filter_candidates(labels, [dict(r) for r in rows], vol, prob, min_nodule_score=cut)
    assert len(kept2) < len(kept)
    assert any(r["fp_verdict"] == "vessel-like (3D classifier)" for r in rejected2)
    assert all(r["nodule_score"] >= cut for r in kept2)


def test_a_scan_thinner_than_the_classifier_patch_is_not_scored(monkeypatch):
    """A single CT slice: every patch would be mostly air outside the scan, so the classifier
    must not score (and drop) its nodules; a full stack is scored."""
    from boltzformer import fp_classifier

    calls = []

    class Recording:
        threshold = 0.73
        geometry = fp_classifier.COARSE

        def probabilities(self, patches):
            calls.append(len(patches))
            return np.zeros(len(patches), np.float32)  # "not a nodule" for everything it sees

    monkeypatch.setattr(fp_classifier, "bundled", lambda: Recording())
    vol, candidates, nodule = _lung_with_nodule_vessel_and_fat()
    one = Volume(vol.array[20:21], vol.spacing_mm, modality="CT")
    labels, _ = postprocess.label_components(candidates[20:21], one.spacing_mm)
    rows = postprocess.lesion_table(labels, one)
    _, kept, rejected = fp_filter.filter_candidates(labels, rows, one, candidates[20:21].astype(np.float32))
    assert calls == []
    assert any(np.isnan(r["nodule_score"]) for r in kept)  # the nodule's slice survives, unscored
    assert all(r["fp_verdict"] != "vessel-like (3D classifier)" for r in rejected)
    assert "not applied" in fp_filter.classifier_skipped(one) and "1 mm" in fp_filter.classifier_skipped(one)

    labels, _ = postprocess.label_components(candidates, vol.spacing_mm)  # 40 slices of 1 mm: deep enough
    rows = postprocess.lesion_table(labels, vol)
    _, kept, rejected = fp_filter.filter_candidates(labels, rows, vol, candidates.astype(np.float32))
    assert calls == [len(rows)] and kept == []
    assert fp_filter.classifier_skipped(vol) is None


def test_blobness_on_fine_voxels_still_tells_a_ball_from_a_tube():
    """At 0.5 mm a 16 mm candidate's kernel spans many voxels: the filter works on block means."""
    z, y, x = np.mgrid[0:48, 0:96, 0:96].astype(np.float32)
    hu = np.full(z.shape, -850.0, np.float32)
    ball = ((z - 24) * 1.0) ** 2 + ((y - 48) * 0.5) ** 2 + ((x - 30) * 0.5) ** 2 <= 8.0**2
    tube = ((y - 48) * 0.5) ** 2 + ((x - 75) * 0.5) ** 2 <= 3.0**2
    hu[ball | tube] = 30.0
    labels = (ball.astype(np.int32)) + 2 * (tube & (z >= 8) & (z < 40))
    boxes = postprocess.find_objects(labels)
    spacing = (0.5, 0.5, 1.0)
    round_ = fp_filter._blobness(hu, labels, 1, boxes[0], spacing, 16.0)
    tubular = fp_filter._blobness(hu, labels, 2, boxes[1], spacing, 6.0)
    assert round_ > 0.5 > 0.2 > tubular


def test_a_nodule_prompt_drops_candidates_smaller_than_a_3_mm_nodule():
    vol, candidates, nodule = _lung_with_nodule_vessel_and_fat()
    speck = np.zeros_like(candidates)
    speck[30, 10, 10:12] = True  # 2 mm³ in the lung, well away from everything
    speck[30, 10, 10] = True
    hu = vol.array.copy()
    hu[speck] = 30
    vol = Volume(hu, vol.spacing_mm, modality="CT")
    labels, n = postprocess.label_components(nodule | speck, vol.spacing_mm)
    rows = postprocess.lesion_table(labels, vol)
    prob = (nodule | speck).astype(np.float32)
    _, kept, rejected = fp_filter.filter_candidates(labels, [dict(r) for r in rows], vol, prob, min_nodule_score=0.0)
    assert len(kept) == 2  # another prompt (or none said): the size rule stays out
    _, kept, rejected = fp_filter.filter_candidates(labels, [dict(r) for r in rows], vol, prob, min_nodule_score=0.0,
                                                    nodules=True)
    assert [r["volume_mm3"] for r in kept] == [float(nodule.sum())]
    assert [r["fp_verdict"] for r in rejected] == ["smaller than a 3 mm nodule"]
    assert fp_filter.MIN_NODULE_VOLUME_MM3 == pytest.approx(14.137, abs=1e-3)



def test_a_missing_classifier_is_said_not_skipped_silently(monkeypatch):
    """Without its weights the 3D classifier was skipped without a word: 103 lesions instead of 6
    on the chest sample, exit 0 (review of environment failures)."""
    from boltzformer import fp_classifier

    monkeypatch.setattr(fp_classifier, "bundled", lambda name=fp_classifier.WEIGHTS_NAME: None)
    vol = Volume(np.full((40, 64, 64), -800, np.int16), (0.7, 0.7, 1.0), (0, 0, 0), np.eye(3), modality="CT")
    assert "is missing from this installation" in fp_filter.classifier_skipped(vol)
