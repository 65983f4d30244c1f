"""Rollout tensors: (prompt | response) batches, their per-token log-probs and values.

Layout of a rollout batch (B rows, P prompt columns, R response columns):

    [pad pad p0 p1 p2 | r0 r1 EOS pad]     ids (B, P + R), valid (B, P + R)
                        ^ response column j is predicted by the hidden state at column P - 1 + j

Prompts are left-padded (as generate.py decodes them), responses right-padded after their stop
token. Real tokens get positions 0, 1, ... whatever their padding, and pad keys are hidden from
attention, so each row scores exactly as it would alone (tested against unpadded forwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llmstack.models.heads import sequence_scores
from llmstack.models.layers import segments_from_valid


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
         device=None) -> dict[str, torch.Tensor | int]:
    """The rollout batch: ids, valid (B, P + R), response_mask (B, R) float, prompt_len P."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    valid = torch.zeros((B, P + R), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        ids[i, P:P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        valid[i, P - len(p):P + len(r)] = True
    return {"ids": ids.to(device), "valid": valid.to(device), "response_mask": valid[:, P:].float().to(device),
            "prompt_len": P}


@dataclass
class Rollout:
    """One PPO rollout batch of this process, scored: B rows, P prompt columns, R response
    columns (the layout above). Per-token tensors are (B, R) and aligned with the response
    tokens: column j holds the quantity of response token j (predicted at column P - 1 + j)."""

    ids: torch.Tensor  # (B, P + R) long: prompt (left-padded) | response (right-padded)
    valid: torch.Tensor  # (B, P + R) bool: real tokens
    mask: torch.Tensor  # (B, R) float: 1 on response tokens (the stop token included)
    prompt_len: int  # P
    old_logp: torch.Tensor  # (B, R) actor log-probs before this step's updates
    ref_logp: torch.Tensor  # (B, R) frozen reference's log-probs
    values: torch.Tensor  # (B, R) critic values V(state before token j) before the updates
    advantages: torch.Tensor  # (B, R) GAE advantages (whitened when ppo.whiten_advantages)
    returns: torch.Tensor  # (B, R) value targets: advantages + values (before whitening)
    kl: torch.Tensor  # (B, R) per-token KL estimate to the reference (ppo.kl_estimator)
    score: torch.Tensor  # (B,) reward model / function score of each conversation
    reward: torch.Tensor  # (B,) score minus the missing-stop penalty: what PPO maximises
    reward_normalized: torch.Tensor  # (B,) the reward after running normalisation and clipping
    stopped: torch.Tensor  # (B,) bool: the response ended with a stop token

    def rows(self, mb: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, valid, response mask) of rows `mb`, the first `cols` columns (P + responses)."""
        return self.ids[mb, :cols], self.valid[mb, :cols], self.mask[mb, :cols - self.prompt_len]


def model_inputs(valid: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(position_ids, segment_ids) for a padded batch (padding is a segment of its own: no
    (B, 1, T, T) mask); (None, None) when nothing is padded on the left (right padding cannot
    influence earlier tokens under a causal mask, and SDPA's causal kernel is the fast path)."""
    if bool(valid[:, 0].all()) and bool((valid.long().diff(dim=1) <= 0).all()):
        return None, None  # every row starts at column 0, padding only on the right
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return pos, segments_from_valid(valid)


def response_logprobs(model, ids: torch.Tensor, valid: torch.Tensor, prompt_len: int, *, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the response tokens under `model` (a PolicyLM or its engine), and
    optionally the entropy (B, R) of its next-token distribution at each response position.

    Only the R hidden states that predict response tokens go through the LM head: the logits of
    the prompt positions are never formed. `temperature` divides the logits as the sampler did.
    """
    pos, seg = model_inputs(valid)
    return model(ids, pos, seg, start=prompt_len, temperature=temperature, with_entropy=with_entropy)


def response_values(value_model, ids: torch.Tensor, valid: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Critic values (B, R): V of the state before each response token (same columns as log-probs)."""
    pos, seg = model_inputs(valid)
    return value_model(ids, pos, seg)[:, prompt_len - 1:-1]


def scores(reward_model, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model scores: its scalar at each row's last real token (the stop token)."""
    pos, seg = model_inputs(valid)
    return sequence_scores(reward_model(ids, pos, seg), valid)


def sequence_logprobs(model, ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(token | prefix) over the tokens where label_mask (B, T) is 1, under
    `model` (a PolicyLM or its engine).

    For right-padded (prompt + response) rows as DPO uses them; label_mask marks the response.
    The first column is never a label (nothing predicts it).
    """
    logp, _ = model(ids, start=1)  # (B, T - 1): columns 1..T-1
    return (logp * label_mask[:, 1:].to(logp.dtype)).sum(-1)
