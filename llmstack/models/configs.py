"""Each model family's config dataclass and presets, in plain Python (no torch).

Validating a config (`llmstack pretrain CONFIG key=value`, `--list-options`) needs the
families' fields and presets but no tensors, so they live here, apart from the model files: a bad
config is refused before torch is imported. gpt.py, bert.py and t5.py import their config and
PRESETS from this module (and re-export them), and layers.py its names of the MLP variants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Activation names of the MLPs: layers.ACTIVATIONS maps each to its function.
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "relu", "silu", "mish")

# Gated MLPs (Shazeer 2020) by name -> the activation of their gate.
GATED = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """LLaMA's gated hidden width: 2/3 of 4*dim (same parameter count as a 4*dim MLP), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# --- GPT ---------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (plain multi-head attention)
    d_model: int = 256
    d_ff: int | None = None  # None: 4*d_model, or swiglu_hidden(d_model) for gated MLPs
    max_seq_len: int = 256
    pos: str = "learned"  # learned | sinusoidal | rotary | alibi | none
    attn_pattern: str = "full"  # full | sliding | strided | fixed
    attn_window: int = 0  # sliding: keys per query (itself included)
    attn_block: int = 0  # strided / fixed: block size l
    attn_summary: int = 1  # fixed: summary columns c per block
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x)) (original Transformer)
    final_norm: bool = True  # a norm before the LM head
    layer_scale: float | None = None  # LayerScale's initial value; None: off
    mlp: str = "gelu"  # gelu (plain, any activation) | swiglu | geglu | reglu
    activation: str | None = None  # None: gelu_tanh for the plain MLP, the gate's own for gated ones
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    init_scheme: str = "normal"  # normal (GPT-2 scaled residuals) | xavier | kaiming
    embed_init: str = "normal"  # normal(init_std) | small: U(-1e-4, 1e-4)
    rope_theta: float = 10000.0
    # rotary frequency scaling for contexts beyond the pretraining one (see ROPE_SCALING); None: off
    rope_scaling: dict | None = None
    qkv_bias: bool | None = None  # None: same as bias; true with bias=false: Qwen2's q/k/v-only biases
    d_head: int | None = None  # per-head dim; None: d_model // n_head (Qwen3: n_head * d_head != d_model)
    qk_norm: bool = False  # q and k normed per head (model.norm over d_head) before rotary (Qwen3)
    rotary_pct: float = 1.0  # rotary: the share of each head's dims that rotate, the first ones (Pythia: 0.25)
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)) in one step (GPT-J, GPT-NeoX / Pythia)
    # the HF model_type an import came from, where the architecture alone does not decide the export
    # (Phi-3 is a LLaMA with fused qkv / gate_up tensors): export writes that layout again; None: decided
    hf_model_type: str | None = None
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head} (or set d_head)")
        if self.d_head is not None and self.d_head < 1:
            raise ValueError(f"d_head={self.d_head} must be >= 1")
        check_rope_scaling(self.rope_scaling, self.pos)
        if self.rotary_pct != 1.0:
            if self.pos != "rotary":
                raise ValueError(f"rotary_pct applies to rotary positions (pos=rotary), not pos={self.pos}")
            if not 0 < self.rotary_pct <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ValueError(f"rotary_pct={self.rotary_pct} must be in (0, 1] and rotate an even number >= 2 of "
                                 f"the {self.head_dim} head dims (it rotates {self.rotary_dim})")
        if self.parallel_residual and self.norm_position != "pre":
            raise ValueError("parallel_residual=true needs norm_position=pre (each branch reads its own norm of x)")
        if self.hf_model_type not in (None, "phi3"):
            raise ValueError(f"hf_model_type={self.hf_model_type!r} is not one of phi3 (or null: decided by the "
                             "architecture)")
        n_kv = self.n_kv_head or self.n_head
        if self.n_head % n_kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={n_kv}")
        choices = {"pos": ("learned", "sinusoidal", "rotary", "alibi", "none"), "mlp": ("gelu", *GATED),
                   "attn_pattern": ("full", "sliding", "strided", "fixed"), "norm_position": ("pre", "post"),
                   "init_scheme": ("normal", "xavier", "kaiming"), "embed_init": ("normal", "small")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.attn_pattern == "sliding" and self.attn_window < 1:
            raise ValueError("attn_pattern=sliding needs attn_window >= 1 (keys each query sees)")
        if self.attn_pattern in ("strided", "fixed") and self.attn_block < 1:
            raise ValueError(f"attn_pattern={self.attn_pattern} needs attn_block >= 1 (block size)")
        if self.attn_pattern == "fixed" and not 1 <= self.attn_summary <= self.attn_block:
            raise ValueError(f"attn_summary={self.attn_summary} must be in 1..attn_block={self.attn_block}")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        """Head dims that rotate: the first int(head_dim * rotary_pct), as transformers rounds."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def qkv_biased(self) -> bool:
        """Whether the q/k/v projection has a bias (the output projection's follows `bias`)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return swiglu_hidden(self.d_model) if self.mlp in GATED else 4 * self.d_model

    @property
    def act(self) -> str:
        return self.activation or GATED.get(self.mlp, "gelu_tanh")


# Rotary scaling types: {"type": T, ...} with T's keys named and meant as in transformers'
# rope_parameters (modeling_rope_utils.py), so a published config maps one to one:
# - linear (position interpolation, Chen et al. 2023): every frequency divided by `factor`
# - llama3 (Llama 3.1+): wavelengths above original_max_position_embeddings / low_freq_factor divided
#   by `factor`, below original / high_freq_factor kept, smoothly interpolated in between
# - yarn (Peng et al. 2023, NTK-by-parts; Qwen2.5 long context): interpolated low frequencies,
#   extrapolated high ones, a linear ramp between the beta_fast / beta_slow rotation counts over
#   the original context; cos/sin scaled by attention_factor (default 0.1 ln(factor) + 1, or the
#   mscale / mscale_all_dim ratio)
# - dynamic (dynamic NTK, bloc97 / emozilla): plain rotary within original_max_position_embeddings;
#   a forward whose sequence length L (longest position + 1) exceeds it rotates with the base
#   theta * (factor * L / original - (factor - 1))^(hd / (hd - 2)) (layers.dynamic_rotary),
#   so KV-cached decoding rotates each new token with the frequencies of the length so far. Unlike
#   transformers, which keeps the largest L of earlier calls until a call within the original
#   context, each forward stands alone: the same results from a fresh transformers model and as
#   long as lengths do not shrink between calls (one generate). original_max_position_embeddings is
#   transformers' max_position_embeddings; an import's max_seq_len is factor x it (hf.py).
# Each type: (required keys, optional keys).
ROPE_SCALING: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
}
# Not implemented, with the supported type nearest to each: `longrope` (Phi-3 128k) picks its short
# or its long per-frequency factors by the longest position of each forward call.
ROPE_SCALING_NEAREST = {"longrope": "yarn (one fixed NTK-by-parts table over original_max_position_embeddings; "
                                    "longrope switches between a short and a long factor table with the longest "
                                    "position of each forward call)"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rope_scaling(scaling: dict | None, pos: str) -> None:
    """Refuse a rope_scaling that is not one of ROPE_SCALING with its keys and sensible values."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or "type" not in scaling:
        raise ValueError(f"rope_scaling={scaling!r} must be a mapping with a 'type' ({', '.join(ROPE_SCALING)})")
    if pos != "rotary":
        raise ValueError(f"rope_scaling applies to rotary positions (pos=rotary), not pos={pos}")
    kind = scaling["type"]
    if kind in ROPE_SCALING_NEAREST:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; the nearest supported: "
                         f"{ROPE_SCALING_NEAREST[kind]}")
    if kind not in ROPE_SCALING:
        raise ValueError(f"rope_scaling type {kind!r} is not one of {', '.join(ROPE_SCALING)}")
    required, optional = ROPE_SCALING[kind]
    keys = set(scaling) - {"type"}
    missing, unknown = sorted(set(required) - keys), sorted(keys - set(required) - set(optional))
    if missing:
        raise ValueError(f"rope_scaling type {kind} needs {', '.join(missing)}")
    if unknown:
        raise ValueError(f"rope_scaling type {kind}: unknown key(s) {', '.join(unknown)} "
                         f"(allowed: {', '.join(required + optional)})")
    for key in keys:
        v = scaling[key]
        if key == "truncate":
            if not isinstance(v, bool):
                raise ValueError(f"rope_scaling.truncate={v!r} must be true or false")
        elif key == "original_max_position_embeddings":
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"rope_scaling.{key}={v!r} must be a whole number >= 1")
        elif not (_number(v) and (v > 0 or key in ("beta_fast", "beta_slow"))):
            raise ValueError(f"rope_scaling.{key}={v!r} must be a number > 0")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling: high_freq_factor={scaling['high_freq_factor']} must exceed "
                         f"low_freq_factor={scaling['low_freq_factor']}")


_GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5)
_LLAMA = dict(pos="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5)

# Sizes follow GPT-2 / GPT-3 (Radford et al. 2019, Brown et al. 2020 table 2.1).
GPT_PRESETS: dict[str, dict] = {
    "gpt2-tiny": dict(_GPT2, n_layer=4, n_head=4, d_model=256, max_seq_len=256),
    "gpt2-small": dict(_GPT2, n_layer=6, n_head=8, d_model=512, max_seq_len=512),
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-350m": dict(_GPT2, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    "gpt2-760m": dict(_GPT2, n_layer=24, n_head=16, d_model=1536, max_seq_len=1024),
    "gpt2-1.3b": dict(_GPT2, n_layer=24, n_head=16, d_model=2048, max_seq_len=2048),
    "llama-tiny": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256),
    "llama-small": dict(_LLAMA, n_layer=6, n_head=8, n_kv_head=4, d_model=512, max_seq_len=512),
    "llama-124m": dict(_LLAMA, n_layer=12, n_head=12, n_kv_head=4, d_model=768, max_seq_len=1024),
    "llama-350m": dict(_LLAMA, n_layer=24, n_head=16, n_kv_head=8, d_model=1024, max_seq_len=2048),
    "llama-1.3b": dict(_LLAMA, n_layer=24, n_head=16, n_kv_head=8, d_model=2048, max_seq_len=2048),
}


# --- Gemma 2 / Gemma 3 -------------------------------------------------------------------------

@dataclass
class GemmaConfig:
    """Gemma 2 / Gemma 3 text decoders (models/gemma.py): (1 + w) RMSNorms before and after each
    branch, embeddings scaled by sqrt(d_model), GeGLU, local (sliding window) and global layers."""

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head
    d_model: int = 256
    d_head: int | None = None  # None: d_model // n_head (Gemma's heads often do not split d_model)
    d_ff: int | None = None  # None: 4 * d_model (GeGLU: gate and up each this wide)
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    activation: str = "gelu_tanh"  # of the gate (GeGLU with the tanh GELU)
    # layer i is global (full attention) when (i + 1) % global_every == 0, else local (sliding):
    # Gemma 2 alternates (2), Gemma 3 has 5 local layers to 1 global (6); 1: every layer global
    global_every: int = 2
    attn_window: int = 4096  # local layers: keys per query, itself included (i - j < w)
    rope_theta: float = 10000.0  # global layers (Gemma 3: 1e6)
    rope_local_theta: float | None = None  # local layers; None: rope_theta (Gemma 2: one rotary for all)
    rope_scaling: dict | None = None  # global layers only (Gemma 3 4B+: linear 8), see ROPE_SCALING
    query_pre_attn_scalar: int | None = None  # attention scale query_pre_attn_scalar**-0.5; None: head_dim
    attn_softcap: float | None = None  # attention logits -> cap * tanh(s / cap) (Gemma 2: 50); None: off
    final_softcap: float | None = None  # output logits, likewise (Gemma 2: 30); None: off
    qk_norm: bool = False  # (1 + w) RMSNorm of q and k per head before rotary (Gemma 3)
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    hf_model_type: str | None = None  # gemma2 | gemma3_text: the export's layout; None: decided by the options
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head} (or set d_head)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")
        if self.global_every < 1:
            raise ValueError(f"global_every={self.global_every} must be >= 1 (1: every layer global)")
        if self.attn_window < 1:
            raise ValueError(f"attn_window={self.attn_window} must be >= 1")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.activation!r} (allowed: {', '.join(ACTIVATION_NAMES)})")
        for key in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            v = getattr(self, key)
            if v is not None and not (_number(v) and v > 0):
                raise ValueError(f"{key}={v!r} must be a number > 0 (or null: off / default)")
        if self.hf_model_type not in (None, "gemma2", "gemma3_text"):
            raise ValueError(f"hf_model_type={self.hf_model_type!r} is not one of gemma2, gemma3_text (or null)")
        check_rope_scaling(self.rope_scaling, "rotary")
        if (self.rope_scaling or {}).get("type") == "dynamic":  # (Gemma's global layers use fixed tables)
            raise ValueError("rope_scaling type 'dynamic' is not supported for Gemma; the nearest supported: "
                             "linear (the same factor, as Gemma 3's published configs) or yarn")

    def is_local(self, layer: int) -> bool:
        """Whether layer `layer` (from 0) attends within the sliding window."""
        return (layer + 1) % self.global_every != 0

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def act(self) -> str:
        return self.activation

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def local_theta(self) -> float:
        return self.rope_theta if self.rope_local_theta is None else self.rope_local_theta

    # read by code written for GPT configs (decoding, accounting): rotary positions, windowed layers
    @property
    def pos(self) -> str:
        return "rotary"

    @property
    def attn_pattern(self) -> str:
        return "sliding" if self.global_every > 1 else "full"


_GEMMA = dict(norm_eps=1e-6, activation="gelu_tanh", tie_embeddings=True, max_seq_len=256, attn_window=64)

# CPU-sized Gemma-style models: Gemma 2's alternation and soft-capping; Gemma 3's 5:1 pattern,
# q/k norms and local/global rotary bases.
GEMMA_PRESETS: dict[str, dict] = {
    "gemma2-tiny": dict(_GEMMA, n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_head=64, d_ff=1024, global_every=2,
                        attn_softcap=50.0, final_softcap=30.0),
    "gemma3-tiny": dict(_GEMMA, n_layer=6, n_head=4, n_kv_head=1, d_model=256, d_head=64, d_ff=1024, global_every=6,
                        rope_theta=1e6, rope_local_theta=1e4, qk_norm=True),
}


# --- BERT --------------------------------------------------------------------------------------

@dataclass
class BertConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int | None = None  # None: 4 * d_model
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"
    prenorm: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    pad_id: int = 0
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.activation!r} (allowed: {', '.join(ACTIVATION_NAMES)})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


# Sizes follow the BERT paper (base) and Turc et al. 2019 ("Well-Read Students", the small BERTs).
BERT_PRESETS: dict[str, dict] = {
    "bert-tiny": dict(n_layer=4, n_head=4, d_model=256, max_seq_len=256),
    "bert-small": dict(n_layer=4, n_head=8, d_model=512, max_seq_len=512),
    "bert-base": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=512, dropout=0.1, attn_dropout=0.1),
    "bert-large": dict(n_layer=24, n_head=16, d_model=1024, max_seq_len=512, dropout=0.1, attn_dropout=0.1),
}


# --- T5 ----------------------------------------------------------------------------------------

FFN_KINDS = ("gated-gelu", "relu")


@dataclass
class T5Config:
    vocab_size: int
    n_layer: int = 4  # encoder layers
    n_decoder_layer: int | None = None  # None: same as n_layer
    n_head: int = 4
    d_model: int = 256
    d_kv: int | None = None  # per-head dim; None: d_model // n_head (T5 allows n_head*d_kv != d_model)
    d_ff: int | None = None  # None: swiglu_hidden(d_model) for gated-gelu, 4*d_model for relu
    ffn: str = "gated-gelu"
    rel_buckets: int = 32
    rel_max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    rescale_output: bool | None = None  # None: same as tie_embeddings
    dropout: float = 0.0
    init_factor: float = 1.0
    max_seq_len: int = 512  # longest input the stages feed (relative positions have no hard limit)
    pad_id: int = 0  # also the decoder start token, as in T5
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"unknown ffn {self.ffn!r} (allowed: {', '.join(FFN_KINDS)})")
        if self.d_kv is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head} (or set d_kv)")

    @property
    def head_dim(self) -> int:
        return self.d_kv or self.d_model // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return swiglu_hidden(self.d_model) if self.ffn == "gated-gelu" else 4 * self.d_model

    @property
    def rescale(self) -> bool:
        return self.tie_embeddings if self.rescale_output is None else self.rescale_output


# Sizes of the T5 v1.1 checkpoints (small, base), plus CPU-sized ones.
T5_PRESETS: dict[str, dict] = {
    "t5-tiny": dict(n_layer=4, n_head=4, d_model=256, d_ff=640, max_seq_len=256),
    "t5-mini": dict(n_layer=6, n_head=8, d_model=384, d_kv=48, d_ff=1024, max_seq_len=512),
    "t5-small": dict(n_layer=8, n_head=6, d_model=512, d_kv=64, d_ff=1024, max_seq_len=512),
    "t5-base": dict(n_layer=12, n_head=12, d_model=768, d_kv=64, d_ff=2048, max_seq_len=512),
}


@dataclass
class HFConfig:
    """A transformers causal LM trained through its own class (`model.backend=hf`,
    models/hf_backend.py): `hf_config` is its config.json; the other fields are read from it, for
    the accounting (parameters, FLOPs, memory) and the checks (sequence length, vocabulary) that
    every stage makes of an architecture."""

    hf_config: dict
    vocab_size: int
    max_seq_len: int
    d_model: int
    n_layer: int
    n_head: int
    head_dim: int
    kv_heads: int
    tie_embeddings: bool = False
    source: str = ""  # the directory the architecture was read from
    activation_checkpointing: bool = False
