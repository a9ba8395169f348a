"""The model's explicit return-attention option computes what the SDPA path computes."""

from __future__ import annotations

import pytest
import torch

from llmlab.model.config import ModelConfig
from llmlab.model.transformer import Transformer


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"position": "alibi"}, {"sliding_window": 5}])
def test_return_attention_matches_sdpa(kw):
    model = _model(**kw)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        logits, attn = model(ids, return_attention=True)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert len(attn) == 2 and attn[0].shape == (2, 4, 12, 12)
    rows = attn[1].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert float(attn[0].triu(1).abs().max()) == 0.0  # causal: nothing above the diagonal


def test_return_attention_with_padding_mask():
    model = _model()
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        logits, attn = model(ids, attention_mask=mask, return_attention=True)
    torch.testing.assert_close(logits[1, 3:], ref[1, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], ref[0], atol=1e-5, rtol=1e-5)
    assert float(attn[0][1, :, 5, :3].abs().max()) == 0.0  # real tokens never attend to padding
