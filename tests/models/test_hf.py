"""Hugging Face conversion: logit parity both ways, bit-exact round trips, refusals, shards.

Every architecture is checked on random tiny configs whose every weight (norm gains and biases
included) is perturbed away from its init, so a mapping that mixes up two tensors cannot pass.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from llmstack import models
from llmstack.models import hf

V = 96
AUTO = {"gpt": tf.AutoModelForCausalLM, "bert": tf.AutoModelForMaskedLM, "t5": tf.AutoModelForSeq2SeqLM}

# (id, family, preset, overrides): the four architectures, with their main options
CASES = [
    ("gpt2", "gpt", "gpt2-tiny", dict(n_layer=2, n_head=4, d_model=32, max_seq_len=48)),
    ("gpt2-untied-relu", "gpt", "gpt2-tiny", dict(n_layer=2, n_head=2, d_model=24, d_ff=40, max_seq_len=48,
                                                  tie_embeddings=False, activation="relu", norm_eps=1e-6)),
    ("llama-gqa", "gpt", "llama-tiny", dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=56, max_seq_len=48,
                                            rope_theta=500.0)),
    ("llama-mha-bias-tied", "gpt", "llama-tiny", dict(n_layer=2, n_head=4, n_kv_head=4, d_model=32, max_seq_len=48,
                                                      bias=True, tie_embeddings=True, activation="gelu_tanh")),
    ("bert", "bert", "bert-tiny", dict(n_layer=2, n_head=4, d_model=32, max_seq_len=48)),
    ("bert-untied", "bert", "bert-tiny", dict(n_layer=2, n_head=2, d_model=24, d_ff=40, max_seq_len=48,
                                              tie_embeddings=False, type_vocab_size=3, activation="gelu_tanh")),
    ("t5-v1.1", "t5", "t5-tiny", dict(n_layer=2, n_decoder_layer=3, n_head=4, d_model=32, d_ff=48)),
    ("t5-relu-tied", "t5", "t5-tiny", dict(n_layer=2, n_head=4, d_model=32, d_kv=12, d_ff=40, ffn="relu",
                                           tie_embeddings=True, rel_buckets=16, rel_max_distance=20)),
]


def perturbed(family: str, cfg, seed: int = 0):
    torch.manual_seed(seed)
    m = models.build_model(family, cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def native(case):
    _, family, preset, kw = case
    cfg = models.build_config(family, preset, V, **kw)
    return family, cfg, perturbed(family, cfg)


def padded_batch(B=3, T=12, seed=1):
    """Random ids and a mask with left padding, right padding, and no padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # left padded
    mask[1, -3:] = 0  # right padded
    return ids.masked_fill(mask == 0, 0), mask


def our_logits(family, m, ids, mask, dec=None, dec_mask=None):
    from llmstack.models.layers import causal_padding_mask

    if family == "gpt":
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return m(ids, position_ids=pos, attn_mask=causal_padding_mask(mask.bool()))
    if family == "bert":
        return m(ids, attention_mask=mask)
    return m(ids, decoder_input_ids=dec, attention_mask=mask, decoder_attention_mask=dec_mask)


def hf_logits(family, h, ids, mask, dec=None, dec_mask=None):
    if family == "gpt":
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return h(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    if family == "bert":
        return h(input_ids=ids, attention_mask=mask).logits
    return h(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits


def assert_parity(family, ours, theirs, ids, mask):
    """Logits equal within 1e-4 (fp32) at every real position, unpadded and padded."""
    with torch.no_grad():
        full = torch.ones_like(mask)
        dec = dec_mask = None
        if family == "t5":
            dec = torch.randint(5, V, (ids.shape[0], 7), generator=torch.Generator().manual_seed(2))
            dec_mask = torch.ones_like(dec)
            dec_mask[2, -2:] = 0  # a padded decoder row too
        for m_ in (full, mask):
            a = our_logits(family, ours, ids, m_, dec, dec_mask)
            b = hf_logits(family, theirs, ids, m_, dec, dec_mask)
            keep = (m_ if family != "t5" else dec_mask).bool()
            assert a.shape == b.shape
            torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_export_logit_parity_and_bit_exact_round_trip(case, tmp_path):
    family, cfg, m = native(case)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    hf.save_pretrained(family, cfg, dict(state), tmp_path, pad_id=0, bos_id=1, eos_id=2)
    theirs = AUTO[family].from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == hf.ARCHITECTURES[hf.target(family, cfg)]
    ids, mask = padded_batch()
    assert_parity(family, m, theirs, ids, mask)

    # native -> HF -> native: every tensor bit-exact, the architecture the same
    family2, cfg2, state2, _ = hf.load_pretrained(tmp_path)
    assert family2 == family
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert set(state2) == set(state) - tied
    for k in state2:
        assert torch.equal(state2[k], state[k]), k
    m2 = models.build_model(family, cfg2)
    m2.load_state_dict(state2, strict=not cfg.tie_embeddings)
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def _hf_random(arch: str):
    """An HF model built from a random config (seeded), all weights perturbed."""
    torch.manual_seed(3)
    if arch == "gpt2":
        h = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                                             bos_token_id=1, eos_token_id=2))
    elif arch == "llama":
        h = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=40,
                                               rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                                               rms_norm_eps=1e-5))
    elif arch == "bert":
        h = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=48, max_position_embeddings=40))
    else:
        h = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                      num_heads=4, feed_forward_proj="gated-gelu",
                                                      tie_word_embeddings=False, decoder_start_token_id=0))
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return h.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5"])
def test_import_of_random_hf_model_gives_hf_logits(arch, tmp_path):
    h = _hf_random(arch)
    h.save_pretrained(tmp_path)
    family, cfg, state, _ = hf.load_pretrained(tmp_path)
    ours = models.build_model(family, cfg)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    ids, mask = padded_batch()
    assert_parity(family, ours.eval(), h, ids, mask)


def test_untied_t5_head_survives_round_trip(tmp_path):
    """An untied T5 LM head is written as its own tensor and read back as such (not tied)."""
    family, cfg, m = native(CASES[6])
    assert not cfg.tie_embeddings
    hf.save_pretrained(family, cfg, dict(m.state_dict()), tmp_path, pad_id=0, bos_id=1, eos_id=2)
    theirs = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert torch.equal(theirs.lm_head.weight, m.lm_head.weight)
    assert not torch.equal(theirs.lm_head.weight, theirs.shared.weight)


@pytest.mark.parametrize("overrides,needle", [
    (dict(preset="gpt2-tiny", bias=False), "model.bias=false"),
    (dict(preset="gpt2-tiny", n_kv_head=2), "model.n_kv_head=2"),
    (dict(preset="gpt2-tiny", mlp="swiglu"), "model.mlp=swiglu"),
    (dict(preset="llama-tiny", norm="layernorm"), "model.norm=layernorm"),
    (dict(preset="llama-tiny", mlp="gelu"), "model.mlp=gelu"),
])
def test_gpt_without_hf_equivalent_is_refused_naming_the_option(overrides, needle, tmp_path):
    preset = overrides.pop("preset")
    cfg = models.build_config("gpt", preset, V, n_layer=1, n_head=4, d_model=32, max_seq_len=32, **overrides)
    with pytest.raises(hf.ConversionError, match=needle.replace(".", r"\.")):
        hf.save_pretrained("gpt", cfg, {}, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_prenorm_bert_is_refused():
    cfg = models.build_config("bert", "bert-tiny", V, prenorm=True, n_layer=1, d_model=32)
    with pytest.raises(hf.ConversionError, match=r"model\.prenorm=true"):
        hf.target("bert", cfg)


def test_large_export_is_sharded_and_loads(tmp_path):
    family, cfg, m = native(CASES[2])
    files = hf.save_pretrained(family, cfg, dict(m.state_dict()), tmp_path, max_shard_bytes=20_000)
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert all(f.stat().st_size < 20_000 + 12_000 for f in files)  # a shard only overflows by one tensor
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    assert_parity(family, m, theirs, ids, mask)
    _, _, state2, _ = hf.load_pretrained(tmp_path)
    assert all(torch.equal(state2[k], v) for k, v in m.state_dict().items() if k in state2)


def test_export_consumes_state_tensor_by_tensor():
    """The converter drops each native tensor once converted: never two full copies at once."""
    family, cfg, m = native(CASES[0])
    state = dict(m.state_dict())
    n = len(state)
    sizes = []
    for _ in hf.to_hf_tensors(family, cfg, state):
        sizes.append(len(state))
    assert sizes[-1] < n and sizes == sorted(sizes, reverse=True)


def test_import_refuses_unknown_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    h = _hf_random("gpt2")
    h.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["transformer.h.0.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.ConversionError, match="does not understand"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(hf.ConversionError, match="model_type 'mamba' is not supported"):
        hf.load_pretrained(tmp_path)
