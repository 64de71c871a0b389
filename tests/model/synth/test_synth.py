"""Synthetic phantoms: determinism, tissue HU, lesion sizes, lesion-free slices, speed, samples."""

import time

import numpy as np
import pytest

from boltzformer.synth import ct, mri, prompts, sample


def test_ct_slices_are_deterministic_by_seed():
    a = ct.ct_slice(np.random.default_rng(3))
    b = ct.ct_slice(np.random.default_rng(3))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.masks.keys() == b.masks.keys()


def test_chest_tissues_have_plausible_hounsfield_units():
    s = ct.ct_slice(np.random.default_rng(0), region="chest")
    lung = s.masks["lung"] & ~s.masks.get("lung_nodule", np.zeros_like(s.masks["lung"]))
    assert np.median(s.image[lung]) < -600
    assert np.median(s.image[s.masks["vertebra"]]) > 200
    assert s.image.min() < -900  # air outside the body


def test_lesion_sizes_cover_small_medium_and_large_and_some_slices_are_lesion_free():
    rng = np.random.default_rng(1)
    areas, free = [], 0
    for _ in range(150):
        s = ct.ct_slice(rng, region="chest")
        m = s.masks.get("lung_nodule")
        if m is None or not m.any():
            free += 1
            continue
        from scipy import ndimage as ndi

        lab, n = ndi.label(m)
        areas += list(np.bincount(lab.ravel())[1:] / m.size)
    areas = np.array(areas)
    assert (areas < 0.001).mean() >= 0.3
    assert (areas >= 0.001).any() and (areas >= 0.005).any()
    assert free >= 10


def test_brain_slices_have_ms_lesions_and_tumours():
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(40):
        s = mri.brain_slice(rng)
        assert s.modality == "MR" and s.image.min() >= 0
        seen |= {k for k, m in s.masks.items() if m.any()}
    assert {"ms_lesion", "brain_tumor"} <= seen


def test_generation_is_fast_enough_to_feed_training():
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(20):
        ct.ct_slice(rng)
    assert 20 / (time.perf_counter() - t) >= 10  # ~40/s measured on one core; slack for CI


def test_volumes_have_continuous_3d_lesions():
    v = ct.ct_volume(0, shape_zyx=(16, 128, 128), spacing_mm=(2.5, 2.5, 2.5), n_nodules=(2, 3))
    assert v.image.dtype == np.int16 and v.image.shape == (16, 128, 128)
    per_slice = v.masks["lung_nodule"].reshape(16, -1).sum(1)
    assert (per_slice > 0).sum() > 1


def test_bundled_samples():
    c = sample.sample_chest_ct()
    assert c.image.shape == (64, 256, 256) and c.masks["lung_nodule"].sum() > 0
    vol = c.volume()
    assert vol.modality == "CT" and vol.spacing_mm == c.spacing_mm
    assert c.mask_volume().array.sum() == c.masks["lung_nodule"].sum()
    b = sample.sample_brain_mri()
    assert b.masks["ms_lesion"].sum() > 0 and b.prompt == "multiple sclerosis lesion"


def test_prompt_vocabulary():
    assert prompts.target_of_prompt("Pulmonary  Nodule") == "lung_nodule"
    assert prompts.target_of_prompt("banana") is None
    assert all(t.window in {"lung", "mediastinum", "soft_tissue", "liver", "bone", "brain"} for t in prompts.TARGETS.values())
    assert len(prompts.all_prompts()) == len(set(prompts.all_prompts()))


ORGANS = ("lung", "heart", "aorta", "vertebra", "liver", "spleen", "kidney", "inferior_vena_cava")


def test_organ_masks_do_not_overlap_where_one_organ_is_painted_over_another():
    """The aorta was painted over lung, heart and vertebra and the kidneys over liver and spleen,
    but the covered organs' masks kept those pixels: 'lung' held aorta in 61 of 100 chest slices."""
    for region in ("chest", "abdomen"):
        rng = np.random.default_rng(7)
        for _ in range(40):
            masks = ct.ct_slice(rng, region=region).masks
            present = [k for k in ORGANS if k in masks]
            for i, a in enumerate(present):
                for b in present[i + 1:]:
                    assert not (masks[a] & masks[b]).any(), (region, a, b)
    with pytest.raises(ValueError, match="region must be 'chest' or 'abdomen'"):
        ct.ct_slice(np.random.default_rng(0), region="head")  # it rendered an abdomen


def test_lobulated_outlines_stay_within_twice_their_radius():
    """Five large lobes could sum below -1, which made a tumour's outline run off the slice."""
    x, y = ct._grid(257, 1.0)
    wobble = tuple((0.3, f, 0.0) for f in (2, 3, 4, 5, 6))  # all troughs together at theta = pi
    inside = ct._ellipse(x, y, 0.0, 0.0, 20.0, 20.0, wobble)
    assert inside.any() and np.hypot(x[inside], y[inside]).max() <= 40.0 + 1e-3


def test_volume_generators_refuse_shapes_they_cannot_render():
    with pytest.raises(ValueError, match=r"shape_zyx \(8, 96, 64\) needs y == x"):
        ct.ct_volume(0, shape_zyx=(8, 96, 64), spacing_mm=(3, 3, 3))  # a numpy broadcast error before
    with pytest.raises(ValueError, match=r"spacing_mm \(0.7, 1.4, 2.5\) \(x, y, z\) needs x == y"):
        ct.ct_volume(0, shape_zyx=(4, 128, 128), spacing_mm=(0.7, 1.4, 2.5))  # rendered at 0.7, labelled 1.4
    with pytest.raises(ValueError, match="needs y == x"):
        mri.brain_volume(0, shape_zyx=(8, 96, 64))
    with pytest.raises(ValueError, match="contrast must be one of flair, t1, t1c, t2"):
        mri.brain_slice(np.random.default_rng(0), contrast="dwi")
