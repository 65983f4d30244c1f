"""BERT: bidirectionality, padding, the MLM loss path, pre-LN option, presets, accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmstack import models
from llmstack.models.bert import PRESETS, Bert


def tiny(**kw) -> Bert:
    torch.manual_seed(0)
    m = models.build_model("bert", models.build_config("bert", "bert-tiny", 128, n_layer=2, d_model=32,
                                                         max_seq_len=32, **kw))
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("prenorm", [False, True])
def test_every_position_sees_the_whole_sequence(prenorm):
    m = tiny(prenorm=prenorm)
    x = torch.randint(5, 128, (2, 12))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 128
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])  # the first position depends on the last token


def test_padding_is_invisible():
    m = tiny()
    x = torch.randint(5, 128, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(m(padded, attention_mask=mask)[:, :9], m(x), rtol=1e-5, atol=1e-5)


def test_mlm_loss_is_cross_entropy_on_labelled_positions_only():
    m = tiny()
    x = torch.randint(5, 128, (3, 16))
    labels = torch.full_like(x, -100)
    labels[:, [2, 7, 11]] = torch.randint(5, 128, (3, 3))
    with torch.no_grad():
        logits = m(x)
        expected = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(m(x, labels=labels), expected)


def test_tied_head_and_init():
    m = models.build_model("bert", models.build_config("bert", "bert-tiny", 128, n_layer=2, d_model=32))
    m.init_weights()
    assert m.lm_head.weight is m.wte.weight
    assert torch.all(m.lm_head.bias == 0) and torch.all(m.ln_emb.weight == 1)
    untied = models.build_model("bert", models.build_config("bert", "bert-tiny", 128, n_layer=1, d_model=32,
                                                            tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert m.ln_f is None and tiny(prenorm=True).ln_emb is None  # post-LN: no final norm; pre-LN: none on embeddings


def test_token_types_change_the_output():
    m = tiny()
    x = torch.randint(5, 128, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(m(x), m(x, token_type_ids=torch.ones_like(x)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    with torch.device("meta"):
        m = models.build_model("bert", models.build_config("bert", name, 30522))
    assert m.num_params() > 0 and m.flops_per_token(128) > 6 * m.num_params() * 0.5


def test_bert_base_has_110m_parameters():
    """The BERT paper's base model: 110M parameters (vocab 30522, tied MLM head)."""
    with torch.device("meta"):
        m = models.build_model("bert", models.build_config("bert", "bert-base", 30522))
    assert abs(m.num_params() - 109.5e6) < 0.6e6
