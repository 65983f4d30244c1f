"""The one training loop shared by pretraining, SFT and reward-model training.

Stages differ only in the batches they feed and the loss function they pass. The loop owns the
step count, learning rate, gradient accumulation, logging, validation and checkpoint cadence.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from llmstack.dist import deepspeed as ds
from llmstack.dist import env
from llmstack.train.metrics import MetricsLogger
from llmstack.train.optim import lr_at


@dataclass
class LoopResult:
    step: int
    tokens: int
    last_loss: float | None
    last_val_loss: float | None


def train_loop(
    engine,
    batches: Iterator[dict],
    *,
    loss_fn: Callable[[object, dict], torch.Tensor],
    start_step: int,
    max_steps: int,
    grad_accum: int,
    lr_fn: Callable[[int], float],
    tokens_per_step: int,
    flops_per_token: float,
    peak_flops: float | None,
    logger: MetricsLogger,
    log_every: int,
    eval_every: int = 0,
    eval_fn: Callable[[], float] | None = None,
    save_every: int = 0,
    save_fn: Callable[[int, int], None] | None = None,
    tokens_seen: int = 0,
    stop_at: int | None = None,
) -> LoopResult:
    """Run optimizer steps start_step .. max_steps-1.

    `tokens_per_step` counts the whole global batch (all ranks). The logged `loss` is the mean
    of the step losses since the last log line, averaged over ranks; `save_fn(step, tokens)` is
    called after step `step` completes (so `step` optimizer updates are in the checkpoint).
    `stop_at` ends the run early (logged, evaluated and saved as a last step would be) while the
    learning-rate schedule still spans max_steps, so a resumed run continues the same curve.
    """
    end = min(max_steps, stop_at or max_steps)
    fault_rank, fault_step = _injected_fault()
    dev = env.device()
    window_loss = torch.zeros((), dtype=torch.float64, device=dev)
    window_steps, window_time = 0, 0.0
    last_loss = last_val = None
    step = start_step
    while step < end:
        t0 = time.perf_counter()
        lr = lr_fn(step)
        ds.set_lr(engine, lr)
        step_loss = torch.zeros((), dtype=torch.float64, device=dev)
        if step + 1 == fault_step and env.rank() == fault_rank:
            raise RuntimeError(f"injected fault ({FAULT_ENV}) in step {step + 1}")
        for _ in range(grad_accum):
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().double()
        window_loss += step_loss / grad_accum
        window_steps += 1
        step += 1
        tokens_seen += tokens_per_step
        if dev.type == "cuda":
            torch.cuda.synchronize()
        window_time += time.perf_counter() - t0
        logger.advance()

        record = None
        if step % log_every == 0 or step == end:
            mean_loss = float(env.all_reduce_mean(window_loss).item()) / window_steps
            tps = tokens_per_step * window_steps / max(window_time, 1e-9)
            record = {"step": step, "loss": mean_loss, "lr": lr, "tokens_per_s": tps, "tokens": tokens_seen}
            if peak_flops:
                record["mfu"] = tps * flops_per_token / (peak_flops * env.world_size())
            if (gn := ds.grad_norm(engine)) is not None:
                record["grad_norm"] = gn
            last_loss = mean_loss
            window_loss.zero_()
            window_steps, window_time = 0, 0.0
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == end):
            last_val = eval_fn()
            record = (record or {"step": step}) | {"val_loss": last_val}
        if record is not None:
            logger.log(record)
        if save_fn is not None and ((save_every and step % save_every == 0) or step == end):
            save_fn(step, tokens_seen)
    return LoopResult(step=step, tokens=tokens_seen, last_loss=last_loss, last_val_loss=last_val)


def train_with(t, engine, batches: Iterator[dict], **kw) -> LoopResult:
    """train_loop with the step count, learning-rate schedule and logging / evaluation / checkpoint
    cadence of a stage's `train` config section; `kw` gives the rest (loss_fn, start_step, ...)."""
    return train_loop(
        engine, batches, max_steps=t.max_steps, stop_at=t.stop_at, log_every=t.log_every, eval_every=t.eval_every,
        save_every=t.save_every,
        lr_fn=lambda s: lr_at(s, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps, schedule=t.schedule,
                              min_lr_ratio=t.min_lr_ratio),
        **kw)


# Test hook: "RANK:STEP" makes that rank raise in that step (1-based), to test that one failing
# rank takes the whole job down promptly instead of leaving the others hanging in a collective.
FAULT_ENV = "LLMSTACK_FAULT_RAISE_AT"


def _injected_fault() -> tuple[int, int]:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return -1, -1
    rank, step = spec.split(":")
    return int(rank), int(step)


@torch.no_grad()
def evaluate(engine, batches: list[dict], loss_fn) -> float:
    """Mean loss over this rank's validation micro-batches, averaged over ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers inside forward are collective).
    """
    dev = env.device()
    was_training = engine.module.training
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for batch in batches:
        total += loss_fn(engine, {k: v.to(dev) for k, v in batch.items()}).double()
    if was_training:
        engine.train()
    return float(env.all_reduce_mean(total / max(1, len(batches))).item())
