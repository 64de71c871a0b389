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


def test_ablation_modes_compute_different_things_with_the_same_weights_and_seed():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    batch = _batch(cfg)
    outputs = {}
    for mode in ("boltzmann", "uniform", "mask2former", "dense"):
        model.set_inference_options(sampling=mode, attention_impl="gather")
        outputs[mode] = model(*batch, generator=torch.Generator().manual_seed(0))["logits"]
    modes = sorted(outputs)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert not torch.allclose(outputs[a], outputs[b], atol=1e-5), (a, b)


def test_ratio_one_equals_dense_attention_numerically():
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    batch = _batch(cfg)
    model.set_inference_options(sampling="dense")
    dense = model(*batch)["logits"]
    model.set_inference_options(sampling="boltzmann", token_ratio=1.0, attention_impl="gather")
    full = model(*batch, generator=torch.Generator().manual_seed(0))["logits"]
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)


def test_inference_token_table_path_equals_the_masked_dense_and_training_paths():
    """Under no_grad the decoder gathers sampled tokens as token-table rows (one matmul for the
    feature and position logits); the same draw as a masked dense SDPA, or through the unfolded
    training path, gives the same output."""
    cfg = get_config("boltzformer-test")
    model = build_model(cfg, seed=0).eval()
    batch = _batch(cfg)
    out = {}
    for impl in ("gather", "dense"):
        model.set_inference_options(sampling="boltzmann", attention_impl=impl)
        with torch.no_grad():
            out[impl] = model(*batch, generator=torch.Generator().manual_seed(3))["logits"]
    model.set_inference_options(attention_impl="gather")
    out["training"] = model(*batch, generator=torch.Generator().manual_seed(3))["logits"].detach()
    torch.testing.assert_close(out["gather"], out["dense"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["gather"], out["training"], atol=1e-4, rtol=1e-4)


def test_ablation_structures_build():
    for overrides in ({"num_queries": 1}, {"text_query_init": False}, {"pigma": False}):
        cfg = get_config("boltzformer-test", **overrides)
        out = build_model(cfg, seed=0)(*_batch(cfg), generator=torch.Generator().manual_seed(0))
        assert out["logits"].shape[1] == 1


def test_stride2_masks_have_twice_the_resolution_and_train_the_detail_branch():
    cfg = get_config("boltzformer-test", mask_stride=2)
    model = build_model(cfg, seed=0)
    out = model(*_batch(cfg), generator=torch.Generator().manual_seed(0), return_attention=True)
    s = cfg.image_size
    assert out["query_masks"].shape == (2, cfg.num_queries, s // 2, s // 2)
    assert out["logits"].shape == (2, 1, s, s)
    # Attention records stay at the token resolutions.
    assert out["attention"][-1]["counts"].shape[-1] == s // cfg.finest_stride
    out["logits"].mean().backward()
    grad = dict(model.named_parameters())["encoder.detail.mix.4.weight"].grad
    assert grad is not None and grad.abs().sum() > 0


def test_stride2_model_starts_from_stride4_weights_with_the_same_coarse_masks():
    """The detail branch starts at zero: a stride-4 checkpoint loaded into the stride-2 network
    predicts the same masks, upsampled (bilinear), before any fine-tuning."""
    from torch.nn import functional as F

    from boltzformer.checkpoint import load_matching

    cfg4 = get_config("boltzformer-test")
    cfg2 = cfg4.replace(mask_stride=2)
    m4, m2 = build_model(cfg4, seed=0).eval(), build_model(cfg2, seed=1).eval()
    report = load_matching(m2, m4.state_dict())
    assert report["reinitialised"] == ["pigma.up.weight"]  # kernel = mask stride
    assert any(k.startswith("encoder.detail") for k in report["new"])
    batch = _batch(cfg4)
    q4 = m4(*batch, generator=torch.Generator().manual_seed(0))["query_masks"]
    q2 = m2(*batch, generator=torch.Generator().manual_seed(0))["query_masks"]
    # Intermediate masks use the stride-2 map pooled back to stride 4: equal up to the blur of
    # bilinear-up then average-pool, so compare with a tolerance relative to the logit scale.
    up = F.interpolate(q4, size=q2.shape[-2:], mode="bilinear", align_corners=False)
    assert (up - q2).abs().mean() < 0.25 * q4.abs().mean()


def test_mask_stride_is_validated():
    with pytest.raises(ValueError, match="mask_stride"):
        get_config("boltzformer-test", mask_stride=8)
    assert get_config("boltzformer-test").mask_stride == 4
    assert get_config("boltzformer-test").replace(attention_strides=(16, 8)).mask_stride == 8
