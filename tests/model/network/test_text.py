"""The frozen sentence encoder: same tokens alone or in a batch, no process-wide side effects."""

import os

import numpy as np

from boltzformer.network.text import SentenceEncoder


def test_prompt_tokens_do_not_depend_on_the_batch(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    together = SentenceEncoder(16).encode(["lung nodule", "a much longer prompt about a lesion in the liver"])
    alone = SentenceEncoder(16).encode(["lung nodule"])
    # [CLS] lung nod ##ule [SEP]: three word pieces, no [SEP] or padding left over
    assert together[0].tokens.shape == alone[0].tokens.shape == (3, 384)
    np.testing.assert_allclose(together[0].tokens, alone[0].tokens, atol=1e-4)
    np.testing.assert_allclose(together[0].pooled, alone[0].pooled, atol=1e-5)
    assert "HF_HUB_OFFLINE" not in os.environ  # loading the encoder leaves the environment alone


def test_a_new_prompt_reaches_the_bundled_network_in_its_cached_prompts_layout():
    """The bundled weights' cached prompts hold [SEP] and padding rows (they were encoded before
    the encoder kept word pieces only); a new prompt came as word pieces alone, a form the network
    never saw. It now gets the layout of its nearest known prompt, which reproduces the cache."""
    from boltzformer.segmenter import Segmenter

    seg = Segmenter.from_pretrained(device="cpu")
    enc = seg._encoder
    for prompt in ("liver", "lung nodule", "multiple sclerosis lesion"):
        cached = seg.prompt_bank[prompt]
        again = enc.encode_padded(prompt, len(cached.tokens))
        np.testing.assert_allclose(again.tokens, cached.tokens, atol=1e-4)
        np.testing.assert_allclose(again.pooled, cached.pooled, atol=1e-5)
    assert seg._padded_bank()
    new = "pulmonary nodules"
    assert new not in seg.prompt_bank
    (embedding,) = seg.embed([new])
    pieces = enc.word_pieces(new)
    nearest = seg.nearest_prompts(new, 1)[0][0]
    rows = len(seg.prompt_bank[nearest].tokens)
    assert embedding.tokens.shape[0] == max(rows, pieces) > pieces  # its pieces, [SEP], padding
    plain = SentenceEncoder(16).encode([new])[0]
    np.testing.assert_allclose(embedding.tokens[:pieces], plain.tokens, atol=1e-4)  # the same word pieces first
