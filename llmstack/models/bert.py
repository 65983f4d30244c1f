"""BERT encoder with a masked-LM head, readable top to bottom (Devlin et al. 2019).

Design choices:
- embeddings: word + learned absolute position + token type, then LayerNorm and dropout (as the
  original and Hugging Face's BertForMaskedLM, so export is a plain copy)
- post-LN blocks, the original: x = LN(x + attn(x)), x = LN(x + mlp(x)); or pre-LN
  (`prenorm=True`, as Megatron-BERT / most modern encoders: x + attn(LN(x)), a final LN, and no
  LayerNorm on the embeddings), which trains more stably when deep
- bidirectional multi-head attention with a padding mask, PyTorch SDPA, one fused QKV matmul
- GELU (erf form, as BERT) two-layer MLP with biases
- MLM head: dense + activation + LayerNorm, then the output projection tied to the word
  embeddings with its own bias (`lm_head`); the loss is computed only at masked positions, so the
  (B, T, V) logits are never built during training (15% of the rows instead)
- init: normal(0, init_std) weights, zero biases, unit norms (BERT's truncated normal is close).
Shapes: B batch, T sequence, C d_model, nh heads, hd head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# the config and presets are plain Python in configs.py (config validation needs no torch)
from llmstack.models.configs import BERT_PRESETS as PRESETS  # noqa: F401 (re-exported)
from llmstack.models.configs import BertConfig
from llmstack.models.layers import ACTIVATIONS, MLP, attention


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; `mask` hides padding keys."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head, self.hd = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # output [q | k | v]
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_dropout = cfg.attn_dropout
        self.resid_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        y = attention(q, k, v, causal=False, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """One encoder layer; post-LN (original BERT) or pre-LN."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, cfg.activation, bias=True, dropout=cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x, mask=None):
        if self.prenorm:
            x = x + self.attn(self.ln_1(x), mask)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, mask))
        return self.ln_2(x + self.mlp(x))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.max_seq_len, C)
        self.wtt = nn.Embedding(cfg.type_vocab_size, C)
        # post-LN normalises the embedding sum; pre-LN leaves that to each block's first norm
        self.ln_emb = nn.LayerNorm(C, eps=cfg.norm_eps) if not cfg.prenorm else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=cfg.norm_eps) if cfg.prenorm else None
        # MLM head: transform, then the output projection (tied to wte) with a per-token bias
        self.head_dense = nn.Linear(C, C)
        self.head_act = ACTIVATIONS[cfg.activation]
        self.head_ln = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one Parameter in two modules, as in gpt.py
        self.gradient_checkpointing = cfg.activation_checkpointing

    # -- init ------------------------------------------------------------------------------
    def init_module_(self, module: nn.Module) -> None:
        """Initialise one module's own parameters (see GPT.init_module_ for why per module)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if not (module is self.lm_head and self.config.tie_embeddings):
                nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_weights(self) -> None:
        for m in self.modules():
            self.init_module_(m)

    # -- forward ---------------------------------------------------------------------------
    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """Encoder output (B, T, C). attention_mask: (B, T), 1 for real tokens, 0 for padding."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        pos = position_ids if position_ids is not None else torch.arange(T, device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.wte(input_ids) + self.wpe(pos) + self.wtt(types)  # (B, T, C)
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        x = self.drop(x)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that may be attended
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_f(x) if self.ln_f is not None else x

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of encoder outputs h (..., C)."""
        return self.lm_head(self.head_ln(self.head_act(self.head_dense(h))))

    def forward(self, input_ids, labels=None, attention_mask=None, token_type_ids=None, position_ids=None):
        """MLM logits (B, T, V); with labels (B, T), the mean cross-entropy over labels != -100.

        The loss path selects the labelled positions first, so only those rows go through the
        head: about 15% of (B, T) under BERT masking.
        """
        h = self.hidden_states(input_ids, attention_mask, token_type_ids, position_ids)
        if labels is None:
            return self.mlm_logits(h)
        keep = labels != -100
        logits = self.mlm_logits(h[keep])  # (N_masked, V)
        return F.cross_entropy(logits.float(), labels[keep])

    # -- accounting -----------------------------------------------------------------------
    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def matmul_params(self) -> int:
        """Linear weights, the output projection included (PaLM's N; lookup embeddings excluded)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 L H Q T. Counts the head on every token although the
        MLM loss only runs it on masked ones: the same convention as the GPT figure, an upper bound."""
        c = self.config
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
