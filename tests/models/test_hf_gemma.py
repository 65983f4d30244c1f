"""Gemma 2 and Gemma 3 (text) imported from their published configs, against transformers.

gemma-2-2b: every other layer local (sliding window), attention logits soft-capped at 50 and
output logits at 30, GeGLU, four (1 + w) RMSNorms per block, embeddings scaled by sqrt(d_model),
a head_dim of its own. gemma-3-1b-it: five local layers to one global, local rotary base 10k and
global 1M (with the linear factor 8 of the 4B and larger models on the global layers), (1 + w)
q/k norms, no soft-capping. Widths and layers cut down (2 and 6 layers: Gemma 3 keeps one global
layer), windows and contexts scaled so that the 96-token batch goes well beyond the window.
Random weights, perturbed away from init so every norm's w matters.

- import: our logits equal transformers' within 1e-4 (fp32) on a left-padded batch, and would not
  without each feature (switched off alone, each moves them by far more);
- export: HF -> native -> HF gives back every tensor bit for bit and the same architecture;
  native -> HF -> native the same config and state;
- greedy generation (KV cache, left-padded prompts, windows crossed while decoding) equals
  transformers' token for token;
- the training loss (labels, padding ignored) and its gradient equal transformers';
- what has no native counterpart is refused by `llmstack import` with exit 2 and one line.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from llmstack import models
from llmstack.generate import generate
from llmstack.models import hf
from tests.models import hf_parity as parity
from tests.models.hf_parity import V, hf_greedy, logit_diff, padded_batch

IDS = dict(vocab_size=V, pad_token_id=0, bos_token_id=2, eos_token_id=1, initializer_range=0.02,
           attention_dropout=0.0, attention_bias=False)

# google/gemma-2-2b: 26 -> 2 layers; 8 heads of 256 over 2304 -> 4 heads of 32 over 96 (GQA 2:1);
# query_pre_attn_scalar: gemma-2-27b's rule, hidden_size / heads (24, not head_dim 32), so the
# scale is not the usual one; window 4096 -> 16, context 8192 -> 256
GEMMA_2_2B = dict(IDS, model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=96,
                  intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=24,
                  sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                  cache_implementation="hybrid", tie_word_embeddings=True)
# google/gemma-3-1b-it: 26 -> 6 layers (sliding_window_pattern 6: layer 5 global); 4 heads of 256
# over 1152 -> 4 of 32 over 64, one KV head; window 512 -> 16; context 32768 -> 256; plus the
# linear rope scaling (factor 8) of gemma-3-4b and larger, on the global layers
GEMMA_3_1B = dict(IDS, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
                  intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=32, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                  rope_scaling={"factor": 8.0, "rope_type": "linear"}, query_pre_attn_scalar=32, sliding_window=16,
                  sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None,
                  cache_implementation="hybrid", eos_token_id=[1, 106], tie_word_embeddings=True)

# (id, config.json, the HF class, the native options whose absence moves the logits: each off alone)
CASES = [
    ("gemma-2-2b", GEMMA_2_2B, "Gemma2ForCausalLM",
     [dict(attn_softcap=None), dict(final_softcap=None), dict(global_every=1), dict(query_pre_attn_scalar=None)]),
    ("gemma-3-1b-it", GEMMA_3_1B, "Gemma3ForCausalLM",
     [dict(qk_norm=False), dict(global_every=1), dict(rope_local_theta=None), dict(rope_scaling=None)]),
]
PROMPTS = [[5 + (7 * i) % 120 for i in range(30)], [9, 10, 11, 12, 13, 14, 15], list(range(20, 38)), [30, 31]]
NEW_TOKENS = 30  # every row passes the window while decoding


def _gemma_weights(model):
    # a smaller (tied) embedding: scaled by sqrt(d_model) it would otherwise outweigh the blocks'
    # normed outputs, and greedy decoding would echo the last token (a test that checks nothing)
    model.get_input_embeddings().weight.mul_(0.1)
    model.model.norm.weight.add_(4.0)  # logits large enough for the final soft-cap (30) to act


def write_published(d, config: dict, seed: int = 0):
    return parity.write_published(d, config, seed, tweak=_gemma_weights, attn_implementation="eager")


def import_native(d):
    return parity.import_native(d, "gemma")


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def imported(request, tmp_path_factory):
    name, config, cls, features = request.param
    d = tmp_path_factory.mktemp(name) / "hf"
    theirs = write_published(d, config)
    cfg, state, ours = import_native(d)
    return dict(name=name, dir=d, theirs=theirs, cfg=cfg, state=state, ours=ours, cls=cls, features=features)


def test_import_reads_the_published_config(imported):
    cfg = imported["cfg"]
    if imported["name"] == "gemma-2-2b":
        assert (cfg.global_every, cfg.attn_window, cfg.attn_softcap, cfg.final_softcap) == (2, 16, 50.0, 30.0)
        assert (cfg.qk_norm, cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (False, 1e4, None, None)
        assert (cfg.head_dim, cfg.d_model, cfg.query_pre_attn_scalar, cfg.act) == (32, 96, 24, "gelu_tanh")
        assert [b.local for b in imported["ours"].blocks] == [True, False]
    else:
        assert (cfg.global_every, cfg.attn_window, cfg.attn_softcap, cfg.final_softcap) == (6, 16, None, None)
        assert (cfg.qk_norm, cfg.rope_theta, cfg.rope_local_theta) == (True, 1e6, 1e4)
        assert cfg.rope_scaling == {"type": "linear", "factor": 8.0}
        assert [b.local for b in imported["ours"].blocks] == [True] * 5 + [False]
    assert cfg.hf_model_type == json.loads((imported["dir"] / "config.json").read_text())["model_type"]


def test_import_logits_equal_transformers(imported):
    ours, theirs, cfg = imported["ours"], imported["theirs"], imported["cfg"]
    ids, mask = padded_batch()
    assert mask.sum(-1).min() > cfg.attn_window + 16  # real positions well beyond the window
    diff = logit_diff(ours, theirs, ids, mask)
    print(f"\n{imported['name']}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert logit_diff(ours, theirs, ids, mask, segments=True) < 1e-4

    # each feature is needed: without it the logits move by far more than 1e-4
    for off in imported["features"]:
        assert all(getattr(cfg, k) != v for k, v in off.items()), off
        plain = models.build_model("gemma", dataclasses.replace(cfg, **off))
        plain.load_state_dict(imported["state"], strict=False)
        assert logit_diff(plain.eval(), theirs, ids, mask) > 1e-3, off


def test_training_loss_and_gradient_equal_transformers(imported):
    ours, theirs = imported["ours"], imported["theirs"]
    ids, mask = padded_batch(seed=4)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ours.zero_grad()
    theirs.zero_grad()
    # ours takes labels already shifted (the data pipeline's causal shift), transformers shifts
    # itself; nothing is predicted from a pad position (whose output is never used)
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).masked_fill(mask == 0, -100)
    labels = torch.cat([torch.full_like(ids[:, :1], -100), shifted[:, :-1]], dim=1)
    a = ours(ids, labels=shifted, position_ids=pos, segment_ids=torch.where(mask.bool(), 0, -1))
    b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    a.backward()
    b.backward()
    print(f"\n{imported['name']}: loss {a.item():.6f} vs {b.item():.6f}")
    assert abs(a.item() - b.item()) < 1e-5
    # the gradient through the fused, soft-capped head and the capped attention
    ga, gb = ours.wte.weight.grad, theirs.model.embed_tokens.weight.grad
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4), (ga - gb).abs().max()
    ga, gb = ours.blocks[0].attn.proj.weight.grad, theirs.model.layers[0].self_attn.o_proj.weight.grad
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4), (ga - gb).abs().max()
    ours.zero_grad()
    theirs.zero_grad()


def test_export_round_trip_is_bit_exact(imported, tmp_path):
    cfg, state, d = imported["cfg"], imported["state"], imported["dir"]
    hf.save_pretrained("gemma", cfg, {k: v.clone() for k, v in state.items()}, tmp_path, pad_id=0, bos_id=2, eos_id=1)
    original, exported = load_file(d / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(exported) == set(original) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    for k, t in exported.items():
        assert t.dtype == original[k].dtype and torch.equal(t, original[k]), k
    a, b = tf.AutoConfig.from_pretrained(d), tf.AutoConfig.from_pretrained(tmp_path)
    assert b.architectures == [imported["cls"]] and b.model_type == a.model_type
    assert b.rope_parameters == a.rope_parameters and b.layer_types == a.layer_types
    for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "head_dim", "num_key_value_heads", "hidden_activation", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(b, key) == getattr(a, key), key
    family, cfg2, state2, _ = hf.load_pretrained(tmp_path)
    assert family == "gemma" and cfg2 == cfg
    assert set(state2) == set(state) and all(torch.equal(state2[k], state[k]) for k in state)
    theirs2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    assert logit_diff(imported["ours"], theirs2, *padded_batch(seed=2)) < 1e-4


def test_greedy_generation_equals_transformers(imported):
    got = generate(imported["ours"], PROMPTS, max_new_tokens=NEW_TOKENS)
    want = hf_greedy(imported["theirs"], PROMPTS, NEW_TOKENS)
    assert got == want
    assert len({t for row in got for t in row}) > 12, "continuations should vary (a meaningful check)"
    # one prompt alone (no padding: the unmasked path, the window over row positions)
    assert generate(imported["ours"], PROMPTS[:1], max_new_tokens=NEW_TOKENS) == want[:1]


# --- refusals -----------------------------------------------------------------------------------

REFUSED = [
    ("gemma2-rope-scaling", dict(GEMMA_2_2B, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     ["Gemma 2 rope type 'linear'", "nearest supported: the default rope"]),
    ("gemma3-mixed-layers", dict(GEMMA_3_1B, layer_types=["sliding_attention", "full_attention", "full_attention",
                                                          "sliding_attention", "sliding_attention", "full_attention"]),
     ["layer_types", "k=2"]),
    ("gemma3-bidirectional", dict(GEMMA_3_1B, use_bidirectional_attention=True),
     ["use_bidirectional_attention=true", "use_bidirectional_attention=false"]),
    ("gemma3-multimodal", dict(GEMMA_3_1B, model_type="gemma3"), ["'gemma3'", "gemma3_text"]),
    ("gemma2-attention-bias", dict(GEMMA_2_2B, attention_bias=True), ["attention_bias=true", "attention_bias=false"]),
]


@pytest.mark.parametrize("config,words", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_import_refuses_what_has_no_native_counterpart(config, words, tmp_path, capsys):
    from llmstack.cli import main

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file({"model.norm.weight": torch.ones(4)}, str(d / "model.safetensors"))
    assert main(["import", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("overrides,words", [
    (dict(qk_norm=True, attn_softcap=50.0), "model.attn_softcap=50.0"),
    (dict(hf_model_type="gemma2", rope_local_theta=5e3), "model.rope_local_theta=5000.0"),
])
def test_export_refuses_native_configs_without_an_hf_counterpart(overrides, words, tmp_path):
    cfg = models.build_config("gemma", "gemma2-tiny", V, n_layer=2, d_model=32, d_head=8, max_seq_len=32,
                              **overrides)
    with pytest.raises(hf.ConversionError, match=words.replace(".", r"\.")):
        hf.save_pretrained("gemma", cfg, {}, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_fused_loss_with_softcap_equals_the_plain_one():
    """layers.linear_cross_entropy(softcap=c) = F.cross_entropy(c * tanh(x W^T / c)), value and gradients."""
    from llmstack.models.layers import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 16, generator=g) * 3).requires_grad_()
    w = (torch.randn(50, 16, generator=g)).requires_grad_()
    y = torch.randint(0, 50, (40,), generator=g)
    y[::7] = -100
    loss = linear_cross_entropy(x, w, y, softcap=5.0, label_smoothing=0.1, z_loss=1e-3)
    gx, gw = torch.autograd.grad(loss, (x, w))
    logits = 5.0 * torch.tanh(x @ w.t() / 5.0)
    ref = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1) + \
        1e-3 * torch.logsumexp(logits, -1)[y != -100].square().mean()
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gx, rx, atol=1e-6) and torch.allclose(gw, rw, atol=1e-6)
    assert not torch.allclose(loss, torch.nn.functional.cross_entropy(x @ w.t(), y, label_smoothing=0.1), atol=1e-2)


def test_bf16_embedding_scale_is_rounded_as_transformers(imported):
    """sqrt(d_model) is rounded to the activations' dtype before it multiplies (bf16: sqrt(96) =
    9.798 -> 9.8125): the first block's input is bit-equal to transformers' in bf16."""
    ours = models.build_model("gemma", imported["cfg"])
    ours.load_state_dict(imported["state"], strict=False)
    ours = ours.to(torch.bfloat16).eval()
    theirs = tf.AutoModelForCausalLM.from_pretrained(imported["dir"], dtype=torch.bfloat16).eval()
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen[name] = args[0] if args else kwargs["hidden_states"]  # (returns None: inputs unchanged)
        return hook
    ours.blocks[0].register_forward_pre_hook(keep("ours"), with_kwargs=True)
    theirs.model.layers[0].register_forward_pre_hook(keep("theirs"), with_kwargs=True)
    ids = torch.arange(3, 3 + 40)[None]
    with torch.no_grad():
        ours(ids)
        theirs(input_ids=ids)
    assert seen["ours"].dtype == torch.bfloat16 and torch.equal(seen["ours"], seen["theirs"])
    unrounded = (ours.wte(ids).float() * imported["cfg"].d_model ** 0.5).to(torch.bfloat16)
    d = imported["cfg"].d_model
    if torch.tensor(d ** 0.5, dtype=torch.bfloat16).item() != d ** 0.5:  # (sqrt(64) = 8 is exact in bf16)
        assert not torch.equal(unrounded, seen["ours"])  # the rounding is visible at this width


@pytest.mark.parametrize("window", [0, 8])
def test_soft_capped_attention_by_segments_flex_equals_gathering(window):
    """SegmentPlan with softcap: the FlexAttention path (score_mod, CUDA's; run eagerly here) equals
    the gathering path, and the cap changes the outputs."""
    from llmstack.models.layers import SegmentPlan, attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 32, 16, generator=g) * s for n, s in ((4, 3), (2, 3), (2, 1)))
    seg = torch.tensor([[0] * 10 + [1] * 22, [-1] * 5 + [0] * 27])
    kw = dict(window=window, pattern="sliding" if window else "full")
    real = seg >= 0
    gathered = attention(q, k, v, causal=True, mask=SegmentPlan(seg, use_flex=False, **kw), softcap=5.0)
    flex = attention(q, k, v, causal=True, mask=SegmentPlan(seg, use_flex=True, **kw), softcap=5.0)
    plain = attention(q, k, v, causal=True, mask=SegmentPlan(seg, use_flex=False, **kw))
    diff = (gathered - flex).abs().amax(dim=(1, 3))[real].max()
    assert diff < 1e-5 and (gathered - plain).abs().amax(dim=(1, 3))[real].max() > 0.1
