"""Boltzmann sampler: temperature schedule, exactness of Gumbel-top-k, distinct tokens, seeding."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from boltzformer.network import sampling


def test_temperature_schedule_anneals_as_tau0_over_1_plus_l():
    assert [sampling.temperature(l, 1.0) for l in range(4)] == [1.0, 0.5, 1 / 3, 0.25]
    assert sampling.temperature(2, 2.0) == pytest.approx(2 / 3)


def test_token_budget_is_ten_percent_with_a_minimum():
    assert sampling.num_sampled_tokens(4096, 0.10, 16) == 410
    assert sampling.num_sampled_tokens(64, 0.10, 16) == 16
    assert sampling.num_sampled_tokens(10, 0.10, 16) == 10  # never more than exist


def test_single_draw_matches_softmax_of_u_over_tau():
    """With K = 1, Gumbel-top-k is exactly one draw from softmax(U / tau): chi-square test."""
    gen = torch.Generator().manual_seed(1234)
    u = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95, 0.6, 0.1, 0.4])
    tau = 1 / 3
    n = 40_000
    conf = u.expand(n, 1, -1).contiguous()
    idx = sampling.sample_tokens(conf, 1, tau, gen)[:, 0, 0]
    observed = torch.bincount(idx, minlength=len(u)).numpy()
    expected = torch.softmax(u.double() / tau, 0).numpy() * n
    chi2, p = stats.chisquare(observed, expected)
    assert p > 0.001, (observed, expected)


def test_inclusion_frequency_matches_sampling_without_replacement():
    """K > 1: the first-draw marginal of a successive-sampling scheme; check by simulation
    against an explicit sequential sampler (same law as Gumbel-top-k)."""
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    u = torch.rand(12, generator=torch.Generator().manual_seed(3))
    tau, k, n = 0.5, 4, 20_000
    idx = sampling.sample_tokens(u.expand(n, 1, -1).contiguous(), k, tau, gen)[:, 0]
    freq = torch.zeros(12).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())).numpy() / n
    p = torch.softmax(u.double() / tau, 0).numpy()
    ref = np.zeros(12)
    for _ in range(n):
        chosen = rng.choice(12, size=k, replace=False, p=p)
        ref[chosen] += 1
    ref /= n
    assert np.abs(freq - ref).max() < 0.02


def test_indices_are_k_distinct_tokens():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(3, 5, 200)
    idx = sampling.sample_tokens(conf, 20, 0.25, gen)
    assert idx.shape == (3, 5, 20)
    for row in idx.reshape(-1, 20):
        assert len(set(row.tolist())) == 20


def test_low_temperature_concentrates_on_confident_tokens():
    gen = torch.Generator().manual_seed(0)
    conf = torch.zeros(1, 1, 1000)
    conf[..., :50] = 1.0
    hot = sampling.sample_tokens(conf, 50, 1.0, gen)
    cold = sampling.sample_tokens(conf, 50, 1 / 9, gen)
    assert (cold < 50).float().mean() > 0.9 > (hot < 50).float().mean()


def test_infinite_temperature_is_uniform():
    gen = torch.Generator().manual_seed(0)
    conf = torch.zeros(2000, 1, 10)
    conf[..., 0] = 1.0
    idx = sampling.sample_tokens(conf, 1, math.inf, gen)
    counts = torch.bincount(idx.reshape(-1), minlength=10).float()
    assert counts[0] / counts.mean() == pytest.approx(1.0, abs=0.2)


def test_same_seed_same_tokens_different_seed_differs():
    conf = torch.rand(2, 3, 500)
    a = sampling.sample_tokens(conf, 50, 0.5, torch.Generator().manual_seed(5))
    b = sampling.sample_tokens(conf, 50, 0.5, torch.Generator().manual_seed(5))
    c = sampling.sample_tokens(conf, 50, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    assert not torch.equal(a.sort(-1).values, c.sort(-1).values)


def test_threshold_mask_attends_everywhere_when_empty():
    conf = torch.tensor([[[0.1, 0.9, 0.7], [0.1, 0.2, 0.3]]])
    m = sampling.threshold_mask(conf)
    assert m.tolist() == [[[False, True, True], [True, True, True]]]


def test_token_counts():
    idx = torch.tensor([[[0, 1], [1, 2]]])
    assert sampling.token_counts(idx, 4).tolist() == [[1.0, 2.0, 1.0, 0.0]]


def test_cpu_selection_picks_the_same_tokens_as_topk():
    scores = torch.randn(3, 10, 4096, generator=torch.Generator().manual_seed(0))
    picked = sampling.top_k_indices(scores, 410)
    assert picked.shape == (3, 10, 410) and picked.dtype == torch.int64
    expected = torch.topk(scores, 410, dim=-1).indices
    assert torch.equal(picked.sort(-1).values, expected.sort(-1).values)


# -- the GPU draw (exponential_scores), checked here on the CPU ------------------------------------
def _gpu_draw(conf, k, tau, gen):
    """sample_tokens as it runs on a GPU (exponential noise, three ops), on this CPU."""
    return sampling.top_k_indices(sampling.exponential_scores(conf, tau, gen), k)


def test_gpu_draw_single_token_matches_softmax_of_u_over_tau():
    gen = torch.Generator().manual_seed(99)
    u = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95, 0.6, 0.1, 0.4])
    tau, n = 1 / 3, 40_000
    idx = _gpu_draw(u.expand(n, 1, -1).contiguous(), 1, tau, gen)[:, 0, 0]
    observed = torch.bincount(idx, minlength=len(u)).numpy()
    expected = torch.softmax(u.double() / tau, 0).numpy() * n
    assert stats.chisquare(observed, expected)[1] > 0.001, (observed, expected)


def test_gpu_draw_has_the_same_inclusion_frequencies_as_the_cpu_draw():
    """K > 1 without replacement: both noises give one law (compared by simulation), and
    infinite tau is uniform."""
    u = torch.rand(12, generator=torch.Generator().manual_seed(3))
    tau, k, n = 0.5, 4, 20_000
    conf = u.expand(n, 1, -1).contiguous()

    def freq(idx):
        return torch.zeros(12).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())).numpy() / n

    gpu = freq(_gpu_draw(conf, k, tau, torch.Generator().manual_seed(5)))
    cpu = freq(sampling.sample_tokens(conf, k, tau, torch.Generator().manual_seed(6)))
    assert np.abs(gpu - cpu).max() < 0.02
    assert gpu[u.argmax()] > 0.5 > gpu[u.argmin()]  # not uniform at this temperature
    uniform = freq(_gpu_draw(conf, k, math.inf, torch.Generator().manual_seed(8)))
    assert np.abs(uniform - k / 12).max() < 0.02
    idx = _gpu_draw(torch.rand(3, 5, 200), 20, 0.25, torch.Generator().manual_seed(0))
    assert all(len(set(row.tolist())) == 20 for row in idx.reshape(-1, 20))  # k distinct tokens
