"""The 3D nodule detector: lungs from HU, blobs not tubes, outlines, lesions added once."""

import numpy as np
import pytest
from scipy import ndimage

from boltzformer import fp_classifier, nodule_detector as nd
from boltzformer.io import Volume


def _chest(crop: bool = False):
    """48 x 96 x 96 at 1.5 mm: a body (40 HU) in air, two lungs (-850), in the right lung a 9 mm
    nodule and a 4 mm vessel along z, on the left lung's wall a 12 mm juxta-pleural nodule.
    crop: cut at the lungs' outer edges (no air around the body; the lungs touch the border)."""
    z, y, x = np.mgrid[0:48, 0:96, 0:96].astype(np.float32)
    hu = np.full(z.shape, -1000.0, np.float32)
    hu[((y - 48) / 44) ** 2 + ((x - 48) / 46) ** 2 <= 1] = 40.0
    right = ((y - 48) / 30) ** 2 + ((x - 26) / 16) ** 2 <= 1
    left = ((y - 48) / 30) ** 2 + ((x - 70) / 16) ** 2 <= 1
    hu[right | left] = -850.0
    nodule = (z - 24) ** 2 + (y - 40) ** 2 + (x - 26) ** 2 <= 3.0**2  # radius 4.5 mm
    vessel = (y - 62) ** 2 + (x - 24) ** 2 <= 1.4**2
    pleural = (z - 24) ** 2 + (y - 48) ** 2 + (x - 81.5) ** 2 <= 4.5**2  # touching the lateral wall
    hu[nodule | vessel | pleural] = 30.0
    if crop:
        hu, nodule, pleural = (a[:, 18:78, 10:86] for a in (hu, nodule, pleural))
    return Volume(hu.astype(np.int16), (1.5, 1.5, 1.5), modality="CT"), nodule, vessel, pleural


@pytest.mark.parametrize("crop", [False, True])
def test_lung_mask_keeps_juxta_pleural_nodules_and_drops_the_air_around_the_body(crop):
    vol, nodule, _, pleural = _chest(crop)
    lung = nd.lung_mask(vol.array.astype(np.float32), vol.spacing_mm)
    assert lung[nodule].all()
    # Its half on the lung's side, bar the last ~1.5 mm (a closing by a 15 mm ball fills a 12 mm
    # bite to within about 1 mm of the wall).
    wall_x = int(np.argwhere(pleural).mean(0).round()[2])
    inner = pleural.copy()
    inner[..., wall_x - 1 :] = False
    assert lung[inner].mean() > 0.95
    if not crop:
        assert not lung[:, 2, 2].any() and not lung[:, 48, 1].any()  # air around the body
    mid_y, mid_x = (30, 38) if crop else (48, 48)
    assert not lung[:, mid_y, mid_x].any()  # the mediastinum between the lungs


def test_blobness_at_matches_whole_volume_filtering():
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.normal(size=(40, 50, 60)).astype(np.float32), 2) * 300
    spacing_zyx = (2.0, 1.2, 1.2)
    pts, scale = np.array([[20, 25, 30], [18, 22, 35]]), np.array([1, 3])
    got = nd.blobness_at(img, spacing_zyx, pts, scale)
    for (z, y, x), k, value in zip(pts, scale, got):
        sig = [nd.RADII_MM[k] / np.sqrt(3) / s for s in spacing_zyx]
        h = np.zeros((3, 3))
        for a in range(3):
            for b in range(a, 3):
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                d = ndimage.gaussian_filter(img.astype(np.float64), sig, order=order, mode="nearest")[z, y, x]
                h[a, b] = h[b, a] = d / (spacing_zyx[a] * spacing_zyx[b])
        ev = sorted(np.linalg.eigvalsh(h), key=abs, reverse=True)
        assert value == pytest.approx(abs(ev[2]) / abs(ev[0]), rel=1e-3)


def _keep_all() -> fp_classifier.Classifier:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return fp_classifier.Classifier(fp_classifier.CandidateNet(), threshold=0.0, info={})


def test_candidates_are_the_nodules_not_the_vessel():
    vol, nodule, vessel, pleural = _chest()
    cand = nd.find_candidates(vol, _keep_all())
    near = lambda m: ndimage.binary_dilation(m, iterations=1)[tuple(cand.points_zyx.T)]  # noqa: E731
    assert near(nodule).any() and near(pleural).any()
    assert not near(vessel & ~ndimage.binary_dilation(nodule, iterations=3)).any()
    assert (cand.blobness > nd.MIN_BLOBNESS).all() and len(cand.kept) == len(cand.points_zyx)
    assert cand.radius_mm[near(nodule)].max() >= 2.5  # a 9 mm nodule is not taken for a 3 mm one


def test_outline_recovers_a_nodule_without_running_along_its_vessel():
    hu = np.full((40, 40, 40), -850.0, np.float32)
    z, y, x = np.mgrid[0:40, 0:40, 0:40]
    ball = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 5**2  # 10 mm at 1 mm
    tube = ((y - 20) ** 2 + (z - 20) ** 2 <= 1.5**2) & (x > 20)
    hu[ball | tube] = 20.0
    box, region = nd.outline(hu, (20, 20, 20), 4.0, (1.0, 1.0, 1.0))
    got = np.zeros(hu.shape, bool)
    got[box] = region
    dice = 2 * (got & ball).sum() / (got.sum() + ball.sum())
    assert dice > 0.85
    assert not got[:, :, 28:].any()  # 1.5 x the radius, then the vessel is left alone
    taken = np.zeros(hu.shape, bool)
    taken[:, :, :20] = True
    box, region = nd.outline(hu, (20, 20, 20), 4.0, (1.0, 1.0, 1.0), taken)
    assert not (taken[box] & region).any()


def test_merge_keeps_confirmed_lesions_drops_the_rest_and_outlines_new_ones():
    vol, nodule, vessel, pleural = _chest()
    cand = nd.find_candidates(vol, _keep_all())
    # the slice model found the right-lung nodule (id 2) and a piece of vessel (id 1)
    labels = np.zeros(vol.shape, np.int32)
    labels[vessel & (np.arange(48)[:, None, None] < 6)] = 1
    labels[nodule] = 2
    rows = [{"lesion_id": 1, "nodule_score": 0.9}, {"lesion_id": 2, "nodule_score": 0.9}]
    out, kept, dropped = nd.merge(labels, rows, vol, np.zeros(vol.shape, np.float32), cand)
    assert [r["lesion_id"] for r in dropped] == [1] and "not confirmed" in dropped[0]["fp_verdict"]
    assert kept[0]["outline"] == "slice model" and (out[nodule] == 1).all()  # renumbered, outline kept
    assert [r["lesion_id"] for r in kept] == list(range(1, len(kept) + 1))
    assert set(np.unique(out).tolist()) == set(range(len(kept) + 1))
    assert not out[labels == 1].any()
    grown = [r for r in kept if r["outline"] == "3D region"]
    assert grown and np.isin(out[pleural], [r["lesion_id"] for r in grown]).mean() > 0.5
    assert all(0.0 <= r["nodule_score"] <= 1.0 and r["blobness"] > nd.MIN_BLOBNESS for r in kept)


def test_applies_to_nodule_prompts_on_hu_ct_only():
    assert nd.applies("lung nodule", "CT", "lung")
    assert not nd.applies("lung tumor", "CT", "lung")
    assert not nd.applies("lung nodule", "MR", "lung")
    assert not nd.applies("lung nodule", "CT", None)
    assert not nd.applies("liver", "CT", "abdomen")


def test_the_gate_is_the_one_stored_with_the_classifier_and_patches_are_on_its_geometry():
    """A classifier trained on candidates of a looser Hessian gate says so (``min_blobness``):
    the detector then gates at that value and cuts patches on the classifier's own grid."""
    vol, *_ = _chest()
    strict = nd.find_candidates(vol, _keep_all())
    torch = pytest.importorskip("torch")
    seen = []

    class Fine(fp_classifier.Classifier):
        def probabilities(self, patches, batch=256):
            seen.append(patches.shape[1:])
            return super().probabilities(patches, batch)

    torch.manual_seed(0)
    loose = Fine(fp_classifier.CandidateNet(arch="fine"), threshold=0.0, info={"min_blobness": 0.05})
    assert nd.min_blobness(loose) == 0.05 and nd.min_blobness(_keep_all()) == nd.MIN_BLOBNESS
    cand = nd.find_candidates(vol, loose)
    assert len(cand.points_zyx) > len(strict.points_zyx) and (cand.blobness > 0.05).all()
    assert (cand.blobness <= nd.MIN_BLOBNESS).any()
    assert seen == [(2, *fp_classifier.FINE.shape_zyx)]


def test_ball_patches_equal_patches_cut_from_a_painted_label_scan():
    """Balls painted per patch box give the patches of balls painted into one scan-sized label
    array in point order (a later ball over an earlier one), overlaps and scan edges included."""
    rng = np.random.default_rng(3)
    hu = rng.normal(-600, 300, (30, 48, 52)).astype(np.float32)
    spacing = (0.8, 0.7, 1.5)  # x, y, z mm
    points = np.array([[15, 24, 26], [15, 26, 27], [0, 0, 0], [29, 47, 51], [14, 20, 30], [5, 40, 3]])
    radius = np.array([4.0, 3.0, 5.0, 2.5, 6.0, 3.5])
    labels = np.zeros(hu.shape, np.uint16)
    sx, sy, sz = spacing
    for lid, (z, y, x), r in zip(range(1, len(points) + 1), points, radius):
        half = [int(np.ceil(r / v)) for v in (sz, sy, sx)]
        box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip((z, y, x), half, hu.shape))
        gz, gy, gx = np.ogrid[box]
        labels[box][((gz - z) * sz) ** 2 + ((gy - y) * sy) ** 2 + ((gx - x) * sx) ** 2 <= r * r] = lid
    expected = fp_classifier.extract_patches(hu, labels, points, spacing, list(range(1, len(points) + 1)))
    got = nd.ball_patches(hu, points, radius, spacing)
    np.testing.assert_array_equal(got, expected)
    fine = nd.ball_patches(hu, points, radius, spacing, fp_classifier.FINE)
    np.testing.assert_array_equal(fine, fp_classifier.extract_patches(
        hu, labels, points, spacing, list(range(1, len(points) + 1)), geometry=fp_classifier.FINE))
    assert got[1, 1].sum() > 0 and got[0, 1].sum() < expected[0, 1].size  # the overlap is there to test
