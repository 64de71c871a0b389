"""BoltzFormer decoder: text-conditioned latent queries refined by Boltzmann-sampled attention.

    queries (m learnable) --self-attn with text--> initial masks (layer -1)
    for l in 0..L-1 (token maps attended round robin, coarse to fine):
        U = sigmoid(previous masks at this layer's token resolution)
        (+ an optional "look here" prior in the early layers: sampling.PointPrior)
        tokens ~ softmax(U / tau_l), K per query      (sampling.py)
        queries <- cross-attn(queries, sampled tokens) (attention.py)
        queries <- self-attn(queries, queries + text)
        queries <- FFN(queries)
        masks <- MLP(queries) . pixel embeddings, at the next layer's resolution
Intermediate masks are predicted at the attention resolution only; the final ones at the
pixel-map resolution (cfg.mask_stride: 4, or 2 with the detail branch), so no layer pays for
full-resolution masks it does not need.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import sampling
from .attention import TokenCrossAttention, token_table
from .config import BoltzFormerConfig

POS_DIM = 32  # Fourier position features per token (8 frequencies x sin/cos x y/x)
# What attention_impl="auto" runs, on every device (measured: benchmarks/results/decoder_*.md)
AUTO_ATTENTION_IMPL = "gather"


def sine_positions(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """2D sine-cosine position features for an h x w token map -> (h*w) x dim (dim % 4 == 0).

    Frequencies are relative to the map, so every token map shares one feature basis."""
    quarter = dim // 4
    freq = 2.0 ** torch.arange(quarter, device=device, dtype=torch.float32)  # 1, 2, 4, ... cycles per map
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py = ys[:, None] * freq[None] / 2
    px = xs[:, None] * freq[None] / 2
    pos = torch.cat(
        [
            py.sin()[:, None].expand(h, w, quarter), py.cos()[:, None].expand(h, w, quarter),
            px.sin()[None].expand(h, w, quarter), px.cos()[None].expand(h, w, quarter),
        ],
        dim=-1,
    )
    return pos.reshape(h * w, 4 * quarter).to(dtype)


class MLP(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int = 3):
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        super().__init__(*mods)


class QueryTextSelfAttention(nn.Module):
    """Queries attend to themselves and to the text tokens (keys/values = queries + text).

    forward(queries: B x Q x D, query_pos: Q x D, text: B x T x D | None, text_padding: B x T)
    -> B x Q x D
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries, query_pos, text=None, text_padding=None):
        q = queries + query_pos
        if text is None:
            kv, k_in, pad = queries, q, None
        else:
            kv = torch.cat([queries, text], dim=1)
            k_in = torch.cat([q, text], dim=1)
            no_pad = torch.zeros(queries.shape[:2], dtype=torch.bool, device=queries.device)
            pad = torch.cat([no_pad, text_padding], dim=1)
        out, _ = self.attn(q, k_in, kv, key_padding_mask=pad, need_weights=False)
        return self.norm(queries + out)


class DecoderBlock(nn.Module):
    """Sparse cross-attention -> self-attention (queries + text) -> FFN (post-norm)."""

    def __init__(self, cfg: BoltzFormerConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.cross = TokenCrossAttention(d, cfg.num_heads)
        self.cross_norm = nn.LayerNorm(d)
        self.self_attn = QueryTextSelfAttention(d, cfg.num_heads)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, d))
        self.ffn_norm = nn.LayerNorm(d)

    def forward(self, queries, query_pos, tokens, pos, text, text_padding, indices, mask, impl, table=None):
        queries = self.cross_norm(
            queries + self.cross(queries + query_pos, tokens, pos, indices=indices, mask=mask, impl=impl, table=table)
        )
        queries = self.self_attn(queries, query_pos, text, text_padding)
        return self.ffn_norm(queries + self.ffn(queries))


class BoltzDecoder(nn.Module):
    """forward(features, pixel_map, text, text_padding, generator, return_attention, prior) -> dict

    features: stride -> B x D x h x w token maps; pixel_map: B x P x Hm x Wm (Hm = H / mask_stride);
    text: B x T x D, text_padding: B x T (True = pad); prior: an optional sampling.PointPrior
    added to U before the Boltzmann draw (None: the sampling is exactly the plain one).
    Returns {"query_masks": B x Q x Hm x Wm logits, "attention": list per layer (if asked)}.
    """

    def __init__(self, cfg: BoltzFormerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.query_feat = nn.Parameter(torch.randn(cfg.num_queries, d) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(cfg.num_queries, d) * 0.02)
        self.init_attn = QueryTextSelfAttention(d, cfg.num_heads)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.mask_norm = nn.LayerNorm(d)
        self.mask_mlp = MLP(d, d, cfg.pixel_dim)

    # -- helpers ---------------------------------------------------------------------------
    def layer_stride(self, layer: int) -> int:
        strides = self.cfg.attention_strides
        return strides[layer % len(strides)]

    def predict_masks(self, queries: torch.Tensor, pixel_map: torch.Tensor) -> torch.Tensor:
        """Mask logits: B x Q x h x w = MLP(queries) . pixel embeddings (at pixel_map's size)."""
        emb = self.mask_mlp(self.mask_norm(queries))
        return torch.einsum("bqc,bchw->bqhw", emb, pixel_map)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, features, pixel_map, text, text_padding, generator=None, return_attention=False,
                prior: sampling.PointPrior | None = None):
        cfg = self.cfg
        b = pixel_map.shape[0]
        mask_stride = cfg.mask_stride
        # Pixel maps pooled once to every attention resolution (intermediate masks live there).
        pixel_at = {mask_stride: pixel_map}
        for s in set(cfg.attention_strides):
            if s not in pixel_at:
                pixel_at[s] = F.avg_pool2d(pixel_map, kernel_size=s // mask_stride)
        impl = AUTO_ATTENTION_IMPL if cfg.attention_impl == "auto" else cfg.attention_impl
        # The sparse inference path reads sampled tokens as rows of a token table (features and
        # position features side by side, attention.token_table), built here once per token map
        # and shared by the blocks that attend to it; training and the dense path keep B x N x D.
        table_rows = impl == "gather" and cfg.sampling in ("boltzmann", "uniform") and not torch.is_grad_enabled()
        # Token maps flattened once (B x N x D, contiguous for fast row gathers, or a view into
        # the table), with their position features (N x POS_DIM; each block projects them into its keys).
        tokens = {}
        for s in set(cfg.attention_strides):
            fmap = features[s]
            h, w = fmap.shape[-2:]
            pos = sine_positions(h, w, POS_DIM, fmap.device, fmap.dtype)
            table = token_table(fmap, pos) if table_rows else None
            flat = fmap.flatten(2).transpose(1, 2).contiguous() if table is None else table[..., : fmap.shape[1]]
            tokens[s] = (flat, pos, (h, w), table)

        query_pos = self.query_pos
        queries = self.query_feat[None].expand(b, -1, -1)
        if cfg.text_query_init:
            queries = self.init_attn(queries, query_pos, text, text_padding)
        else:
            queries = self.init_attn(queries, query_pos, None, None)
        masks = self.predict_masks(queries, pixel_at[self.layer_stride(0)])  # layer "-1"

        attention = []
        for layer, block in enumerate(self.blocks):
            s = self.layer_stride(layer)
            flat, pos, (h, w), table = tokens[s]
            n = h * w
            confidence = torch.sigmoid(masks.detach().float()).flatten(2)  # U: B x Q x N
            if prior is not None and cfg.sampling == "boltzmann":
                bias = prior.energies(layer, h, w, confidence.device)  # B x N, same for every query
                if bias is not None:
                    confidence = confidence + bias[:, None, :]
            tau = sampling.temperature(layer, cfg.tau0)
            indices = mask = None
            k = n
            if cfg.sampling in ("boltzmann", "uniform"):
                k = sampling.num_sampled_tokens(n, cfg.token_ratio, cfg.min_tokens)
                if k < n:
                    t = tau if cfg.sampling == "boltzmann" else math.inf
                    indices = sampling.sample_tokens(confidence, k, t, generator)
            elif cfg.sampling == "mask2former":
                mask = sampling.threshold_mask(confidence)
            if return_attention:
                attention.append(self._attention_record(layer, s, (h, w), confidence, tau, indices, mask, k))
            queries = block(queries, query_pos, flat, pos, text, text_padding, indices, mask, impl, table)
            last = layer == len(self.blocks) - 1
            next_stride = mask_stride if last else self.layer_stride(layer + 1)
            masks = self.predict_masks(queries, pixel_at[next_stride])
        out = {"query_masks": masks}
        if return_attention:
            out["attention"] = attention
        return out

    def _attention_record(self, layer, stride, hw, confidence, tau, indices, mask, tokens_per_query):
        """Per-layer sampling record at token resolution (for the heatmaps); tokens_per_query is
        the K each query attended (all N tokens for dense and mask2former)."""
        b, q, n = confidence.shape
        probs = sampling.boltzmann_probabilities(confidence, tau if self.cfg.sampling == "boltzmann" else math.inf)
        if indices is not None:
            counts = sampling.token_counts(indices, n)
        elif mask is not None:
            counts = mask.float().sum(1)
        else:
            counts = torch.full((b, n), float(q), device=confidence.device)
        record = {
            "layer": layer, "stride": stride, "tau": tau, "tokens_per_query": tokens_per_query,
            "probabilities": probs.mean(1).reshape(b, *hw),  # B x h x w, mean over queries
            "counts": counts.reshape(b, *hw),  # B x h x w, queries that sampled each token
        }
        bits = sampling.query_bits(indices, mask, b, q, n, confidence.device)
        if bits is not None:  # which queries sampled each token, as bits: per-query heatmaps cost no more memory
            record["query_bits"] = bits.reshape(b, *hw)
        return record
