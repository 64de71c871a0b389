"""Phantom training examples: how positives are drawn (boltzformer.training.data.phantom_examples)."""

from types import SimpleNamespace

import numpy as np
import pytest

from boltzformer.synth.lung3d import phantom as phantom_mod
from boltzformer.training import data


def _two_nodule_phantom(seed, shape_zyx, spacing_mm, n_nodules):
    """A big nodule on slices 2-13 and a small one on slice 20 only, inside a lung."""
    z, y, x = shape_zyx
    image = np.full(shape_zyx, -850, np.int16)
    lung = np.zeros(shape_zyx, np.uint8)
    lung[:, 8:-8, 8:-8] = 1
    labels = np.zeros(shape_zyx, np.uint16)
    labels[2:14, 20:30, 20:30] = 1
    labels[20, 40:43, 40:43] = 2
    image[labels > 0] = 30
    masks = {"lung_nodule": (labels > 0).astype(np.uint8), "lung": lung,
             "heart": np.zeros(shape_zyx, np.uint8), "aorta": np.zeros(shape_zyx, np.uint8)}
    return phantom_mod.ChestPhantom(image, masks, labels, [SimpleNamespace(label=1), SimpleNamespace(label=2)], spacing_mm)


@pytest.fixture
def fake_phantoms(monkeypatch):
    monkeypatch.setattr("boltzformer.synth.lung3d.chest_phantom", _two_nodule_phantom)


def _share_on_small_nodule(sampling: str) -> float:
    ex = data.phantom_examples(0, 1, 300, size=64, offsets_mm=(), negative_fraction=0.0, unrelated_fraction=0.0,
                               positive_sampling=sampling)
    pos = [m for m, t in zip(ex.masks, ex.targets) if t == "lung_nodule" and m.any()]
    small = [m[40:43, 40:43].any() and not m[20:30, 20:30].any() for m in pos]
    return float(np.mean(small))


def test_per_nodule_sampling_draws_each_nodule_equally_often(fake_phantoms):
    # Per slice, the one-slice nodule is 1 of 13 positive slices; per nodule, 1 of 2 nodules.
    assert _share_on_small_nodule("slice") < 0.2
    assert 0.35 < _share_on_small_nodule("nodule") < 0.65


def test_unknown_positive_sampling_is_refused():
    with pytest.raises(ValueError, match="positive_sampling"):
        data.phantom_examples(0, 1, 1, positive_sampling="lesion")


def test_training_never_draws_the_synthetic_evaluation_slices():
    """Chunk i of seed s is seeded s * 100003 + i: seed 0 reached the test set's 777 (and the
    validation set's 555) from about 139 000 examples on, and drew those very slices."""
    from boltzformer.training.data import generate_synthetic

    with pytest.raises(ValueError, match="chunk seed 555, the seed of a synthetic evaluation set"):
        generate_synthetic(556 * 250, seed=0, size=32)
    assert len(generate_synthetic(3, seed=0, size=32)) == 3
