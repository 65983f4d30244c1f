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
from torch.autograd.function import once_differentiable


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


# ---------------------------------------------------------------------------------------------
# LM head + cross-entropy, fused and chunked
# ---------------------------------------------------------------------------------------------
# Why: on the tiny CPU preset the (B*T, V) logits are 2048 x 8192 fp32 = 64 MB, bigger than the
# caches. The plain `F.cross_entropy(x @ W.T, y)` writes them (that matmul runs at ~130 GFLOP/s
# instead of ~190 because of it), then log_softmax, nll, log_softmax_backward and nll_backward
# each stream 64 MB again. Working on row chunks whose logits fit in cache, and computing the
# gradient in the same pass (as Liger-Kernel's "fused linear cross-entropy" does), keeps the same
# three matmuls and leaves two elementwise passes per chunk (log_softmax, exp), in cache.
# Measured (head + loss, forward + backward, 2 threads): ~225 ms unfused, ~175 ms fused, out of a
# ~450-540 ms step. The full logits never exist, which also saves memory on GPUs (a
# 16 x 1024 x 50257 fp32 logits tensor is 3.3 GB). Same math as F.cross_entropy(mean, ignore_index).

# Elements of one chunk's (rows, V) logits. CPU: 4M fp32 = 16 MB, inside a 32 MB L3 (measured:
# 256..512 rows of V=8192 are equally fast, 2048 rows are not). GPU: large, so each chunk's
# matmuls stay big; only memory is saved there. Never fewer than 2*C rows, though: every chunk
# adds its (V, C) weight gradient into the fp32 accumulator (a pass over V*C floats), which must
# stay small next to the chunk's 6*rows*C*V matmul FLOPs (measured on CPU with V=50257, C=768:
# 83-row chunks were 20% slower than unfused, 1024-row chunks as fast).
_CE_CHUNK_ELEMS = {"cpu": 1 << 22}
_CE_CHUNK_ELEMS_DEFAULT = 1 << 27


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, ignore_index: int, compute_dtype, need_grad: bool):
        # x (N, C), weight (V, C), labels (N,). Autocast is off in here; compute_dtype is the
        # dtype the plain path's matmul would have used (autocast's, else the inputs').
        N, V = x.shape[0], weight.shape[0]
        rows = max(1, _CE_CHUNK_ELEMS.get(x.device.type, _CE_CHUNK_ELEMS_DEFAULT) // V, 2 * x.shape[1])
        rows = -(-N // -(-N // rows))  # balance the chunks
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
        valid = labels != ignore_index
        n_valid = valid.sum()
        # d(mean loss)/d(logits) = (softmax - onehot) * scale, scale = 1/n_valid on counted rows,
        # 0 on ignored ones. The scale is applied to the (rows, C) sides of the two gradient
        # matmuls instead of the (rows, V) one: an elementwise pass over the logits saved.
        scale = (valid.to(torch.float32) / n_valid.clamp(min=1))[:, None]
        # ignored rows: any valid index, masked below (other out-of-range labels still fail in gather)
        target = labels.masked_fill(~valid, 0)[:, None]
        minus_valid = valid.to(torch.float32).neg()[:, None]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
        for s in range(0, N, rows):
            e = min(s + rows, N)
            # fp32 log-softmax (upcast inside the kernel): bf16 logits lose too much precision
            logp = torch.log_softmax(xc[s:e] @ wc.t(), dim=-1, dtype=torch.float32)
            loss -= (logp.gather(1, target[s:e]) * valid[s:e, None]).sum()
            if need_grad:
                p = logp.exp_()  # softmax, in place
                p.scatter_add_(1, target[s:e], minus_valid[s:e])  # - onehot (counted rows only)
                p = p.to(compute_dtype)
                grad_x[s:e] = (p @ wc).mul_(scale[s:e])
                xs = (xc[s:e] * scale[s:e]).to(compute_dtype)
                if compute_dtype == torch.float32:
                    grad_w.addmm_(p.t(), xs)
                else:  # low-precision matmul, fp32 accumulation across chunks
                    grad_w += p.t() @ xs
        if need_grad:
            ctx.grads = (grad_x, grad_w.to(weight.dtype))
        return loss / n_valid  # nan when nothing is counted, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.grads
        # the loss is usually the root (grad 1): skip two passes then; no host sync on GPUs, no
        # data-dependent branch under torch.compile
        if torch.compiler.is_compiling() or grad_out.device.type != "cpu" or grad_out.item() != 1.0:
            grad_x, grad_w = grad_x * grad_out.to(grad_x.dtype), grad_w * grad_out.to(grad_w.dtype)
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, labels, ignore_index) (mean over counted rows), in chunks.

    x (..., C), weight (V, C), labels (...). Under autocast the matmuls run in the autocast dtype
    and the softmax in fp32, as the unfused path does. The gradient is computed during the
    forward pass (when autograd needs one) and handed out by backward.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    args = (x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1), ignore_index, compute_dtype, need_grad)
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):  # the function casts explicitly
            return _LinearCrossEntropy.apply(*args)
    return _LinearCrossEntropy.apply(*args)
