"""Open-weight models imported from their published configs: Llama 3.2 (llama3 rope scaling), a
Llama 2 long-context fine-tune (linear scaling), a Llama 2 run with dynamic NTK scaling, Qwen2.5
with YaRN (q/k/v biases without an output bias, tied head), Mistral 7B v0.1 (sliding-window attention), Qwen3 (per-head q/k RMSNorm, a
head_dim of its own), Phi-3-mini-4k (fused qkv_proj / gate_up_proj, a sliding window) and Pythia
(GPT-NeoX: parallel residual, partial rotary, per-head fused qkv, LayerNorm with biases, untied head).

Each config.json below is the published one with widths and layers cut down and every context
length (max_position_embeddings, the rope-scaling thresholds, the window) scaled alike, so that
a 96-token batch reaches well beyond them. Every architectural key is kept, in the published
(pre-transformers-5) spelling: `rope_scaling` and `rope_theta` at the top level (GPT-NeoX's
`rotary_pct` and `rotary_emb_base`). Random weights.

- import: our logits equal transformers' within 1e-4 (fp32) on a left-padded batch, and would not
  without each feature (scaling off, full attention, no q/k norm, sequential residual, whole-head
  rotary: each moves them by far more);
- export: HF -> native -> HF gives back every tensor bit for bit, the same architecture and rope
  parameters; native -> HF -> native the same config and state;
- greedy generation (KV cache, left-padded prompts) equals transformers' token for token;
- dynamic NTK rope follows each forward's length as transformers' does (from a fresh model: it
  also keeps the longest length of earlier calls, which ours does not);
- what has no native counterpart (Phi-3's longrope, mixed local/global Qwen2 layers, ...) is refused
  by `llmstack import` with exit 2 and one line naming the feature and the nearest supported one.
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
from llmstack.models.configs import GemmaConfig
from llmstack.models.layers import dynamic_rotary
from tests.models.hf_parity import V, hf_greedy, import_native, logit_diff, padded_batch, write_published

IDS = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, initializer_range=0.02, attention_dropout=0.0)

# meta-llama/Llama-3.2-1B: 16 -> 2 layers, width 2048 -> 128 (32 heads of 64 -> 4 of 32, GQA 4:1);
# contexts / 256: original 8192 -> 32, max 131072 -> 512. With theta 5e5 and head_dim 32 the
# wavelengths (6.3, 14.3, 32.4, ...) fall in all three llama3 bands: kept (< 32/4), smoothed, / 32.
LLAMA_3_2 = dict(IDS, model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=128,
                 intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                 hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                 rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 32, "rope_type": "llama3"},
                 tie_word_embeddings=True, attention_bias=False, mlp_bias=False, pretraining_tp=1)
# lmsys/vicuna-7b-v1.5-16k (Llama 2, position interpolation): 4096 -> 32 context, linear factor 4
LLAMA_2_LINEAR = dict(IDS, model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                      intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      rope_scaling={"factor": 4.0, "type": "linear"}, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, pretraining_tp=1)
# upstage/Llama-2-70b-instruct-v2 (Llama 2 run with dynamic NTK, factor 2, for 10k+ tokens): widths as
# above, context 4096 -> 48, so the 40-token prompts start within it and generation goes beyond it
# (a first pass within it also resets what transformers' rope kept from the earlier 96-token calls)
LLAMA_2_DYNAMIC = dict(LLAMA_2_LINEAR, max_position_embeddings=48, rope_scaling={"factor": 2.0, "type": "dynamic"})
# Qwen/Qwen2.5-0.5B-Instruct plus the YaRN block its model card adds for long inputs: 24 -> 2
# layers, 14 heads of 64 -> 7 of 16 (GQA 7:1), context 32768 -> 64 (max_position_embeddings left
# at the original, as there: the model runs to factor x 64 = 256).
QWEN_2_5 = dict(IDS, model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=112, intermediate_size=608,
                num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1, hidden_act="silu",
                max_position_embeddings=64, max_window_layers=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64, "type": "yarn"},
                sliding_window=64, use_sliding_window=False, tie_word_embeddings=True)
# mistralai/Mistral-7B-v0.1: 32 -> 2 layers, 32 heads of 128 -> 4 of 16 (GQA 4:1); window 4096 -> 16
MISTRAL_7B = dict(IDS, model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                  intermediate_size=224, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  sliding_window=16, tie_word_embeddings=False)

# Qwen/Qwen3-0.6B: 28 -> 2 layers; 16 heads of 128 over a width of 1024 (heads * head_dim = 2 x
# width) -> 4 heads of 32 over 64, GQA 2:1; context 40960 -> 160; no window, no biases, tied head.
QWEN_3 = dict(IDS, model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=192,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
              max_position_embeddings=160, max_window_layers=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
              rope_scaling=None, sliding_window=None, use_sliding_window=False, attention_bias=False,
              tie_word_embeddings=True)
# microsoft/Phi-3-mini-4k-instruct: 32 -> 2 layers, 32 heads of 96 -> 4 of 16 (no GQA); context 4096
# -> 128 and its window 2047 (= half the context - 1) -> 63; pad id 32000 -> 0 (inside the cut vocabulary)
PHI_3_MINI = dict(IDS, model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                  max_position_embeddings=128, original_max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_scaling=None, sliding_window=63, attention_bias=False, embd_pdrop=0.0,
                  resid_pdrop=0.0, pad_token_id=0, tie_word_embeddings=False)
# EleutherAI/pythia-160m: 12 -> 2 layers, 12 heads of 64 -> 4 of 32 (rotary_pct 0.25: 8 dims rotate);
# context 2048 -> 128; exact GELU, parallel residual, untied head (embed_out)
PYTHIA = dict(IDS, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=128,
              intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu",
              max_position_embeddings=128, layer_norm_eps=1e-5, rotary_emb_base=10000, rotary_pct=0.25,
              use_parallel_residual=True, tie_word_embeddings=False)

# (id, config.json, the threshold the batch goes beyond, the HF class of the export, the native
# options whose absence moves the logits: each switched off alone)
CASES = [
    ("llama-3.2-llama3", LLAMA_3_2, 32, "LlamaForCausalLM", [dict(rope_scaling=None)]),
    ("llama-2-linear", LLAMA_2_LINEAR, 32, "LlamaForCausalLM", [dict(rope_scaling=None)]),
    ("llama-2-dynamic", LLAMA_2_DYNAMIC, 48, "LlamaForCausalLM", [dict(rope_scaling=None)]),
    ("qwen2.5-yarn", QWEN_2_5, 64, "Qwen2ForCausalLM", [dict(rope_scaling=None)]),
    ("mistral-7b-sliding", MISTRAL_7B, 16, "MistralForCausalLM", [dict(attn_pattern="full", attn_window=0)]),
    ("qwen3-0.6b", QWEN_3, 0, "Qwen3ForCausalLM", [dict(qk_norm=False)]),
    ("phi-3-mini-4k", PHI_3_MINI, 63, "Phi3ForCausalLM", [dict(attn_pattern="full", attn_window=0)]),
    ("pythia-160m", PYTHIA, 0, "GPTNeoXForCausalLM", [dict(parallel_residual=False), dict(rotary_pct=1.0)]),
]
PROMPTS = [[5 + (7 * i) % 120 for i in range(40)], [9, 10, 11, 12, 13, 14, 15], list(range(20, 48)), [30, 31]]
NEW_TOKENS = 36  # the 40-token prompt continues to position 75


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def imported(request, tmp_path_factory):
    name, config, threshold, cls, features = request.param
    d = tmp_path_factory.mktemp(name) / "hf"
    theirs = write_published(d, config)
    cfg, state, ours = import_native(d)
    return dict(name=name, dir=d, theirs=theirs, cfg=cfg, state=state, ours=ours, threshold=threshold, cls=cls,
                features=features)


def test_import_logits_equal_transformers_beyond_the_threshold(imported):
    ours, theirs, cfg = imported["ours"], imported["theirs"], imported["cfg"]
    ids, mask = padded_batch()
    assert mask.sum(-1).min() > imported["threshold"] + 16  # real positions well beyond it
    diff = logit_diff(ours, theirs, ids, mask)
    print(f"\n{imported['name']}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4

    # each feature is needed to make them equal: without it the logits move by far more than 1e-4
    for off in imported["features"]:
        assert all(getattr(cfg, k) != v for k, v in off.items()), off  # (the import did turn it on)
        plain = models.build_model("gpt", dataclasses.replace(cfg, **off))
        plain.load_state_dict(imported["state"], strict=False)
        assert logit_diff(plain.eval(), theirs, ids, mask) > 1e-2, off


def test_import_reads_the_published_config(imported):
    cfg, name = imported["cfg"], imported["name"]
    if name.startswith("llama-3.2"):
        assert cfg.rope_scaling == {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}
        assert (cfg.rope_theta, cfg.max_seq_len, cfg.tie_embeddings) == (500000.0, 512, True)
    elif name.startswith("llama-2-dynamic"):  # (factor x the original context: 96 positions)
        assert cfg.rope_scaling == {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 48}
        assert cfg.max_seq_len == 96
    elif name.startswith("llama-2"):
        assert cfg.rope_scaling == {"type": "linear", "factor": 4.0}
    elif name.startswith("qwen2.5"):
        assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        assert (cfg.bias, cfg.qkv_bias, cfg.tie_embeddings) == (False, True, True)
        assert cfg.max_seq_len == 256 and cfg.attn_pattern == "full"  # the YaRN context; no window
        assert imported["ours"].blocks[0].attn.proj.bias is None
    elif name.startswith("mistral"):
        assert (cfg.attn_pattern, cfg.attn_window, cfg.rope_scaling) == ("sliding", 16, None)
    elif name.startswith("qwen3"):
        assert (cfg.qk_norm, cfg.d_head, cfg.head_dim, cfg.n_kv_head, cfg.tie_embeddings) == (True, 32, 32, 2, True)
        assert (cfg.bias, cfg.qkv_bias, cfg.attn_pattern, cfg.rope_theta) == (False, None, "full", 1e6)
        attn = imported["ours"].blocks[0].attn
        assert attn.qkv.weight.shape == (8 * 32, 64) and attn.proj.weight.shape == (64, 4 * 32)
        assert attn.q_norm.weight.shape == (32,)
    elif name.startswith("phi-3"):
        assert (cfg.attn_pattern, cfg.attn_window, cfg.hf_model_type, cfg.rope_scaling) == ("sliding", 63, "phi3", None)
        assert (cfg.bias, cfg.tie_embeddings, cfg.d_ff, cfg.max_seq_len) == (False, False, 176, 128)
    else:
        assert (cfg.parallel_residual, cfg.rotary_pct, cfg.rotary_dim, cfg.norm, cfg.mlp, cfg.act) == \
            (True, 0.25, 8, "layernorm", "gelu", "gelu")
        assert (cfg.bias, cfg.tie_embeddings, cfg.kv_heads) == (True, False, 4)


def test_export_round_trip_is_bit_exact(imported, tmp_path):
    cfg, state, d = imported["cfg"], imported["state"], imported["dir"]
    hf.save_pretrained("gpt", cfg, {k: v.clone() for k, v in state.items()}, tmp_path, pad_id=0, bos_id=1, eos_id=2)
    # HF -> native -> HF: every tensor back bit for bit
    original, exported = load_file(d / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(exported) == set(original) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    for k, t in exported.items():
        assert t.dtype == original[k].dtype and torch.equal(t, original[k]), k
    # ... under the same architecture, with the same rope parameters and window
    a, b = tf.AutoConfig.from_pretrained(d), tf.AutoConfig.from_pretrained(tmp_path)
    assert b.architectures == [imported["cls"]] and b.model_type == a.model_type
    legacy = {"type"}  # the pre-5 spelling of rope_type, which transformers keeps alongside
    assert b.rope_parameters == {k: v for k, v in a.rope_parameters.items() if k not in legacy}
    for key in ("sliding_window", "use_sliding_window", "tie_word_embeddings", "num_key_value_heads", "head_dim",
                "attention_bias", "mlp_bias", "use_parallel_residual", "layer_norm_eps", "rms_norm_eps", "hidden_act"):
        assert getattr(b, key, None) == getattr(a, key, None), key
    # native -> HF -> native: the same config and state
    family, cfg2, state2, _ = hf.load_pretrained(tmp_path)
    assert family == "gpt" and cfg2 == cfg
    assert set(state2) == set(state) and all(torch.equal(state2[k], state[k]) for k in state)
    # and transformers runs the export as it ran the original
    theirs2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = padded_batch(seed=2)
    assert logit_diff(imported["ours"], theirs2, ids, mask) < 1e-4


def test_greedy_generation_equals_transformers(imported):
    got = generate(imported["ours"], PROMPTS, max_new_tokens=NEW_TOKENS)
    want = hf_greedy(imported["theirs"], PROMPTS, NEW_TOKENS)
    assert got == want
    assert all(len(set(row[-20:])) > 3 for row in got), "continuations should vary (a meaningful check)"


def test_dynamic_rope_follows_each_forwards_length(tmp_path):
    """Dynamic NTK's frequencies come from each forward's longest position: batches of 40 (within
    the original 48), 64 and 96 positions each equal a fresh transformers model; the static decoding
    step (positions on the device, no host sync) gives transformers' tokens too. After a 96-token
    call transformers keeps that length's frequencies for a 64-token batch, ours do not: the
    frequencies of 64 and of 96 positions differ by far more than the tolerance."""
    d = tmp_path / "hf"
    write_published(d, LLAMA_2_DYNAMIC, seed=6)
    _, _, ours = import_native(d)
    ids, mask = padded_batch(seed=7)

    def theirs():
        return tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    for n in (40, 64, 96):
        assert logit_diff(ours, theirs(), ids[:, :n], mask[:, :n]) < 1e-4, n
    seen_96 = theirs()
    logit_diff(ours, seen_96, ids, mask)
    assert logit_diff(ours, seen_96, ids[:, :64], mask[:, :64]) > 1e-2
    got = generate(ours, PROMPTS, max_new_tokens=NEW_TOKENS, step="static")
    assert got == generate(ours, PROMPTS, max_new_tokens=NEW_TOKENS, step="eager")
    assert got == hf_greedy(theirs(), PROMPTS, NEW_TOKENS)

    # no host sync (what a CUDA graph needs): one fullgraph trace serves a decoding step's positions
    # within and beyond the original context, as the eager function does
    from torch._dynamo.testing import CompileCounter

    counter, cfg = CompileCounter(), ours.config
    torch._dynamo.reset()
    traced = torch.compile(dynamic_rotary, backend=counter, fullgraph=True, dynamic=False)
    inv_freq = ours._tables(torch.device("cpu"))["inv_freq"]
    for longest in (30, 47, 48, 70):
        pos = torch.tensor([[longest - 9], [longest]])  # (B, 1): one new token per row
        want = dynamic_rotary(pos, inv_freq, cfg.rope_theta, cfg.rope_scaling)
        got = traced(pos, inv_freq, cfg.rope_theta, cfg.rope_scaling)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), longest
    assert counter.frame_count == 1


@pytest.mark.parametrize("extra", [
    dict(beta_fast=16, beta_slow=2, mscale=1.0, mscale_all_dim=0.5, truncate=False),  # DeepSeek-V3 / gpt-oss keys
    dict(attention_factor=1.25),
], ids=["mscale-untruncated", "attention-factor"])
def test_yarn_options_match_transformers(extra, tmp_path):
    config = dict(QWEN_2_5, rope_scaling=dict(QWEN_2_5["rope_scaling"], **extra))
    theirs = write_published(tmp_path / "hf", config, seed=4)
    cfg, _, ours = import_native(tmp_path / "hf")
    assert all(cfg.rope_scaling[k] == v for k, v in extra.items())
    assert logit_diff(ours, theirs, *padded_batch()) < 1e-4


# --- refusals -----------------------------------------------------------------------------------

REFUSED = [
    ("longrope", dict(LLAMA_2_LINEAR, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                     "long_factor": [2.0] * 8, "original_max_position_embeddings": 32}),
     ["'longrope'", "nearest supported: yarn"]),
    # microsoft/Phi-3-mini-128k-instruct's rope (a factor per rotated pair), and "yarn", which
    # transformers reads as longrope for Phi-3
    ("phi3-longrope", dict(PHI_3_MINI, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                     "long_factor": [2.0] * 8}),
     ["Phi-3 rope type 'longrope'", "nearest supported: the default rope", "rope_scaling null"]),
    ("phi3-yarn-is-longrope", dict(PHI_3_MINI, rope_scaling={"type": "yarn", "factor": 4.0}),
     ["Phi-3 rope type 'yarn' (longrope in transformers)", "rope_scaling null"]),
    ("qwen3-attention-bias", dict(QWEN_3, attention_bias=True), ["Qwen3 attention_bias=true", "attention_bias=false"]),
    ("neox-no-attention-bias", dict(PYTHIA, attention_bias=False),
     ["GPT-NeoX attention_bias=false", "attention_bias=true"]),
    ("neox-odd-rotary", dict(PYTHIA, rotary_pct=0.1), ["rotary_pct=0.1", "even number"]),
    ("qwen2-head-dim", dict(QWEN_2_5, head_dim=32), ["head_dim=32", "head_dim=16"]),
    ("qwen2-mixed-window", dict(QWEN_2_5, use_sliding_window=True, max_window_layers=1),
     ["1 of 2 layers", "max_window_layers=0"]),
    ("partial-rotary", dict(MISTRAL_7B, partial_rotary_factor=0.5), ["partial_rotary_factor=0.5", "1.0"]),
]


@pytest.mark.parametrize("config,words", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_import_refuses_what_has_no_native_counterpart(config, words, tmp_path, capsys):
    from llmstack.cli import main

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file({"model.norm.weight": torch.ones(4)}, str(d / "model.safetensors"))  # refused before any tensor
    assert main(["import", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_mistral_window_defaults_as_transformers():
    """No sliding_window key: MistralConfig's 4096; null: full attention (Mistral 7B v0.2 on)."""
    cfg = {k: v for k, v in MISTRAL_7B.items() if k != "sliding_window"}
    _, arch, native = hf.native_config(cfg, lambda k: True, lambda a, b: False)
    assert arch == "mistral" and (native.attn_pattern, native.attn_window) == ("sliding", 4096)
    _, _, native = hf.native_config(dict(MISTRAL_7B, sliding_window=None), lambda k: True, lambda a, b: False)
    assert native.attn_pattern == "full"


@pytest.mark.parametrize("overrides,words", [
    (dict(attn_pattern="sliding", attn_window=8, bias=True), "model.bias=true"),
    (dict(bias=True, qkv_bias=False), "model.qkv_bias=false"),
])
def test_export_refuses_native_configs_without_an_hf_counterpart(overrides, words, tmp_path):
    cfg = models.build_config("gpt", "llama-tiny", V, n_layer=1, d_model=32, max_seq_len=32, **overrides)
    with pytest.raises(hf.ConversionError, match=words.replace(".", r"\.")):
        hf.save_pretrained("gpt", cfg, {}, tmp_path / "out")


@pytest.mark.parametrize("scaling,words", [
    ({"type": "dynamic", "factor": 2.0}, "needs original_max_position_embeddings"),
    ({"type": "longrope", "factor": 2.0}, "nearest supported: yarn"),
    ({"type": "llama3", "factor": 8.0}, "needs high_freq_factor"),
    ({"type": "linear", "factor": 2.0, "beta_fast": 4}, "unknown key(s) beta_fast"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, "must exceed"),
])
def test_rope_scaling_is_validated_with_clear_errors(scaling, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        models.build_config("gpt", "llama-tiny", V, rope_scaling=scaling)
    with pytest.raises(ValueError, match="pos=rotary"):
        models.build_config("gpt", "gpt2-tiny", V, rope_scaling={"type": "linear", "factor": 2.0})


def test_gemma_refuses_dynamic_rope():
    """Gemma's global layers rotate with fixed tables: dynamic NTK is refused there, naming the nearest."""
    with pytest.raises(ValueError, match="'dynamic' is not supported for Gemma; the nearest supported: linear"):
        GemmaConfig(vocab_size=V, rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32})


# --- variants of the new architectures ------------------------------------------------------------

VARIANTS = [
    # mistralai/Mistral-Nemo-Base-2407: a head_dim of its own (32 heads of 128 over a width of 5120)
    ("mistral-nemo-head-dim", dict(MISTRAL_7B, head_dim=32), dict(d_head=32)),
    # microsoft/Phi-4-mini-instruct's shape (model_type phi3): partial rotary 0.75, GQA 3:1, tied head
    # (without its longrope scaling, refused above)
    ("phi3-partial-gqa-tied", dict(PHI_3_MINI, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                   partial_rotary_factor=0.75, tie_word_embeddings=True, sliding_window=None),
     dict(rotary_pct=0.75, n_kv_head=2, tie_embeddings=True, attn_pattern="full")),
    # GPT-NeoX with sequential residual and a tied head (use_parallel_residual=false, as some NeoX fine-tunes)
    ("neox-sequential-tied", dict(PYTHIA, use_parallel_residual=False, tie_word_embeddings=True),
     dict(parallel_residual=False, tie_embeddings=True)),
    # partial rotary under YaRN: the ramp is computed over the rotated dims only (as transformers)
    ("pythia-yarn", dict(PYTHIA, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     dict(rotary_pct=0.25, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    # partial rotary under dynamic NTK: the base grows with the rotated dims' exponent (as transformers)
    ("pythia-dynamic", dict(PYTHIA, max_position_embeddings=48, rope_scaling={"type": "dynamic", "factor": 2.0}),
     dict(rotary_pct=0.25, max_seq_len=96,
          rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 48})),
]


@pytest.mark.parametrize("config,expect", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_variants_import_and_export_match_transformers(config, expect, tmp_path):
    theirs = write_published(tmp_path / "hf", config, seed=5)
    cfg, state, ours = import_native(tmp_path / "hf")
    assert all(getattr(cfg, k) == v for k, v in expect.items()), cfg
    ids, mask = padded_batch(seed=3)
    assert logit_diff(ours, theirs, ids, mask) < 1e-4
    hf.save_pretrained("gpt", cfg, {k: v.clone() for k, v in state.items()}, tmp_path / "out", pad_id=0, bos_id=1,
                       eos_id=2)
    _, cfg2, state2, _ = hf.load_pretrained(tmp_path / "out")
    assert cfg2 == cfg and set(state2) == set(state) and all(torch.equal(state2[k], state[k]) for k in state)
    theirs2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(theirs2) is type(theirs) and logit_diff(ours, theirs2, ids, mask) < 1e-4


def test_neox_fused_qkv_is_interleaved_head_by_head():
    """GPT-NeoX's query_key_value rows are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], ours [q_0 q_1 ... | k... | v...]."""
    cfg = models.build_config("gpt", "gpt2-tiny", V, n_layer=1, n_head=3, d_model=24, max_seq_len=16, pos="rotary",
                              rotary_pct=0.5, tie_embeddings=False)
    m = models.build_model("gpt", cfg)
    m.init_weights()
    state = dict(m.state_dict())
    ours = state["blocks.0.attn.qkv.weight"].clone()
    theirs = dict(hf.to_hf_tensors("gpt", cfg, state))["gpt_neox.layers.0.attention.query_key_value.weight"]
    hd, C = cfg.head_dim, cfg.d_model
    for h in range(cfg.n_head):
        for j in range(3):  # q, k, v
            assert torch.equal(theirs[(3 * h + j) * hd:(3 * h + j + 1) * hd], ours[j * C + h * hd:j * C + (h + 1) * hd])


@pytest.mark.parametrize("preset,overrides,words", [
    ("llama-tiny", dict(parallel_residual=True), "model.parallel_residual=true"),
    ("llama-tiny", dict(rotary_pct=0.5), "model.rotary_pct=0.5"),
    ("llama-tiny", dict(qk_norm=True, bias=True), "Qwen3 without biases"),
    ("gpt2-tiny", dict(qk_norm=True), "model.qk_norm=true"),
    ("gpt2-tiny", dict(pos="rotary", n_kv_head=2), "GPT-NeoX has no grouped-query attention"),
    ("gpt2-tiny", dict(pos="rotary", d_head=16), "model.d_head=16"),
])
def test_export_refuses_new_options_without_an_hf_counterpart(preset, overrides, words, tmp_path):
    cfg = models.build_config("gpt", preset, V, n_layer=1, n_head=4, d_model=32, max_seq_len=32, **overrides)
    with pytest.raises(hf.ConversionError, match=words.replace(".", r"\.")):
        hf.save_pretrained("gpt", cfg, {}, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
