"""Gemma 2 / Gemma 3 text decoders, readable top to bottom (Gemma Team 2024, 2025).

What sets the family apart from the GPT file's options, each as in transformers' Gemma2 / Gemma3
modules so imported weights give the same logits:
- RMSNorm with a (1 + w) gain: the weight is stored as w (zeros at init), the norm computed in fp32
  and the product (x * (1 + w)) cast back, not (x cast back) * w as LLaMA;
- four norms per block: before and after attention, before and after the MLP, each output norm
  applied to the branch before the residual add (the "sandwich");
- token embeddings multiplied by sqrt(d_model), the normalizer rounded to the activations' dtype
  first (bf16: sqrt(2304) = 48.0 becomes 48.0, sqrt(1152) = 33.94 becomes 34.0), as transformers;
- local layers (sliding window, keys i - j < w) and global ones (full causal): Gemma 2 alternates,
  Gemma 3 has five local layers to one global; Gemma 3's local layers rotate with their own base
  (10k) and its global ones with 1M and an optional frequency scaling;
- GeGLU (the tanh GELU as gate), attention scale query_pre_attn_scalar**-0.5, per-head (1 + w)
  q/k norms before rotary (Gemma 3), soft-capping cap * tanh(s / cap) of the attention logits
  (Gemma 2; the math path in layers.softcap_attention, SDPA has no hook) and of the output
  logits (Gemma 2; layers.LMHead applies it to logits and inside the fused loss).
The model is a subclass of GPT for the decoding and accounting interface only (KV cache, `lm_head`,
`hidden_states`, FLOPs): every module and the forward pass are this file's.
Shapes: B batch, T sequence, C d_model, nh heads, nkv key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from llmstack.models.configs import GEMMA_PRESETS as PRESETS  # noqa: F401 (re-exported)
from llmstack.models.configs import GemmaConfig
from llmstack.models.gpt import GPT
from llmstack.models.layers import (
    GatedMLP,
    KVCache,
    Linear,
    LMHead,
    apply_rotary,
    attention,
    pattern_mask,
    plan_segments,
    rotary_tables,
)


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w) in fp32, cast back; the weight holds w (zero: the identity gain)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.layer_idx = layer_idx  # which slot of a KV cache is ours
        self.qkv = Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)  # [q | k | v]
        self.proj = Linear(self.n_head * self.hd, cfg.d_model, bias=False)
        self.q_norm = GemmaRMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = GemmaRMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x, rope, mask=None, cache: KVCache | None = None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.hd).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=1)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        causal = True
        if cache is not None:
            past = cache.length
            kc, vc = cache.append(self.layer_idx, k, v)  # (B, nkv, past+T, hd)
            if past > 0:
                k, v = kc, vc
            if past > 0 and mask is None:  # (the model gives local layers their window mask itself)
                if T == 1:
                    causal = False
                else:  # new queries sit at the bottom right of the keys
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = attention(q, k, v, causal=causal, mask=mask, scale=self.scale, softcap=self.softcap,
                      dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class Block(nn.Module):
    """x + post_attn_norm(attn(ln_1(x))), then x + post_mlp_norm(mlp(ln_2(x)))."""

    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.local = cfg.is_local(layer_idx)
        self.ln_1 = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = GemmaAttention(cfg, layer_idx)
        self.post_attn_norm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.ln_2 = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.ff_dim, cfg.act, False, 0.0)  # GeGLU: proj(gelu_tanh(gate) * up)
        self.post_mlp_norm = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, rope, mask=None, cache=None):
        x = x + self.drop(self.post_attn_norm(self.attn(self.ln_1(x), rope, mask, cache)))
        return x + self.drop(self.post_mlp_norm(self.mlp(self.ln_2(x))))


class Gemma(GPT):
    def __init__(self, cfg: GemmaConfig):
        nn.Module.__init__(self)  # (GPT's modules are not ours: see the module docstring)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = GemmaRMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.softcap = cfg.final_softcap  # in the logits and in the fused loss
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._fixed_tables: dict = {}  # fp32 rotary tables per device, never cast (see GPT)
        self.gradient_checkpointing = cfg.activation_checkpointing

    def _tables(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """This device's fp32 (cos, sin) tables: "global" (rope_theta, rope_scaling) and "local"."""
        tables = self._fixed_tables.get(str(device))
        if tables is None:
            c = self.config
            # normal tensors even when first made under inference mode (a sampler's generate),
            # so a later training forward may save them for backward
            with torch.autocast(device.type, enabled=False), torch.inference_mode(False), torch.no_grad():
                tables = {"global": rotary_tables(c.head_dim, c.max_seq_len, c.rope_theta, device=device,
                                                  scaling=c.rope_scaling),
                          "local": rotary_tables(c.head_dim, c.max_seq_len, c.local_theta, device=device)}
            self._fixed_tables[str(device)] = tables
        return tables

    # -- init ------------------------------------------------------------------------------
    def init_module_(self, module: nn.Module) -> None:
        """One module's own parameters: Linear and embedding weights N(0, init_std) (as transformers'
        Gemma), norms' w at zero (a gain of one)."""
        if isinstance(module, nn.Linear):
            if not (module is self.lm_head and self.config.tie_embeddings):
                nn.init.normal_(module.weight, 0.0, self.config.init_std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
        elif isinstance(module, GemmaRMSNorm):
            nn.init.zeros_(module.weight)

    # -- forward ---------------------------------------------------------------------------
    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, C); arguments as GPT.hidden_states."""
        c = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > c.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len={c.max_seq_len}")
        masks = {"global": attn_mask, "local": None}
        if segment_ids is not None:
            if attn_mask is not None:
                raise ValueError("pass segment_ids or attn_mask, not both")
            if past:
                raise ValueError("segment_ids apply to the first pass over a KV cache only")
            masks["global"] = plan_segments(segment_ids)
            masks["local"] = plan_segments(segment_ids, window=c.attn_window, pattern="sliding")
        if masks["local"] is None:  # (one segment per row, or a tensor mask: the window over row positions)
            masks["local"] = self._window_mask(attn_mask, past, T)
        x = self.wte(input_ids)  # (B, T, C)
        x = x * torch.tensor(c.d_model ** 0.5, dtype=x.dtype)  # normalizer rounded to x's dtype, as transformers
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        rope_pos = position_ids if position_ids.dim() == 1 else position_ids[:, None]  # (T,) or (B, 1, T)
        ropes = {kind: (cos[rope_pos].to(x.dtype), sin[rope_pos].to(x.dtype))
                 for kind, (cos, sin) in self._tables(x.device).items()}
        x = self.drop(x)
        for block in self.blocks:
            kind = "local" if block.local else "global"
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, ropes[kind], masks[kind], use_reentrant=False)
            else:
                x = block(x, ropes[kind], masks[kind], cache)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def _window_mask(self, attn_mask, past: int, T: int):
        """The local layers' mask: the sliding window over queries past..past+T-1 and their keys,
        with `attn_mask` (B, 1, T, S) folded in; `attn_mask` itself while the window cannot bite."""
        c = self.config
        if past + T <= c.attn_window:
            return attn_mask
        dev = self.wte.weight.device
        q_pos, k_pos = torch.arange(past, past + T, device=dev), torch.arange(past + T, device=dev)
        mask = pattern_mask("sliding", q_pos, k_pos, window=c.attn_window)  # (T, S)
        return mask if attn_mask is None else mask & attn_mask

