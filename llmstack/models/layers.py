"""Pieces shared by the model families, and nothing else.

Per DESIGN.md (torchtitan's rule), only the most common building blocks live here: norms (and
LayerScale), positional encodings (rotary, sinusoidal, ALiBi), attention-pattern masks, the SDPA
attention call, activations and the MLP variants, init functions, and the fused LM head loss.
Each model family assembles them in its own file. Models never import torch.distributed or deepspeed.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# names shared with the torch-free configs (GATED: gated MLPs by name -> the activation of their gate)
from llmstack.models.configs import GATED, swiglu_hidden  # noqa: F401 (re-exported)


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


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al. 2021, CaiT): x * gamma.

    gamma starts at a small `init_value` (CaiT: 0.1 up to 18 layers, 1e-5 deeper), so every block
    starts close to the identity; the model's init sets it (see `init_value`).
    """

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


# ---------------------------------------------------------------------------------------------
# Absolute positions and ALiBi
# ---------------------------------------------------------------------------------------------


def sinusoidal_table(max_len: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(max_len, dim) fixed encodings of Vaswani et al. 2017: PE(t, 2i) = sin(t / base^(2i/d)),
    PE(t, 2i+1) = cos(t / base^(2i/d)); added to the token embeddings."""
    t = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(d/2),)
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(t * inv)
    pe[:, 1::2] = torch.cos(t * inv[: dim // 2])
    return pe.float()


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): 2^(-8h/n) for h = 1..n when n is a power of two;
    otherwise the n' = 2^floor(log2 n) slopes, then every other slope of the 2n' sequence."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    p = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(p) + geometric(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(nh, T, S) additive attention bias -m_h * (i - j) for query i, key j (fp32)."""
    dist = (q_pos[:, None] - k_pos[None, :]).float()  # (T, S)
    return -slopes.float()[:, None, None] * dist


# ---------------------------------------------------------------------------------------------
# Attention patterns, as boolean "may attend" masks over (query position, key position)
# ---------------------------------------------------------------------------------------------

ATTN_PATTERNS = ("full", "sliding", "strided", "fixed")


def pattern_mask(pattern: str, q_pos: torch.Tensor, k_pos: torch.Tensor, *, window: int = 0, block: int = 0,
                 summary: int = 1) -> torch.Tensor:
    """(T, S) boolean mask: may query at position q_pos[i] attend to key at k_pos[j]? Always causal.

    - full: every earlier position (and itself)
    - sliding: the last `window` positions, itself included (i - j < w; Mistral's convention)
    - strided (Child et al. 2019, sparse transformers): the previous `block` positions, and every
      position a multiple of `block` back ((i - j) mod l = 0)
    - fixed (same paper): the positions of its own block of `block`, and the last `summary`
      positions (c "summary columns") of every block: j mod l >= l - c
    """
    d = q_pos[:, None] - k_pos[None, :]  # (T, S) distance back
    causal = d >= 0
    if pattern == "full":
        return causal
    if pattern == "sliding":
        return causal & (d < window)
    if pattern == "strided":
        return causal & ((d < block) | (d % block == 0))
    if pattern == "fixed":
        same_block = (q_pos[:, None] // block) == (k_pos[None, :] // block)
        return causal & (same_block | (k_pos[None, :] % block >= block - summary))
    raise ValueError(f"unknown attention pattern {pattern!r} (allowed: {', '.join(ATTN_PATTERNS)})")


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (Su et al. 2021, RoFormer). We use the "half rotation" layout of
# GPT-NeoX / HF LLaMA: the head dim is split into two halves (x1, x2) that rotate as pairs
# (x1[i], x2[i]) with frequency theta^(-2i/hd). Matching HF's layout keeps export a plain copy.
# ---------------------------------------------------------------------------------------------


def rotary_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                       device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,) fp32, cos/sin scale) of plain or scaled rotary positions.

    `scaling`: None, or {"type": linear | llama3 | yarn | dynamic, ...} as in configs.ROPE_SCALING,
    which says what each type does. The arithmetic follows transformers' modeling_rope_utils step by
    step in fp32, so imported Llama 3.x / Qwen2.5-YaRN models rotate exactly as there. For
    `dynamic`, these are the frequencies of sequences within the original context; longer ones
    rotate with `dynamic_rotary`.
    """
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # (hd/2,): theta^(-2i/hd)
    kind = scaling["type"] if scaling else None
    if kind is None:
        return inv_freq, 1.0
    factor = scaling["factor"]
    if kind == "linear":  # positions / factor, i.e. every frequency / factor
        return inv_freq / factor, 1.0
    old_ctx = scaling["original_max_position_embeddings"]
    if kind == "dynamic":
        return ntk_frequencies(head_dim, theta, factor, old_ctx, old_ctx, device=device), 1.0
    if kind == "llama3":
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)  # long waves: interpolated
        smooth = (old_ctx / wavelen - lo) / (hi - lo)  # 0 at the long-wave end, 1 at the short-wave end
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind != "yarn":
        raise ValueError(f"unknown rope scaling type {kind!r} (allowed: linear, llama3, yarn, dynamic)")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_of(rotations: float) -> float:  # the dim index whose wave turns `rotations` times over old_ctx
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # (as transformers: no zero-width ramp)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1: extrapolate (high frequencies, kept), 0: interpolate (low ones, / factor)
    pos_freqs = theta ** exponent
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    return interpolated * (1 - keep) + extrapolated * keep, float(attn)


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim) for positions 0..max_len-1 (fp32), with an
    optional frequency scaling (`rotary_frequencies`); YaRN's attention factor multiplies both."""
    inv_freq, attn = rotary_frequencies(head_dim, theta, scaling, device=device)
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd): both halves share a frequency
    if attn != 1.0:
        return emb.cos() * attn, emb.sin() * attn
    return emb.cos(), emb.sin()


def ntk_frequencies(head_dim: int, theta: float, factor: float, old_ctx: int, seq_len: int | torch.Tensor,
                    device=None) -> torch.Tensor:
    """Dynamic NTK inverse frequencies (head_dim/2,) for a sequence of `seq_len` positions (bloc97 /
    emozilla; transformers' _compute_dynamic_ntk_parameters): theta grows to
    theta * (factor * L / old_ctx - (factor - 1))^(hd / (hd - 2)) with L = max(seq_len, old_ctx),
    so every wave stretches as the sequence outgrows the original context. seq_len is a host int
    (transformers' initial frequencies, arithmetic in double) or a 0-d integer tensor (its
    per-forward update, arithmetic in fp32 on that tensor's device; no host sync, so a captured
    CUDA graph can replay it), step for step as there."""
    if isinstance(seq_len, torch.Tensor):
        seq_len = seq_len.clamp(min=old_ctx)  # (a tensor from a Python scalar would copy from the host)
    else:
        seq_len = max(seq_len, old_ctx)
    base = theta * ((factor * seq_len / old_ctx) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base ** exponent)


def dynamic_rotary(pos: torch.Tensor, inv_freq: torch.Tensor, theta: float,
                   scaling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (pos.shape + (rd,), fp32) of dynamic NTK rope at integer positions `pos` (T,) or (B, T).

    The frequencies follow this call's sequence length L = max(pos) + 1, as transformers' rotary
    embedding recomputes them in each forward: `inv_freq` ((rd/2,), `rotary_frequencies`' with the
    dynamic scaling) while L <= original_max_position_embeddings, `ntk_frequencies(L)` beyond it.
    A KV-cached decoding step thus rotates its new query and key with the frequencies of the
    current length while the cached keys keep theirs, as there. Stateless: transformers also keeps
    the longest L seen by earlier calls (until a call within the original context resets it), so
    it differs after a longer call, and only then.
    """
    old_ctx = scaling["original_max_position_embeddings"]
    seq_len = pos.max() + 1  # 0-d, on pos's device
    grown = ntk_frequencies(2 * inv_freq.shape[0], theta, scaling["factor"], old_ctx, seq_len, device=pos.device)
    inv_freq = torch.where(seq_len > old_ctx, grown, inv_freq)
    freqs = pos[..., None].float() * inv_freq  # (..., T, rd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by per-position angles; cos/sin are (T, rd) or (B, 1, T, rd).

    rd < hd is partial rotary (GPT-NeoX's rotary_pct): the first rd dims rotate, in the same
    half-rotation layout within them (tables from `rotary_tables(rd, ...)`), the rest pass as they are.
    """
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
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
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention via PyTorch SDPA (flash / memory-efficient kernels when possible).

    q: (B, nh, T, hd); k, v: (B, n_kv, S, hd) with nh a multiple of n_kv (grouped-query attention:
    each group of nh/n_kv query heads shares one key/value head). `mask` is a `SegmentPlan` (packed
    documents or padding as segment ids, see below), a boolean (B, 1, T, S)
    "may attend" mask, a float additive bias broadcastable to (B, nh, T, S) (T5's relative
    position bias, with -inf-like values where attention is not allowed), or None; with a mask,
    `causal` must already be folded into it. `scale` defaults to 1/sqrt(hd) (T5 uses 1).
    `softcap`: attention logit soft-capping (Gemma 2), see `softcap_attention`; None: off.
    """
    # SDPA's flash kernel needs unit stride in the head dim (else: the slow math path). Each tensor
    # on its own: during decoding q comes strided from the few-rows Linear while k, v are views of
    # the KV cache, which a copy would duplicate whole in every layer at every step.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if isinstance(mask, SegmentPlan):
        return mask.attend(q, k, v, dropout_p=dropout_p, scale=scale, softcap=softcap)
    if softcap:
        return softcap_attention(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p, scale=scale, softcap=softcap)
    # grouped-query attention natively: no per-layer (or, decoding, per-token) copies of K/V
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=gqa)


def softcap_attention(q, k, v, *, causal: bool, mask=None, dropout_p: float = 0.0, scale: float | None = None,
                      softcap: float) -> torch.Tensor:
    """Attention with soft-capped logits (Gemma 2): s = q.k * scale, s = cap * tanh(s / cap), then the
    mask, softmax (fp32) and the weighted values. SDPA has no hook between the scores and the
    softmax, so this is the math path (the (B, nh, T, S) scores exist), as transformers' eager one.
    Same arguments as `attention` (a tensor mask or none: `causal` aligned top-left, as SDPA)."""
    nh, nkv = q.shape[1], k.shape[1]
    if nh != nkv:  # grouped-query attention: each key/value head serves nh/nkv query heads
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, S)
    s = softcap * torch.tanh(s / softcap)
    T, S = s.shape[-2:]
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ v  # (B, nh, T, hd)


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" mask (B, 1, T, T) from a (B, T) mask of real (non-pad) tokens.

    Causal, and pad keys are hidden. A pad query (left padding) would then see no key at all;
    it may attend to itself instead, so no row is empty (its output is never used, but an empty
    softmax row is NaN in some kernels, and NaN would leak through later layers' matmuls).
    """
    B, T = valid.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :].bool()) | eye)[:, None]  # (B, 1, T, T)


# ---------------------------------------------------------------------------------------------
# Packed documents and padding as segment ids (B, T): a token attends, causally, to the earlier
# tokens of its own segment and to nothing else. No (B, 1, T, T) mask is ever built:
# - a row holding one segment runs SDPA's causal kernel (the caller passes no plan at all);
# - on CUDA, FlexAttention with a block mask made on the device from the ids (blocks of other
#   documents are skipped, not computed);
# - elsewhere (CPU, or patterns FlexAttention is not given here), "varlen by gathering": every
#   document is copied into a row of its own, documents of similar length share one causal SDPA
#   call, and the outputs are scattered back. Causal attention over a right-padded row never
#   reaches the padding, so no mask is needed, and no work is spent across documents.
# Pads are just one more segment (any id, conventionally -1): their outputs are never used.
# ---------------------------------------------------------------------------------------------


def segments_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Segment ids (B, T) of a padded batch: 0 for real tokens, -1 for padding (left or right)."""
    return torch.where(valid.bool(), 0, -1).long()


def single_segment_rows(segment_ids: torch.Tensor) -> bool:
    """True when every row holds one segment: plain causal attention is then the same thing."""
    return bool((segment_ids == segment_ids[:, :1]).all())


def _bucket_len(n: int) -> int:
    """Padded length of a document of n tokens in the gathering path: at most 25% more (and
    exact up to 8), so documents of similar length share one SDPA call."""
    if n <= 8:
        return n
    step = max(8, 1 << (n.bit_length() - 3))  # 4 steps per octave
    return -(-n // step) * step


class SegmentPlan:
    """How the tokens of one batch attend, worked out once per forward from the segment ids and
    used by every layer (see the section comment above). Build with `plan_segments`."""

    def __init__(self, segment_ids: torch.Tensor, *, window: int = 0, pattern: str = "full", block: int = 0,
                 summary: int = 1, alibi: torch.Tensor | None = None, use_flex: bool | None = None):
        self.B, self.T = segment_ids.shape
        self.window, self.pattern, self.block, self.summary = window, pattern, block, summary
        self.alibi = alibi  # (nh,) slopes, or None
        dev = segment_ids.device
        if use_flex is None:
            use_flex = dev.type == "cuda" and _flex_available()
        self.flex = bool(use_flex) and pattern in ("full", "sliding")
        if self.flex:
            self.segment_ids = segment_ids
            self._block_mask = None  # made on first use, on the ids' device
            return
        self._plan_gather(segment_ids)

    # -- gathering path ------------------------------------------------------------------------
    def _plan_gather(self, segment_ids: torch.Tensor) -> None:
        import numpy as np

        seg = segment_ids.detach().cpu().numpy()  # the one host sync of a forward pass
        B, T = seg.shape
        # order tokens by (row, segment id), positions ascending within each: a stable sort
        key = (np.arange(B)[:, None] * (int(seg.max()) - int(seg.min()) + 1) + (seg - seg.min())).reshape(-1)
        order = np.argsort(key, kind="stable")  # flat indices b*T + t, grouped by document
        sorted_key = key[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        lengths = np.diff(np.r_[starts, len(order)])
        padded = np.array([_bucket_len(int(n)) for n in lengths])
        # Buckets of documents padded to one length L, laid out one after another: `gather` lists,
        # slot by slot, the flat token each slot reads (pad slots repeat their document's last
        # token); `scatter` gives, for every token, the slot holding its output. One index_select
        # per tensor each way, whatever the number of buckets.
        self.buckets = []  # (N documents, L)
        gather, scatter = [], np.empty(B * T, dtype=np.int64)
        base = 0
        for L in np.unique(padded):
            docs = np.flatnonzero(padded == L)
            n = lengths[docs]
            col = np.arange(L)[None, :]
            src = starts[docs][:, None] + np.minimum(col, n[:, None] - 1)  # (N, L) into `order`
            slots = order[src].reshape(-1)  # the flat token each slot reads
            gather.append(slots)
            real = (col < n[:, None]).reshape(-1)
            scatter[slots[real]] = base + np.flatnonzero(real)
            self.buckets.append((len(docs), int(L)))
            base += len(docs) * int(L)
        dev = segment_ids.device
        gather = np.concatenate(gather)
        self.gather = torch.from_numpy(gather).to(dev)
        self.scatter = torch.from_numpy(scatter).to(dev)
        # `gather` with pad slots sent to one extra row (B*T): where the outputs go
        slot_token = np.full(len(gather), B * T)
        slot_token[scatter] = np.arange(B * T)
        self.put = torch.from_numpy(slot_token).to(dev)
        self.sizes = [N * L for N, L in self.buckets]
        self._masks: dict = {}

    def _bucket_mask(self, L: int, dtype, device):
        """None (plain causal), or the (1 or nh, L, L) mask / bias of the pattern and ALiBi within
        a document (positions 0..L-1 of the document)."""
        if self.pattern == "full" and self.alibi is None:
            return None
        key = (L, dtype)
        if key not in self._masks:
            pos = torch.arange(L, device=device)
            mask = pattern_mask(self.pattern, pos, pos, window=self.window, block=self.block, summary=self.summary)
            if self.alibi is None:
                self._masks[key] = mask[None]
            else:
                bias = alibi_bias(self.alibi.to(device), pos, pos)
                self._masks[key] = bias.masked_fill(~mask, float("-inf")).to(dtype)
        return self._masks[key]

    def attend(self, q, k, v, *, dropout_p: float = 0.0, scale: float | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """Attention of q (B, nh, T, hd) over k, v (B, nkv, T, hd) within segments -> (B, nh, T, hd).
        `softcap`: soft-capped logits (Gemma 2), see `softcap_attention`."""
        if self.flex:
            return self._attend_flex(q, k, v, scale=scale, softcap=softcap)
        B, nh, T, hd = q.shape
        nkv = k.shape[1]
        # token-major (B*T, heads, hd), gathered into the buckets' slots
        qs, ks, vs = (_ToBuckets.apply(t.transpose(1, 2).reshape(B * T, t.shape[1], hd), self.gather, self.scatter,
                                       self.sizes) for t in (q, k, v))
        outs = []
        for (N, L), qb, kb, vb in zip(self.buckets, qs, ks, vs):
            qb, kb, vb = (t.view(N, L, t.shape[1], hd).transpose(1, 2) for t in (qb, kb, vb))
            mask = self._bucket_mask(L, q.dtype, q.device)
            if softcap:
                yb = softcap_attention(qb, kb, vb, causal=True, mask=mask, dropout_p=dropout_p, scale=scale,
                                       softcap=softcap)
            elif mask is None:
                yb = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, dropout_p=dropout_p, scale=scale,
                                                    enable_gqa=nkv != nh)
            else:
                yb = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                                    enable_gqa=nkv != nh)
            outs.append(yb.transpose(1, 2).reshape(N * L, nh, hd))
        y = _FromBuckets.apply(self.put, self.sizes, B * T, *outs)
        return y.view(B, T, nh, hd).transpose(1, 2)

    # -- FlexAttention path (CUDA) ----------------------------------------------------------------
    def _attend_flex(self, q, k, v, *, scale, softcap=None):
        seg, window = self.segment_ids, self.window
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            def doc_causal(b, h, qi, ki):
                ok = (seg[b, qi] == seg[b, ki]) & (qi >= ki)
                return ok & (qi - ki < window) if window > 0 else ok

            self._block_mask = create_block_mask(doc_causal, self.B, None, self.T, self.T, device=seg.device)
        slopes = self.alibi.to(q.device).float() if self.alibi is not None else None

        def alibi(score, b, h, qi, ki):
            return score - slopes[h] * (qi - ki)

        def capped(score, b, h, qi, ki):  # soft-capped logits (Gemma 2), then ALiBi if any
            score = softcap * torch.tanh(score / softcap)
            return alibi(score, b, h, qi, ki) if slopes is not None else score
        mod = capped if softcap else alibi if slopes is not None else None
        return _flex()(q, k, v, score_mod=mod, block_mask=self._block_mask, scale=scale,
                       enable_gqa=k.shape[1] != q.shape[1])


class _ToBuckets(torch.autograd.Function):
    """x (tokens, ...) -> its rows in the buckets' slots, one tensor per bucket.

    The gradient is one index_select (each token's own slot): a pad slot's gradient is exactly
    zero (its query's output is dropped, and under causal attention no real query reaches it), so
    nothing is accumulated, unlike index_select's own backward (zeros, then a scatter-add)."""

    @staticmethod
    def forward(ctx, x, gather, scatter, sizes):
        ctx.save_for_backward(scatter)
        ctx.sizes, ctx.tail = sizes, x.shape[1:]
        return tuple(x.index_select(0, gather).split(sizes))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        (scatter,) = ctx.saved_tensors
        ref = next(g for g in grads if g is not None)
        full = grads[0] if len(grads) == 1 else torch.cat(
            [g if g is not None else ref.new_zeros(n, *ctx.tail) for g, n in zip(grads, ctx.sizes)])
        return full.index_select(0, scatter), None, None, None


class _FromBuckets(torch.autograd.Function):
    """Per-bucket outputs -> (tokens, ...) in token order: each bucket's rows are copied to their
    tokens (pad slots to a spare row, dropped); the gradient is one index_select (zero for pads)."""

    @staticmethod
    def forward(ctx, put, sizes, n_tokens, *ys):
        ctx.save_for_backward(put)
        ctx.sizes = sizes
        out = ys[0].new_empty(n_tokens + 1, *ys[0].shape[1:])
        for y, idx in zip(ys, put.split(sizes)):
            out.index_copy_(0, idx, y)
        return out[:n_tokens]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (put,) = ctx.saved_tensors
        g = torch.cat([g, g.new_zeros(1, *g.shape[1:])])
        return (None, None, None, *g.index_select(0, put).split(ctx.sizes))


_FLEX = None


def _flex_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _flex():
    """flex_attention, compiled on accelerators (eager FlexAttention is a slow reference there)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX


def plan_segments(segment_ids: torch.Tensor | None, **kw) -> SegmentPlan | None:
    """The attention plan of a batch with segment ids, or None when plain causal attention is the
    same thing (no ids, or one segment per row and no pattern/ALiBi needing per-document positions)."""
    if segment_ids is None or single_segment_rows(segment_ids):
        return None  # (a pattern or ALiBi then applies over row positions, which are the document's)
    return SegmentPlan(segment_ids, **kw)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    One (B, n_kv, max_len, hd) buffer per layer for keys and one for values; a forward pass writes
    its new positions after the `length` already cached ones in every layer (`append`), then the
    model calls `advance`. Preallocation avoids the quadratic copying of growing the cache with
    torch.cat each step, and narrow/copy_ keep the per-step work to a few tensor ops.
    """

    def __init__(self, n_layer: int, batch: int, n_kv: int, max_len: int, head_dim: int, *,
                 dtype=torch.float32, device=None):
        shape = (batch, n_kv, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, t, hd) after the cached positions; return all keys and values so far."""
        s, t = self.length, k.shape[2]
        if s + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {s + t} needed")
        kb, vb = self.k[layer], self.v[layer]
        kb.narrow(2, s, t).copy_(k)
        vb.narrow(2, s, t).copy_(v)
        return kb.narrow(2, 0, s + t), vb.narrow(2, 0, s + t)  # (B, n_kv, s+t, hd)

    def advance(self, t: int) -> None:
        self.length += t


# ---------------------------------------------------------------------------------------------
# Linear layers and MLPs
# ---------------------------------------------------------------------------------------------

# Why a Linear subclass: decoding on CPU streams every weight once per token, and how fast
# depends on the shape of the product (measured on the 2-core machine, weights read from memory):
# - a few rows (one new token per sequence, 2..64 sequences): x @ W.T runs well below the same
#   product as (W @ x.T).T, a tall-skinny GEMM that streams W row by row (gpt2-tiny at batch 16:
#   ~25% less time per decoding step);
# - one row: the matrix-vector kernel reads a row-major W (out, in) with short rows (in = d_model)
#   at ~9 GB/s, the transposed W.T (in, out), whose rows are long, at 13-21 GB/s. So inside
#   `decoding_layout()` (generate.py), a wide Linear (out >= 2 x in: fused QKV, MLP up-projection,
#   LM head) keeps a transposed copy of its weight for the duration of the generate call.
# Only in inference mode, so training and evaluation keep the exact numerics of nn.Linear.
_FEW_ROWS = 64
_TRANSPOSED: dict | None = None  # Linear -> weight.T (contiguous) while decoding_layout() is active


@contextlib.contextmanager
def decoding_layout():
    """Let wide Linears keep a transposed weight copy for single-row products (see above).

    The copies are made on first use and dropped on exit: they cost memory (the wide weights
    once more) only during one generate call, and cannot go stale as weights change between calls.
    """
    global _TRANSPOSED
    outer, _TRANSPOSED = _TRANSPOSED, {}
    try:
        yield
    finally:
        _TRANSPOSED = outer


class Linear(nn.Linear):
    """nn.Linear (same parameters, init and state dict) with faster few-row paths for CPU decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (never while torch.compile traces: the inference-mode query would break the graph at
        # every Linear and recompile per weight shape; compiled code is never the decoding path)
        if not torch.compiler.is_compiling() and x.device.type == "cpu" and torch.is_inference_mode_enabled():
            rows = x.numel() // x.shape[-1]
            # (a ZeRO-3 partitioned weight, marked ds_id, is only whole inside its forward: no copy)
            if rows == 1 and _TRANSPOSED is not None and self.out_features >= 2 * self.in_features \
                    and not hasattr(self.weight, "ds_id"):
                wt = _TRANSPOSED.get(self)
                if wt is None:
                    wt = _TRANSPOSED[self] = self.weight.t().contiguous()  # (C_in, C_out)
                x1 = x.reshape(1, self.in_features)
                y = x1 @ wt if self.bias is None else torch.addmm(self.bias, x1, wt)
                return y.reshape(*x.shape[:-1], self.out_features)
            if 1 < rows <= _FEW_ROWS:
                xt = x.reshape(rows, x.shape[-1]).t()  # (C_in, rows)
                y = torch.mm(self.weight, xt) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)
                return y.t().reshape(*x.shape[:-1], self.out_features)  # (a transposed view: no copy)
        return super().forward(x)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,  # = Swish with beta 1
    "mish": F.mish,  # x * tanh(softplus(x)) (Misra 2019)
}

class MLP(nn.Module):
    """Two-layer feed-forward: proj(act(fc(x))). GPT-2 / BERT style."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (allowed: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[activation]
        self.fc = Linear(dim, hidden, bias=bias)
        self.proj = Linear(hidden, dim, bias=bias)
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
        self.fc = Linear(dim, 2 * hidden, bias=bias)
        self.proj = Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).split(self.hidden, dim=-1)
        return self.drop(self.proj(self.act(gate) * up))


# ---------------------------------------------------------------------------------------------
# Initialisation of one weight, by scheme. Linear weights are (out, in): fan_in = in.
# ---------------------------------------------------------------------------------------------

INIT_SCHEMES = ("normal", "xavier", "kaiming")


def init_linear_(weight: torch.Tensor, scheme: str, std: float, residual_layers: int | None = None) -> None:
    """normal: N(0, std), divided by sqrt(2 * n_layer) on residual output projections (GPT-2,
    section 2.3; `residual_layers` = n_layer there); xavier: N(0, 2 / (fan_in + fan_out)) (Glorot &
    Bengio 2010); kaiming: N(0, 2 / fan_in) (He et al. 2015, for ReLU-like activations)."""
    fan_out, fan_in = weight.shape
    if scheme == "normal":
        s = std / math.sqrt(2 * residual_layers) if residual_layers else std
    elif scheme == "xavier":
        s = math.sqrt(2.0 / (fan_in + fan_out))
    elif scheme == "kaiming":
        s = math.sqrt(2.0 / fan_in)
    else:
        raise ValueError(f"unknown init scheme {scheme!r} (allowed: {', '.join(INIT_SCHEMES)})")
    nn.init.normal_(weight, 0.0, s)


SMALL_EMBED_INIT = 1e-4


def init_embedding_(weight: torch.Tensor, kind: str, std: float) -> None:
    """normal: N(0, std); small: U(-1e-4, 1e-4) ("small init" of embeddings, as RWKV does: with a
    norm right after, tiny embeddings move quickly away from their start early in training)."""
    if kind == "normal":
        nn.init.normal_(weight, 0.0, std)
    elif kind == "small":
        nn.init.uniform_(weight, -SMALL_EMBED_INIT, SMALL_EMBED_INIT)
    else:
        raise ValueError(f"unknown embedding init {kind!r} (allowed: normal, small)")


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
    def forward(ctx, x, weight, labels, ignore_index: int, compute_dtype, need_grad: bool, smoothing: float = 0.0,
                z_loss: float = 0.0, softcap: float = 0.0):
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
        # Low precision (bf16/fp16 models): the gradients stay fp32 until backward has multiplied
        # them by the incoming gradient (fp16's loss scale, 2^16 by default, is not even
        # representable in fp16), and 1/n_valid is applied in fp32: rounding g/n to fp16 first
        # would flush the small entries of a large batch to zero.
        inv_n = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        scale = (valid.to(torch.float32) * inv_n)[:, None]
        # ignored rows: any valid index, masked below (other out-of-range labels still fail in gather)
        target = labels.masked_fill(~valid, 0)[:, None]
        minus_valid = valid.to(torch.float32).neg()[:, None]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
        for s in range(0, N, rows):
            e = min(s + rows, N)
            # fp32 log-softmax (upcast inside the kernel): bf16 logits lose too much precision
            logits = xc[s:e] @ wc.t()
            if softcap:  # final logit soft-capping (Gemma): logits = cap * tanh(logits / cap)
                th = torch.tanh(logits.float() / softcap)
                logits = (th * softcap).to(logits.dtype)
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            if not (smoothing or z_loss):
                loss -= (logp.gather(1, target[s:e]) * valid[s:e, None]).sum()
            else:
                # label smoothing: target (1-e) onehot + e/V; z-loss (PaLM): z * logsumexp(logits)^2
                row = -(1 - smoothing) * logp.gather(1, target[s:e]) - smoothing / V * logp.sum(-1, keepdim=True)
                if z_loss:
                    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (rows, 1)
                    row = row + z_loss * lse.square()
                loss += (row * valid[s:e, None]).sum()
            if need_grad:
                p = logp.exp_()  # softmax, in place
                if z_loss:
                    p.mul_(1 + 2 * z_loss * lse)  # d(z lse^2)/dlogits = 2 z lse softmax
                if smoothing:
                    p.sub_(smoothing / V)
                    p.scatter_add_(1, target[s:e], minus_valid[s:e] * (1 - smoothing))
                else:
                    p.scatter_add_(1, target[s:e], minus_valid[s:e])  # - onehot (counted rows only)
                if softcap:  # through the cap: d(cap tanh(l / cap))/dl = 1 - tanh^2
                    p.mul_(1 - th.square())
                p = p.to(compute_dtype)
                if compute_dtype == torch.float32:
                    torch.mm(p, wc, out=grad_x[s:e]).mul_(scale[s:e])
                    grad_w.addmm_(p.t(), xc[s:e] * scale[s:e])
                else:  # low-precision matmuls; scaling by 1/n and accumulation across chunks in fp32
                    grad_x[s:e] = (p @ wc).float().mul_(scale[s:e])
                    grad_w += (p.t() @ (xc[s:e] * valid[s:e, None].to(compute_dtype))).float()
        if need_grad:
            if compute_dtype != torch.float32:
                grad_w.mul_(inv_n)
            ctx.grads = (grad_x, grad_w, x.dtype, weight.dtype)
        return loss / n_valid  # nan when nothing is counted, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_x, grad_w, x_dtype, w_dtype = ctx.grads  # fp32
        # the loss is usually the root (grad 1): skip two passes then; no host sync on GPUs, no
        # data-dependent branch under torch.compile. The incoming gradient (a loss scale, say)
        # multiplies the fp32 gradients before they are cast to the inputs' dtypes.
        if torch.compiler.is_compiling() or grad_out.device.type != "cpu" or grad_out.item() != 1.0:
            g = grad_out.to(torch.float32)
            grad_x, grad_w = grad_x * g, grad_w * g
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, labels, ignore_index, label_smoothing) (mean over counted rows)
    + z_loss * mean(logsumexp(logits)^2), in chunks. `softcap`: the logits are first soft-capped,
    cap * tanh(logits / cap) (Gemma's final_logit_softcapping); None: not.

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
    args = (x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1), ignore_index, compute_dtype, need_grad,
            float(label_smoothing), float(z_loss), float(softcap or 0.0))
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):  # the function casts explicitly
            return _LinearCrossEntropy.apply(*args)
    return _LinearCrossEntropy.apply(*args)


class LMHead(Linear):
    """The output projection; given labels it returns the mean cross-entropy instead of logits.

    Still an nn.Linear (same `lm_head.weight`, same init and accounting; `Linear`'s decoding path). The loss goes through
    this module's forward, not through `self.lm_head.weight` used from outside, so that ZeRO-3's
    module hooks gather the (tied) weight for it. With labels it uses the fused, chunked
    `linear_cross_entropy`, which never materialises the (B, T, V) logits.
    `softcap` (set by a model that has it, e.g. Gemma): logits are cap * tanh(logits / cap), in the
    logits returned and in the loss alike.
    """

    softcap: float | None = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, label_smoothing: float = 0.0,
                z_loss: float = 0.0) -> torch.Tensor:
        if labels is None:
            logits = super().forward(x)
            return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap
        return linear_cross_entropy(x, self.weight, labels, ignore_index=-100, label_smoothing=label_smoothing,
                                    z_loss=z_loss, softcap=self.softcap)
