"""2.5D context: neighbours at physical offsets, warm start that keeps a 2D model's output."""

import numpy as np
import pytest
import torch

from boltzformer.checkpoint import load_matching, save_model
from boltzformer.context import context_margin, context_stack
from boltzformer.io import Volume
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.network.text import PromptEmbedding, batch_embeddings
from boltzformer.segmenter import Segmenter


def test_neighbours_are_interpolated_at_physical_offsets_and_edge_replicated():
    stack = np.stack([np.full((2, 2), float(k), np.float32) for k in range(5)])  # slice k has value k
    out = context_stack(stack, [0, 2, 4], z_spacing_mm=2.0, offsets_mm=(-5.0, -2.5, 2.5, 5.0))
    assert out.shape == (3, 5, 2, 2)
    # slice 2 at 2 mm spacing: -5 mm is index -0.5 (clipped to slice 0), -2.5 mm index 0.75,
    # +2.5 mm index 3.25, +5 mm index 4.5 (clipped to the last slice, 4)
    np.testing.assert_allclose(out[1, :, 0, 0], [2.0, 0.0, 0.75, 3.25, 4.0])
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 0.0, 0.0, 1.25, 2.5])  # below slice 0: slice 0 again
    np.testing.assert_allclose(out[2, :, 0, 0], [4.0, 1.5, 2.75, 4.0, 4.0])
    assert context_margin(2.0, (-5.0, 5.0)) == 4 and context_margin(2.0, ()) == 0


def test_single_slice_gives_the_slice_as_every_neighbour():
    one = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    out = context_stack(one, [0], 1.0, (-5.0, 5.0))
    np.testing.assert_array_equal(out[0, 1], one[0])
    np.testing.assert_array_equal(out[0, 2], one[0])


def test_widened_warm_start_computes_what_the_2d_model_did():
    base = build_model(get_config("boltzformer-test"), seed=0).eval()
    wide = build_model(get_config("boltzformer-test", context_offsets_mm=(-2.5, 2.5)), seed=1).eval()
    report = load_matching(wide, base.state_dict())
    assert "encoder.stem.0.weight" in report["widened"] and not report["reinitialised"]
    x = torch.rand(2, 1, 64, 64)
    emb = PromptEmbedding(np.random.default_rng(0).random((3, 384)).astype(np.float32), np.ones(384, np.float32) / 384 ** 0.5)
    t, v, p = batch_embeddings([emb] * 2, 4)
    with torch.no_grad():
        a = base(x, t, v, p, generator=torch.Generator().manual_seed(0))["logits"]
        b = wide(torch.cat([x, torch.rand(2, 2, 64, 64)], 1), t, v, p, generator=torch.Generator().manual_seed(0))["logits"]
    torch.testing.assert_close(a, b)


def test_config_keeps_channels_and_offsets_consistent():
    cfg = get_config("boltzformer-test", context_offsets_mm=(-5, -2.5, 2.5, 5))
    assert cfg.in_channels == 5
    with pytest.raises(ValueError, match=r"in_channels \(3\) must be 1 \+ the number of context offsets"):
        cfg.replace(in_channels=3)


@pytest.fixture(scope="module")
def context_segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test", context_offsets_mm=(-2.5, 2.5)), seed=0), path, prompt_bank={})
    # dense attention: no sampling noise, so results can be compared across batchings
    return Segmenter.from_pretrained(path, device="cpu", sampling="dense")


def test_context_model_segments_volumes_ranges_and_single_slices(context_segmenter):
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(-700, 100, (6, 32, 32)).astype(np.int16), (0.8, 0.8, 1.25), modality="CT")
    full = context_segmenter.segment_volume(vol, "lung nodule").probabilities
    part = context_segmenter.segment_volume(vol, "lung nodule", slices=(2, 4)).probabilities
    # a slice's result does not depend on which range was asked for: its neighbours come along
    np.testing.assert_allclose(part[2:4], full[2:4], atol=1e-5)
    one = Volume(vol.array[2:3], (0.8, 0.8, 1.25), modality="CT")
    assert context_segmenter.segment_volume(one, "lung nodule").probabilities.shape == (1, 32, 32)
