"""Schedules and parameter groups."""

from __future__ import annotations

import math

import pytest

from llmstack.models.gpt import GPT, gpt_config_from_preset
from llmstack.train.optim import lr_at, param_groups


def test_warmup_then_cosine_to_min():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(60, lr=1.0, warmup_steps=10, max_steps=110, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_at(60, lr=1.0, warmup_steps=10, max_steps=110, schedule="constant", min_lr_ratio=0.0) == 1.0


def test_no_decay_on_norms_biases_embeddings():
    for preset in ("gpt2-tiny", "llama-tiny"):
        m = GPT(gpt_config_from_preset(preset, 128, n_layer=1, d_model=32))
        decay, no_decay = param_groups(m, 0.1)
        names = {id(p): n for n, p in m.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        assert all(n.endswith("weight") and "ln" not in n and "wte" not in n and "wpe" not in n for n in decayed)
        assert "blocks.0.attn.qkv.weight" in decayed
        total = len(decay["params"]) + len(no_decay["params"])
        assert total == len({id(p) for p in m.parameters()})  # tied weight once
