"""3D chest phantom: determinism, geometry, nodule labels, continuous vessel trees, HU, speed."""

import re
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from boltzformer.synth import lung3d

SHAPE, SPACING = (64, 256, 256), (1.4, 1.4, 2.5)


@pytest.fixture(scope="module")
def timed():
    lung3d.chest_phantom(100, shape_zyx=(8, 64, 64), spacing_mm=(5.0, 5.0, 5.0))  # imports, caches
    t = time.perf_counter()
    ph = lung3d.chest_phantom(7, SHAPE, SPACING, n_nodules=(4, 6))
    return ph, time.perf_counter() - t


@pytest.fixture(scope="module")
def phantoms(timed):
    """A few phantoms at the default geometry, all with nodules."""
    return [timed[0]] + [lung3d.chest_phantom(s, SHAPE, SPACING, n_nodules=(3, 5)) for s in (1, 2)]


def test_rendering_time_is_bounded(timed):
    assert timed[1] < 10.0, f"{timed[1]:.1f} s for {SHAPE}"


def test_same_seed_same_volume_and_different_seeds_differ():
    kw = dict(shape_zyx=(24, 96, 96), spacing_mm=(3.5, 3.5, 5.0), n_nodules=(1, 3))
    a, b, c = lung3d.chest_phantom(5, **kw), lung3d.chest_phantom(5, **kw), lung3d.chest_phantom(6, **kw)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.nodule_labels, b.nodule_labels)
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        np.testing.assert_array_equal(a.masks[k], b.masks[k])
    assert a.nodules == b.nodules
    assert not np.array_equal(a.image, c.image)


def test_shapes_dtypes_and_mask_keys(phantoms):
    ph = phantoms[0]
    assert ph.image.shape == SHAPE and ph.image.dtype == np.int16
    assert ph.nodule_labels.shape == SHAPE and ph.nodule_labels.dtype == np.uint16
    assert ph.spacing_mm == SPACING
    assert set(lung3d.MASK_KEYS) <= set(ph.masks)
    for k, m in ph.masks.items():
        assert m.shape == SHAPE and m.dtype == np.uint8 and m.max() <= 1, k
    for k in ("lung", "left_lung", "right_lung", "vessels", "airways", "vertebra"):
        assert ph.masks[k].any(), k
    lung = ph.masks["lung"].astype(bool)
    left, right = ph.masks["left_lung"].astype(bool), ph.masks["right_lung"].astype(bool)
    assert not (left & right).any() and np.array_equal(left | right, lung)
    # patient left is +x: the left lung's centre of mass lies at larger column index than the right's
    assert np.argwhere(left)[:, 2].mean() > np.argwhere(right)[:, 2].mean()


def test_other_spacings_and_sizes_render():
    for shape, sp in (((40, 128, 128), (2.8, 2.8, 5.0)), ((48, 160, 160), (2.0, 2.0, 0.7))):
        ph = lung3d.chest_phantom(3, shape, sp)
        assert ph.image.shape == shape and ph.masks["lung"].shape == shape
        assert ph.image.min() < -900 and ph.image.max() > 200


def test_nodules_lie_in_the_lungs_and_touch_what_their_kind_says(phantoms):
    n_seen = {k: 0 for k in lung3d.NODULE_KINDS}
    for ph in phantoms:
        assert len(ph.nodules) >= 1
        lung = ph.masks["lung"].astype(bool)
        near_lung = ndi.binary_dilation(lung, iterations=2)
        nod = ph.masks["lung_nodule"].astype(bool)
        assert np.array_equal(nod, ph.nodule_labels > 0)
        assert not (nod & ~near_lung).any()
        vessels = ph.masks["vessels"].astype(bool)
        for n in ph.nodules:
            m = ph.nodule_labels == n.label
            shell = ndi.binary_dilation(m, iterations=2) & ~m
            lung_frac = (lung & ~nod)[shell].mean()
            n_seen[n.kind] += 1
            if n.kind == "juxta_pleural":
                assert 0.05 < lung_frac < 0.95, (n, lung_frac)  # lung on one side, chest wall on the other
            else:
                assert lung_frac > 0.5, (n, lung_frac)
            if n.kind == "juxta_vascular":
                assert (vessels & ndi.binary_dilation(m, iterations=2)).any(), n
    assert sum(n_seen.values()) >= 8


def test_nodule_labels_match_the_nodule_list(phantoms):
    for ph in phantoms:
        labels = ph.nodule_labels
        present = set(np.unique(labels)) - {0}
        assert present == {n.label for n in ph.nodules}
        voxel = float(np.prod(ph.spacing_mm))
        nz, ny, nx = labels.shape
        for n in ph.nodules:
            assert n.kind in lung3d.NODULE_KINDS
            assert 3.0 <= n.diameter_mm <= 30.0
            vol = (labels == n.label).sum() * voxel
            sphere = np.pi / 6 * n.diameter_mm ** 3
            assert sphere / 3 <= vol <= sphere * 3, (n, vol, sphere)
            # the reported centre (world mm from the volume centre) lies in or next to the labelled voxels
            x, y, z = n.center_mm
            idx = np.array([z / ph.spacing_mm[2] + (nz - 1) / 2, y / ph.spacing_mm[1] + (ny - 1) / 2,
                            x / ph.spacing_mm[0] + (nx - 1) / 2])
            pts = np.argwhere(labels == n.label)
            gap = np.min(np.linalg.norm((pts - idx) * np.array(ph.spacing_mm)[::-1], axis=1))
            assert gap <= max(2.0, 0.5 * n.diameter_mm), (n, gap)


def test_nodule_sizes_favour_small_ones():
    rng = np.random.default_rng(0)
    d = lung3d.nodules._diameters(rng, 4000, 3.0, 30.0)
    assert d.min() >= 3.0 and d.max() <= 30.0
    assert 0.5 <= (d < 10).mean() <= 0.85 and (d > 20).mean() > 0.05


def test_vessels_form_continuous_3d_trees(phantoms):
    for ph in phantoms:
        v = ph.masks["vessels"].astype(bool)
        lab, n = ndi.label(v, np.ones((3, 3, 3), bool))
        sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
        # arteries and veins of two lungs: at most four trees hold nearly all vessel voxels ...
        assert sizes[:4].sum() >= 0.85 * v.sum()
        # ... and the largest runs through most of the slices
        big = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        assert big.any(axis=(1, 2)).sum() >= 0.7 * v.shape[0]
        # dots re-drawn per slice would give thousands of components of a few voxels
        assert sizes[0] >= 0.3 * v.sum()


def test_vessels_taper_from_the_hilum_to_the_periphery(phantoms):
    for ph in phantoms:
        v = ph.masks["vessels"].astype(bool)
        thick = ndi.distance_transform_edt(v, sampling=ph.spacing_mm[::-1])
        medial, lateral = [], []
        for key in ("left_lung", "right_lung"):
            lung = ph.masks[key].astype(bool)
            cols = np.argwhere(lung.any(axis=(0, 1)))[:, 0]
            lo, hi = cols.min(), cols.max()
            x = np.arange(lung.shape[2])
            frac = (x - lo) / max(hi - lo, 1)
            if key == "right_lung":  # the right lung's lateral side is at small x
                frac = 1 - frac
            medial.append(thick[v & lung & (frac < 0.33)[None, None, :]])
            lateral.append(thick[v & lung & (frac > 0.67)[None, None, :]])
        medial, lateral = np.concatenate(medial), np.concatenate(lateral)
        assert lateral.size > 300  # vessels reach the outer lung
        assert np.percentile(medial, 95) > 1.5 * np.percentile(lateral, 95)


def test_airways_have_air_lumen_and_tissue_wall(phantoms):
    ph = phantoms[0]
    aw = ph.masks["airways"].astype(bool)
    assert aw.sum() > 500
    hu = ph.image[aw]
    assert hu.min() < -700  # air inside
    assert np.percentile(hu, 90) > -500  # walls


def test_tissue_hounsfield_units(phantoms):
    for ph in phantoms:
        lung = ph.masks["lung"].astype(bool)
        paren = lung & ~ph.masks["vessels"].astype(bool) & ~ph.masks["airways"].astype(bool) & (ph.nodule_labels == 0)
        assert -900 <= np.median(ph.image[paren]) <= -750
        assert np.median(ph.image[ph.masks["vertebra"].astype(bool)]) > 150
        assert np.median(ph.image[ph.masks["vessels"].astype(bool)]) > -300
        assert np.median(ph.image[:, :6, :6]) < -900  # air in the corners
        heart = ph.masks["heart"].astype(bool)
        if heart.any():
            assert 0 < np.median(ph.image[heart]) < 600
        for n in ph.nodules:
            med = np.median(ph.image[ph.nodule_labels == n.label])
            assert med > -800, n  # denser than lung


def test_bad_arguments_are_one_clear_message():
    """They failed deep in numpy or scipy (ZeroDivisionError, 'low >= high'), or gave NaN sizes."""
    for kwargs, said in ((dict(n_nodules=(5, 2)), "n_nodules must be"), (dict(n_nodules=-1), "n_nodules must be"),
                         (dict(nodule_diameter_mm=(0, 10)), "nodule_diameter_mm must be a (min, max) range from 1 mm"),
                         (dict(nodule_diameter_mm=(20, 5)), "nodule_diameter_mm must be"),
                         (dict(shape_zyx=(0, 16, 16)), "shape_zyx must be 3 sizes"),
                         (dict(spacing_mm=(-1.0, 1.0, 1.0)), "spacing_mm must be 3 positive")):
        with pytest.raises(ValueError, match=re.escape(said)):
            lung3d.chest_phantom(0, **kwargs)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        lung3d.chest_phantom(-1)
