"""Per-token rewards, advantages and returns for PPO (Ziegler et al. 2019; Stiennon et al. 2020).

Shapes: B rollouts, R response positions. `mask` (B, R) is 1.0 on response tokens (up to and
including the stop token) and 0.0 on the right padding after them. Position j of a response is
the action "emit token j" taken in the state prompt + response[:j].
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions; unbiased (n / (n - 1)) by default."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions (mean kept when not shift_mean).

    Padding positions come out as 0, so they can never leak into a masked sum later.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probs.

    k1 = log p - log q (unbiased, can be negative); k3 = (r - 1) - log r with r = q / p (Schulman's
    "Approximating KL divergence", always >= 0, lower variance); abs = |log p - log q|.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r} (allowed: k1, k3, abs)")


def penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (B, R), kl (B, R)): r_j = -kl_coef * KL_j on every response token, plus the
    sequence score (B,) on the last response token (the one that ends the episode)."""
    kl = kl_estimate(logprobs, ref_logprobs, kind) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of each row's last response token
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per row, right to left.

    delta_j = r_j + gamma * V_{j+1} - V_j, with V after the last response token = 0 (terminal);
    A_j = delta_j + gamma * lam * A_{j+1}; returns G_j = A_j + V_j (the value targets).
    Returns (advantages, returns), both (B, R) and 0 on padding.
    """
    values = values * mask
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for j in reversed(range(R)):
        m = mask[:, j]
        delta = rewards[:, j] + gamma * next_value - values[:, j]
        a = delta + gamma * lam * next_adv
        # on padding keep carrying zeros: the position after a row's last token is terminal
        adv[:, j] = a * m
        next_value = values[:, j] * m
        next_adv = adv[:, j]
    returns = (adv + values) * mask
    return adv, returns


class AdaptiveKLController:
    """KL coefficient that tracks a target KL (Ziegler et al. 2019, section 2.2):

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    With target None the coefficient stays fixed.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and variance of scores (Chan et al.'s parallel update), to normalise rewards.

    `update` takes a batch (all ranks' scores, so every rank normalises the same way).
    """

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def normalize_scores(scores: torch.Tensor, moments: RunningMoments | None, clip: float | None) -> torch.Tensor:
    """Scores divided by the running std (and centred on the running mean), then clipped to +-clip."""
    if moments is not None and moments.count > 1:
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores
