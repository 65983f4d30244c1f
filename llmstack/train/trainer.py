"""The one training loop of every stage: the Trainer and its callbacks.

A stage supplies only what is its own: a step function (its batches and its loss, or PPO's
rollout and updates), its evaluation, and what its checkpoints record. The Trainer owns the
rest, the same for every stage (in the manner of OLMo-core's trainer callbacks and torchtitan's
`train_step`):

- the step count, from a resumed step to train.max_steps (train.stop_at ends a run early while
  the learning-rate schedule still spans max_steps, so a resumed run continues the same curve);
- the learning rate of every trained engine (train.schedule, each engine from its own base lr);
- gradient accumulation (`MicroBatches`: train.grad_accum micro-batches per optimizer step) and
  loss normalisation by the global count of target tokens, when the stage counts them;
- logging (metrics.jsonl / TensorBoard / console: loss, lr, tokens/s, MFU, gradient norm, plus
  the stage's statistics averaged over the steps since the last line and over ranks);
- validation and checkpoint cadence (train.eval_every, train.save_every, the last step);
- divergence and preemption (RunGuard: skipped non-finite steps, exit 3 past
  train.max_skipped_steps; SIGTERM/SIGUSR1 finish the step, save and exit 75).

Callbacks see every step; each hook runs on every rank at the same point, so a callback may run
collectives (`on_log` of the data-statistics callbacks sums counts over ranks). Tests install
theirs (fault injection) through `EXTRA_CALLBACKS`, which production code never fills.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import Diverged, UsageError
from llmstack.train import checkpoint as ckpt
from llmstack.train.guard import RunGuard
from llmstack.train.meta import CheckpointMeta
from llmstack.train.metrics import MetricsLogger, Peak, mfu_fields, record_peak
from llmstack.train.optim import lr_at

# Callbacks every Trainer adds after the stage's own: a seam for tests (fault injection).
EXTRA_CALLBACKS: list = []


class Callback:
    """Hooks the Trainer calls on every rank, in order. `step` is 1-based (the step that is about
    to run, or has just run)."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer, step: int) -> None: ...

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """Add fields to a metrics record before it is written (may run collectives)."""

    def on_step_end(self, trainer: Trainer, step: int) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


class StatWindow(Callback):
    """Statistics a stage adds during its steps (`add(accuracy=..., ...)`), logged as their means
    over the steps since the last metrics line and over ranks."""

    def __init__(self):
        self.sums: dict[str, tuple[float, int]] = {}

    def add(self, **stats) -> None:
        for k, v in stats.items():
            s, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (s + float(v.detach() if torch.is_tensor(v) else v), n + 1)

    def on_log(self, trainer: Trainer, record: dict) -> None:
        if "loss" not in record or not self.sums:
            return
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k][0] / max(1, self.sums[k][1]) for k in keys], dtype=torch.float64)
        record.update({k: float(v) for k, v in zip(keys, env.all_reduce_mean(local.to(env.device())))})
        self.sums = {}


@dataclass
class CheckpointPart:
    """One engine of a checkpoint: saved under `root`, its meta.json from `meta(step, tokens)`
    (called on every rank: it may gather), DeepSpeed's client state from `client_state(meta)`."""

    engine: object
    root: Path
    meta: Callable[[int, int], CheckpointMeta]
    client_state: Callable[[CheckpointMeta], dict] = lambda meta: {"step": meta.step, "tokens": meta.tokens}


class Checkpointer:
    """Saves and restores a run's trained engines. The last part is the anchor: its root holds the
    `latest` pointer that resume follows, and it is written last, so a crash between parts leaves
    the previous step as the newest complete checkpoint; the other parts (PPO's critic) are
    restored from the directory of the same name under their own roots."""

    def __init__(self, parts: list[CheckpointPart], keep_last: int):
        self.parts, self.keep_last = parts, keep_last

    def save(self, step: int, tokens: int) -> Path:
        for part in self.parts:
            meta = part.meta(step, tokens).stamped()
            path = ckpt.save(part.engine, part.root, step, meta, part.client_state(meta), self.keep_last)
        others = "".join(f" ({p.root.name}: {p.root / path.name})" for p in self.parts[:-1])
        env.print0(f"saved checkpoint {path}{others}")
        return path

    def restore(self, path: Path) -> CheckpointMeta:
        """Load every part from `path` (the anchor's checkpoint); returns its meta."""
        meta, _ = ckpt.load(self.parts[-1].engine, path)
        for part in self.parts[:-1]:
            other = part.root / Path(path).name
            if not (other / ckpt.META).is_file():
                raise UsageError(f"cannot resume from {path}: its {part.root.name} checkpoint {other} is missing")
            ckpt.load(part.engine, other, restore_rng=False)
        env.print0(f"resumed from {path} at step {meta.step}")
        return meta


@dataclass
class StepOutput:
    """What a step function returns: this rank's loss of the step (mean over its micro-batches;
    the Trainer averages it over ranks), the tokens it trained on when they vary per step
    (None: the Trainer's nominal tokens_per_step) and, for MFU, the model FLOPs of the step on
    all ranks when they are not tokens x flops_per_token (RL steps: sampling, scoring, training)."""

    loss: torch.Tensor
    tokens: int | None = None
    flops: float | None = None


@dataclass
class TrainResult:
    step: int
    tokens: int
    last_loss: float | None
    val: dict = field(default_factory=dict)  # the last validation's metrics (val_loss, ...)

    @property
    def last_val_loss(self) -> float | None:
        return self.val.get("val_loss")


class Trainer:
    """Runs optimizer steps start_step .. end of a stage's step function (see the module docstring).

    `engines`: (engine, base learning rate) of every trained engine; the schedule scales each.
    `step_fn(trainer, step)`: one optimizer step (0-based `step`) through `trainer.backward` and
    `trainer.optimizer_step`, returning a StepOutput. `evaluate()`: validation metrics
    {"val_loss": ..., ...} averaged over ranks. `tokens_per_step`: the global batch's tokens.
    MFU (train/metrics.mfu) is logged when `peak_flops` (a metrics.Peak, recorded in run.json)
    is given and a step's FLOPs are known (`flops_per_token`, or StepOutput.flops).
    """

    def __init__(self, t, engines: list[tuple[object, float]], step_fn: Callable[[Trainer, int], StepOutput], *,
                 run_dir: Path, start_step: int = 0, tokens: int = 0, tokens_per_step: int = 0,
                 flops_per_token: float = 0.0, peak_flops: Peak | None = None,
                 evaluate: Callable[[], dict] | None = None, checkpointer: Checkpointer | None = None,
                 callbacks: list[Callback] = ()):
        self.t, self.engines, self.step_fn = t, engines, step_fn
        self.start_step, self.step, self.tokens = start_step, start_step, tokens
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.evaluate, self.checkpointer = evaluate, checkpointer
        self.callbacks = [*callbacks, *EXTRA_CALLBACKS]
        self.end = min(t.max_steps, t.stop_at or t.max_steps)
        self.logger = MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps,
                                    start_step=start_step, progress=t.progress)
        self.guard: RunGuard | None = None
        self.val: dict = {}
        if peak_flops is not None and env.is_main():
            record_peak(run_dir, peak_flops)
            env.print0(f"MFU against the peak of each rank: {peak_flops.describe()}")

    # -- what step functions call --------------------------------------------------------------

    def backward(self, engine, loss: torch.Tensor) -> None:
        self.guard.backward(engine, loss)

    def optimizer_step(self, engine) -> None:
        self.guard.step(engine)

    def lr(self, base: float, step: int) -> float:
        t = self.t
        return lr_at(step, lr=base, warmup_steps=t.warmup_steps, max_steps=t.max_steps, schedule=t.schedule,
                     min_lr_ratio=t.min_lr_ratio)

    def log(self, record: dict) -> None:
        """Write a metrics record after every callback's on_log (collective: every rank calls it)."""
        for cb in self.callbacks:
            cb.on_log(self, record)
        self.logger.log(record)

    def validate(self, step: int | None = None) -> dict:
        """Run the stage's evaluation; logged as a record of `step` when given."""
        self.val = self.evaluate()
        if step is not None:
            self.log({"step": step, **self.val})
        return self.val

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        t, dev = self.t, env.device()
        window_loss, window_steps, window_time, window_tokens, window_flops = 0.0, 0, 0.0, 0, 0.0
        last_loss, save_pending = None, False
        try:
            with RunGuard(t.max_skipped_steps) as guard:
                self.guard = guard
                for cb in self.callbacks:
                    cb.on_train_start(self)
                while self.step < self.end:
                    t0 = time.perf_counter()
                    lrs = [self.lr(base, self.step) for _, base in self.engines]
                    for (engine, _), lr in zip(self.engines, lrs):
                        ds.set_lr(engine, lr)
                    for cb in self.callbacks:
                        cb.on_step_start(self, self.step + 1)
                    out = self.step_fn(self, self.step)
                    self.step += 1
                    step_tokens = self.tokens_per_step if out.tokens is None else out.tokens
                    self.tokens += step_tokens
                    outcome = guard.end_step(self.step, out.loss)  # one small all-reduce: loss, skip, stop
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    window_time += time.perf_counter() - t0
                    window_loss, window_steps, window_tokens = (window_loss + outcome.loss, window_steps + 1,
                                                                window_tokens + step_tokens)
                    window_flops += step_tokens * self.flops_per_token if out.flops is None else out.flops
                    self.logger.advance()
                    stopping = guard.stop_requested and self.step < self.end

                    record = None
                    if self.step % t.log_every == 0 or self.step == self.end or outcome.skipped or stopping:
                        mean_loss = window_loss / window_steps
                        tps = window_tokens / max(window_time, 1e-9)
                        record = {"step": self.step, "loss": mean_loss, "lr": lrs[0], "tokens_per_s": tps,
                                  "tokens": self.tokens}
                        if self.peak_flops is not None and window_flops > 0:
                            record.update(mfu_fields(self.peak_flops, tps, window_flops / max(window_tokens, 1),
                                                     env.world_size()))
                        if (gn := ds.grad_norm(self.engines[0][0])) is not None:
                            record["grad_norm"] = gn
                        record["skipped_steps"] = guard.skipped_steps
                        if outcome.skipped:
                            record["skipped"] = True
                        if math.isfinite(mean_loss):
                            last_loss = mean_loss
                        window_loss, window_steps, window_time, window_tokens, window_flops = 0.0, 0, 0.0, 0, 0.0
                    if outcome.diverged or (outcome.skipped and self.step == self.end):
                        self.log(record)  # logged first: metrics.jsonl shows that step
                        raise Diverged(outcome.diverged or guard.ended_skipped(self.step))
                    eval_every = getattr(t, "eval_every", 0)
                    if self.evaluate is not None and not stopping and (
                            (eval_every and self.step % eval_every == 0) or self.step == self.end):
                        record = (record or {"step": self.step}) | self.evaluate()
                        self.val = {k: v for k, v in record.items() if k.startswith("val_")}
                    if record is not None:
                        self.log(record)
                    due = (t.save_every and self.step % t.save_every == 0) or self.step == self.end or stopping
                    saved = False
                    if self.checkpointer is not None and (due or save_pending):
                        if outcome.skipped:
                            save_pending = True  # never a checkpoint of a skipped step: rotation would drop good ones
                        elif guard.weights_finite(self.step, *(e for e, _ in self.engines)):
                            self.checkpointer.save(self.step, self.tokens)
                            save_pending, saved = False, True
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step)
                    if stopping:
                        raise guard.preempted(self.step, saved)
                for cb in self.callbacks:
                    cb.on_train_end(self)
        finally:
            self.logger.close()
        return TrainResult(step=self.step, tokens=self.tokens, last_loss=last_loss, val=self.val)


class MicroBatches:
    """The step function of stages whose optimizer step is train.grad_accum micro-batches through
    one engine (pretrain, SFT, reward model, DPO).

    `loss_fn(engine, batch)` returns the micro-batch's mean loss; or, with `count(batch)` (its
    target tokens), its *summed* loss, which is then normalised by the global count N of target
    tokens of the step (all micro-batches, all ranks): each micro-batch's sum is scaled by
    accum * world / N, DeepSpeed divides by accum and averages over ranks, so the gradient is the
    token mean of one big batch for any split into micro-batches and ranks (a per-micro-batch
    mean would weight short sequences more).
    """

    def __init__(self, engine, batches: Iterator[dict], loss_fn: Callable[[object, dict], torch.Tensor],
                 accum: int, *, count: Callable[[dict], torch.Tensor] | None = None):
        self.engine, self.batches, self.loss_fn, self.accum, self.count = engine, batches, loss_fn, accum, count

    def __call__(self, trainer: Trainer, step: int) -> StepOutput:
        dev = env.device()
        micro = [env.to_device(next(self.batches), dev) for _ in range(self.accum)]  # pinned, non_blocking on CUDA
        scale = None
        if self.count is not None:
            local = sum(int(self.count(b)) for b in micro)
            n = int(env.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64, device=dev)).item())
            scale = torch.tensor(self.accum * env.world_size() / max(n, 1), dtype=torch.float32, device=dev)
        step_loss = torch.zeros((), dtype=torch.float64, device=dev)
        for batch in micro:
            loss = self.loss_fn(self.engine, batch)
            if scale is not None:
                loss = loss * scale
            trainer.backward(self.engine, loss)
            trainer.optimizer_step(self.engine)
            step_loss += loss.detach().double()
        return StepOutput(loss=step_loss / self.accum)
