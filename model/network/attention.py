"""Cross-attention from the latent queries to image tokens: sparse (gather) and dense paths.

Sparse path: each query attends only to its own K sampled tokens. The key and value projections
are absorbed into the query side, so the H*W tokens are never projected:

    logits_h = (W_k,h^T q_h) . x_j           (the key bias is constant over j and cancels)
    out_h    = W_v,h (sum_j a_hj x_j) + b_v,h  (the weights a_hj sum to one)

Cost per layer is O(Q * K * D) instead of O(H*W * D^2) for projecting every token.

Dense path: project all tokens and run `scaled_dot_product_attention`, optionally with a
boolean mask (sampled tokens, or Mask2Former's thresholded mask). It is the ablation baseline
and is faster on some devices for small token maps. With K = H*W both paths agree numerically.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class TokenCrossAttention(nn.Module):
    """Multi-head cross-attention, queries -> image tokens.

    forward(queries: B x Q x D, keys_in: B x N x D (tokens + positions), values_in: B x N x D,
            indices: B x Q x K | None, mask: B x Q x N bool | None, impl) -> B x Q x D
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError("dim must be divisible by num_heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries, keys_in, values_in, indices=None, mask=None, impl: str = "gather"):
        if indices is not None and impl == "gather":
            return self._gather(queries, keys_in, values_in, indices)
        if indices is not None:  # dense implementation of the same sparse pattern
            mask = torch.zeros(
                indices.shape[0], indices.shape[1], keys_in.shape[1], dtype=torch.bool, device=queries.device
            ).scatter_(2, indices, True)
        return self._dense(queries, keys_in, values_in, mask)

    def _dense(self, queries, keys_in, values_in, mask):
        b, q, _ = queries.shape
        n = keys_in.shape[1]
        h, dh = self.num_heads, self.head_dim
        qh = self.q_proj(queries).view(b, q, h, dh).transpose(1, 2)  # B H Q dh
        kh = self.k_proj(keys_in).view(b, n, h, dh).transpose(1, 2)  # B H N dh
        vh = self.v_proj(values_in).view(b, n, h, dh).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None]  # B 1 Q N, True = attend
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask)  # B H Q dh
        return self.out_proj(out.transpose(1, 2).reshape(b, q, self.dim))

    def _gather(self, queries, keys_in, values_in, indices):
        b, q, _ = queries.shape
        k = indices.shape[-1]
        h, dh, d = self.num_heads, self.head_dim, self.dim
        qh = self.q_proj(queries).view(b, q, h, dh)
        # Absorb W_k into the query: B Q H D
        q_abs = torch.einsum("bqhe,hed->bqhd", qh, self.k_proj.weight.view(h, dh, d))
        flat = indices.reshape(b, q * k, 1).expand(-1, -1, d)
        keys = torch.gather(keys_in, 1, flat).view(b * q, k, d)  # (B Q) K D
        values = torch.gather(values_in, 1, flat).view(b * q, k, d)
        logits = torch.bmm(q_abs.reshape(b * q, h, d), keys.transpose(1, 2)) / math.sqrt(dh)  # (BQ) H K
        attn = torch.softmax(logits.float(), dim=-1).to(values.dtype)
        mixed = torch.bmm(attn, values).view(b, q, h, d)  # weighted token sums per head
        out = torch.einsum("bqhd,hed->bqhe", mixed, self.v_proj.weight.view(h, dh, d))
        out = out + self.v_proj.bias.view(h, dh)
        return self.out_proj(out.reshape(b, q, d))


def cross_attention_macs(num_queries: int, num_tokens: int, dim: int, num_heads: int, k: int | None) -> int:
    """Multiply-accumulates of one cross-attention call (one image, projections included).

    k=None: dense attention over all num_tokens (tokens projected to keys and values).
    k: sparse gather attention over k tokens per query with absorbed projections.
    """
    q, n, d = num_queries, num_tokens, dim
    if k is None:
        return 2 * n * d * d + q * d * d + 2 * q * n * d + q * d * d
    return q * d * d + q * d * d + 2 * q * num_heads * k * d + q * d * d + q * d * d
