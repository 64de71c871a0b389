"""CUDA graphs of the slice network (network/graphs.py).

On a CPU machine (CI) only the fallback runs: graphs are off and every output is the eager one.
The CUDA tests run where a GPU is (benchmarks/gpu/graphs_check.py runs this file on the lent GPU
machine): replayed batches equal eager ones, draw the same sampling noise, and leave the
generator where eager runs leave it.
"""

import numpy as np
import pytest
import torch

from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config
from boltzformer.network.graphs import GraphedNetwork, graphs_available
from boltzformer.segmenter import Segmenter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU machine)")


def _inputs(cfg, device, b=4, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randn(b, t, cfg.text_dim, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    pooled = torch.randn(b, cfg.text_dim, generator=g)
    return [v.to(device) for v in (x, tokens, valid, pooled)]


def test_off_on_cpu_and_the_segmenter_runs_eagerly():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    assert not graphs_available(torch.device("cpu"))
    graphed = GraphedNetwork(model, torch.device("cpu"))
    assert not graphed.enabled
    with torch.inference_mode():
        assert graphed.run(*_inputs(cfg, "cpu"), torch.Generator().manual_seed(0)) is None
        assert graphed.run(*_inputs(cfg, "cpu"), torch.Generator().manual_seed(0)) is None  # never captures
    seg = Segmenter(model, {}, device="cpu")
    assert not seg._graphs.enabled


def test_env_switch_turns_graphs_off(monkeypatch):
    cfg = get_config("boltzformer-test")
    monkeypatch.setenv("BOLTZFORMER_CUDA_GRAPHS", "0")
    seg = Segmenter(build_model(cfg, seed=0).eval(), {}, device="cpu")
    assert seg._graphs.enabled is False


@cuda
def test_replayed_batches_equal_eager_ones_with_the_same_draws():
    dev = torch.device("cuda")
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).to(dev).eval()
    graphed = GraphedNetwork(model, dev)
    assert graphed.enabled
    batches = [_inputs(cfg, dev, seed=s) for s in range(4)]

    def eager(gen, x, tokens, valid, pooled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, tokens, valid, pooled, generator=gen)["logits"]

    with torch.inference_mode():
        g_eager = torch.Generator(device=dev).manual_seed(7)
        want = [eager(g_eager, *b).float() for b in batches]
        g = torch.Generator(device=dev).manual_seed(7)
        got = []
        for b in batches:
            out = graphed.run(*b, g)
            got.append((eager(g, *b) if out is None else out).float())
        assert len(graphed._graphs) == 1  # the first batch ran eagerly, the second captured
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=0)  # bf16 autocast either way
        # the generator ends where the eager one does: later volumes draw the same noise
        assert torch.equal(g.get_state(), g_eager.get_state())
        # a fresh generator with the same seed replays the same draws (another volume, same seed)
        g2 = torch.Generator(device=dev).manual_seed(7)
        again = [graphed.run(*b, g2) for b in batches]
        for a, b in zip(got, again):
            assert torch.equal(a, b.float())


@cuda
def test_segmenter_masks_with_and_without_graphs_agree():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    rng = np.random.default_rng(0)
    slices = rng.random((12, cfg.image_size, cfg.image_size), dtype=np.float32)
    from boltzformer.network.text import PromptEmbedding

    emb = PromptEmbedding(rng.standard_normal((3, cfg.text_dim)).astype(np.float32),
                          rng.standard_normal(cfg.text_dim).astype(np.float32))
    for mirror in (False, True):  # mirrored: two passes per batch, the second with the first's noise
        probs = {}
        for on in (False, True):
            seg = Segmenter(model, {}, device="cuda", cuda_graphs=on)
            gen = seg._generator(3)
            probs[on] = np.concatenate([seg.predict_batch(slices[i:i + 4], emb, gen, mirror=mirror)[0]
                                        for i in range(0, 12, 4)])
            if on:
                assert len(seg._graphs._graphs) == 1
        assert np.abs(probs[True] - probs[False]).max() < 1e-2


@cuda
def test_new_weights_are_replayed_not_stale_ones():
    """Weights copied in place (a new version of the same storage) or given new storage (another
    memory format) make the graphs record again: a replay never uses stale weights."""
    dev = torch.device("cuda")
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).to(dev).eval()
    graphed = GraphedNetwork(model, dev)
    batch = _inputs(cfg, dev)

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(*batch, generator=torch.Generator(device=dev).manual_seed(1))["logits"].float()

    def replayed():
        for _ in range(2):  # the second call of a shape replays
            out = graphed.run(*batch, torch.Generator(device=dev).manual_seed(1))
        return out.float()

    with torch.inference_mode():
        torch.testing.assert_close(replayed(), eager(), atol=2e-2, rtol=0)
        model.load_state_dict(build_model(cfg, seed=1).state_dict())  # in place: same storage, new version
        assert graphed.run(*batch, torch.Generator(device=dev).manual_seed(1)) is None  # old graphs dropped
        torch.testing.assert_close(replayed(), eager(), atol=2e-2, rtol=0)
        model.to(memory_format=torch.channels_last)  # new storage for the convolution weights
        assert graphed.run(*batch, torch.Generator(device=dev).manual_seed(1)) is None  # old graphs dropped
        torch.testing.assert_close(replayed(), eager(), atol=2e-2, rtol=0)
