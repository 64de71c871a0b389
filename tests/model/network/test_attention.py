"""Sparse gather attention equals dense attention on the same tokens, and costs far less."""

import torch

from boltzformer.network.attention import TokenCrossAttention, cross_attention_macs


def _inputs(b=2, q=5, n=64, d=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, q, d, generator=g), torch.randn(b, n, d, generator=g), torch.randn(n, 32, generator=g))


def test_all_tokens_gathered_equals_dense_attention():
    attn = TokenCrossAttention(32, 4).eval()
    q, tokens, pos = _inputs()
    perm = torch.stack([torch.randperm(64) for _ in range(10)]).view(2, 5, 64)  # any order
    sparse = attn(q, tokens, pos, indices=perm, impl="gather")
    dense = attn(q, tokens, pos)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-4)


def test_gather_equals_dense_with_the_same_sampled_mask():
    attn = TokenCrossAttention(32, 4).eval()
    q, tokens, pos = _inputs()
    idx = torch.stack([torch.randperm(64)[:7] for _ in range(10)]).view(2, 5, 7)
    torch.testing.assert_close(
        attn(q, tokens, pos, indices=idx, impl="gather"), attn(q, tokens, pos, indices=idx, impl="dense"),
        atol=1e-5, rtol=1e-4,
    )


def _counted_macs(fn) -> int:
    """Multiply-accumulates of the matrix products `fn` actually runs (from their tensor shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def test_sparse_flops_counted_from_the_real_ops_are_an_order_of_magnitude_below_dense():
    q_, n, d, h, k = 10, 4096, 128, 4, 410
    attn = TokenCrossAttention(d, h).eval()
    q, tokens, pos = torch.randn(1, q_, d), torch.randn(1, n, d), torch.randn(n, 32)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(q_)]).view(1, q_, k)
    with torch.no_grad():
        attn(q, tokens, pos, indices=idx, impl="gather")  # folds the projections once (cached)
    sparse = _counted_macs(lambda: attn(q, tokens, pos, indices=idx, impl="gather"))
    dense = _counted_macs(lambda: attn(q, tokens, pos))
    assert sparse == cross_attention_macs(q_, n, d, h, k)  # the formula in the docs is what runs
    # The counter may not see inside CPU scaled_dot_product_attention (2 q n d MACs).
    assert cross_attention_macs(q_, n, d, h, None) - 2 * q_ * n * d <= dense <= cross_attention_macs(q_, n, d, h, None)
    assert dense / sparse >= 8


def test_folded_inference_path_equals_the_training_path_and_follows_weight_changes():
    attn = TokenCrossAttention(32, 4)
    q, tokens, pos = _inputs()
    idx = torch.stack([torch.randperm(64)[:9] for _ in range(10)]).view(2, 5, 9)
    trained = attn(q, tokens, pos, indices=idx)  # grad enabled: the unfolded chain
    assert trained.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(attn(q, tokens, pos, indices=idx), trained.detach(), atol=1e-5, rtol=1e-4)
        attn.v_proj.bias.add_(1.0)  # an in-place weight change must not reuse the stale fold
        changed = attn(q, tokens, pos, indices=idx)
    torch.testing.assert_close(changed, attn._gather_training(q, tokens, pos, idx).detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(changed, trained.detach())


def test_fused_row_mixing_used_on_gpus_equals_the_cpu_chain():
    """mix_rows' one-call SDPA form (run on GPUs) and its bmm-softmax-bmm form agree."""
    from boltzformer.network.attention import mix_rows

    g = torch.Generator().manual_seed(1)
    q_cat, xe = torch.randn(6, 4, 40, generator=g), torch.randn(6, 9, 40, generator=g)
    fused, chain = mix_rows(q_cat, xe, 32, fused=True), mix_rows(q_cat, xe, 32, fused=False)
    assert fused.shape == (6, 4, 32)
    torch.testing.assert_close(fused, chain, atol=1e-5, rtol=1e-4)
    ref = torch.softmax(q_cat @ xe.transpose(1, 2), -1) @ xe[..., :32]  # the definition
    torch.testing.assert_close(chain, ref, atol=1e-5, rtol=1e-4)
