"""Boltzmann attention sampling (and the ablation samplers).

For each query and decoder layer l, the previous layer's mask prediction gives a confidence
U = sigmoid(logits) per token; tokens are drawn from p = softmax(U / tau_l) with the annealed
temperature tau_l = tau0 / (1 + l): near-uniform exploration in early layers, concentrated
exploitation later.

We draw K *distinct* tokens per query, shared across heads, with the Gumbel-top-k trick:
topk(U / tau + Gumbel noise, K) is an exact sample without replacement from softmax(U / tau).
A fixed K gives fixed tensor shapes, so attention can `gather` K tokens instead of masking a
dense H*W matrix: that is where the compute saving comes from.

`PointPrior` ("look here") adds an energy bump around a point to U before the draw in the early
layers, so the queries explore there first; without one the sampling is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch


def temperature(layer: int, tau0: float = 1.0) -> float:
    """tau_l = tau0 / (1 + l), l = 0 for the first decoder block."""
    return tau0 / (1.0 + layer)


def num_sampled_tokens(num_tokens: int, ratio: float, min_tokens: int = 16) -> int:
    """K = max(min_tokens, round(ratio * num_tokens)), never more than num_tokens."""
    return int(min(num_tokens, max(min_tokens, round(ratio * num_tokens))))


def gumbel_noise(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel noise, drawn from `generator` (reproducible) on its own device."""
    gen_device = generator.device if generator is not None else torch.device(device)
    g = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    # In place: -log(-log(u)), u kept away from 0 and 1 so the double log stays finite.
    g.clamp_(1e-10, 1.0 - 1e-7).log_().neg_().log_().neg_()
    return g.to(device=device, dtype=dtype)


def boltzmann_probabilities(confidence: torch.Tensor, tau: float) -> torch.Tensor:
    """p = softmax(U / tau) over tokens. confidence U: B x Q x N in [0, 1] -> B x Q x N."""
    return torch.softmax(confidence.float() / tau, dim=-1)


def sample_tokens(
    confidence: torch.Tensor,
    k: int,
    tau: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw k distinct token indices per query from softmax(U / tau) (Gumbel-top-k).

    confidence: B x Q x N (U in [0, 1]); tau = math.inf gives uniform random sampling.
    Returns indices: B x Q x k (int64), in no particular order.

    Cost matters here: this runs for every query of every layer, and it must not eat the
    saving of the sparse attention. The noise is made in place in one buffer (uniform draws,
    then two vectorised logs; `exponential_` measured 5x slower on CPU; on a GPU, where the number
    of kernel launches is what costs, `exponential_scores` draws in three ops) and the temperature is
    folded into one in-place add. The selection is a partial selection, never a sort: on CPU
    numpy's introselect (`argpartition`), which measured 2.4x faster than `torch.topk` (61 vs
    148 us for 10 x 4096 scores, k = 410, 2 cores); elsewhere `topk(sorted=False)`. Both pick the
    same k largest scores, so the draw does not depend on the device's selection routine.
    """
    gen_device = generator.device if generator is not None else confidence.device
    if confidence.device.type != "cpu" and gen_device == confidence.device:
        return top_k_indices(exponential_scores(confidence, tau, generator), k)
    scores = gumbel_noise(confidence.shape, generator, confidence.device)
    if not math.isinf(tau):
        scores.add_(confidence.float(), alpha=1.0 / tau)
    return top_k_indices(scores, k)


def exponential_scores(confidence: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scores whose k largest are the same exact draw as Gumbel-top-k, in three ops instead of
    seven (on a GPU each is a kernel launch, and at 32² tokens the launches are the cost).

    With E ~ Exp(1), -log E is standard Gumbel, and scaling by tau > 0 keeps the order:
    topk(U / tau - log E) = topk(U - tau log E). Infinite tau (uniform): topk(-log E).
    confidence: B x Q x N -> B x Q x N float32. A draw of E = 0 (probability about 2^-24 per
    token in float32) makes its token certain to be picked; the others are unaffected.
    """
    scores = torch.empty(confidence.shape, device=confidence.device, dtype=torch.float32)
    scores.exponential_(generator=generator).log_()
    if math.isinf(tau):
        return scores.neg_()
    return torch.add(confidence.float(), scores, alpha=-tau)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last axis, unordered. ... x N -> ... x k int64."""
    n = scores.shape[-1]
    if scores.device.type != "cpu" or scores.requires_grad or k >= n:
        return torch.topk(scores, k, dim=-1, sorted=False).indices
    flat = scores.reshape(-1, n).numpy()
    picked = np.argpartition(flat, n - k, axis=-1)[:, n - k:]
    return torch.from_numpy(np.ascontiguousarray(picked, dtype=np.int64)).view(*scores.shape[:-1], k)


@dataclass(frozen=True)
class PointPrior:
    """A Gaussian bump added to the sampling energies U around one point per image ("look here").

    centers_yx: B x 2 float tensor, each batch item's point as fractions of the image height and
      width in pixel-centre convention ((row + 0.5) / H, (col + 0.5) / W), so it holds at any
      token resolution and survives resizing; a row of NaN gives that item no prior.
    amplitude: the energy added at the point, in U's units (U is a confidence in [0, 1]): at
      temperature tau a token there is exp(amplitude / tau) times likelier than a far one of the
      same U; a bump of amplitude 0 changes nothing.
    sigma_tokens: the Gaussian's standard deviation in tokens of each layer's own token map
      (a few tokens: a coarse layer's bump covers more of the image than a fine one's).
    layers: the bump applies in decoder blocks 0 .. layers - 1 (the exploring, high-temperature
      ones); later blocks sample from U alone, so the queries' own masks decide there.
    """

    centers_yx: torch.Tensor
    amplitude: float = 3.0
    sigma_tokens: float = 2.0
    layers: int = 2

    def energies(self, layer: int, h: int, w: int, device) -> torch.Tensor | None:
        """B x (h*w) float32 energies for decoder block `layer` on an h x w token map, or None
        when this block gets no prior."""
        if layer >= self.layers:
            return None
        c = self.centers_yx.to(device=device, dtype=torch.float32)
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        dy = (ys[None, :] - c[:, :1]) * h / self.sigma_tokens  # B x h, in sigmas
        dx = (xs[None, :] - c[:, 1:]) * w / self.sigma_tokens  # B x w
        bump = torch.exp(-0.5 * (dy[:, :, None] ** 2 + dx[:, None, :] ** 2)) * float(self.amplitude)
        return torch.nan_to_num(bump, nan=0.0).reshape(c.shape[0], h * w)

    def mirrored(self) -> "PointPrior":
        """The same prior on the images mirrored left-right: x fraction -> 1 - x (NaN stays)."""
        c = self.centers_yx.clone()
        c[:, 1] = 1.0 - c[:, 1]
        return replace(self, centers_yx=c)


def threshold_mask(confidence: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mask2Former-style masked attention: attend where U > threshold.

    confidence: B x Q x N -> bool B x Q x N (True = attend). A query whose mask is empty attends
    everywhere (as in Mask2Former), so no row of the attention is all -inf.
    """
    attend = confidence > threshold
    empty = ~attend.any(dim=-1, keepdim=True)
    return attend | empty


def token_counts(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """How many queries sampled each token. indices: B x Q x K -> B x N (float)."""
    b = indices.shape[0]
    counts = torch.zeros(b, num_tokens, device=indices.device, dtype=torch.float32)
    ones = torch.ones(indices.shape[0], indices.shape[1] * indices.shape[2], device=indices.device)
    return counts.scatter_add_(1, indices.reshape(b, -1), ones)


MAX_QUERY_BITS = 62  # query q is bit q of an int64 (the sign bit stays clear)


def query_bits(indices: torch.Tensor | None, mask: torch.Tensor | None, batch: int, num_queries: int,
               num_tokens: int, device) -> torch.Tensor | None:
    """Which queries attended each token, as a bit field: bit q set when query q did.

    indices: B x Q x K sampled tokens (distinct per query), or mask: B x Q x N (True = attend),
    or neither (every query attends every token). Returns int64 B x N, or None when there are
    more queries than bits. A record of the sampling only: nothing the network computes reads it.
    """
    if num_queries > MAX_QUERY_BITS:
        return None
    weights = torch.ones(num_queries, dtype=torch.int64, device=device).bitwise_left_shift_(
        torch.arange(num_queries, device=device))
    if indices is not None:
        k = indices.shape[-1]
        out = torch.zeros(batch, num_tokens, dtype=torch.int64, device=device)
        # tokens are distinct within a query, so the sum of distinct powers of two is their OR
        return out.scatter_add_(1, indices.reshape(batch, -1),
                                weights[None, :, None].expand(batch, num_queries, k).reshape(batch, -1))
    if mask is not None:
        return (mask.long() * weights[None, :, None]).sum(1)
    return torch.full((batch, num_tokens), int(weights.sum()), dtype=torch.int64, device=device)
