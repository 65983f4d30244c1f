"""GPT model: causality, shared pieces against their formulas, accounting, init, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmstack.models.gpt import GPT, PRESETS, GPTConfig, gpt_config_from_preset
from llmstack.models.layers import RMSNorm, apply_rotary, attention, rotary_tables


def tiny(preset="gpt2-tiny", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = gpt_config_from_preset(preset, 128, n_layer=2, d_model=32, n_head=4, max_seq_len=32, **kw)
    m = GPT(cfg)
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_causal_future_tokens_do_not_change_past_logits(preset):
    m = tiny(preset)
    x = torch.randint(0, 128, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_attention_matches_softmax_formula_with_gqa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)  # 2 kv heads serve 4 query heads
    out = attention(q, k, v, causal=True)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ kr.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ vr, rtol=1e-5, atol=1e-6)


def test_rmsnorm_formula():
    x = torch.randn(3, 7)
    n = RMSNorm(7, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.arange(7.0))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * torch.arange(7.0)
    torch.testing.assert_close(n(x), expected)


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi = apply_rotary(q.view(1, 1, 1, 8), cos[i : i + 1], sin[i : i + 1])
        kj = apply_rotary(k.view(1, 1, 1, 8), cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_tied_embeddings_and_parameter_count():
    m = tiny()
    assert m.lm_head.weight is m.wte.weight
    c = m.config
    # ln_1, ln_2 (weight+bias each), qkv, proj, mlp fc, mlp proj (weights + biases)
    per_block = (4 * 32) + (32 * 3 * 32 + 3 * 32) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    expected = 128 * 32 + 32 * 32 + c.n_layer * per_block + 2 * 32
    assert m.num_params() == expected == sum(p.numel() for p in m.parameters())


def test_flops_per_token_palm_formula():
    m = tiny()
    L, C, V, T = 2, 32, 128, 32
    n_matmul = L * (3 * C * C + C * C + 4 * C * C + 4 * C * C) + V * C  # qkv, proj, fc, proj; LM head
    assert m.matmul_params() == n_matmul
    assert m.flops_per_token(T) == 6 * n_matmul + 12 * L * 4 * 8 * T


def test_gpt2_124m_preset_has_124m_parameters():
    with torch.device("meta"):
        m = GPT(gpt_config_from_preset("gpt2-124m", 50257))
    assert abs(m.num_params() - 124.44e6) < 0.05e6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    with torch.device("meta"):
        m = GPT(gpt_config_from_preset(name, 8192))
    assert m.num_params() > 0


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(gpt_config_from_preset("gpt2-tiny", 512, n_layer=8, d_model=256))
    m.init_weights()
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.001
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.ln_f.weight == 1)


def test_activation_checkpointing_same_loss_and_grads():
    x = torch.randint(0, 128, (2, 16))
    grads = []
    for ac in (False, True):
        m = tiny(activation_checkpointing=ac).train()
        loss = m(x, labels=x)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_packed_documents_with_mask_and_positions_equal_separate(preset):
    """Two documents in one row with a block-diagonal causal mask and reset positions give the
    same logits as each document alone (the hook the packing pipeline uses)."""
    m = tiny(preset)
    a, b = torch.randint(0, 128, (1, 6)), torch.randint(0, 128, (1, 10))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(6), torch.arange(10)]).view(1, -1)
    doc = torch.tensor([0] * 6 + [1] * 10)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    with torch.no_grad():
        out = m(packed, position_ids=pos, attn_mask=mask.view(1, 1, 16, 16))
        torch.testing.assert_close(out[:, :6], m(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 6:], m(b), rtol=1e-5, atol=1e-5)


def test_loss_is_cross_entropy_ignoring_minus_100():
    m = tiny()
    x = torch.randint(0, 128, (2, 8))
    labels = x.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        logits = m(x)
        expected = F.cross_entropy(logits[:, 3:].reshape(-1, 128), x[:, 3:].reshape(-1))
        torch.testing.assert_close(m(x, labels=labels), expected)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(vocab_size=10, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(vocab_size=10, d_model=32, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_position_tables_first_made_in_inference_mode_train_later():
    """A sampler's generate (inference mode) may be a rotary model's first forward; the cached
    position tables must still be usable by a later training forward (PPO/GRPO actors)."""
    from llmstack.models.gpt import GPT, gpt_config_from_preset

    m = GPT(gpt_config_from_preset("llama-tiny", 100, n_layer=1))
    m.init_weights()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.inference_mode():
        m(ids)
    m(ids, labels=ids).backward()
    assert m.wte.weight.grad is not None
