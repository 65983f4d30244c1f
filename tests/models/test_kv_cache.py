"""GPT with a KV cache: logits equal to the full forward, for prefill + steps, padded or not."""

from __future__ import annotations

import pytest
import torch

from llmstack.models.gpt import GPT, gpt_config_from_preset
from llmstack.models.layers import KVCache, causal_padding_mask


def tiny(preset) -> GPT:
    torch.manual_seed(0)
    m = GPT(gpt_config_from_preset(preset, 128, n_layer=2, d_model=32, n_head=4, max_seq_len=32))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_prefill_then_steps_equal_full_forward(preset):
    m = tiny(preset)
    x = torch.randint(0, 128, (2, 14))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 14)
        parts = [m(x[:, :5], cache=cache), m(x[:, 5:8], cache=cache)]  # a multi-token chunk after a prefix
        parts += [m(x[:, i:i + 1], cache=cache) for i in range(8, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_left_padded_rows_equal_unpadded(preset):
    m = tiny(preset)
    x = torch.randint(0, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = m(padded, position_ids=pos, attn_mask=causal_padding_mask(valid))
        torch.testing.assert_close(out[:, 3:], m(x), rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 1, 4, 2)
    cache.append(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    cache.advance(4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.append(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
