"""Decoder-only GPT, readable top to bottom (after nanoGPT's model.py).

Design choices, each a config option rather than a separate class (the pieces live in layers.py):
- positions: learned absolute (GPT-2), sinusoidal absolute, rotary (LLaMA, half-rotation layout
  as in HF; optionally on the first rotary_pct of each head only, as GPT-NeoX), ALiBi (a per-head
  linear bias on attention scores), or none
- attention: multi-head, grouped- or multi-query (n_kv_head < n_head), one fused QKV matmul,
  PyTorch SDPA; a head dim of its own (n_head * d_head may differ from d_model) and per-head
  q/k norms before rotary (Qwen3); q/k/v bias alone (Qwen2); rope scaling llama3 / linear / yarn
  (fixed tables) or dynamic NTK (frequencies from each forward's longest position);
  patterns full causal, sliding window, strided or fixed (sparse transformers) as masks over
  SDPA; packed documents and padding as segment ids (layers.SegmentPlan: never a (B, 1, T, T)
  mask); GQA through SDPA's enable_gqa; attention dropout
- norm: LayerNorm (with or without bias) or RMSNorm; pre-norm (default), post-norm, or pre-norm
  with parallel attention and MLP branches (GPT-NeoX); a final norm (default on); optional
  LayerScale on both residual branches
- MLP: plain 4x with any activation (default GELU, tanh approximation, as GPT-2) or gated
  SwiGLU / GEGLU / ReGLU at 2/3 of the width (same parameter count)
- tied or untied input/output embeddings; dropout on residual branches and attention weights
- init: normal(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer)
  (GPT-2 paper, section 2.3), or Xavier / Kaiming on Linear weights; embeddings normal(init_std)
  or small-init; biases zero, norms one, LayerScale at its initial value.
- inference: an optional preallocated KV cache (layers.KVCache) and per-row positions, so
  generate.py can decode left-padded batches one token at a time.
Shapes: B batch, T sequence, C d_model, nh heads, nkv key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# the config and presets are plain Python in configs.py (config validation needs no torch)
from llmstack.models.configs import GPT_PRESETS as PRESETS
from llmstack.models.configs import GPTConfig
from llmstack.models.layers import (  # noqa: F401 (LMHead and linear_cross_entropy are re-exported)
    GATED,
    MLP,
    GatedMLP,
    KVCache,
    LayerScale,
    Linear,
    LMHead,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    attention,
    dynamic_rotary,
    init_embedding_,
    init_linear_,
    linear_cross_entropy,
    make_norm,
    pattern_mask,
    plan_segments,
    rotary_frequencies,
    rotary_tables,
    sinusoidal_table,
)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.layer_idx = layer_idx  # which slot of a KV cache is ours
        # one matmul for q, k, v: output [q (nh*hd) | k (nkv*hd) | v (nkv*hd)]
        self.qkv = Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.qkv_biased)
        self.proj = Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.bias)
        self.proj.residual_scaled = True  # read by init: GPT-2 scaled residual init
        # Qwen3's qk-norm: q and k normed over each head's dims before rotary (None: off)
        self.q_norm = make_norm(cfg.norm, self.hd, cfg.norm_eps, cfg.bias) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg.norm, self.hd, cfg.norm_eps, cfg.bias) if cfg.qk_norm else None
        self.attn_dropout = cfg.attn_dropout
        self.resid_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rope=None, mask=None, cache: KVCache | None = None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.hd).transpose(1, 2)  # heads of q | k | v
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        causal = True
        if cache is not None:
            past = cache.length
            kc, vc = cache.append(self.layer_idx, k, v)  # (B, nkv, past+T, hd)
            if past > 0:  # (with nothing cached before, the fresh contiguous k, v are the same values)
                k, v = kc, vc
            if past > 0 and mask is None:
                if T == 1:  # one new token sees every cached one: no mask at all (fastest kernel)
                    causal = False
                else:  # SDPA's is_causal aligns top-left; new queries sit at the bottom right
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = attention(q, k, v, causal=causal, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # re-assemble heads: (B, T, nh*hd)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm block: x + ls(attn(norm(x))), then x + ls(mlp(norm(x))) (GPT-2 onwards);
    post-norm: norm(x + attn(x)), then norm(x + mlp(x)) (Vaswani et al. 2017); parallel residual:
    x + ls(attn(norm_1(x))) + ls(mlp(norm_2(x))) (GPT-J, GPT-NeoX). `ls` is LayerScale when on,
    else nothing."""

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.parallel = cfg.parallel_residual
        self.ln_1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        mlp_cls = GatedMLP if cfg.mlp in GATED else MLP
        self.mlp = mlp_cls(cfg.d_model, cfg.ff_dim, cfg.act, cfg.bias, cfg.dropout)
        self.mlp.proj.residual_scaled = True
        ls = cfg.layer_scale is not None
        self.ls_1 = LayerScale(cfg.d_model, cfg.layer_scale) if ls else nn.Identity()
        self.ls_2 = LayerScale(cfg.d_model, cfg.layer_scale) if ls else nn.Identity()

    def forward(self, x, rope=None, mask=None, cache=None):
        if self.parallel:  # both branches read x (GPT-J / GPT-NeoX), each through its own norm
            return x + self.ls_1(self.attn(self.ln_1(x), rope, mask, cache)) + self.ls_2(self.mlp(self.ln_2(x)))
        if self.post:
            x = self.ln_1(x + self.ls_1(self.attn(x, rope, mask, cache)))
            return self.ln_2(x + self.ls_2(self.mlp(x)))
        x = x + self.ls_1(self.attn(self.ln_1(x), rope, mask, cache))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.final_norm else nn.Identity()
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # the same Parameter in two modules (as HF does): each module's forward sees it, so
            # ZeRO-3 gathers it for both the lookup and the output projection.
            self.lm_head.weight = self.wte.weight
        # Fixed position tables (rotary cos/sin, sinusoidal, ALiBi slopes) are not buffers: they are
        # computed in fp32 on first use per device and cached outside the module's tensors (see
        # `_tables`), so neither a construction context that makes floats in bf16
        # (deepspeed.zero.Init) nor a cast of the module (model.bfloat16(), DeepSpeed's bf16
        # engine) can round them. In bf16, positions above 256 are not representable and
        # collapse onto their neighbours. They are cast to the activations' dtype at use, as
        # transformers does.
        self._fixed_tables: dict = {}
        self.gradient_checkpointing = cfg.activation_checkpointing

    @property
    def _dynamic_rope(self) -> bool:
        """Dynamic NTK rope: no fixed table, the frequencies follow each forward's length."""
        return (self.config.rope_scaling or {}).get("type") == "dynamic"

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """This device's fp32 position tables: "rope" (cos, sin), sinusoidal "pe" or ALiBi "alibi"
        (dynamic rope: "inv_freq", its frequencies within the original context)."""
        tables = self._fixed_tables.get(str(device))
        if tables is None:
            c, tables = self.config, {}
            # normal tensors even when first made under inference mode (a sampler's generate),
            # so a later training forward may save them for backward
            with torch.autocast(device.type, enabled=False), torch.inference_mode(False), torch.no_grad():
                if c.pos == "rotary" and self._dynamic_rope:
                    tables["inv_freq"] = rotary_frequencies(c.rotary_dim, c.rope_theta, c.rope_scaling, device)[0]
                elif c.pos == "rotary":
                    tables["rope"] = rotary_tables(c.rotary_dim, c.max_seq_len, c.rope_theta, device=device,
                                                   scaling=c.rope_scaling)
                elif c.pos == "sinusoidal":
                    tables["pe"] = sinusoidal_table(c.max_seq_len, c.d_model).to(device)
                elif c.pos == "alibi":
                    tables["alibi"] = alibi_slopes(c.n_head).to(device)
            self._fixed_tables[str(device)] = tables
        return tables

    # -- init ------------------------------------------------------------------------------
    def init_module_(self, module: nn.Module) -> None:
        """Initialise one module's own parameters (not its children's).

        Split per module so the distributed layer can gather a ZeRO-3 partitioned module, init
        it on one rank and scatter it back, consuming the RNG in the same order as a plain run.
        """
        c = self.config
        if isinstance(module, nn.Linear):
            if not (module is self.lm_head and c.tie_embeddings):
                residual = c.n_layer if getattr(module, "residual_scaled", False) else None
                init_linear_(module.weight, c.init_scheme, c.init_std, residual)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init_embedding_(module.weight, c.embed_init if module is self.wte else "normal", c.init_std)
        elif isinstance(module, LayerScale):
            nn.init.constant_(module.gamma, module.init_value)
        elif isinstance(module, (nn.LayerNorm,)) or type(module).__name__ == "RMSNorm":
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def init_weights(self) -> None:
        for m in self.modules():
            self.init_module_(m)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        segment_ids: torch.Tensor | None = None,
    ):
        """Logits (B, T, V), or the mean cross-entropy over labels != -100 when labels are given
        (with optional label smoothing and z-loss, see layers.linear_cross_entropy).

        input_ids, labels, position_ids: (B, T). attn_mask: optional boolean (B, 1, T, T) "may
        attend" mask that already includes causality (used for packed documents and padding);
        with a cache it is (B, 1, T, past+T). segment_ids: see `hidden_states` (packed documents
        and padding without any (B, 1, T, T) mask; use instead of attn_mask). cache: see `hidden_states`.
        """
        x = self.hidden_states(input_ids, position_ids, attn_mask, cache, segment_ids)
        if labels is None:
            return self.lm_head(x)  # logits (B, T, V)
        # = F.cross_entropy(logits.float(), labels, ignore_index=-100), computed in cache-sized
        # chunks with the softmax in fp32 (bf16 logits lose too much precision in the log-sum-exp)
        return self.lm_head(x, labels, label_smoothing, z_loss)

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, C) that the LM head reads.

        segment_ids (B, T): each token attends, causally, to the earlier tokens with its own id
        only (packed documents; padding as one more id, e.g. `layers.segments_from_valid`), with
        positions from position_ids. No (B, 1, T, T) mask is built (layers.SegmentPlan); attention
        patterns and ALiBi then count positions within each document.
        With a `cache` (from `new_cache`) the keys/values of these T positions are stored after the
        cached ones and attention covers both; positions default to past..past+T-1 (segment ids
        only for the first, cache-filling pass).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        plan = None
        if segment_ids is not None:
            if attn_mask is not None:
                raise ValueError("pass segment_ids or attn_mask, not both")
            if past:
                raise ValueError("segment_ids apply to the first pass over a KV cache only")
            c = self.config
            plan = plan_segments(segment_ids, window=c.attn_window, pattern=c.attn_pattern, block=c.attn_block,
                                 summary=c.attn_summary,
                                 alibi=self._tables(input_ids.device)["alibi"] if c.pos == "alibi" else None)
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if position_ids is None and past:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        if self.wpe is not None:
            pos = position_ids if position_ids is not None else torch.arange(T, device=input_ids.device)
            x = x + self.wpe(pos)
        elif self.config.pos == "sinusoidal":
            pos = position_ids if position_ids is not None else torch.arange(T, device=input_ids.device)
            x = x + self._tables(x.device)["pe"][pos].to(x.dtype)
        elif self.config.pos == "rotary" and self._dynamic_rope:
            # frequencies of this forward's longest position, computed on the device (layers.dynamic_rotary)
            pos = position_ids if position_ids is not None else torch.arange(T, device=x.device)
            cos, sin = dynamic_rotary(pos, self._tables(x.device)["inv_freq"], self.config.rope_theta,
                                      self.config.rope_scaling)  # fp32 (T, hd) or (B, T, hd)
            if pos.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
            rope = (cos.to(x.dtype), sin.to(x.dtype))
        elif self.config.pos == "rotary":
            cos, sin = self._tables(x.device)["rope"]  # fp32 (max_seq_len, hd)
            if position_ids is None:
                rope = (cos[:T].to(x.dtype), sin[:T].to(x.dtype))
            else:  # (T, hd) for shared positions, (B, 1, T, hd) for per-sample ones (broadcast over heads)
                rope_pos = position_ids if position_ids.dim() == 1 else position_ids[:, None]
                rope = (cos[rope_pos].to(x.dtype), sin[rope_pos].to(x.dtype))
        x = self.drop(x)
        attn_mask = plan if plan is not None else self._pattern_mask(attn_mask, past, T, x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def _pattern_mask(self, attn_mask, past: int, T: int, dtype):
        """The attention mask with the configured pattern and ALiBi folded in; `attn_mask` itself
        when neither is on (then SDPA's causal kernel runs). Queries sit at past..past+T-1."""
        c = self.config
        if c.attn_pattern == "full" and c.pos != "alibi":
            return attn_mask
        dev = self.wte.weight.device
        q_pos, k_pos = torch.arange(past, past + T, device=dev), torch.arange(past + T, device=dev)
        mask = pattern_mask(c.attn_pattern, q_pos, k_pos, window=c.attn_window, block=c.attn_block,
                            summary=c.attn_summary)  # (T, S)
        if attn_mask is not None:
            mask = mask & attn_mask  # (B, 1, T, S)
        if c.pos != "alibi":
            return mask
        bias = alibi_bias(self._tables(dev)["alibi"], q_pos, k_pos)  # (nh, T, S): -m_h (i - j)
        return bias.masked_fill(~mask, float("-inf")).to(dtype)  # (1 or B, nh, T, S)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` positions (model's dtype/device)."""
        p = self.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch, c.kv_heads, max_len, c.head_dim, dtype=p.dtype, device=p.device)

    # -- accounting -----------------------------------------------------------------------
    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def matmul_params(self) -> int:
        """Parameters used in matmuls: every Linear weight, the LM head included (tied or not);
        lookup embeddings excluded. The N of the PaLM FLOPs formula (DESIGN.md)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 L H Q T (PaLM appendix B; causal mask not discounted)."""
        c = self.config
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def gpt_config_from_preset(preset: str | None, vocab_size: int, **overrides) -> GPTConfig:
    """A GPTConfig from a named preset plus explicit field overrides (None values ignored)."""
    base = dict(PRESETS[preset]) if preset else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(vocab_size=vocab_size, **base)


def config_dict(cfg: GPTConfig) -> dict:
    return asdict(cfg)
