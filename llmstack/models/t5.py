"""T5 encoder-decoder, readable top to bottom (Raffel et al. 2020; T5 v1.1 defaults).

Design choices:
- no absolute positions: a learned relative position bias per head, bucketed (exact for short
  distances, logarithmic up to `rel_max_distance`), computed once per stack and shared by all of
  its layers; bidirectional buckets in the encoder, causal ones in the decoder
- attention logits are not divided by sqrt(head dim) (T5 folds that into the init)
- pre-norm with T5's LayerNorm, which is RMSNorm: no mean subtraction, no bias; a final norm per stack
- no biases anywhere; FFN gated-GELU (v1.1, `ffn="gated-gelu"`, tanh GELU) or ReLU (original T5)
- one embedding shared by encoder and decoder; LM head untied (v1.1) or tied to the embedding, in
  which case the decoder output is scaled by d_model**-0.5 first (`rescale_output`, mesh-tf's
  convention; Hugging Face's `scale_decoder_outputs`)
- decoder: causal self-attention, then cross-attention over the encoder output, then the FFN
- init as mesh-tf / Hugging Face T5 (std from fan-in, scaled by `init_factor`), except an untied
  LM head, which gets std d_model**-0.5 so the initial logits have unit scale.
- inference: `encode` once, then `decode` one token at a time with a T5Cache (self-attention keys
  and values grow; cross-attention keys and values are computed once from the encoder output).
Shapes: B batch, S encoder length, T decoder length, C d_model, nh heads, dk head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# the config and presets are plain Python in configs.py (config validation needs no torch)
from llmstack.models.configs import FFN_KINDS  # noqa: F401 (re-exported)
from llmstack.models.configs import T5_PRESETS as PRESETS  # noqa: F401 (re-exported)
from llmstack.models.configs import T5Config
from llmstack.models.layers import MLP, GatedMLP, KVCache, Linear, LMHead, RMSNorm, attention


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each relative position rel = key_pos - query_pos (mesh-tf's scheme).

    Bidirectional: half the buckets for keys after the query, half for keys before. Within a half,
    the first half of its buckets are exact distances 0..n/2-1, the rest log-spaced up to
    max_distance, beyond which everything shares the last bucket. Causal: only keys at or before
    the query are distinguished (later ones fall into bucket 0, and are masked anyway).
    """
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced buckets; dist.clamp avoids log(0) on entries that take the exact branch anyway
    log_ratio = torch.log(dist.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class RelativeBias(nn.Embedding):
    """Learned (buckets, nh) table -> additive attention bias (1, nh, Tq, Tk).

    An nn.Embedding (a lookup table, as in mesh-tf): the optimizer then treats it like the other
    embeddings (no weight decay).
    """

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__(cfg.rel_buckets, cfg.n_head)
        self.bidirectional, self.max_distance = bidirectional, cfg.rel_max_distance

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        q_pos = torch.arange(offset, offset + q_len, device=self.weight.device)[:, None]
        k_pos = torch.arange(k_len, device=self.weight.device)[None, :]
        b = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_embeddings, self.max_distance)
        return super().forward(b).permute(2, 0, 1)[None]  # (Tq, Tk, nh) -> (1, nh, Tq, Tk)


class Attention(nn.Module):
    """Self-attention (fused q, k, v) or cross-attention (q from x, fused k, v from the encoder)."""

    def __init__(self, cfg: T5Config, cross: bool = False, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.hd, self.cross, self.layer_idx = cfg.n_head, cfg.head_dim, cross, layer_idx
        inner = cfg.inner_dim
        if cross:
            self.q = Linear(cfg.d_model, inner, bias=False)
            self.kv = Linear(cfg.d_model, 2 * inner, bias=False)  # [k | v]
        else:
            self.qkv = Linear(cfg.d_model, 3 * inner, bias=False)  # [q | k | v]
        self.proj = Linear(inner, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.attn_dropout = cfg.dropout

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, -1, self.hd).transpose(1, 2)  # (B, nh, T, dk)

    def forward(self, x, bias, *, memory=None, cache: T5Cache | None = None):
        """x (B, T, C); bias: float (.., nh or 1, T, S) additive (position bias and/or mask)."""
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x))
            if cache is not None and cache.cross[self.layer_idx] is not None:
                k, v = cache.cross[self.layer_idx]  # the encoder output does not change while decoding
            else:
                k, v = (self._heads(t) for t in self.kv(memory).chunk(2, dim=-1))  # (B, nh, S, dk)
                if cache is not None:
                    cache.cross[self.layer_idx] = (k, v)
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                past = cache.length
                kc, vc = cache.self_attn.append(self.layer_idx, k, v)
                k, v = (kc, vc) if past > 0 else (k, v)  # the fresh k, v are contiguous: faster kernels
        y = attention(q, k, v, causal=False, mask=bias, scale=1.0,
                      dropout_p=self.attn_dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


def _ffn(cfg: T5Config) -> nn.Module:
    if cfg.ffn == "gated-gelu":
        return GatedMLP(cfg.d_model, cfg.ff_dim, "gelu_tanh", bias=False, dropout=cfg.dropout)
    return MLP(cfg.d_model, cfg.ff_dim, "relu", bias=False, dropout=cfg.dropout)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = _ffn(cfg)

    def forward(self, x, bias):
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx=layer_idx)
        self.ln_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = Attention(cfg, cross=True, layer_idx=layer_idx)
        self.ln_3 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = _ffn(cfg)

    def forward(self, x, self_bias, memory, cross_bias, cache=None):
        x = x + self.self_attn(self.ln_1(x), self_bias, cache=cache)
        x = x + self.cross_attn(self.ln_2(x), cross_bias, memory=memory, cache=cache)
        return x + self.mlp(self.ln_3(x))


class Stack(nn.Module):
    """The blocks of the encoder or decoder, their shared relative bias and final norm."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        n = cfg.decoder_layers if decoder else cfg.n_layer
        self.rel_bias = RelativeBias(cfg, bidirectional=not decoder)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) if decoder else EncoderBlock(cfg) for i in range(n))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()


class T5Cache:
    """Decoder state while generating: self-attention keys/values, cross-attention keys/values."""

    def __init__(self, cfg: T5Config, batch: int, max_len: int, dtype, device):
        self.self_attn = KVCache(cfg.decoder_layers, batch, cfg.n_head, max_len, cfg.head_dim, dtype=dtype, device=device)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.decoder_layers

    @property
    def length(self) -> int:
        return self.self_attn.length


def _additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive 0 / most-negative float (finite, so no NaN when added)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one Parameter in two modules, as in gpt.py
        self.gradient_checkpointing = cfg.activation_checkpointing
        self._plan_init()

    # -- init ------------------------------------------------------------------------------
    def _plan_init(self) -> None:
        """Record on each Linear the std of its rows (fused q|k|v rows differ), so that init can
        run one module at a time with only that module's parameters (what ZeRO-3 gathers)."""
        c, f = self.config, self.config.init_factor
        dm, inner = c.d_model, c.inner_dim
        q_std = f * (dm * c.head_dim) ** -0.5  # the 1/sqrt(dk) that attention does not apply, folded in
        for m in self.modules():
            if isinstance(m, Attention):
                if m.cross:
                    m.q.init_rows, m.kv.init_rows = [(inner, q_std)], [(2 * inner, f * dm**-0.5)]
                else:
                    m.qkv.init_rows = [(inner, q_std), (2 * inner, f * dm**-0.5)]
                m.proj.init_rows = [(dm, f * inner**-0.5)]
            elif isinstance(m, (MLP, GatedMLP)):
                m.fc.init_rows = [(m.fc.out_features, f * dm**-0.5)]
                m.proj.init_rows = [(dm, f * c.ff_dim**-0.5)]
        self.lm_head.init_rows = [(c.vocab_size, f * dm**-0.5)]

    def init_module_(self, module: nn.Module) -> None:
        """Initialise one module's own parameters (see GPT.init_module_ for why per module)."""
        c, f = self.config, self.config.init_factor
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and c.tie_embeddings:
                    return
                rows = module.init_rows
                for w, (_, std) in zip(module.weight.split([n for n, _ in rows]), rows):
                    w.normal_(0.0, std)
            elif isinstance(module, RelativeBias):
                module.weight.normal_(0.0, f * c.d_model**-0.5)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, f * 1.0)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(f * 1.0)

    def init_weights(self) -> None:
        for m in self.modules():
            self.init_module_(m)

    # -- forward ---------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, C). attention_mask: (B, S), 1 for real tokens, 0 for padding."""
        enc = self.encoder
        B, S = input_ids.shape
        x = enc.drop(self.embed(input_ids))
        bias = enc.rel_bias(S, S)  # (1, nh, S, S)
        if attention_mask is not None:
            bias = bias + _additive(attention_mask.bool()[:, None, None, :], bias.dtype)  # (B, nh, S, S)
        for block in enc.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return enc.drop(enc.ln_f(x))

    def decode(self, decoder_input_ids, memory, attention_mask=None, decoder_attention_mask=None,
               cache: T5Cache | None = None) -> torch.Tensor:
        """Decoder output (B, T, C), before the LM head's rescale.

        memory: encoder output (B, S, C); attention_mask (B, S) its padding; decoder_attention_mask
        (B, T) optional decoder padding. With a cache, the T new positions follow the cached ones.
        """
        dec = self.decoder
        B, T = decoder_input_ids.shape
        past = cache.length if cache is not None else 0
        x = dec.drop(self.embed(decoder_input_ids))
        self_bias = dec.rel_bias(T, past + T, offset=past)  # (1, nh, T, past+T)
        if T > 1 or decoder_attention_mask is not None:  # (one new token may see every cached one)
            keep = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)  # causal, bottom-right aligned
            if decoder_attention_mask is not None:
                keep = keep & decoder_attention_mask.bool()[:, None, None, :]  # (B, 1, T, past+T)
            self_bias = self_bias + _additive(keep, x.dtype)
        cross_bias = None
        if attention_mask is not None:
            cross_bias = _additive(attention_mask.bool()[:, None, None, :], x.dtype)  # (B, 1, 1, S)
        for block in dec.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, self_bias, memory, cross_bias, use_reentrant=False)
            else:
                x = block(x, self_bias, memory, cross_bias, cache)
        if cache is not None:
            cache.self_attn.advance(T)
        return dec.drop(dec.ln_f(x))

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder output as the LM head reads it: scaled by d_model**-0.5 when `rescale`."""
        return h * self.config.d_model**-0.5 if self.config.rescale else h

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: [start] + labels[:-1], ignored labels (-100) as padding."""
        start = torch.full_like(labels[:, :1], self.config.pad_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_id)

    def forward(self, input_ids, decoder_input_ids=None, labels=None, attention_mask=None, decoder_attention_mask=None):
        """Logits (B, T, V), or with labels (B, T) the mean cross-entropy over labels != -100.

        Without decoder_input_ids, they are the labels shifted right (teacher forcing).
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5 needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        memory = self.encode(input_ids, attention_mask)
        h = self.head_input(self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask))
        if labels is None:
            return self.lm_head(h)
        return self.lm_head(h, labels)  # fused chunked cross-entropy (layers.linear_cross_entropy)

    def new_cache(self, batch: int, max_len: int) -> T5Cache:
        """An empty decoder cache for `batch` rows of up to `max_len` decoder positions."""
        p = self.embed.weight
        return T5Cache(self.config, batch, max_len, p.dtype, p.device)

    # -- accounting -----------------------------------------------------------------------
    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def matmul_params(self) -> int:
        """Linear weights, the LM head included (PaLM's N; lookup embeddings excluded)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the seq_len-token text that span corruption turns into an
        encoder input of Te tokens and a decoder target of Td (data_pipeline/objectives.py; for
        seq_len 256: 232 and 52). The PaLM count (6N + 12 L H Q T) applied to each stack over
        the tokens it processes: 6 x the encoder's Linear weights x Te, the decoder's and the LM
        head's x Td, except cross-attention's key/value projections, which read the encoder's Te
        outputs; attention 12 H Q per (query, key) pair and layer: Te x Te (encoder), Td x Td
        (decoder self-attention) and Td x Te (cross-attention). The sum per sequence / seq_len:
        the stage counts seq_len tokens per sequence.
        """
        from data_pipeline.objectives import span_corruption_lengths

        c = self.config
        te, td, _ = span_corruption_lengths(seq_len)
        encoder = sum(m.weight.numel() for m in self.encoder.modules() if isinstance(m, nn.Linear))
        decoder = sum(m.weight.numel() for m in self.decoder.modules() if isinstance(m, nn.Linear))
        cross_kv = sum(block.cross_attn.kv.weight.numel() for block in self.decoder.blocks)
        linear = encoder * te + cross_kv * te + (decoder - cross_kv + self.lm_head.weight.numel()) * td
        attention = 12 * c.inner_dim * (c.n_layer * te * te + c.decoder_layers * (td * td + td * te))
        return (6 * linear + attention) / seq_len
