"""T5: relative position buckets, causal decoder, padding, loss, cached decoding, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmstack import models
from llmstack.models.t5 import PRESETS, T5, relative_position_bucket


def tiny(**kw) -> T5:
    torch.manual_seed(0)
    m = models.build_model("t5", models.build_config("t5", "t5-tiny", 128, n_layer=2, d_model=32, d_ff=48, **kw))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_equal_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :] - torch.zeros(1, 1, dtype=torch.long)
    for buckets, dist in ((32, 128), (16, 20), (8, 64)):
        ours = relative_position_bucket(rel, bidirectional, buckets, dist)
        theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets,
                                                       max_distance=dist)
        assert torch.equal(ours, theirs)


def test_decoder_is_causal_and_encoder_is_not():
    m = tiny()
    src, tgt = torch.randint(5, 128, (2, 10)), torch.randint(5, 128, (2, 8))
    tgt2 = tgt.clone()
    tgt2[:, 5:] = (tgt2[:, 5:] + 1) % 128
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 128
    with torch.no_grad():
        a, b = m(src, decoder_input_ids=tgt), m(src, decoder_input_ids=tgt2)
        torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, 5:], b[:, 5:])
        assert not torch.allclose(a[:, 0], m(src2, decoder_input_ids=tgt)[:, 0])  # every output sees all input


def test_encoder_padding_is_invisible():
    m = tiny()
    src, tgt = torch.randint(5, 128, (1, 9)), torch.randint(5, 128, (1, 6))
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(m(padded, decoder_input_ids=tgt, attention_mask=mask),
                                   m(src, decoder_input_ids=tgt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_loss_is_cross_entropy_with_teacher_forcing(tie):
    m = tiny(tie_embeddings=tie)
    assert m.config.rescale == tie  # tied heads read the decoder output scaled by d_model**-0.5
    src, labels = torch.randint(5, 128, (2, 10)), torch.randint(5, 128, (2, 7))
    labels[1, -2:] = -100
    with torch.no_grad():
        dec_in = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
        torch.testing.assert_close(m.shift_right(labels), dec_in)
        logits = m(src, decoder_input_ids=dec_in)
        expected = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(m(src, labels=labels), expected, rtol=1e-5, atol=1e-6)


def test_cached_decoding_equals_full_decoder():
    m = tiny(n_decoder_layer=3)
    src, tgt = torch.randint(5, 128, (2, 10)), torch.randint(5, 128, (2, 6))
    with torch.no_grad():
        memory = m.encode(src)
        full = m.decode(tgt, memory)
        cache = m.new_cache(2, 6)
        steps = [m.decode(tgt[:, :2], memory, cache=cache)]  # two at once, then one by one
        steps += [m.decode(tgt[:, i:i + 1], memory, cache=cache) for i in range(2, 6)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_init_scales():
    torch.manual_seed(0)
    m = models.build_model("t5", models.build_config("t5", "t5-small", 1000))
    m.init_weights()
    c = m.config
    q, kv = m.encoder.blocks[0].attn.qkv.weight.split([c.inner_dim, 2 * c.inner_dim])
    assert abs(q.std().item() - (c.d_model * c.head_dim) ** -0.5) < 2e-4
    assert abs(kv.std().item() - c.d_model**-0.5) < 2e-3
    assert abs(m.embed.weight.std().item() - 1.0) < 0.02
    assert m.lm_head.weight is not m.embed.weight  # v1.1: untied


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    with torch.device("meta"):
        m = models.build_model("t5", models.build_config("t5", name, 32128))
    assert m.num_params() > 0


def test_t5_v1_1_small_size():
    """google/t5-v1_1-small: 77M parameters (untied head, gated-GELU, 8+8 layers, d_ff 1024)."""
    with torch.device("meta"):
        m = models.build_model("t5", models.build_config("t5", "t5-small", 32128))
    assert abs(m.num_params() - 76.96e6) < 0.1e6
