"""Critic-free, group-relative policy gradient: advantages, KL, clipped objective, loss aggregation.

Shapes: N = P x G completions, grouped contiguously: rows [g*G, (g+1)*G) are the G completions
sampled for prompt g. `rewards` (N,) holds one scalar per completion; per-token tensors are (N, T)
with a float `mask` (N, T) that is 1.0 on completion tokens and 0.0 on padding. The baseline is the
group's own rewards, so there is no value model.

Advantages (one scalar per completion, broadcast over its tokens by the caller), r_i the reward of
completion i, mean / std over its group of G:

- grpo (Shao et al. 2024, DeepSeekMath, outcome supervision):  A_i = (r_i - mean) / (std + eps),
  std the unbiased (Bessel, n - 1) one, as TRL's GRPOTrainer computes it.
- dr_grpo (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
  A_i = r_i - mean; dividing by the group std weights easy and hard prompts unequally.
- rloo (Ahmadian et al. 2024, "Back to Basics"): A_i = r_i - 1/(G-1) sum_{j != i} r_j
  = G/(G-1) (r_i - mean), the leave-one-out baseline (G >= 2).
- reinforce_pp (Hu 2025, REINFORCE++-baseline): A_i = (r_i - mean) / (std_batch + eps), the
  group-centred rewards divided by their unbiased std over the whole batch (all N rows).

Per-token loss (GRPO's objective, with DAPO's (Yu et al. 2025) asymmetric "clip-higher"):
ratio = exp(logp - logp_old), L_t = -min(ratio A_t, clip(ratio, 1 - eps_low, 1 + eps_high) A_t),
plus beta times the k3 estimate of KL(policy || reference) in the loss (GRPO), not in the reward.

Aggregation over tokens, as each paper writes its objective:
- GRPO: 1/G sum_i 1/|o_i| sum_t L_{i,t}, mean over sequences of each sequence's token mean
  ("seq_mean_token_mean"): a token of a long completion weighs less than one of a short one.
- DAPO: sum_{i,t} L_{i,t} / sum_i |o_i|, the token mean over the batch ("token_mean").
- Dr. GRPO: sum_{i,t} L_{i,t} / (N * max_len), max_len the generation budget, a constant, so
  neither the length of a completion nor that of the batch changes a token's weight
  ("seq_mean_token_sum_norm").
"""

from __future__ import annotations

import torch

from llmstack.rlhf.advantages import kl_estimate, masked_mean, masked_var

ALGOS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")

# The aggregation each method is published or implemented with. GRPO and Dr. GRPO state theirs in
# the paper's objective; RLOO and REINFORCE++ define a sequence-level estimator, and their
# implementations in OpenRLHF and TRL average the per-token loss over all tokens of the batch.
DEFAULT_AGG = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm", "rloo": "token_mean",
               "reinforce_pp": "token_mean"}


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N,) as (P, G), with the checks every group function shares."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"the number of completions ({rewards.numel()}) must be a multiple of "
                         f"group_size ({group_size})")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, algo: str, eps: float = 1e-6) -> torch.Tensor:
    """One advantage per completion (N,) from its group's rewards (formulas in the module docstring).

    grpo divides by the unbiased group std (n - 1, as TRL's GRPOTrainer); reinforce_pp by the unbiased
    std over all N group-centred rewards (their batch mean is 0, so REINFORCE++'s batch re-centring
    changes nothing). A group of identical rewards gets advantage 0 under every algorithm.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r} (allowed: {', '.join(ALGOS)})")
    r = _groups(rewards, group_size)
    r = r.to(torch.promote_types(r.dtype, torch.float32))
    G = group_size
    centred = r - r.mean(dim=1, keepdim=True)  # (P, G)
    if algo == "grpo":
        # a group of one has no spread: its std is taken as 0, and its advantage is 0
        std = (centred.pow(2).sum(dim=1, keepdim=True) / max(G - 1, 1)).sqrt()
        adv = centred / (std + eps)
    elif algo == "dr_grpo":
        adv = centred
    elif algo == "rloo":
        if G < 2:
            raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {G}")
        adv = centred * (G / (G - 1))
    else:  # reinforce_pp
        flat = centred.flatten()
        std = masked_var(flat, torch.ones_like(flat)).sqrt()
        adv = centred / (std + eps)
    return adv.flatten()


def equal_groups(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """(P,) bool: the groups whose rewards are all equal (max - min <= atol).

    Their advantages are 0 under every algorithm, so they carry no gradient but still count in a
    mean; DAPO's dynamic sampling drops them (keep_rows(~equal_groups(r, G), G) selects the rest).
    """
    r = _groups(rewards, group_size)
    return (r.amax(dim=1) - r.amin(dim=1)) <= atol


def keep_rows(groups_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group mask (P,) -> per-row mask (N,): each group's value repeated for its G rows."""
    return groups_mask.repeat_interleave(group_size)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) (Schulman, "Approximating KL divergence"):

    exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0, and 0 where the two log-probs agree.
    """
    return kl_estimate(logp, ref_logp, "k3")


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, adv_tokens: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss with an asymmetric clip (DAPO's clip-higher), all (N, T):

    ratio = exp(logp - old_logp);  L = -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A).
    Returns (L, clipped), clipped a float mask (1.0 where the clipped term is the one taken, so the
    token gives no gradient); masked_mean(clipped, mask) is the clip fraction.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv_tokens * ratio
    clipped = -adv_tokens * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logp.dtype)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None, *,
              total_rows=None, total_tokens=None) -> torch.Tensor:
    """Scalar loss from per-token values (N, T) over the masked tokens (modes in the module docstring):

    seq_mean_token_mean: sum_i (sum_t m_it x_it / sum_t m_it) / rows;
    token_mean: sum_it m_it x_it / tokens;  seq_mean_token_sum_norm: sum_it m_it x_it / (rows * max_len).

    rows and tokens are this call's own (N, mask.sum()) unless total_rows and total_tokens are given
    (both, as numbers or tensors): then this is one part's share, and the shares of parts that split
    a batch's rows sum to the aggregate of the whole batch (gradient accumulation). An engine that
    divides each micro-batch loss by the accumulation steps needs the share multiplied by their number.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation {mode!r} (allowed: {', '.join(AGG_MODES)})")
    if mode == "seq_mean_token_sum_norm" and max_len is None:
        raise ValueError("seq_mean_token_sum_norm needs max_len (the generation budget)")
    if (total_rows is None) != (total_tokens is None):
        raise ValueError("give both total_rows and total_tokens (a part of a batch) or neither")
    if total_rows is None:
        if mode == "token_mean":
            return masked_mean(per_token, mask)
        total_rows = per_token.shape[0]
    if mode == "seq_mean_token_mean":
        # rows without tokens count as sequences with mean 0 (masked_mean clamps their count to 1)
        return masked_mean(per_token, mask, dim=-1).sum() / _at_least_one(total_rows)
    token_sum = (per_token * mask).sum()
    if mode == "token_mean":
        return token_sum / _at_least_one(total_tokens)
    return token_sum / (_at_least_one(total_rows) * max_len)


def _at_least_one(count):
    """A count (number or tensor) as a divisor: an empty batch divides by 1, giving 0, not nan."""
    return count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
