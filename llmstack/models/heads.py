"""Heads for RLHF on a GPT: token log-probs (policy), a scalar head (reward model, critic).

- PolicyLM is a GPT (same parameters, state dict and checkpoints, so `generate`, `export` and
  `model.init` take it as is) whose forward returns the log-probs of the given tokens instead of
  logits: PPO and DPO train through the DeepSpeed engine's forward, and only the positions that
  are scored go through the LM head, in row chunks (`token_logprobs`, below).
- ScalarHeadModel is a GPT backbone whose LM head is dropped (a reward or value model never needs
  the (B, T, V) logits); `head` maps each final hidden state to one number. The reward model reads
  it at the last real token of a sequence, the critic at every response position.
Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from llmstack.models.gpt import GPT, GPTConfig

BACKBONE = "backbone."  # prefix of the backbone's parameters in a scalar model's state dict


class PolicyLM(GPT):
    """A GPT whose forward gives per-token log-probs (and optionally entropies) of its input."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, *, start: int = 1, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(token_t | tokens_<t) for columns t = start..T-1, (B, T - start), fp32;
        the entropy of each of those next-token distributions, or None).

        Column t is predicted by the hidden state at t - 1; the logits of columns before
        start - 1 are never formed, and the others only a chunk of rows at a time
        (`token_logprobs`). `temperature` divides the logits (as the sampler did). The LM head's
        weight is read here, in the model's forward: under ZeRO-3 DeepSpeed then gathers it for
        this forward and its backward (an external parameter of the module; a tied head shares
        the embedding's).
        """
        if start < 1:
            raise ValueError(f"start must be >= 1 (nothing predicts column 0), got {start}")
        h = self.hidden_states(input_ids, position_ids, segment_ids=segment_ids)[:, start - 1:-1]  # (B, T - start, C)
        return token_logprobs(h, self.lm_head.weight, input_ids[:, start:], temperature=temperature,
                              with_entropy=with_entropy)


class ScalarHeadModel(nn.Module):
    """GPT backbone + Linear(C, 1): forward gives one scalar per position, (B, T)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.backbone = GPT(cfg)
        # The LM head is not used: drop it (a tied one leaves its weight in the embedding).
        self.backbone.lm_head = None
        self.head = nn.Linear(cfg.d_model, 1, bias=True)

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    def init_module_(self, module: nn.Module) -> None:
        """Backbone modules as GPT initialises them; the head small, so that initial scores are
        near 0 whatever the backbone (std 1/sqrt(C + 1), as in Stiennon et al. 2020)."""
        if module is self.head:
            nn.init.normal_(module.weight, 0.0, 1.0 / (self.config.d_model + 1) ** 0.5)
            nn.init.zeros_(module.bias)
        else:
            self.backbone.init_module_(module)

    def init_weights(self) -> None:
        for m in self.modules():
            self.init_module_(m)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scalars (B, T), fp32: one per position, each seeing the tokens up to it (and, with
        segment_ids, of its own segment: padding is a segment of its own)."""
        h = self.backbone.hidden_states(input_ids, position_ids, segment_ids=segment_ids)  # (B, T, C)
        return self.head(h).squeeze(-1).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def last_token_index(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row of a (B, T) validity mask (any padding side)."""
    T = valid.shape[1]
    pos = torch.arange(T, device=valid.device).expand_as(valid)
    return torch.where(valid.bool(), pos, -1).max(dim=1).values.clamp(min=0)


def sequence_scores(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) the scalar at each row's last real token: the reward of the whole sequence."""
    return values.gather(1, last_token_index(valid)[:, None]).squeeze(1)


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal LM's state dict as the backbone of a scalar model (its LM head dropped)."""
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


def is_scalar_state(state: dict[str, torch.Tensor]) -> bool:
    """True for the weights of a ScalarHeadModel (a reward model or critic), False for a causal LM."""
    return "head.weight" in state and any(k.startswith(BACKBONE) for k in state)


# ---------------------------------------------------------------------------------------------
# Chosen-token log-probs in row chunks
# ---------------------------------------------------------------------------------------------
# Scoring a rollout batch the plain way forms the (B, R, V) logits, upcasts them to fp32 and takes
# their log_softmax (and, for the entropy bonus, softmax * log_softmax): three or four (B, R, V) fp32
# tensors, kept for backward in training. At PPO sizes that is most of the memory: 64 rollouts x
# 512 response tokens x a 128k vocabulary is 16.8 GB per fp32 copy. Only one number per token is
# needed (the chosen token's log-prob, and the entropy), so `token_logprobs` works on row chunks
# whose logits fit in a fixed budget: per chunk the matmul, an fp32 log_softmax, the gather (and the
# entropy), then the chunk is dropped. Backward recomputes each chunk's logits from the saved hidden
# states and LM-head weight (one more (rows, C) x (C, V) matmul per chunk, as activation
# checkpointing does) instead of keeping any (rows, V) tensor between the passes.
#
# Same math and the same roundings as the plain path (lm_head(h).float(), then log_softmax):
# logits in the matmul's dtype (bf16 in a bf16 run), upcast to fp32, divided by the temperature,
# fp32 log_softmax. Unlike layers.py's fused linear cross-entropy, which computes its gradient in
# forward (possible for a mean loss), per-token outputs get their upstream gradient only in backward.

# Elements of one chunk's (rows, V) fp32 logits. CPU: 4M (16 MB, cache-sized, as layers.py's fused
# cross-entropy measured). Elsewhere 2^26 (256 MB per fp32 (rows, V) tensor; backward holds about
# three at once): chunks of ~500 rows at V=128k, enough to keep the matmuls large.
_CHUNK_ELEMS = {"cpu": 1 << 22}
_CHUNK_ELEMS_DEFAULT = 1 << 26


def chunk_rows(n_rows: int, vocab: int, device: torch.device, chunk_elems: int | None = None) -> int:
    """Rows per chunk: the budget / V, at least 1, balanced so the last chunk is not a sliver."""
    budget = chunk_elems or _CHUNK_ELEMS.get(device.type, _CHUNK_ELEMS_DEFAULT)
    rows = max(1, budget // vocab)
    n_chunks = max(1, -(-n_rows // rows))
    return -(-n_rows // n_chunks)


def _chunk_logp(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """(rows, V) fp32 log_softmax of h @ weight.T / temperature, rounded as the plain path rounds."""
    logits = F.linear(h, weight)  # in the inputs' dtype, then fp32 as lm_head(h).float() (fp64 stays: tests)
    logits = logits.to(_out_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, temperature: float, with_entropy: bool, rows: int):
        # h (N, C), weight (V, C), labels (N,) -> logp (N,) fp32, entropy (N,) fp32 (empty without)
        N = h.shape[0]
        out_dtype = _out_dtype(h.dtype)
        logp = torch.empty(N, dtype=out_dtype, device=h.device)
        entropy = torch.empty(N if with_entropy else 0, dtype=out_dtype, device=h.device)
        for s in range(0, N, rows):
            e = min(s + rows, N)
            lp = _chunk_logp(h[s:e], weight, temperature)  # (rows, V)
            logp[s:e] = lp.gather(1, labels[s:e, None]).squeeze(1)
            if with_entropy:
                entropy[s:e] = -(lp.exp() * lp).sum(-1)
        ctx.save_for_backward(h, weight, labels, entropy)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not zeros
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        # With z = logits / T, p = softmax(z), y the label, H the entropy:
        #   d logp_y / dz = onehot(y) - p;   dH / dz = -p * (log p + H).
        # dL/dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T; then the two matmuls
        # of a linear layer, chunk by chunk, the weight gradient accumulated in fp32.
        h, weight, labels, entropy = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        if not ctx.with_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_out_dtype(weight.dtype), device=weight.device) if need_w else None
        N = h.shape[0]
        for s in range(0, N, rows):
            e = min(s + rows, N)
            lp = _chunk_logp(h[s:e], weight, T)  # recomputed (rows, V) log p
            p = lp.exp()
            g = None
            if g_ent is not None:  # - g_ent * p * (log p + H), in place in lp
                g = lp.add_(entropy[s:e, None]).mul_(p).mul_(-g_ent[s:e, None].to(p.dtype))
            if g_logp is not None:  # g_logp * (onehot - p), in place in p
                gl = g_logp[s:e, None].to(p.dtype)
                g = p.mul_(-gl) if g is None else g.add_(p.mul_(-gl))
                g.scatter_add_(1, labels[s:e, None], gl)
            if T != 1.0:
                g.div_(T)
            g = g.to(h.dtype)  # the gradient of the upcast is a downcast, as autograd gives the plain path
            if need_h:
                grad_h[s:e] = g @ weight
            if need_w:
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), h[s:e])
                else:  # low-precision matmul, fp32 accumulation across chunks
                    grad_w += (g.t() @ h[s:e]).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None, None


def token_logprobs(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, chunk_elems: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(labels), the entropy of each next-token distribution or None), both fp32 of labels'
    shape, for logits = h @ weight.T / temperature, computed in row chunks (see the module docstring).

    h (..., C) final hidden states, weight (V, C) the LM head, labels (...) token ids. Both
    outputs are differentiable (the policy loss and the entropy bonus). `chunk_elems` overrides
    the per-chunk budget of logits elements (tests).
    """
    shape = labels.shape
    x, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    rows = chunk_rows(x.shape[0], weight.shape[0], x.device, chunk_elems)
    logp, entropy = _TokenLogprobs.apply(x, weight, y, float(temperature), bool(with_entropy), rows)
    return logp.view(shape), entropy.view(shape) if with_entropy else None
