"""Losses of the RLHF stages, written to match the formulas in the papers term by term.

Shapes: B rollouts (or preference pairs), R response positions; `mask` (B, R) is 1.0 on counted
tokens. Every token-level mean is over counted tokens of the whole mini-batch (not per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstack.rlhf.advantages import masked_mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

    ratio = exp(logp - logp_old);  L = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
    Also returns the clip fraction (tokens where the clipped term is the larger) and approx-KL
    mean(0.5 * (logp - logp_old)^2) between the current and the rollout policy.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio**2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (as in OpenAI's baselines PPO2):

    V_clip = V_old + clip(V - V_old, -eps, eps);  L = 0.5 * mean(max((V - G)^2, (V_clip - G)^2)).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last dim: logsumexp(z) - sum(softmax(z) * z)."""
    logits = logits.float()
    p = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                  reduce: bool = True) -> torch.Tensor:
    """Bradley-Terry reward-model loss: mean(-log sigmoid(r_chosen - r_rejected - margin)), or the
    per-pair values with reduce=False.

    `margin` (per pair or a constant) asks for a larger gap on clearer preferences (LLaMA-2, eq. 2).
    """
    loss = -F.logsigmoid(r_chosen - r_rejected - margin)
    return loss.mean() if reduce else loss


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             reduce: bool = True) -> tuple[torch.Tensor, dict]:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7) on summed response log-probs (B,).

    z = beta * ((pi_c - ref_c) - (pi_r - ref_r));  L = -(1 - s) log sigmoid(z) - s log sigmoid(-z)
    with label smoothing s (conservative DPO: the labels are flipped with probability s).
    The implicit rewards are beta * (pi - ref) of each response. With reduce=False the loss and the
    statistics are per pair (B,) instead of means.
    """
    chosen_reward = beta * (chosen_logps - ref_chosen_logps)
    rejected_reward = beta * (rejected_logps - ref_rejected_logps)
    z = chosen_reward - rejected_reward
    loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    mean = (lambda x: x.mean()) if reduce else (lambda x: x)
    with torch.no_grad():
        stats = {"reward_margin": mean(z), "reward_accuracy": mean((z > 0).float()),
                 "chosen_reward": mean(chosen_reward), "rejected_reward": mean(rejected_reward)}
    return mean(loss), stats
