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
