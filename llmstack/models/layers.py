"""Pieces shared by the model families, and nothing else.

Per DESIGN.md (torchtitan's rule), only the most common building blocks live here: norms, rotary
embeddings, the SDPA attention call and the MLP variants. Each model family assembles them in
its own file. Models never import torch.distributed or deepspeed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * g, no mean subtraction, no bias.

    Computed in fp32 and cast back, as in LLaMA, so bf16 training keeps a stable denominator.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """`layernorm` (optionally without bias) or `rmsnorm`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r} (allowed: layernorm, rmsnorm)")


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021, RoFormer). We use the "half rotation" layout of
# GPT-NeoX / HF LLaMA: the head dim is split into two halves (x1, x2) that rotate as pairs
# (x1[i], x2[i]) with frequency theta^(-2i/hd). Matching HF's layout keeps export a plain copy.
# ---------------------------------------------------------------------------------------------


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim) for positions 0..max_len-1 (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd): both halves share a frequency
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by per-position angles; cos/sin are (T, hd) or (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention via PyTorch SDPA (flash / memory-efficient kernels when possible).

    q: (B, nh, T, hd); k, v: (B, n_kv, S, hd) with nh a multiple of n_kv (grouped-query attention:
    each group of nh/n_kv query heads shares one key/value head). `mask` is a boolean (B, 1, T, S)
    "may attend" mask or None; with a mask, `causal` must already be folded into it.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # expand instead of SDPA's enable_gqa: the latter falls back to the math kernel on CPU.
        B, nkv, S, hd = k.shape
        k = k[:, :, None].expand(B, nkv, n_rep, S, hd).reshape(B, nkv * n_rep, S, hd)
        v = v[:, :, None].expand(B, nkv, n_rep, S, hd).reshape(B, nkv * n_rep, S, hd)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """Two-layer feed-forward: proj(act(fc(x))). GPT-2 / BERT style."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (allowed: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[activation]
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class GatedMLP(nn.Module):
    """Gated feed-forward (Shazeer 2020, "GLU variants"): proj(act(gate(x)) * up(x)).

    With activation silu this is SwiGLU (LLaMA), with gelu GEGLU (T5 v1.1). The gate and up
    projections are fused into one matmul (`fc`, output [gate | up]) for speed.
    """

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (allowed: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[activation]
        self.hidden = hidden
        self.fc = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).split(self.hidden, dim=-1)
        return self.drop(self.proj(self.act(gate) * up))


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """LLaMA's gated hidden width: 2/3 of 4*dim (same parameter count as a 4*dim MLP), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)
