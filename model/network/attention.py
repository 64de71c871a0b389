"""Cross-attention from the latent queries to image tokens: sparse (gather) and dense paths.

Keys are tokens plus a learned projection of small Fourier position features,
k_j = W_k (x_j + P e_j), values are W_v x_j.

Sparse path: each query attends only to its own K sampled tokens. The key and value projections
are absorbed into the query side, so the H*W tokens are never projected and each sampled token
is gathered once (D floats, plus F = 32 position features):

    logits_hj = (W_k,h^T q_h) . x_j + (P^T W_k,h^T q_h) . e_j   (the key bias cancels)
    out_h     = W_v,h (sum_j a_hj x_j) + b_v,h                    (weights a_hj sum to one)

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

    forward(queries: B x Q x D, tokens: B x N x D, pos: N x F position features,
            indices: B x Q x K | None, mask: B x Q x N bool | None, impl) -> B x Q x D
    """

    def __init__(self, dim: int, num_heads: int, pos_dim: int = 32):
        super().__init__()
        if dim % num_heads:
            raise ValueError("dim must be divisible by num_heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(pos_dim, dim, bias=False)

    def forward(self, queries, tokens, pos, indices=None, mask=None, impl: str = "gather", table=None):
        """table: `token_table(tokens, pos)` when the caller has it (the decoder builds one per
        token map and forward pass; the sparse inference path reads its rows), else None."""
        if indices is not None and impl == "gather":
            return self._gather(queries, tokens, pos, indices, table)
        if indices is not None:  # dense implementation of the same sparse pattern
            mask = torch.zeros(
                indices.shape[0], indices.shape[1], tokens.shape[1], dtype=torch.bool, device=queries.device
            ).scatter_(2, indices, True)
        return self._dense(queries, tokens, pos, mask)

    def _dense(self, queries, tokens, pos, mask):
        b, q, _ = queries.shape
        n = tokens.shape[1]
        h, dh = self.num_heads, self.head_dim
        qh = self.q_proj(queries).view(b, q, h, dh).transpose(1, 2)  # B H Q dh
        kh = self.k_proj(tokens + self.pos_proj(pos)).view(b, n, h, dh).transpose(1, 2)  # B H N dh
        vh = self.v_proj(tokens).view(b, n, h, dh).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None]  # B 1 Q N, True = attend
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask)  # B H Q dh
        return self.out_proj(out.transpose(1, 2).reshape(b, q, self.dim))

    def _gather(self, queries, tokens, pos, indices, table=None):
        if torch.is_grad_enabled() and self.q_proj.weight.requires_grad:
            return self._gather_training(queries, tokens, pos, indices)
        return self._gather_inference(queries, tokens, pos, indices, table)

    def _gather_training(self, queries, tokens, pos, indices):
        """The sparse path written as the math reads (autograd through every projection)."""
        b, q, _ = queries.shape
        h, dh, d = self.num_heads, self.head_dim, self.dim
        qh = self.q_proj(queries).view(b, q, h, dh)
        q_abs = torch.einsum("bqhe,hed->bqhd", qh, self.k_proj.weight.view(h, dh, d))  # W_k absorbed: B Q H D
        q_pos = q_abs @ self.pos_proj.weight  # P absorbed: B Q H F
        x, e = self._gathered(tokens, pos, indices)
        logits = torch.baddbmm(
            torch.bmm(q_pos.reshape(b * q, h, -1), e.transpose(1, 2)),
            q_abs.reshape(b * q, h, d), x.transpose(1, 2),
        ) / math.sqrt(dh)  # (B Q) H K
        attn = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        mixed = torch.bmm(attn, x).view(b, q, h, d)  # attention-weighted token sums per head
        out = torch.einsum("bqhd,hed->bqhe", mixed, self.v_proj.weight.view(h, dh, d)) + self.v_proj.bias.view(h, dh)
        return self.out_proj(out.reshape(b, q, d))

    def _gather_inference(self, queries, tokens, pos, indices, table=None):
        """The same sparse attention with the projections folded into two matrices (`_folded`)
        and each sampled token read once as one row of the token table (its D features and F
        position features side by side), so the D- and F-parts of the logits are one matmul:

            addmm (queries in) -> index_select (rows) -> softmax(q k^T) v (`mix_rows`) -> addmm (out)

        Four to six tensor ops, where the math as written takes fourteen: at these sizes the
        per-op overhead, not the arithmetic, sets the time (on 2 CPU cores at 64² tokens it was
        half of the call; on a GPU each op is a kernel launch, about 20 us of host time on the
        H100 machine). tokens: B x N x D; table: their `token_table` (built here when None)."""
        b, q, _ = queries.shape
        h, d = self.num_heads, self.dim
        table = token_table(tokens, pos) if table is None else table
        n, c = table.shape[1], table.shape[2]  # c = D + F
        k = indices.shape[-1]
        w_in, b_in, w_out, b_out = self._folded()
        q_cat = torch.addmm(b_in, queries.reshape(b * q, d), w_in).view(b * q, h, c)  # per head [D | F], scaled
        rows = indices.reshape(-1) if b == 1 else (indices + torch.arange(0, b * n, n, device=indices.device).view(b, 1, 1)).reshape(-1)
        xe = table.reshape(b * n, c).index_select(0, rows).view(b * q, k, c)  # (B Q) x K x (D + F)
        mixed = mix_rows(q_cat, xe, d, fused=xe.device.type == "cuda")  # (B Q) H D (measured on CUDA only)
        return torch.addmm(b_out, mixed.reshape(b * q, h * d), w_out).view(b, q, d)

    @staticmethod
    def _gathered(tokens, pos, indices):
        """Rows of the K sampled tokens per query: x (B Q) x K x D and their positions (B Q) x K x F.

        index_select on a flat token table: much faster than gather with an index expanded over
        channels (measured 0.06 vs 0.6 ms at 4096 tokens on 2 CPU cores)."""
        b, n, d = tokens.shape
        q, k = indices.shape[1], indices.shape[2]
        flat = indices.reshape(-1) if b == 1 else (indices + torch.arange(b, device=indices.device).view(b, 1, 1) * n).reshape(-1)
        x = tokens.reshape(b * n, d).index_select(0, flat).view(b * q, k, d)
        e = pos.index_select(0, indices.reshape(-1)).view(b * q, k, -1)
        return x, e

    def _folded(self):
        """Projections folded for inference, cached until a weight changes.

        w_in: D x H(D + F), b_in: H(D + F): queries -> per head W_k,h^T (W_q,h q + b_q,h) / sqrt(dh)
          (the D-part) followed by its position part P^T(...) (the F-part), head after head; the
          key bias cancels in softmax.
        w_out: HD x D, b_out: D: per-head token mixtures -> out_proj(W_v,h mix_h + b_v,h).
        """
        # Read from the submodules' parameter dicts: nn.Module attribute lookups took 9 of the
        # 13 us this check cost per call (2 CPU cores), a share of a call worth keeping on a GPU.
        sub = self._modules
        q, k, v, o = (sub[n]._parameters for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
        params = (q["weight"], q["bias"], k["weight"], v["weight"], v["bias"], o["weight"], o["bias"],
                  sub["pos_proj"]._parameters["weight"])
        # Inference tensors (made under torch.inference_mode) keep no version counter; they cannot
        # be changed in place outside inference mode, so their storage identifies them.
        key = tuple((p.data_ptr(), None if p.is_inference() else p._version, p.device, p.dtype) for p in params)
        cached = getattr(self, "_folded_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            h, dh, d = self.num_heads, self.head_dim, self.dim
            scale = 1.0 / math.sqrt(dh)
            wq = self.q_proj.weight.view(h, dh, d)
            wk = self.k_proj.weight.view(h, dh, d)
            a = torch.einsum("hed,hec->hdc", wk, wq) * scale  # H x D(out) x D(in)
            c = torch.einsum("hed,he->hd", wk, self.q_proj.bias.view(h, dh)) * scale  # H x D
            p = self.pos_proj.weight  # D x F
            a_pos = torch.einsum("hdc,df->hfc", a, p)  # H x F x D(in)
            c_pos = c @ p  # H x F
            # per head its D query features then its F position features, as a token table row
            w_in = torch.cat([a, a_pos], 1).reshape(-1, d).t().contiguous()
            b_in = torch.cat([c, c_pos], 1).reshape(-1)
            wv = self.v_proj.weight.view(h, dh, d)
            wo = self.out_proj.weight.view(d, h, dh)
            w_out = torch.einsum("ohe,hed->hdo", wo, wv).reshape(h * d, d).contiguous()
            b_out = self.out_proj.bias + self.out_proj.weight @ self.v_proj.bias
        folded = (w_in, b_in, w_out, b_out)
        self._folded_cache = (key, folded)
        return folded


def mix_rows(q_cat: torch.Tensor, xe: torch.Tensor, d: int, fused: bool) -> torch.Tensor:
    """softmax(q k^T) v for each query's own gathered rows, the heads sharing them.

    q_cat: (B Q) x H x (D + F) folded, scaled queries; xe: (B Q) x K x (D + F) gathered table rows
    (keys: all of a row; values: its first D features) -> (B Q) x H x D.
    fused: one scaled_dot_product_attention call, the H heads as its query rows (one kernel on a
    GPU; on an H100 it took the sampled call at 32² tokens from 0.24 to 0.16 ms, under dense
    attention's 0.22 ms); else bmm, softmax, bmm (faster on CPU, where SDPA measured 1.3-4x slower).
    """
    if fused:
        return F.scaled_dot_product_attention(q_cat[:, None], xe[:, None], xe[:, None, :, :d], scale=1.0)[:, 0]
    attn = torch.softmax(torch.bmm(q_cat, xe.transpose(1, 2)).float(), dim=-1).to(xe.dtype)  # (B Q) H K
    return torch.bmm(attn, xe[..., :d])


def token_table(tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The rows the sparse inference path gathers: each token's D features and its F position
    features side by side. tokens: B x N x D or a B x D x h x w map (N = h w); pos: N x F
    -> B x N x (D + F), contiguous (one row read per sampled token)."""
    if tokens.dim() == 4:
        tokens = tokens.flatten(2).transpose(1, 2)
    b, n, d = tokens.shape
    table = tokens.new_empty(b, n, d + pos.shape[-1])
    table[..., :d].copy_(tokens)
    table[..., d:].copy_(pos)  # the same positions for every batch item
    return table


def cross_attention_macs(num_queries: int, num_tokens: int, dim: int, num_heads: int, k: int | None,
                         pos_dim: int = 32) -> int:
    """Multiply-accumulates of one cross-attention call (one image, projections included).

    k=None: dense attention over all num_tokens (tokens projected to keys and values).
    k: sparse gather attention over k tokens per query as it runs at inference, with the
      projections folded (`TokenCrossAttention._folded`): H(D + F) query features in, K tokens
      per query, one H*D -> D matrix out. Folding costs more query-side MACs than the unfolded
      chain (none of them scale with the tokens) and saves half of the tensor ops.
    """
    q, n, d, h = num_queries, num_tokens, dim, num_heads
    if k is None:
        return n * pos_dim * d + 2 * n * d * d + q * d * d + 2 * q * n * d + q * d * d
    return q * d * h * (d + pos_dim) + q * h * k * (2 * d + pos_dim) + q * h * d * d
