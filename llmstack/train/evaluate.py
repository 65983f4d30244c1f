"""Validation of a stage's model on fixed held-out batches, averaged over ranks.

Every rank runs the same number of forwards whatever its share of the data (ZeRO-3 gathers
inside forward are collective): a rank with fewer batches scores filler ones and discards them.
"""

from __future__ import annotations

from typing import Callable

import torch

from data_pipeline.pairs import collate
from llmstack.distributed import env


@torch.no_grad()
def evaluate_batches(engine, batches: list[dict], loss_fn) -> float:
    """Mean loss over this rank's validation micro-batches, averaged over ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers inside forward are collective).
    """
    dev = env.device()
    was_training = engine.module.training
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for batch in batches:
        total += loss_fn(engine, env.to_device(batch, dev)).double()
    if was_training:
        engine.train()
    return float(env.all_reduce_mean(total / max(1, len(batches))).item())


@torch.no_grad()
def evaluate_pairs(engine, pairs: list[dict], micro: int, pad_id: int,
                   pair_stats: Callable[[object, dict], dict[str, torch.Tensor]]) -> dict[str, float]:
    """Means over held-out pairs of the per-pair statistics `pair_stats(engine, batch)` returns
    ({name: (m,) tensor}). Pairs are dealt round-robin to ranks; every rank runs the same number
    of forwards (ZeRO-3 gathers are collective), filler pairs having weight 0."""
    world, rank = env.world_size(), env.rank()
    mine = list(range(rank, len(pairs), world))
    per_rank = -(-len(pairs) // world)
    mine += [-1] * (per_rank - len(mine))
    module = getattr(engine, "module", engine)
    was_training = module.training
    module.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    for s in range(0, per_rank, micro):
        idx = mine[s:s + micro]
        batch = collate([pairs[max(i, 0)] for i in idx], pad_id, idx)
        batch = env.to_device(batch)
        w = batch["weight"].double()
        for name, v in pair_stats(engine, batch).items():
            sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64, device=w.device)) + (v.double() * w).sum()
        count = count.to(w.device) + w.sum()
    if was_training:
        module.train()
    total = env.all_reduce_sum(count)
    return {k: float(env.all_reduce_sum(v) / total.clamp(min=1)) for k, v in sorted(sums.items())}
