"""Heads for RLHF on a GPT: token log-probs (policy), a scalar head (reward model, critic).

- PolicyLM is a GPT (same parameters, state dict and checkpoints, so `generate`, `export` and
  `model.init` take it as is) whose forward returns the log-probs of the given tokens instead of
  logits: PPO and DPO train through the DeepSpeed engine's forward, and only the positions that
  are scored go through the LM head.
- ScalarHeadModel is a GPT backbone whose LM head is dropped (a reward or value model never needs
  the (B, T, V) logits); `head` maps each final hidden state to one number. The reward model reads
  it at the last real token of a sequence, the critic at every response position.
Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmstack.models.gpt import GPT, GPTConfig

BACKBONE = "backbone."  # prefix of the backbone's parameters in a scalar model's state dict


class PolicyLM(GPT):
    """A GPT whose forward gives per-token log-probs (and optionally entropies) of its input."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, *, start: int = 1, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(token_t | tokens_<t) for columns t = start..T-1, (B, T - start), fp32;
        the entropy of each of those next-token distributions, or None).

        Column t is predicted by the hidden state at t - 1; the logits of columns before
        start - 1 are never formed. `temperature` divides the logits (as the sampler did).
        """
        if start < 1:
            raise ValueError(f"start must be >= 1 (nothing predicts column 0), got {start}")
        h = self.hidden_states(input_ids, position_ids, attn_mask)[:, start - 1:-1]  # (B, T - start, C)
        logits = self.lm_head(h).float()  # (B, T - start, V)
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, input_ids[:, start:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
        return logp, entropy


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
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalars (B, T), fp32: one per position, each seeing the tokens up to it."""
        h = self.backbone.hidden_states(input_ids, position_ids, attn_mask)  # (B, T, C)
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
