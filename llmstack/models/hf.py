"""Native <-> Hugging Face transformers conversion for every family, both ways.

Targets: gpt2-style GPT <-> GPT2LMHeadModel, llama-style GPT <-> LlamaForCausalLM (grouped-query
attention; our rotary layout is HF's "rotate half", so q/k need no permutation), and its kin
Qwen2ForCausalLM (q/k/v biases without an output bias), MistralForCausalLM (sliding-window
attention), Qwen3ForCausalLM (per-head q/k RMSNorm, a head_dim of its own) and Phi3ForCausalLM
(the same network with fused qkv_proj and gate_up_proj tensors, which are ours as they are), each
with rotary scaling (linear, llama3, yarn); GPT-NeoX-style GPT (parallel residual, partial
rotary, LayerNorm, biases) <-> GPTNeoXForCausalLM (Pythia); BERT <-> BertForMaskedLM, T5 <->
T5ForConditionalGeneration.

One table per architecture (`_maps`) lists, for each native tensor, the HF tensors it corresponds
to: a plain copy, a transpose (GPT-2's Conv1D stores (in, out)), a split along rows (our fused
q|k|v and gate|up matmuls are several HF Linears), or a per-head interleave (GPT-NeoX fuses q|k|v
head by head). Export walks the table one tensor at a time
and writes safetensors shards as they fill, so at most one shard exists next to the native
weights; import reads tensor by tensor and refuses any HF tensor it does not consume, so a
mismatch fails loudly instead of producing gibberish. Transposes, slices and concatenations
copy values exactly: native -> HF -> native is bit-exact.

A native configuration with no HF equivalent raises ConversionError naming the blocking option.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from llmstack.models.bert import BertConfig
from llmstack.models.configs import ROPE_SCALING, ROPE_SCALING_NEAREST, GemmaConfig, check_rope_scaling
from llmstack.models.gpt import GPTConfig
from llmstack.models.t5 import T5Config


class ConversionError(ValueError):
    """A configuration or checkpoint that has no faithful counterpart on the other side."""


# our activation names <-> transformers' ACT2FN names (gelu_new and gelu_pytorch_tanh are both
# the tanh approximation; gelu is the exact erf form)
_TO_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "mish": "mish"}
_FROM_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu", "mish": "mish"}

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", "bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# one network (RMSNorm, gated MLP, rotary): they differ in biases, attention window, q/k norms and
# (Phi-3) in fused tensors
LLAMA_LIKE = ("llama", "qwen2", "mistral", "qwen3", "phi3")
_NAMES = {"llama": "LLaMA", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3", "phi3": "Phi-3",
          "gpt_neox": "GPT-NeoX", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
GEMMA = ("gemma2", "gemma3_text")  # the gemma family (models/gemma.py), text decoders only


@dataclass(frozen=True)
class Map:
    """native tensor <-> HF tensors: rows split into `hf` parts (sizes `rows`), optionally transposed."""

    native: str
    hf: tuple[str, ...]
    rows: tuple[int, ...] | None = None  # None: one part, all rows
    transpose: bool = False
    optional: bool = False  # import: skipped when the checkpoint lacks it (a later entry supplies the tensor)
    heads: int = 0  # > 0: HF rows are [q_h | k_h | v_h] head by head (GPT-NeoX), ours [q | k | v]


def _one(native: str, hf: str, transpose: bool = False) -> Map:
    return Map(native, (hf,), None, transpose)


def _linear(native: str, hf: str, bias: bool) -> list[Map]:
    return [_one(f"{native}.weight", f"{hf}.weight")] + ([_one(f"{native}.bias", f"{hf}.bias")] if bias else [])


def _split(native: str, hfs: list[str], rows: list[int], bias: bool) -> list[Map]:
    maps = [Map(f"{native}.weight", tuple(f"{h}.weight" for h in hfs), tuple(rows))]
    if bias:
        maps.append(Map(f"{native}.bias", tuple(f"{h}.bias" for h in hfs), tuple(rows)))
    return maps


def _norm(native: str, hf: str, bias: bool) -> list[Map]:
    return _linear(native, hf, bias)


# ---------------------------------------------------------------------------------------------
# Which HF architecture a native config maps to (or why none does)
# ---------------------------------------------------------------------------------------------


def target(family: str, cfg) -> str:
    """The HF architecture key ("gpt2", "llama", "bert", "t5") for this config, or ConversionError."""
    if family == "gpt":
        return _gpt_target(cfg)
    if family == "bert":
        if cfg.prenorm:
            raise ConversionError("model.prenorm=true has no Hugging Face equivalent: BertForMaskedLM is post-LN "
                                  "(set model.prenorm=false to train an exportable BERT)")
        _hf_act(cfg.activation, "model.activation")
        return "bert"
    if family == "t5":
        return "t5"
    if family == "gemma":
        return _gemma_target(cfg)
    raise ConversionError(f"model family {family!r} has no Hugging Face mapping")


def _hf_act(act: str, key: str) -> str:
    if act not in _TO_HF_ACT:
        raise ConversionError(f"{key}={act} has no Hugging Face activation")
    return _TO_HF_ACT[act]


def _gpt_target(c: GPTConfig) -> str:
    # options no HF causal LM we map to has: refused whatever the positions
    unmapped = [(c.pos == "alibi", "model.pos=alibi (GPT-2 and LLaMA have no ALiBi attention bias)"),
                (c.attn_pattern not in ("full", "sliding"),
                 f"model.attn_pattern={c.attn_pattern} (HF causal LMs attend to every earlier position, or to a "
                 "sliding window: model.attn_pattern=sliding with model.pos=rotary, as Mistral)"),
                (c.norm_position != "pre", f"model.norm_position={c.norm_position} (GPT-2 and LLaMA are pre-norm)"),
                (not c.final_norm, "model.final_norm=false (GPT-2 and LLaMA have a final norm)"),
                (c.layer_scale is not None, f"model.layer_scale={c.layer_scale} (no LayerScale in GPT-2 or LLaMA)")]
    bad = [msg for cond, msg in unmapped if cond]
    if bad:
        raise ConversionError("no Hugging Face architecture matches this GPT: " + "; ".join(bad))
    if c.pos in ("learned", "sinusoidal", "none"):
        # GPT-2 is the HF model with absolute positions added to the embeddings; a fixed sinusoidal
        # table (or none: zeros) is exported as its wpe weight, which gives the same logits
        blockers = [(c.norm != "layernorm", f"model.norm={c.norm} (needs layernorm)"),
                    (not c.bias, "model.bias=false (needs true: GPT-2's Conv1D and LayerNorm have biases)"),
                    (c.mlp != "gelu", f"model.mlp={c.mlp} (needs the plain, ungated MLP: model.mlp=gelu)"),
                    (c.kv_heads != c.n_head, f"model.n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)"),
                    (c.attn_pattern == "sliding", "model.attn_pattern=sliding (GPT-2 has no sliding window; "
                                                  "Mistral has, with model.pos=rotary)"),
                    (c.qkv_biased != c.bias, f"model.qkv_bias={c.qkv_bias} (GPT-2 biases every projection alike)"),
                    (c.parallel_residual, "model.parallel_residual=true (GPT-2 blocks are sequential; GPT-NeoX's "
                                          "are parallel, with model.pos=rotary)"),
                    (c.qk_norm, "model.qk_norm=true (GPT-2 has no q/k norms; Qwen3 has, with model.pos=rotary)"),
                    (c.n_head * c.head_dim != c.d_model,
                     f"model.d_head={c.d_head} (GPT-2's heads split d_model: model.d_head unset)")]
        name = "gpt2"
    else:
        name = _rotary_target(c)
        own_head_dim = name in ("llama", "mistral", "qwen3")  # their configs carry a head_dim of their own
        split = c.n_head * c.head_dim != c.d_model and not own_head_dim
        blockers = [(split, f"model.d_head={c.d_head} ({_NAMES[name]}'s heads split d_model: model.d_head unset; "
                            "LLaMA, Mistral and Qwen3 take a head_dim of their own)"),
                    (name not in ("gpt_neox", "qwen3") and c.qk_norm,
                     f"model.qk_norm=true ({_NAMES[name]} has no q/k norms; Qwen3 has)")]
        if name == "gpt_neox":
            blockers += [
                (not c.bias or not c.qkv_biased, f"model.bias={c.bias} model.qkv_bias={c.qkv_bias} (GPT-NeoX biases "
                                                 "every projection and norm: model.bias=true, qkv_bias unset)"),
                (c.kv_heads != c.n_head, f"model.n_kv_head={c.n_kv_head} (GPT-NeoX has no grouped-query attention)"),
                (c.attn_pattern == "sliding", "model.attn_pattern=sliding (GPT-NeoX has no sliding window; Mistral "
                                              "has, with model.norm=rmsnorm and a gated MLP)"),
                (c.qk_norm, "model.qk_norm=true (GPT-NeoX has no q/k norms; Qwen3 has, with model.norm=rmsnorm)")]
        else:
            neox = "GPT-NeoX's, with model.norm=layernorm model.mlp=gelu"
            blockers += [
                (c.norm != "rmsnorm", f"model.norm={c.norm} (needs rmsnorm; LayerNorm with a plain MLP is {neox})"),
                (c.mlp == "gelu", "model.mlp=gelu (needs a gated MLP: swiglu, geglu or reglu; a plain MLP with "
                                  "LayerNorm is GPT-NeoX's)"),
                (c.parallel_residual, f"model.parallel_residual=true (LLaMA-style blocks are sequential; parallel "
                                      f"ones are {neox})"),
                (c.rotary_pct != 1.0 and name != "phi3",
                 f"model.rotary_pct={c.rotary_pct} ({_NAMES[name]} rotates whole heads: model.rotary_pct=1.0; "
                 f"partial rotary is {neox})"),
                (name == "mistral" and c.bias, "model.bias=true (Mistral has no biases; Qwen2, with a sliding "
                                               "window too, has q/k/v biases: model.bias=false model.qkv_bias=true)"),
                (name == "llama" and c.bias and not c.qkv_biased,
                 "model.qkv_bias=false with model.bias=true (LLaMA's attention_bias covers q, k, v and o alike; "
                 "q/k/v biases alone are Qwen2's: model.bias=false model.qkv_bias=true)"),
                (name in ("qwen3", "phi3") and (c.bias or c.qkv_biased),
                 f"model.bias={c.bias} model.qkv_bias={c.qkv_bias} ({_NAMES[name]} without biases is what is "
                 "supported: model.bias=false, qkv_bias unset)"),
                (name == "phi3" and c.rope_scaling is not None,
                 f"model.rope_scaling type {(c.rope_scaling or {}).get('type')} (Phi-3's only scaled rope is "
                 "longrope, which is not supported: rope_scaling unset)")]
    arch = ARCHITECTURES[name]
    bad = [msg for cond, msg in blockers if cond]
    if bad:
        raise ConversionError(f"no Hugging Face architecture matches this GPT: with model.pos={c.pos} the target is "
                              f"{arch}, which this config does not fit: " + "; ".join(bad))
    _hf_act(c.act, "model.activation")
    return name


def _rotary_target(c: GPTConfig) -> str:
    """The HF architecture a rotary GPT is meant for (`_gpt_target` then checks that it fits)."""
    if c.hf_model_type is not None:  # the layout it was imported from (Phi-3's fused tensors)
        return c.hf_model_type
    if c.norm == "layernorm" and c.mlp == "gelu":
        return "gpt_neox"
    if c.qk_norm:
        return "qwen3"
    if c.qkv_biased and not c.bias:  # Qwen2: q/k/v biases alone (with a sliding window too)
        return "qwen2"
    return "mistral" if c.attn_pattern == "sliding" else "llama"


def _gemma_target(c: GemmaConfig) -> str:
    """gemma2 or gemma3_text (the one imported from, else: Gemma 3 when a Gemma 3 feature is on)."""
    g3 = c.qk_norm or c.rope_local_theta not in (None, c.rope_theta) or c.rope_scaling is not None
    name = c.hf_model_type or ("gemma3_text" if g3 else "gemma2")
    if name == "gemma2":
        blockers = [(c.qk_norm, "model.qk_norm=true (Gemma 2 has no q/k norms; Gemma 3 has, without attention "
                                "soft-capping)"),
                    (c.rope_local_theta not in (None, c.rope_theta),
                     f"model.rope_local_theta={c.rope_local_theta} (Gemma 2 has one rotary base for all layers: "
                     "unset; local and global bases are Gemma 3's)"),
                    (c.rope_scaling is not None, "model.rope_scaling (Gemma 2 has no rope scaling: unset; Gemma 3 "
                                                 "scales its global layers' rope)")]
    else:
        blockers = [(c.attn_softcap is not None,
                     f"model.attn_softcap={c.attn_softcap} (transformers' Gemma 3 attention does not soft-cap its "
                     "logits: unset; attention soft-capping is Gemma 2's, without q/k norms)")]
    bad = [msg for cond, msg in blockers if cond]
    if bad:
        raise ConversionError(f"no Hugging Face architecture matches this Gemma: the target is {ARCHITECTURES[name]}, "
                              "which this config does not fit: " + "; ".join(bad))
    _hf_act(c.act, "model.activation")
    return name


# ---------------------------------------------------------------------------------------------
# Parameter tables
# ---------------------------------------------------------------------------------------------


def _maps(arch: str, cfg) -> list[Map]:
    return {"gpt2": _gpt2_maps, **{a: _llama_maps for a in LLAMA_LIKE if a != "phi3"}, "phi3": _phi3_maps,
            "gpt_neox": _neox_maps, "bert": _bert_maps, "t5": _t5_maps,
            **{a: _gemma_maps for a in GEMMA}}[arch](cfg)


def _gpt2_maps(c: GPTConfig) -> list[Map]:
    t = "transformer"
    maps = [_one("wte.weight", f"{t}.wte.weight"), _one("wpe.weight", f"{t}.wpe.weight")]
    for i in range(c.n_layer):
        n, h = f"blocks.{i}", f"{t}.h.{i}"
        maps += _norm(f"{n}.ln_1", f"{h}.ln_1", True) + _norm(f"{n}.ln_2", f"{h}.ln_2", True)
        for native, hf in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                           ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            # Conv1D keeps weights as (in, out): the transpose of nn.Linear's (out, in)
            maps += [_one(f"{n}.{native}.weight", f"{h}.{hf}.weight", transpose=True),
                     _one(f"{n}.{native}.bias", f"{h}.{hf}.bias")]
    maps += _norm("ln_f", f"{t}.ln_f", True)
    if not c.tie_embeddings:
        maps.append(_one("lm_head.weight", "lm_head.weight"))
    return maps


def _llama_maps(c: GPTConfig) -> list[Map]:
    maps = [_one("wte.weight", "model.embed_tokens.weight")]
    q, kv, ff = c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.ff_dim
    for i in range(c.n_layer):
        n, h = f"blocks.{i}", f"model.layers.{i}"
        maps += _norm(f"{n}.ln_1", f"{h}.input_layernorm", False)
        maps += _split(f"{n}.attn.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"], [q, kv, kv], c.qkv_biased)
        if c.qk_norm:  # Qwen3
            maps += _norm(f"{n}.attn.q_norm", f"{h}.self_attn.q_norm", False)
            maps += _norm(f"{n}.attn.k_norm", f"{h}.self_attn.k_norm", False)
        maps += _linear(f"{n}.attn.proj", f"{h}.self_attn.o_proj", c.bias)
        maps += _norm(f"{n}.ln_2", f"{h}.post_attention_layernorm", False)
        maps += _split(f"{n}.mlp.fc", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], [ff, ff], c.bias)
        maps += _linear(f"{n}.mlp.proj", f"{h}.mlp.down_proj", c.bias)
    maps += _norm("ln_f", "model.norm", False)
    if not c.tie_embeddings:
        maps.append(_one("lm_head.weight", "lm_head.weight"))
    return maps


def _phi3_maps(c: GPTConfig) -> list[Map]:
    """Phi-3: LLaMA's tensors with q|k|v fused as qkv_proj and gate|up as gate_up_proj, in our order."""
    maps = [_one("wte.weight", "model.embed_tokens.weight")]
    for i in range(c.n_layer):
        n, h = f"blocks.{i}", f"model.layers.{i}"
        maps += _norm(f"{n}.ln_1", f"{h}.input_layernorm", False)
        maps += _linear(f"{n}.attn.qkv", f"{h}.self_attn.qkv_proj", False)  # [q | k | v]
        maps += _linear(f"{n}.attn.proj", f"{h}.self_attn.o_proj", False)
        maps += _norm(f"{n}.ln_2", f"{h}.post_attention_layernorm", False)
        maps += _linear(f"{n}.mlp.fc", f"{h}.mlp.gate_up_proj", False)  # [gate | up]: chunk(2) in Phi3MLP
        maps += _linear(f"{n}.mlp.proj", f"{h}.mlp.down_proj", False)
    maps += _norm("ln_f", "model.norm", False)
    if not c.tie_embeddings:
        maps.append(_one("lm_head.weight", "lm_head.weight"))
    return maps


def _neox_maps(c: GPTConfig) -> list[Map]:
    """GPT-NeoX / Pythia. Its query_key_value is fused head by head ([q_h | k_h | v_h] for each
    head h, split by `view(..., nh, 3 * hd).chunk(3)`), ours part by part: a per-head interleave.
    The output embedding is written under its published name, embed_out (transformers 5 reads it)."""
    maps = [_one("wte.weight", "gpt_neox.embed_in.weight")]
    for i in range(c.n_layer):
        n, h = f"blocks.{i}", f"gpt_neox.layers.{i}"
        maps += _norm(f"{n}.ln_1", f"{h}.input_layernorm", True)
        maps += [Map(f"{n}.attn.qkv.{p}", (f"{h}.attention.query_key_value.{p}",), heads=c.n_head)
                 for p in ("weight", "bias")]
        maps += _linear(f"{n}.attn.proj", f"{h}.attention.dense", True)
        maps += _norm(f"{n}.ln_2", f"{h}.post_attention_layernorm", True)
        maps += _linear(f"{n}.mlp.fc", f"{h}.mlp.dense_h_to_4h", True)
        maps += _linear(f"{n}.mlp.proj", f"{h}.mlp.dense_4h_to_h", True)
    maps += _norm("ln_f", "gpt_neox.final_layer_norm", True)
    if not c.tie_embeddings:
        maps.append(_one("lm_head.weight", "embed_out.weight"))
    return maps


def _gemma_maps(c: GemmaConfig) -> list[Map]:
    """Gemma 2 / 3: LLaMA's attention and gated MLP tensors, four norms per block (all stored as
    the w of a (1 + w) gain, copied as they are), Gemma 3's q/k norms."""
    maps = [_one("wte.weight", "model.embed_tokens.weight")]
    q, kv, ff = c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.ff_dim
    for i in range(c.n_layer):
        n, h = f"blocks.{i}", f"model.layers.{i}"
        maps += _norm(f"{n}.ln_1", f"{h}.input_layernorm", False)
        maps += _split(f"{n}.attn.qkv", [f"{h}.self_attn.{p}_proj" for p in "qkv"], [q, kv, kv], False)
        if c.qk_norm:
            maps += _norm(f"{n}.attn.q_norm", f"{h}.self_attn.q_norm", False)
            maps += _norm(f"{n}.attn.k_norm", f"{h}.self_attn.k_norm", False)
        maps += _linear(f"{n}.attn.proj", f"{h}.self_attn.o_proj", False)
        maps += _norm(f"{n}.post_attn_norm", f"{h}.post_attention_layernorm", False)
        maps += _norm(f"{n}.ln_2", f"{h}.pre_feedforward_layernorm", False)
        maps += _split(f"{n}.mlp.fc", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], [ff, ff], False)
        maps += _linear(f"{n}.mlp.proj", f"{h}.mlp.down_proj", False)
        maps += _norm(f"{n}.post_mlp_norm", f"{h}.post_feedforward_layernorm", False)
    maps += _norm("ln_f", "model.norm", False)
    if not c.tie_embeddings:
        maps.append(_one("lm_head.weight", "lm_head.weight"))
    return maps


def _bert_maps(c: BertConfig) -> list[Map]:
    e = "bert.embeddings"
    maps = [_one("wte.weight", f"{e}.word_embeddings.weight"), _one("wpe.weight", f"{e}.position_embeddings.weight"),
            _one("wtt.weight", f"{e}.token_type_embeddings.weight")] + _norm("ln_emb", f"{e}.LayerNorm", True)
    for i in range(c.n_layer):
        n, h = f"blocks.{i}", f"bert.encoder.layer.{i}"
        maps += _split(f"{n}.attn.qkv", [f"{h}.attention.self.{p}" for p in ("query", "key", "value")],
                       [c.d_model] * 3, True)
        maps += _linear(f"{n}.attn.proj", f"{h}.attention.output.dense", True)
        maps += _norm(f"{n}.ln_1", f"{h}.attention.output.LayerNorm", True)
        maps += _linear(f"{n}.mlp.fc", f"{h}.intermediate.dense", True)
        maps += _linear(f"{n}.mlp.proj", f"{h}.output.dense", True)
        maps += _norm(f"{n}.ln_2", f"{h}.output.LayerNorm", True)
    maps += _linear("head_dense", "cls.predictions.transform.dense", True)
    maps += _norm("head_ln", "cls.predictions.transform.LayerNorm", True)
    # The output bias lives twice in BertForMaskedLM: `cls.predictions.bias`, and the decoder's own
    # bias, which is what the forward uses (transformers ties the two only with tied embeddings).
    maps += [Map("lm_head.bias", ("cls.predictions.decoder.bias",), optional=True),
             _one("lm_head.bias", "cls.predictions.bias")]
    if not c.tie_embeddings:
        maps.append(_one("lm_head.weight", "cls.predictions.decoder.weight"))
    return maps


def _t5_maps(c: T5Config) -> list[Map]:
    inner, ff = c.inner_dim, c.ff_dim
    maps = [_one("embed.weight", "shared.weight")]

    def ffn(native: str, hf: str) -> list[Map]:
        if c.ffn == "gated-gelu":
            fc = _split(f"{native}.fc", [f"{hf}.wi_0", f"{hf}.wi_1"], [ff, ff], False)
        else:
            fc = _linear(f"{native}.fc", f"{hf}.wi", False)
        return fc + _linear(f"{native}.proj", f"{hf}.wo", False)

    for stack, n_layers in (("encoder", c.n_layer), ("decoder", c.decoder_layers)):
        maps.append(_one(f"{stack}.rel_bias.weight",
                         f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", transpose=False))
        for i in range(n_layers):
            n, h = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            sa = "attn" if stack == "encoder" else "self_attn"
            maps += _norm(f"{n}.ln_1", f"{h}.0.layer_norm", False)
            maps += _split(f"{n}.{sa}.qkv", [f"{h}.0.SelfAttention.{p}" for p in "qkv"], [inner] * 3, False)
            maps += _linear(f"{n}.{sa}.proj", f"{h}.0.SelfAttention.o", False)
            if stack == "decoder":
                maps += _norm(f"{n}.ln_2", f"{h}.1.layer_norm", False)
                maps += _linear(f"{n}.cross_attn.q", f"{h}.1.EncDecAttention.q", False)
                maps += _split(f"{n}.cross_attn.kv", [f"{h}.1.EncDecAttention.{p}" for p in "kv"], [inner] * 2, False)
                maps += _linear(f"{n}.cross_attn.proj", f"{h}.1.EncDecAttention.o", False)
                maps += _norm(f"{n}.ln_3", f"{h}.2.layer_norm", False) + ffn(f"{n}.mlp", f"{h}.2.DenseReluDense")
            else:
                maps += _norm(f"{n}.ln_2", f"{h}.1.layer_norm", False) + ffn(f"{n}.mlp", f"{h}.1.DenseReluDense")
        maps += _norm(f"{stack}.ln_f", f"{stack}.final_layer_norm", False)
    # Written whenever the decoder output is not rescaled (also when tied): transformers 5 decides
    # the rescale from tie_word_embeddings and ties only when the two tensors are equal.
    if not c.tie_embeddings or not c.rescale:
        maps.append(Map("lm_head.weight" if not c.tie_embeddings else "embed.weight", ("lm_head.weight",)))
    return maps


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def hf_config(family: str, cfg, *, pad_id: int | None, bos_id: int | None, eos_id: int | None):
    """The transformers config object for a native config (ConversionError if there is none)."""
    import transformers as tf

    arch = target(family, cfg)
    ids = dict(pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    common = dict(architectures=[ARCHITECTURES[arch]], tie_word_embeddings=cfg.tie_embeddings, **ids)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.ff_dim,
                             activation_function=_hf_act(cfg.act, "model.activation"), resid_pdrop=cfg.dropout,
                             embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout, layer_norm_epsilon=cfg.norm_eps,
                             initializer_range=cfg.init_std, **common)
    if arch in LLAMA_LIKE:
        act = "gelu_pytorch_tanh" if cfg.act == "gelu_tanh" else _hf_act(cfg.act, "model.activation")
        rope = _hf_rope(cfg, partial=arch == "phi3")
        shared = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
                      num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                      hidden_act=act, max_position_embeddings=_hf_positions(cfg), rms_norm_eps=cfg.norm_eps,
                      rope_parameters=rope, attention_dropout=cfg.attn_dropout, initializer_range=cfg.init_std,
                      **common)
        window = cfg.attn_window if cfg.attn_pattern == "sliding" else None
        if arch == "llama":
            return tf.LlamaConfig(head_dim=cfg.head_dim, attention_bias=cfg.bias, mlp_bias=cfg.bias, **shared)
        if arch == "mistral":  # (the same "keys i - j < w" window as ours)
            return tf.MistralConfig(head_dim=cfg.head_dim, sliding_window=window, **shared)
        if arch == "phi3":  # (Mistral's window; original_max_position_embeddings matters to longrope only;
            # attention_bias: not read by transformers, written as Phi-3's published configs do)
            return tf.Phi3Config(sliding_window=window, original_max_position_embeddings=cfg.max_seq_len,
                                 resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attention_bias=False, **shared)
        # Qwen2 / Qwen3: a window on the layers from max_window_layers on; ours is on every layer or none
        kind = "sliding_attention" if window else "full_attention"
        qwen = dict(use_sliding_window=window is not None, sliding_window=window,
                    max_window_layers=0 if window else cfg.n_layer, layer_types=[kind] * cfg.n_layer, **shared)
        if arch == "qwen3":
            return tf.Qwen3Config(head_dim=cfg.head_dim, attention_bias=False, **qwen)
        return tf.Qwen2Config(**qwen)
    if arch in GEMMA:
        return _gemma_hf_config(arch, cfg, common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                                num_attention_heads=cfg.n_head, intermediate_size=cfg.ff_dim,
                                hidden_act=_hf_act(cfg.act, "model.activation"),
                                max_position_embeddings=_hf_positions(cfg), layer_norm_eps=cfg.norm_eps,
                                use_parallel_residual=cfg.parallel_residual, attention_bias=True,
                                rope_parameters=_hf_rope(cfg, partial=True),
                                attention_dropout=cfg.attn_dropout, hidden_dropout=cfg.dropout,
                                initializer_range=cfg.init_std, **common)
    if arch == "bert":
        return tf.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                             num_attention_heads=cfg.n_head, intermediate_size=cfg.ff_dim,
                             hidden_act=_hf_act(cfg.activation, "model.activation"), hidden_dropout_prob=cfg.dropout,
                             attention_probs_dropout_prob=cfg.attn_dropout, max_position_embeddings=cfg.max_seq_len,
                             type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.init_std,
                             layer_norm_eps=cfg.norm_eps, **common)
    # T5: transformers 5 reads tie_word_embeddings as "rescale the decoder output by d_model**-0.5"
    # (scale_decoder_outputs) and ties the LM head to the embedding when its tensor is absent or equal.
    common.update(tie_word_embeddings=cfg.rescale, pad_token_id=cfg.pad_id)
    return tf.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.ff_dim,
                       num_layers=cfg.n_layer, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_head,
                       relative_attention_num_buckets=cfg.rel_buckets,
                       relative_attention_max_distance=cfg.rel_max_distance, dropout_rate=cfg.dropout,
                       layer_norm_epsilon=cfg.norm_eps, initializer_factor=cfg.init_factor, feed_forward_proj=cfg.ffn,
                       decoder_start_token_id=cfg.pad_id, **common)


def _hf_rope(cfg: GPTConfig, partial: bool) -> dict:
    """transformers 5's rope_parameters of a rotary GPT (with partial_rotary_factor where the
    architecture reads it)."""
    scaling = dict(cfg.rope_scaling or {})
    if scaling.get("type") == "dynamic":  # (transformers reads it from max_position_embeddings: _hf_positions)
        del scaling["original_max_position_embeddings"]
    rope = {"rope_type": scaling.pop("type", "default"), "rope_theta": float(cfg.rope_theta), **scaling}
    return {**rope, "partial_rotary_factor": cfg.rotary_pct} if partial else rope


def _hf_positions(cfg: GPTConfig) -> int:
    """max_position_embeddings of a rotary GPT's export: max_seq_len, or under dynamic NTK the
    original context (transformers' threshold for it)."""
    scaling = cfg.rope_scaling or {}
    return scaling["original_max_position_embeddings"] if scaling.get("type") == "dynamic" else cfg.max_seq_len


def native_config(hf: dict, has: Callable[[str], bool], same: Callable[[str, str], bool]) -> tuple[str, str, object]:
    """(family, arch, native config) from a config.json dict.

    `has(key)` says whether the checkpoint holds a tensor and `same(a, b)` whether two tensors are
    equal; they decide whether the output embedding is tied (absent, or equal to the input one).
    """
    mt = hf.get("model_type")

    def act(name: str, key: str) -> str:
        if name not in _FROM_HF_ACT:
            raise ConversionError(f"{key}={name!r} is not supported (supported: {', '.join(_FROM_HF_ACT)})")
        return _FROM_HF_ACT[name]

    def tied(out_key: str, emb_key: str) -> bool:
        return not has(out_key) or same(out_key, emb_key)

    if mt == "gpt2":
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if hf.get(key, ok) != ok:
                raise ConversionError(f"GPT-2 config {key}={hf.get(key)} is not supported")
        n_embd = hf.get("n_embd", 768)
        cfg = GPTConfig(vocab_size=hf["vocab_size"], n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
                        d_model=n_embd, d_ff=hf.get("n_inner") or 4 * n_embd, max_seq_len=hf.get("n_positions", 1024),
                        pos="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                        activation=act(hf.get("activation_function", "gelu_new"), "activation_function"), bias=True,
                        tie_embeddings=tied("lm_head.weight", "transformer.wte.weight"),
                        dropout=hf.get("resid_pdrop", 0.0), attn_dropout=hf.get("attn_pdrop", 0.0),
                        init_std=hf.get("initializer_range", 0.02))
        return "gpt", "gpt2", cfg
    if mt in LLAMA_LIKE:
        return "gpt", mt, _llama_like_config(mt, hf, act, tied("lm_head.weight", "model.embed_tokens.weight"))
    if mt == "gpt_neox":
        return "gpt", mt, _neox_config(hf, act, tied("embed_out.weight", "gpt_neox.embed_in.weight"))
    if mt in GEMMA:
        return "gemma", mt, _gemma_config(mt, hf, act, tied("lm_head.weight", "model.embed_tokens.weight"))
    if mt == "gemma3":
        raise ConversionError("model_type 'gemma3' (Gemma3ForConditionalGeneration, text and vision) is not "
                              "supported; the nearest supported: its text decoder as model_type gemma3_text "
                              "(Gemma3ForCausalLM, as gemma-3-1b)")
    if mt == "bert":
        if hf.get("is_decoder") or hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("only encoder BERT with absolute positions is supported")
        if not has("cls.predictions.transform.dense.weight"):
            raise ConversionError("this BERT checkpoint has no masked-LM head (cls.predictions.*): "
                                  "import a BertForMaskedLM / BertForPreTraining checkpoint")
        cfg = BertConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                         n_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                         max_seq_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
                         norm_eps=hf.get("layer_norm_eps", 1e-12), activation=act(hf.get("hidden_act", "gelu"), "hidden_act"),
                         tie_embeddings=tied("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
                         dropout=hf.get("hidden_dropout_prob", 0.0), attn_dropout=hf.get("attention_probs_dropout_prob", 0.0),
                         init_std=hf.get("initializer_range", 0.02), pad_id=hf.get("pad_token_id") or 0)
        return "bert", "bert", cfg
    if mt == "t5":
        ffn = hf.get("feed_forward_proj", "relu")
        if ffn not in ("gated-gelu", "relu"):
            raise ConversionError(f"T5 feed_forward_proj={ffn!r} is not supported (gated-gelu or relu)")
        cfg = T5Config(vocab_size=hf["vocab_size"], n_layer=hf["num_layers"],
                       n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
                       d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"], ffn=ffn,
                       rel_buckets=hf.get("relative_attention_num_buckets", 32),
                       rel_max_distance=hf.get("relative_attention_max_distance", 128),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=tied("lm_head.weight", "shared.weight"),
                       rescale_output=_t5_rescale(hf), dropout=hf.get("dropout_rate", 0.0),
                       init_factor=hf.get("initializer_factor", 1.0),
                       pad_id=hf.get("decoder_start_token_id", hf.get("pad_token_id")) or 0)
        return "t5", "t5", cfg
    raise ConversionError(f"model_type {mt!r} is not supported (supported: gpt2, {', '.join(LLAMA_LIKE)}, gpt_neox, "
                          f"{', '.join(GEMMA)}, bert, t5)")


def _llama_like_config(mt: str, hf: dict, act: Callable[[str, str], str], tied: bool) -> GPTConfig:
    """The GPT of a llama / qwen2 / mistral / qwen3 / phi3 config.json; a key it lacks takes the default
    of transformers' config class (e.g. Mistral's sliding_window=4096, Qwen3's head_dim=128), as
    from_pretrained does."""
    import transformers as tf

    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config,
           "phi3": tf.Phi3Config}[mt]
    name = _NAMES[mt]

    def get(key: str):
        return hf.get(key, getattr(cls, key, None))

    heads, d, n_layer = get("num_attention_heads"), get("hidden_size"), get("num_hidden_layers")
    head_dim = get("head_dim")
    split = head_dim is None or (d % heads == 0 and head_dim == d // heads)  # heads split d_model
    if not split and mt in ("qwen2", "phi3"):
        raise ConversionError(f"{name} head_dim={head_dim} != hidden_size/num_attention_heads is not supported "
                              f"(the nearest supported: head_dim={d // heads}; LLaMA, Mistral and Qwen3 take a "
                              "head_dim of their own)")
    theta, scaling, partial = _rope_from_hf(hf, mt, get("max_position_embeddings"))
    bias, qkv_bias, window = False, None, None
    if mt == "llama":
        if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
            raise ConversionError("LLaMA attention_bias != mlp_bias is not supported (one `bias` option here)")
        bias = bool(hf.get("attention_bias"))
    elif mt in ("qwen2", "qwen3"):
        if mt == "qwen3" and get("attention_bias"):
            raise ConversionError("Qwen3 attention_bias=true is not supported (biases on q, k, v and o but not on the "
                                  "MLP: no option here); the nearest supported: attention_bias=false (as Qwen3's "
                                  "published models), or Qwen2's q/k/v-only biases")
        qkv_bias, window = (True if mt == "qwen2" else None), _qwen2_window(hf, get, n_layer, name)
    else:  # Mistral, Phi-3
        window = get("sliding_window")
    if window is not None and not (isinstance(window, int) and window >= 1):
        raise ConversionError(f"{name} sliding_window={window!r} is not supported (a whole number >= 1, or null)")
    try:
        return GPTConfig(vocab_size=get("vocab_size"), n_layer=n_layer, n_head=heads,
                         n_kv_head=get("num_key_value_heads") or heads, d_model=d, d_ff=get("intermediate_size"),
                         d_head=None if split else head_dim,
                         max_seq_len=_context(get("max_position_embeddings"), scaling), pos="rotary",
                         attn_pattern="full" if window is None else "sliding", attn_window=window or 0,
                         norm="rmsnorm", norm_eps=get("rms_norm_eps"), mlp="swiglu",
                         activation=act(get("hidden_act"), "hidden_act"), bias=bias, qkv_bias=qkv_bias,
                         qk_norm=mt == "qwen3", tie_embeddings=tied, dropout=hf.get("resid_pdrop", 0.0) or 0.0,
                         attn_dropout=hf.get("attention_dropout", 0.0), init_std=hf.get("initializer_range", 0.02),
                         rope_theta=theta, rope_scaling=scaling, rotary_pct=partial,
                         hf_model_type="phi3" if mt == "phi3" else None)
    except ValueError as e:
        raise ConversionError(f"{name}: {e}") from None


def _neox_config(hf: dict, act: Callable[[str, str], str], tied: bool) -> GPTConfig:
    """The GPT of a gpt_neox config.json (Pythia, GPT-NeoX-20B): LayerNorm with biases, a plain MLP,
    partial rotary (rotary_pct, default 0.25), parallel residual (use_parallel_residual, default
    true); a key it lacks takes GPTNeoXConfig's default."""
    import transformers as tf

    def get(key: str):
        return hf.get(key, getattr(tf.GPTNeoXConfig, key, None))

    if not get("attention_bias"):
        raise ConversionError("GPT-NeoX attention_bias=false is not supported (its MLP and norms keep their biases: "
                              "one `bias` option here); the nearest supported: attention_bias=true, as Pythia")
    theta, scaling, partial = _rope_from_hf(hf, "gpt_neox", get("max_position_embeddings"))
    try:
        return GPTConfig(vocab_size=get("vocab_size"), n_layer=get("num_hidden_layers"),
                         n_head=get("num_attention_heads"), d_model=get("hidden_size"), d_ff=get("intermediate_size"),
                         max_seq_len=_context(get("max_position_embeddings"), scaling), pos="rotary", norm="layernorm",
                         norm_eps=get("layer_norm_eps"), mlp="gelu", activation=act(get("hidden_act"), "hidden_act"),
                         bias=True, tie_embeddings=tied, dropout=get("hidden_dropout") or 0.0,
                         attn_dropout=get("attention_dropout") or 0.0, init_std=get("initializer_range"),
                         rope_theta=theta, rope_scaling=scaling, rotary_pct=partial,
                         parallel_residual=bool(get("use_parallel_residual")))
    except ValueError as e:
        raise ConversionError(f"GPT-NeoX: {e}") from None


def _gemma_layer_types(c: GemmaConfig) -> list[str]:
    return ["sliding_attention" if c.is_local(i) else "full_attention" for i in range(c.n_layer)]


def _gemma_hf_config(arch: str, cfg: GemmaConfig, common: dict):
    """Gemma2Config or Gemma3TextConfig (rope per layer type: sliding = local, full = global)."""
    import transformers as tf

    act = "gelu_pytorch_tanh" if cfg.act == "gelu_tanh" else _hf_act(cfg.act, "model.activation")
    scaling = dict(cfg.rope_scaling or {})
    global_rope = {"rope_type": scaling.pop("type", "default"), "rope_theta": float(cfg.rope_theta), **scaling}
    shared = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, hidden_activation=act, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, attention_bias=False, attention_dropout=cfg.attn_dropout,
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim, sliding_window=cfg.attn_window,
                  layer_types=_gemma_layer_types(cfg), final_logit_softcapping=cfg.final_softcap,
                  initializer_range=cfg.init_std, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(rope_parameters=global_rope, attn_logit_softcapping=cfg.attn_softcap, **shared)
    rope = {"full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": float(cfg.local_theta)}}
    return tf.Gemma3TextConfig(rope_parameters=rope, attn_logit_softcapping=None, **shared)


def _gemma_config(mt: str, hf: dict, act: Callable[[str, str], str], tied: bool) -> GemmaConfig:
    """The Gemma of a gemma2 / gemma3_text config.json (published spelling: rope_theta,
    rope_local_base_freq, rope_scaling, sliding_window_pattern; or transformers 5's rope_parameters
    per layer type and layer_types); a key it lacks takes the default of transformers' class."""
    import transformers as tf

    cls = tf.Gemma2Config if mt == "gemma2" else tf.Gemma3TextConfig
    name = _NAMES[mt]

    def get(key: str):
        return hf.get(key, getattr(cls, key, None))

    n_layer = get("num_hidden_layers")
    if get("attention_bias"):
        raise ConversionError(f"{name} attention_bias=true is not supported; the nearest supported: "
                              "attention_bias=false (as every published Gemma)")
    if get("use_bidirectional_attention"):
        raise ConversionError(f"{name} use_bidirectional_attention=true (an encoder, as EmbeddingGemma) is not "
                              "supported; the nearest supported: use_bidirectional_attention=false (causal)")
    # local / global layers: layer_types, else transformers' default pattern (Gemma 2: every other
    # layer global; Gemma 3: sliding_window_pattern, default 6, the last of each group global)
    every = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)
    kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention"
                                      for i in range(n_layer)]
    if "full_attention" in kinds:
        every = kinds.index("full_attention") + 1
    periodic = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]
    if list(kinds) != periodic or "full_attention" not in kinds:
        raise ConversionError(f"{name} layer_types {kinds} are not supported: every k-th layer global, the others "
                              f"local, is (the nearest supported: the pattern of its first global layer, k={every})")
    # rotary: global layers (full_attention) and local ones (sliding_attention)
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
    elif mt == "gemma3_text":
        full = dict(rope or hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", cls.default_theta["global"]))
        local = {"rope_theta": hf.get("rope_local_base_freq", cls.default_theta["local"])}
    else:
        full = dict(rope or hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        local = dict(full)
    if mt == "gemma2" and full.get("rope_type", full.get("type", "default")) != "default":
        raise ConversionError(f"Gemma 2 rope type {full.get('rope_type', full.get('type'))!r} is not supported; the "
                              "nearest supported: the default rope (rope_scaling null), or Gemma 3, which scales "
                              "its global layers' rope")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ConversionError(f"{name} rope type {local.get('rope_type', local.get('type'))!r} on the local "
                              "(sliding_attention) layers is not supported; the nearest supported: the default "
                              "rope there, scaling on the global layers only (as Gemma 3)")
    max_len = get("max_position_embeddings")
    theta, scaling, _ = _rope_from_hf({"rope_parameters": full}, mt, max_len)
    local_theta = float(local.get("rope_theta", theta))
    head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
    heads, d = get("num_attention_heads"), get("hidden_size")
    try:
        return GemmaConfig(vocab_size=get("vocab_size"), n_layer=n_layer, n_head=heads,
                           n_kv_head=get("num_key_value_heads") or heads, d_model=d, d_ff=get("intermediate_size"),
                           d_head=None if d % heads == 0 and head_dim == d // heads else head_dim,
                           max_seq_len=_context(max_len, scaling), norm_eps=get("rms_norm_eps"),
                           activation=act(get("hidden_activation") or get("hidden_act"), "hidden_activation"),
                           global_every=every, attn_window=get("sliding_window") or max_len,
                           rope_theta=theta, rope_local_theta=None if local_theta == theta else local_theta,
                           rope_scaling=scaling, query_pre_attn_scalar=get("query_pre_attn_scalar"),
                           # transformers' Gemma 3 attention does not soft-cap (attn_logit_softcapping is unread)
                           attn_softcap=get("attn_logit_softcapping") if mt == "gemma2" else None,
                           final_softcap=get("final_logit_softcapping"), qk_norm=mt == "gemma3_text",
                           tie_embeddings=tied, attn_dropout=get("attention_dropout") or 0.0,
                           init_std=get("initializer_range"), hf_model_type=mt)
    except ValueError as e:
        raise ConversionError(f"{name}: {e}") from None


def _context(max_len: int, scaling: dict | None) -> int:
    """max_seq_len of an imported model: max_position_embeddings, or YaRN's implied context, or
    dynamic NTK's factor x max_position_embeddings (transformers sets no limit; our positions stop
    at max_seq_len; an export writes max_position_embeddings back as the original context)."""
    if scaling and scaling["type"] == "dynamic":
        return max(max_len, int(scaling["factor"] * max_len))
    if scaling and scaling["type"] == "yarn" and max_len <= scaling["original_max_position_embeddings"]:
        # YaRN left at the original context (as Qwen2.5's model cards add it) is meant for factor x that
        # context, transformers' "implicit factor"; our positions stop at max_seq_len, so it grows
        return int(scaling["factor"] * scaling["original_max_position_embeddings"])
    return max_len


def _qwen2_window(hf: dict, get: Callable[[str], object], n_layer: int, name: str = "Qwen2") -> int | None:
    """Qwen2's (and Qwen3's) window (None: none), which must cover every layer or none: transformers
    puts it on the layers from max_window_layers on, only with use_sliding_window (off in their
    published configs)."""
    window = get("sliding_window") if get("use_sliding_window") else None
    if window is None:
        return None
    kinds = get("layer_types") or ["sliding_attention" if i >= get("max_window_layers") else "full_attention"
                                   for i in range(n_layer)]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) != {"sliding_attention"}:
        raise ConversionError(f"{name} with a sliding window on {kinds.count('sliding_attention')} of {n_layer} layers "
                              "(use_sliding_window=true, max_window_layers="
                              f"{get('max_window_layers')}) is not supported: local and global layers mixed; the "
                              "nearest supported: the window on every layer (max_window_layers=0) or on none "
                              "(use_sliding_window=false)")
    return window


def _rope_from_hf(hf: dict, mt: str, max_len: int) -> tuple[float, dict | None, float]:
    """(rope_theta, native rope_scaling, rotary_pct) of a config.json's rope_parameters
    (transformers 5) or rope_scaling + rope_theta (before), with transformers' defaults for what they
    leave out. GPT-NeoX spells rope_theta rotary_emb_base and partial_rotary_factor rotary_pct (0.25)."""
    name, neox = _NAMES[mt], mt == "gpt_neox"
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rotary_emb_base" if neox else "rope_theta", 10000.0)))
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConversionError(f"{name} per-layer rope parameters are not supported (one rotary embedding for all "
                              "layers is)")
    partial = rope.get("partial_rotary_factor", hf.get("rotary_pct" if neox else "partial_rotary_factor"))
    partial = (0.25 if neox else 1.0) if partial is None else partial
    if partial not in (1, 1.0) and mt not in ("gpt_neox", "phi3"):  # (their rotary code rotates whole heads)
        raise ConversionError(f"{name} partial_rotary_factor={partial} is not supported (the nearest supported: "
                              "rotary over the whole head, 1.0; partial rotary is GPT-NeoX's and Phi-3's)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if mt == "phi3" and kind != "default":  # transformers reads Phi-3's "su" and "yarn" as longrope
        raise ConversionError(f"Phi-3 rope type {kind!r} (longrope in transformers) is not supported: it picks its "
                              "short or its long factor table by the longest position of each forward call, which "
                              "no fixed table reproduces; the nearest supported: the default rope of Phi-3's "
                              "4k-context models (rope_scaling null)")
    if kind == "default":
        return theta, None, float(partial)
    if kind in ROPE_SCALING_NEAREST:
        raise ConversionError(f"{name} rope type {kind!r} is not supported; the nearest supported: "
                              f"{ROPE_SCALING_NEAREST[kind]}")
    if kind not in ROPE_SCALING:
        raise ConversionError(f"{name} rope type {kind!r} is not supported (supported: default, "
                              f"{', '.join(ROPE_SCALING)})")
    required, optional = ROPE_SCALING[kind]
    scaling = {"type": kind, **{k: rope[k] for k in required + optional if rope.get(k) is not None}}
    if kind == "dynamic":  # transformers' threshold is max_position_embeddings, whatever else the config says
        scaling["original_max_position_embeddings"] = max_len
    elif "original_max_position_embeddings" in required:  # a top-level value wins, as in transformers (Phi-3)
        orig = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings", max_len)
        scaling["original_max_position_embeddings"] = int(orig) if float(orig).is_integer() else orig
    if kind == "yarn" and "factor" not in scaling:  # transformers: the context's growth
        scaling["factor"] = max_len / scaling["original_max_position_embeddings"]
    try:
        check_rope_scaling(scaling, "rotary")
    except ValueError as e:
        raise ConversionError(f"{name} {e}") from None
    return theta, scaling, float(partial)


def _t5_rescale(hf: dict) -> bool:
    """Whether T5's decoder output is scaled by d_model**-0.5: transformers 5 writes
    `scale_decoder_outputs`; before it, (and absent) it followed tie_word_embeddings (default true)."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return bool(hf.get("tie_word_embeddings", True))


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def to_hf_tensors(family: str, cfg, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a native state dict, one at a time.

    Entries are popped from `state` as they are converted, so the caller's dict shrinks while the
    HF copy grows: the two never both hold every tensor.
    """
    arch = target(family, cfg)
    if arch == "gpt2" and cfg.pos != "learned":  # the fixed table becomes GPT-2's wpe weight
        from llmstack.models.layers import sinusoidal_table

        table = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
        state["wpe.weight"] = table if cfg.pos == "sinusoidal" else torch.zeros_like(table)
    maps = _maps(arch, cfg)
    needed = {m.native for m in maps}
    missing = sorted(needed - set(state))
    if missing:
        raise ConversionError(f"native weights lack {missing[:5]}")
    last_use = {m.native: i for i, m in enumerate(maps)}
    done = set()
    for i, m in enumerate(maps):
        t = state[m.native]
        if m.native in done:  # a second HF copy of one tensor (safetensors refuses shared storage)
            t = t.clone()
        done.add(m.native)
        if m.heads:  # rows (3, nh, hd) -> (nh, 3, hd)
            t = t.unflatten(0, (3, m.heads, -1)).transpose(0, 1).flatten(0, 2)
        parts = t.split(list(m.rows), dim=0) if m.rows else (t,)
        for name, part in zip(m.hf, parts):
            yield name, (part.t() if m.transpose else part).contiguous()
        if last_use[m.native] == i:
            state.pop(m.native)


def from_hf_tensors(arch: str, cfg, get: Callable[[str], torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """Native state dict (fp32) from HF tensors; every HF tensor must be consumed or known-redundant."""
    state, used = {}, set()
    for m in _maps(arch, cfg):
        if m.native in state:  # an entry written twice on export (T5's untied-equal head) is read once
            used.update(n for n in m.hf if n in keys)
            continue
        absent = [n for n in m.hf if n not in keys]
        if absent and m.optional:
            continue
        if absent:
            raise ConversionError(f"HF checkpoint lacks {absent[:3]} (needed for {m.native})")
        parts = [get(n).float() for n in m.hf]
        parts = [p.t() for p in parts] if m.transpose else parts
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if m.heads:  # rows (nh, 3, hd) -> (3, nh, hd)
            t = t.unflatten(0, (m.heads, 3, -1)).transpose(0, 1).flatten(0, 2)
        state[m.native] = t.contiguous()
        used.update(m.hf)
    redundant = _redundant_keys(arch, cfg)
    unused = sorted(k for k in keys - used if not any(k == r or k.endswith(r) for r in redundant))
    if unused:
        raise ConversionError(f"HF checkpoint has weights this conversion does not understand: {unused[:5]}")
    return state


def _redundant_keys(arch: str, cfg) -> tuple[str, ...]:
    """HF tensors that carry nothing of their own: tied copies and non-learned buffers."""
    common = ("lm_head.weight",) if cfg.tie_embeddings else ()  # equal to the input embedding
    return common + {
        "gpt2": (".attn.bias", ".attn.masked_bias"),
        **{a: (".rotary_emb.inv_freq",) for a in LLAMA_LIKE},
        # (old checkpoints keep the causal mask and inv_freq buffers; a tied head may be written too)
        "gpt_neox": (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
                    + (("embed_out.weight",) if cfg.tie_embeddings else ()),
        "bert": ("cls.predictions.decoder.bias", "cls.predictions.decoder.weight", "embeddings.position_ids",
                 "bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                 "cls.seq_relationship.bias"),
        "t5": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        **{a: ("inv_freq", ".embed_scale") for a in GEMMA},  # (rotary and embedding-scale buffers)
    }[arch]


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def save_pretrained(family: str, cfg, state: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
                    pad_id=None, bos_id=None, eos_id=None, max_shard_bytes: int = 5 << 30,
                    dtype: torch.dtype | None = None) -> list[Path]:
    """Write config.json and model.safetensors (or shards + index) for transformers' from_pretrained.

    Consumes `state` (see to_hf_tensors). Shards are written as they fill; returns their paths.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(family, cfg, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)  # refuses before any write
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    files: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            path = out / f".shard-{len(files):05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            files.append(path)
            shard, size = {}, 0

    for name, t in to_hf_tensors(family, cfg, state):
        if dtype is not None:
            t = t.to(dtype)
        n = t.numel() * t.element_size()
        if shard and size + n > max_shard_bytes:
            flush()
        shard[name], size, total = t, size + n, total + n
        weight_map[name] = len(files)
    flush()
    if len(files) == 1:
        final = [out / "model.safetensors"]
    else:
        final = [out / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[i].name for k, i in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for src, dst in zip(files, final):
        os.replace(src, dst)
    config.save_pretrained(str(out))
    if family != "bert":  # decoders: transformers' `generate` stops on every EOS id, pads with pad
        generation_config(config).save_pretrained(str(out))
    return final


def generation_config(config):
    """The generation_config.json of an exported decoder: bos / eos (an int or a list, e.g. Llama 3
    Instruct's [<|end_of_text|>, <|eom_id|>, <|eot_id|>]) / pad ids of `config`, greedy by default."""
    import transformers as tf

    gen = tf.GenerationConfig.from_model_config(config)
    gen.do_sample = False
    return gen


class _Reader:
    """Tensors of an HF directory: model.safetensors, sharded safetensors, or pytorch_model.bin."""

    def __init__(self, d: Path):
        from safetensors import safe_open

        self.handles, self.where = [], {}
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (d / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = []
        for f in files:
            h = safe_open(str(d / f), framework="pt")
            self.handles.append(h)
            for k in h.keys():
                self.where[k] = h
        self.bin = None
        if not files:
            if not (d / "pytorch_model.bin").is_file():
                raise ConversionError(f"{d} has no model.safetensors, sharded safetensors or pytorch_model.bin")
            self.bin = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)

    def keys(self) -> set[str]:
        return set(self.bin) if self.bin is not None else set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.bin[key] if self.bin is not None else self.where[key].get_tensor(key)


def load_pretrained(hf_dir: str | os.PathLike) -> tuple[str, object, dict[str, torch.Tensor], dict]:
    """(family, native config, native fp32 state dict, HF config dict) from an HF model directory."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise ConversionError(f"{d} is not a Hugging Face model directory (no config.json)")
    hf = json.loads((d / "config.json").read_text())
    reader = _Reader(d)
    keys = reader.keys()
    # checkpoints saved from the bare GPT2Model have no "transformer." prefix
    if hf.get("model_type") == "gpt2" and "wte.weight" in keys:
        raw = {k: k for k in keys}
        keys = {f"transformer.{k}" for k in raw}
        get = lambda k: reader.get(k.removeprefix("transformer."))  # noqa: E731
    elif hf.get("model_type") == "gpt_neox" and "lm_head.weight" in keys and "embed_out.weight" not in keys:
        # GPT-NeoX's output embedding under transformers 5's module name rather than the published one
        keys = keys - {"lm_head.weight"} | {"embed_out.weight"}
        get = lambda k: reader.get("lm_head.weight" if k == "embed_out.weight" else k)  # noqa: E731
    else:
        get = reader.get

    def same(a: str, b: str) -> bool:
        return a in keys and b in keys and torch.equal(get(a), get(b))

    family, arch, cfg = native_config(hf, lambda k: k in keys, same)
    return family, cfg, from_hf_tensors(arch, cfg, get, keys), hf
