"""The 3D false-positive classifier: patches on a physical grid, and what the bundled one says."""

import numpy as np
import pytest
import torch

from boltzformer import fp_classifier as fpc
from boltzformer import postprocess
from boltzformer.io import Volume


def _sphere_volume(spacing_xyz, radius_mm=6.0, shape=(40, 96, 96)):
    sx, sy, sz = spacing_xyz
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    c = [(n - 1) / 2 for n in shape]
    r2 = ((z - c[0]) * sz) ** 2 + ((y - c[1]) * sy) ** 2 + ((x - c[2]) * sx) ** 2
    hu = np.where(r2 <= radius_mm**2, 40.0, -850.0).astype(np.float32)
    return hu, (r2 <= radius_mm**2), c


@pytest.mark.parametrize("geometry", [fpc.COARSE, fpc.FINE], ids=["coarse", "fine"])
@pytest.mark.parametrize("spacing", [(0.7, 0.7, 2.5), (1.5, 1.5, 1.0)])
def test_patch_is_on_a_physical_grid_whatever_the_spacing(spacing, geometry):
    hu, ball, centre = _sphere_volume(spacing)
    labels = ball.astype(np.int32)
    p = fpc.extract_patches(hu, labels, [centre], spacing, [1], geometry=geometry)
    assert p.shape == (1, 2, *geometry.shape_zyx)
    # A ball of radius R has a spread of R / sqrt(5) (2.7 mm) along every axis, in mm of the
    # patch's own grid whatever the scan's spacing.
    w = np.clip(p[0, 0] - p[0, 0].min(), 0, None)
    spread_mm = []
    for axis, step in enumerate(geometry.spacing_mm_zyx):
        pos = (np.arange(geometry.shape_zyx[axis]) - (geometry.shape_zyx[axis] - 1) / 2) * step
        prof = w.sum(tuple(a for a in range(3) if a != axis))
        mean = (prof * pos).sum() / prof.sum()
        assert abs(mean) < 0.5  # centred
        spread_mm.append(np.sqrt((prof * (pos - mean) ** 2).sum() / prof.sum()))
    assert all(abs(s - 6.0 / np.sqrt(5)) < 0.45 for s in spread_mm), spread_mm
    mask, bright = p[0, 1] > 0.5, p[0, 0] > 0.42
    assert (mask & bright).sum() / (mask | bright).sum() > 0.75  # the mask channel is the candidate itself


def test_mask_channel_holds_only_the_candidate_and_outside_reads_as_air():
    hu, ball, centre = _sphere_volume((1.0, 1.0, 1.0))
    labels = ball.astype(np.int32)
    labels[:, :, 50:] *= 2  # the right half of the ball is another component
    p = fpc.extract_patches(hu, labels, [centre, (0.0, 0.0, 0.0)], (1.0, 1.0, 1.0), [1, 1])
    left = p[0, 1] > 0.5
    assert left.any() and not left[:, :, 18:].any()  # only columns left of the cut (x 50: patch column 17.5)
    assert (p[0, 0] > 0.5).sum() > left.sum()  # the CT channel still shows the whole ball
    corner = p[1, 0]  # a patch centred on the volume's corner: the outside reads as air (0)
    assert corner[0, 0, 0] == 0.0


def test_network_shapes_and_size():
    net = fpc.CandidateNet()
    out = net(torch.zeros(3, 2, *fpc.PATCH_SHAPE))
    assert out.shape == (3,)
    assert sum(p.numel() for p in net.parameters()) < 300_000
    fine = fpc.CandidateNet(arch="fine")
    assert fine.geometry == fpc.FINE and fine(torch.zeros(3, 2, *fpc.FINE.shape_zyx)).shape == (3,)
    assert sum(p.numel() for p in fine.parameters()) < 300_000
    with pytest.raises(ValueError, match="unknown CandidateNet arch"):
        fpc.CandidateNet(arch="huge")


def test_a_saved_fine_classifier_loads_with_its_geometry_and_scores_on_it(tmp_path):
    """The arch is stored with the weights: a loaded classifier cuts its own patches."""
    torch.manual_seed(0)
    net = fpc.CandidateNet(arch="fine").eval()
    fpc.save(net, 0.6, {"arch": "fine", "width": 16}, tmp_path)
    clf = fpc.load(tmp_path / fpc.WEIGHTS_NAME)
    assert clf.geometry == fpc.FINE and clf.threshold == 0.6
    hu, ball, centre = _sphere_volume((1.0, 1.0, 1.0))
    labels = ball.astype(np.int32)
    rows = postprocess.lesion_table(labels, Volume(hu, (1.0, 1.0, 1.0), modality="CT"))
    got = clf.score(hu, labels, rows, (1.0, 1.0, 1.0))
    patches = fpc.extract_patches(hu, labels, fpc.candidate_centres(labels, [1], (1.0, 1.0, 1.0)), (1.0, 1.0, 1.0), [1],
                                  geometry=fpc.FINE)
    np.testing.assert_allclose(got, torch.sigmoid(net(torch.from_numpy(patches))).detach().numpy(), rtol=1e-4, atol=1e-5)


def _tube_and_ball(spacing=(0.8, 0.8, 1.25), marked_half_mm=3.0):
    """A lung with an 8 mm nodule and a 4 mm vessel running through every slice."""
    sx, sy, sz = spacing
    shape = (64, 128, 128)
    z, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    hu = np.full(shape, -860.0, np.float32)
    ball = ((z - 32) * sz) ** 2 + ((y - 40) * sy) ** 2 + ((x - 40) * sx) ** 2 <= 4.0**2
    tube = ((y - 90) * sy) ** 2 + ((x - 90) * sx) ** 2 <= 2.0**2
    hu[ball | tube] = 30.0
    hu += np.random.default_rng(0).normal(0, 20, shape).astype(np.float32)
    # What a slice-wise model marks: the ball, and the vessel over a few slices.
    cand = ball | (tube & (abs(z - 32) * sz <= marked_half_mm))
    return Volume(hu, spacing, modality="CT"), cand, ball


def _ball_and_tube_scores(marked_half_mm):
    vol, cand, ball = _tube_and_ball(marked_half_mm=marked_half_mm)
    labels, n = postprocess.label_components(cand, vol.spacing_mm)
    rows = postprocess.lesion_table(labels, vol)
    scores = fpc.bundled().score(vol.array, labels, rows, vol.spacing_mm)
    is_ball = [bool(ball[labels == r["lesion_id"]].any()) for r in rows]
    assert n == 2 and sorted(is_ball) == [False, True]
    return scores[is_ball.index(True)], scores[is_ball.index(False)]


@pytest.mark.skipif(fpc.bundled() is None, reason="no bundled 3D classifier in boltzformer.resources")
def test_bundled_classifier_ranks_a_nodule_above_a_vessel():
    threshold = fpc.bundled().threshold
    # A vessel marked over 12 mm of its length: the shipped threshold (the validation operating
    # point, see the model card) keeps the nodule and drops the vessel.
    ball_score, tube_score = _ball_and_tube_scores(marked_half_mm=6.0)
    assert ball_score > 0.9 and ball_score >= threshold > tube_score, (ball_score, tube_score)
    # A stub of 6 mm still ranks below the nodule, but it passes the threshold: the model card
    # says so (short vessel stubs are the false positives the classifier leaves).
    ball_score, tube_score = _ball_and_tube_scores(marked_half_mm=3.0)
    assert ball_score > tube_score and ball_score >= threshold, (ball_score, tube_score)


def test_centre_is_the_thickest_point_of_a_nodule_merged_with_vessels():
    # A 10 mm ball at x = 20 joined to a 3 mm vessel running 70 mm to the right: one component
    # whose centroid lies on the vessel; the patch must be centred on the ball.
    spacing = (0.8, 0.8, 2.0)
    z, y, x = np.mgrid[0:20, 0:64, 0:128].astype(np.float32)
    ball = ((z - 10) * 2.0) ** 2 + ((y - 32) * 0.8) ** 2 + ((x - 20) * 0.8) ** 2 <= 5.0**2
    vessel = (((z - 10) * 2.0) ** 2 + ((y - 32) * 0.8) ** 2 <= 1.5**2) & (x >= 20)
    labels = (ball | vessel).astype(np.int32)
    (c,) = fpc.candidate_centres(labels, [1], spacing)
    centroid = np.argwhere(labels).mean(0)
    assert abs(c[2] - 20) <= 1 and abs(c[1] - 32) <= 1 and abs(c[0] - 10) <= 1, c
    assert centroid[2] > 35  # what the centroid would have been
