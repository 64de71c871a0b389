"""The per-query attention record and the top-mass summaries of AttentionMaps."""

import numpy as np
import pytest
import torch

from boltzformer.checkpoint import save_model
from boltzformer.io import Volume
from boltzformer.network import sampling
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.results import AttentionMaps
from boltzformer.segmenter import Segmenter


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test"), seed=0), path, prompt_bank={})
    return Segmenter.from_pretrained(path, device="cpu")


def _volume(direction=None):
    rng = np.random.default_rng(0)
    arr = rng.normal(-700, 100, size=(5, 40, 48)).astype(np.int16)
    return Volume(arr, (0.7, 0.8, 2.5), (10.0, -5.0, 3.0), np.eye(3) if direction is None else direction, "CT")


def _popcount(bits: np.ndarray) -> np.ndarray:
    bits = bits.astype(np.uint64)
    out = np.zeros(bits.shape, np.int64)
    for q in range(64):
        out += ((bits >> np.uint64(q)) & np.uint64(1)).astype(np.int64)
    return out


def test_query_bits_of_sampled_indices_and_masks():
    indices = torch.tensor([[[0, 2], [2, 3], [1, 2]]])  # B=1, Q=3, K=2
    bits = sampling.query_bits(indices, None, 1, 3, 5, "cpu")
    assert bits.tolist() == [[0b001, 0b100, 0b111, 0b010, 0]]
    mask = torch.tensor([[[True, False], [True, True]]])  # B=1, Q=2, N=2
    assert sampling.query_bits(None, mask, 1, 2, 2, "cpu").tolist() == [[0b11, 0b10]]
    assert sampling.query_bits(None, None, 2, 3, 2, "cpu").tolist() == [[7, 7], [7, 7]]  # dense: all
    assert sampling.query_bits(indices, None, 1, sampling.MAX_QUERY_BITS + 1, 5, "cpu") is None


@pytest.mark.parametrize("swapped", [False, True])
def test_per_query_maps_add_up_to_the_counts_on_the_input_grid(segmenter, swapped):
    """Each query's map holds its K tokens; together they are the counts, also after the maps
    are brought back to a reoriented input's grid."""
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float) if swapped else None
    att = segmenter.segment_volume(_volume(direction), "lung nodule", return_attention=True, slices=(1, 4)).attention
    cfg = segmenter.config
    assert att.query_bits is not None and att.query_bits.shape == att.counts.shape
    assert att.query_bits.dtype == np.uint8  # 4 queries fit in a byte
    np.testing.assert_array_equal(_popcount(att.query_bits), att.counts.astype(np.int64))
    for q in range(cfg.num_queries):
        one = att.query_samples(q)
        assert set(np.unique(one)) <= {0.0, 1.0}
        for layer, k in enumerate(att.tokens_per_query):
            cell = (att.strides[layer] // cfg.finest_stride) ** 2
            assert one[layer, 0].astype(np.float64).sum() == k * cell
    total = sum(att.query_samples(q).astype(np.float64) for q in range(cfg.num_queries))
    np.testing.assert_array_equal(total, att.counts.astype(np.float64))
    with pytest.raises(ValueError, match="out of range"):
        att.query_samples(cfg.num_queries)


def test_recording_attention_leaves_the_output_unchanged(segmenter):
    volume = _volume()
    plain = segmenter.segment_volume(volume, "lung nodule", seed=7).probabilities
    recorded = segmenter.segment_volume(volume, "lung nodule", seed=7, return_attention=True).probabilities
    np.testing.assert_array_equal(plain, recorded)


def _maps(prob_layers):
    p = np.asarray(prob_layers, np.float16)  # L x Z x G x G
    return AttentionMaps(counts=np.zeros_like(p), probabilities=p, strides=[4] * p.shape[0],
                         temperatures=[1.0] * p.shape[0], tokens_per_query=[1] * p.shape[0], slice_start=0,
                         grid_scale_yx=(1.0, 1.0))


def test_top_mass_is_the_fewest_cells_holding_the_fraction():
    flat = np.ones((4, 4))
    sharp = np.full((4, 4), 0.1)
    sharp[1, 2] = 6.0  # 6 of 7.5: 80 % of the mass in one cell
    two = np.zeros((4, 4))
    two[0, 0], two[3, 3], two[2, 2] = 3.0, 2.0, 1.0  # 50 %: the first cell alone
    att = _maps([[flat, sharp], [two, np.zeros((4, 4))]])
    top = att.top_mass(0.5)
    assert not top[0, 0].any()  # a flat distribution: no cell stands out (the panel says "flat")
    assert top[0, 1].sum() == 1 and top[0, 1, 1, 2]
    assert top[1, 0].sum() == 1 and top[1, 0, 0, 0]
    assert not top[1, 1].any()  # an unprocessed slice (all zero) selects nothing
    assert att.top_mass(0.9)[1, 0].sum() == 3  # 3 + 2 < 0.9 * 6: all three
    area, mass = att.top_mass_stats(0.5)
    assert area[0].tolist() == pytest.approx([0.0, 1 / 16])
    assert area[1, 0] == pytest.approx(1 / 16) and np.isnan(area[1, 1])  # an unprocessed slice: no number
    assert mass[0, 1] == pytest.approx(6 / 7.5, rel=1e-3) and mass[1, 0] == pytest.approx(0.5)  # float16 maps


def test_top_mass_leaves_out_a_flat_floor():
    """One hot cell over a flat background holding most of the mass: half of the background
    would be an arbitrary pick, so the set is the hot cell, and says it holds less than half."""
    floor = np.ones((4, 4))
    floor[2, 1] = 3.0  # 3 of 18
    att = _maps([[floor]])
    top = att.top_mass(0.5)
    assert top.sum() == 1 and top[0, 0, 2, 1]
    area, mass = att.top_mass_stats(0.5)
    assert area[0, 0] == pytest.approx(1 / 16) and mass[0, 0] == pytest.approx(3 / 18)


def test_spread_and_the_sharpest_layer():
    flat = np.ones((4, 4))
    half = np.zeros((4, 4))
    half[:2] = 1.0  # uniform on 8 of 16 cells
    one = np.zeros((4, 4))
    one[3, 3] = 5.0
    att = _maps([[flat, flat, np.zeros((4, 4))], [half, half, np.zeros((4, 4))], [one, flat, np.zeros((4, 4))]])
    spread = att.spread()
    assert spread[0, :2].tolist() == pytest.approx([1.0, 1.0]) and np.isnan(spread[:, 2]).all()  # not processed
    assert spread[1, :2].tolist() == pytest.approx([0.5, 0.5])
    assert spread[2, :2].tolist() == pytest.approx([1 / 16, 1.0])
    # geometric means 1, 0.5, 0.25: the layer sharp on one slice wins (an arithmetic mean: 0.53 > 0.5)
    assert att.sharpest_layer() == 2
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        att.top_mass(0.0)


def test_view_picks_values_query_and_top_mass():
    sharp = np.full((4, 4), 0.1)
    sharp[1, 2] = 6.0
    att = _maps([[sharp]])
    att.counts = np.full(att.probabilities.shape, 3, np.float16)
    att.query_bits = np.full(att.probabilities.shape, 0b101, np.uint8)
    att.num_queries = 3
    assert (att.view() == 3).all() and att.view().dtype == np.float16
    assert (att.view("counts", query=1) == 0).all() and (att.view("counts", query=2) == 1).all()
    top = att.view("counts", top_fraction=0.5)
    assert top[0, 0, 1, 2] == 3 and top.sum() == 3  # only the cell holding the mass
    assert att.view("probabilities")[0, 0, 1, 2] == np.float16(6.0)
    with pytest.raises(ValueError, match="values must be 'counts' or 'probabilities', not 'entropy'"):
        att.view("entropy")


def test_spread_is_computed_once_until_slices_are_stored():
    """spread() took 0.3-0.8 s on a 224-slice CT and the panel asked for it 3-4 times a run."""
    from boltzformer.results import AttentionMaps

    rng = np.random.default_rng(0)
    layer = lambda: (torch.from_numpy(rng.random((2, 8, 8)).astype(np.float32)),  # noqa: E731
                     torch.from_numpy(rng.random((2, 8, 8)).astype(np.float32)), 4, 1.0, None, 6)
    maps = AttentionMaps.empty([layer()], 4, 0, (32, 32), num_queries=10)
    maps.store([layer()], 0)
    first = maps.spread()
    assert maps.spread() is first and not first.flags.writeable
    assert np.isnan(first[0, 2:]).all()  # slices 2-3 not processed yet
    maps.store([layer()], 2)
    assert not np.isnan(maps.spread()[0]).any()
