"""The composed network: shapes, gradients, determinism, every ablation mode."""

import pytest
import torch

from boltzformer.network.boltzformer import build_model
from boltzformer.network.config import get_config


def _batch(cfg, b=2, t=3):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randn(b, t, cfg.text_dim, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, -1] = False
    pooled = torch.randn(b, cfg.text_dim, generator=g)
    return x, tokens, valid, pooled


def test_output_shapes_and_attention_records():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    out = model(*_batch(cfg), generator=torch.Generator().manual_seed(0), return_attention=True)
    s = cfg.image_size
    assert out["logits"].shape == (2, 1, s, s)
    assert out["query_masks"].shape == (2, cfg.num_queries, s // cfg.mask_stride, s // cfg.mask_stride)
    att = out["attention"]
    assert len(att) == cfg.num_layers
    for layer, rec in enumerate(att):
        stride = cfg.attention_strides[layer % len(cfg.attention_strides)]
        assert rec["counts"].shape == (2, s // stride, s // stride)
        assert rec["tau"] == pytest.approx(cfg.tau0 / (1 + layer))
        k = max(cfg.min_tokens, round(cfg.token_ratio * (s // stride) ** 2))
        assert rec["counts"].sum(dim=(1, 2)).tolist() == [float(min(k, (s // stride) ** 2) * cfg.num_queries)] * 2


def test_default_model_is_small_enough_for_a_laptop():
    from boltzformer.network.boltzformer import count_parameters

    assert count_parameters(build_model(get_config())) <= 10_000_000


def test_gradients_reach_encoder_queries_and_text_projection():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0)
    out = model(*_batch(cfg), generator=torch.Generator().manual_seed(0))
    out["logits"].mean().backward()
    for name in ("encoder.stem.0.weight", "decoder.query_feat", "text.token_proj.0.weight",
                 "text.pooled_proj.0.weight", "pigma.fuse.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_same_seed_same_output_different_seed_differs():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    batch = _batch(cfg)
    a = model(*batch, generator=torch.Generator().manual_seed(1))["logits"]
    b = model(*batch, generator=torch.Generator().manual_seed(1))["logits"]
    c = model(*batch, generator=torch.Generator().manual_seed(2))["logits"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("mode", ["boltzmann", "uniform", "mask2former", "dense"])
@pytest.mark.parametrize("impl", ["gather", "dense"])
def test_every_ablation_mode_runs_with_the_same_weights(mode, impl):
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    model.set_inference_options(sampling=mode, attention_impl=impl)
    out = model(*_batch(cfg), generator=torch.Generator().manual_seed(0), return_attention=True)
    assert torch.isfinite(out["logits"]).all()


def test_ratio_one_equals_dense_attention_numerically():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    batch = _batch(cfg)
    model.set_inference_options(sampling="dense")
    dense = model(*batch)["logits"]
    model.set_inference_options(sampling="boltzmann", token_ratio=1.0, attention_impl="gather")
    full = model(*batch, generator=torch.Generator().manual_seed(0))["logits"]
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)


def test_ablation_structures_build():
    for overrides in ({"num_queries": 1}, {"text_query_init": False}, {"pigma": False}):
        cfg = get_config("boltzformer-test", **overrides)
        out = build_model(cfg, seed=0)(*_batch(cfg), generator=torch.Generator().manual_seed(0))
        assert out["logits"].shape[1] == 1
