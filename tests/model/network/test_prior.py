"""The "look here" sampling prior (sampling.PointPrior): a Gaussian bump on U in the early decoder
blocks. Strictly additive: no prior, or a bump of amplitude 0, gives bit-identical outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzformer.network import sampling
from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config


def test_the_bump_is_a_gaussian_of_the_given_width_on_each_token_map():
    prior = sampling.PointPrior(torch.tensor([[0.5, 0.25], [float("nan"), float("nan")]]), amplitude=3.0,
                                sigma_tokens=2.0, layers=2)
    for h in (16, 32):
        e = prior.energies(0, h, h, "cpu").reshape(2, h, h)
        peak = np.unravel_index(int(e[0].argmax()), (h, h))
        # the point lies between the two centre cells of the map's middle row pair, at a quarter width
        assert abs(peak[0] + 0.5 - h / 2) <= 0.5 and abs(peak[1] + 0.5 - h / 4) <= 0.5
        assert float(e[0].max()) == pytest.approx(3.0 * math.exp(-0.5 * (0.5**2 + 0.5**2) / 4), rel=1e-5)
        # 4 cells further along x: the Gaussian of the cell centres' distances to the point (in tokens)
        row = e[0, peak[0]]
        d0, d4 = peak[1] + 0.5 - h / 4, peak[1] + 4.5 - h / 4
        assert float(row[peak[1] + 4]) / float(row[peak[1]]) == pytest.approx(math.exp(-0.5 * (d4**2 - d0**2) / 4),
                                                                            rel=1e-4)
        assert not e[1].any()  # NaN: no prior for that image
    assert prior.energies(2, 16, 16, "cpu") is None  # only the first `layers` blocks


def _inputs(cfg, batch=2):
    s = cfg.image_size
    x = torch.rand(batch, cfg.in_channels, s, s, generator=torch.Generator().manual_seed(1))
    tokens = torch.randn(batch, 3, 384, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(batch, 3, dtype=torch.bool)
    pooled = torch.randn(batch, 384, generator=torch.Generator().manual_seed(3))
    return x, tokens, valid, pooled


def _run(model, inputs, prior=None, seed=5):
    with torch.inference_mode():
        return model(*inputs, generator=torch.Generator().manual_seed(seed), return_attention=True, prior=prior)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("boltzformer-test")
    return build_model(cfg, seed=0).eval()


def test_no_prior_and_a_zero_prior_give_bit_identical_outputs(tiny):
    inputs = _inputs(tiny.cfg)
    plain = _run(tiny, inputs)
    again = _run(tiny, inputs, prior=None)
    zero = _run(tiny, inputs, prior=sampling.PointPrior(torch.tensor([[0.3, 0.6]] * 2), amplitude=0.0,
                                                        layers=tiny.cfg.num_layers))
    for other in (again, zero):
        assert torch.equal(plain["logits"], other["logits"])
        for a, b in zip(plain["attention"], other["attention"]):
            assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["query_bits"], b["query_bits"])


def test_the_prior_pulls_the_early_samples_toward_the_point():
    cfg = get_config("boltzformer-test", image_size=128)  # block 0 samples 16 of 8 x 8 tokens
    tiny = build_model(cfg, seed=0).eval()
    inputs = _inputs(cfg)
    point = torch.tensor([[0.2, 0.8], [0.7, 0.3]])
    plain = _run(tiny, inputs)
    pulled = _run(tiny, inputs, prior=sampling.PointPrior(point, amplitude=6.0, sigma_tokens=1.5, layers=1))
    first_plain, first_pulled = plain["attention"][0]["counts"], pulled["attention"][0]["counts"]
    h, w = first_plain.shape[-2:]
    near = sampling.PointPrior(point, amplitude=1.0, sigma_tokens=1.5).energies(0, h, w, "cpu").reshape(2, h, w) > math.exp(-2)
    for b in range(2):  # the share of samples within two sigmas of the point rises
        share_plain = float(first_plain[b][near[b]].sum() / first_plain[b].sum())
        share_pulled = float(first_pulled[b][near[b]].sum() / first_pulled[b].sum())
        assert share_pulled > share_plain + 0.2 and share_pulled > 0.6
    # the recorded probabilities are those the draw used (biased)
    assert not torch.equal(plain["attention"][0]["probabilities"], pulled["attention"][0]["probabilities"])
    assert not torch.equal(plain["logits"], pulled["logits"])


def test_mask2former_and_uniform_sampling_ignore_the_prior():
    for mode in ("uniform", "mask2former"):
        cfg = get_config("boltzformer-test").replace(sampling=mode)
        model = build_model(cfg, seed=0).eval()
        inputs = _inputs(cfg)
        prior = sampling.PointPrior(torch.tensor([[0.5, 0.5]] * 2), amplitude=8.0, layers=cfg.num_layers)
        assert torch.equal(_run(model, inputs)["logits"], _run(model, inputs, prior=prior)["logits"])


def test_the_mirrored_prior_is_the_bump_mirrored_left_right():
    prior = sampling.PointPrior(torch.tensor([[0.4, 0.25], [float("nan"), float("nan")]]), amplitude=2.0,
                                sigma_tokens=1.5, layers=3)
    m = prior.mirrored()
    assert (m.amplitude, m.sigma_tokens, m.layers) == (2.0, 1.5, 3)
    assert prior.centers_yx[0, 1] == 0.25  # the original is untouched
    for h, w in ((16, 16), (8, 12)):
        e = prior.energies(0, h, w, "cpu").reshape(2, h, w)
        f = m.energies(0, h, w, "cpu").reshape(2, h, w)
        torch.testing.assert_close(f, e.flip(-1))
        assert not f[1].any()  # NaN stays: still no prior for that image
