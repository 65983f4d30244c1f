"""Export of the component options: logit parity where transformers has the option, a refusal
naming the option where it has none."""

from __future__ import annotations

import pytest
import transformers as tf

from llmstack import models
from llmstack.models import hf
from tests.models.test_hf import V, assert_parity, padded_batch, perturbed

SMALL = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=48)

# (id, preset, overrides, HF class): options with a transformers equivalent
PARITY = [
    ("sinusoidal", "gpt2-tiny", dict(pos="sinusoidal"), "GPT2LMHeadModel"),
    ("no-positions", "gpt2-tiny", dict(pos="none"), "GPT2LMHeadModel"),
    ("mish", "gpt2-tiny", dict(activation="mish"), "GPT2LMHeadModel"),
    ("gelu-exact", "gpt2-tiny", dict(activation="gelu"), "GPT2LMHeadModel"),
    ("geglu-mqa", "llama-tiny", dict(mlp="geglu", n_kv_head=1), "LlamaForCausalLM"),
    ("reglu-gqa", "llama-tiny", dict(mlp="reglu", n_kv_head=2), "LlamaForCausalLM"),
    ("swiglu-mha", "llama-tiny", dict(mlp="swiglu", n_kv_head=4), "LlamaForCausalLM"),
    ("rotary-layernorm-gelu", "gpt2-tiny", dict(pos="rotary"), "GPTNeoXForCausalLM"),  # sequential GPT-NeoX
]


@pytest.mark.parametrize("case", PARITY, ids=[c[0] for c in PARITY])
def test_export_parity_of_options_with_an_hf_equivalent(case, tmp_path):
    _, preset, kw, cls = case
    cfg = models.build_config("gpt", preset, V, **{**SMALL, **kw})
    m = perturbed("gpt", cfg)
    hf.save_pretrained("gpt", cfg, dict(m.state_dict()), tmp_path, pad_id=0, bos_id=1, eos_id=2)
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == cls
    ids, mask = padded_batch()
    assert_parity("gpt", m, theirs, ids, mask)


# (overrides, the words the refusal must contain)
REFUSED = [
    (dict(pos="alibi"), "model.pos=alibi"),
    (dict(attn_pattern="sliding", attn_window=8), "model.attn_pattern=sliding"),
    (dict(attn_pattern="strided", attn_block=4), "model.attn_pattern=strided"),
    (dict(attn_pattern="fixed", attn_block=4), "model.attn_pattern=fixed"),
    (dict(norm_position="post"), "model.norm_position=post"),
    (dict(final_norm=False), "model.final_norm=false"),
    (dict(layer_scale=0.1), "model.layer_scale=0.1"),
    (dict(norm="rmsnorm"), "model.norm=rmsnorm"),  # learned positions with RMSNorm: neither GPT-2 nor LLaMA
    (dict(mlp="swiglu"), "model.mlp=swiglu"),  # GPT-2 has no gated MLP
    (dict(pos="rotary", norm="rmsnorm"), "model.mlp=gelu"),  # LLaMA has no ungated MLP (GPT-NeoX: LayerNorm)
]


@pytest.mark.parametrize("kw,words", REFUSED, ids=[c[1] for c in REFUSED])
def test_export_refuses_options_without_an_hf_equivalent(kw, words, tmp_path):
    cfg = models.build_config("gpt", "gpt2-tiny", V, **{**SMALL, **kw})
    m = perturbed("gpt", cfg)
    with pytest.raises(hf.ConversionError, match=words.replace(".", r"\.")):
        hf.save_pretrained("gpt", cfg, dict(m.state_dict()), tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
