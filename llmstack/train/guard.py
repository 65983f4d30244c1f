"""RunGuard: the two ways a run ends early on purpose, for any training loop (the Trainer, and
PPO's step function through it).

- divergence: a step whose loss or global gradient norm is not finite applies no update and is
  counted (`skipped_steps` in metrics.jsonl); more than train.max_skipped_steps such steps in a
  row stop the run with exit status 3. No checkpoint is written after a skipped step or of
  non-finite weights, so `latest` and the kept checkpoints stay the last good ones.
- preemption: SIGTERM (SLURM, Kubernetes) or SIGUSR1 (SLURM's --signal warning) lets the run
  finish its step, save a checkpoint and exit with status 75, every rank at the same step.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import dataclass

import torch

from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import Diverged, Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StepOutcome:
    loss: float  # the step's loss, mean over ranks (inf or NaN when not finite)
    skipped: bool  # no update applied: a loss or the global gradient norm was not finite
    diverged: str | None  # why the run must stop now (exit 3), else None


class RunGuard:
    """Preemption signals and divergence for the Trainer (llmstack/train/trainer.py), whose step
    functions (micro-batches, PPO's rollout step) train through it. Every rank runs the same calls
    in the same order:

        with RunGuard(cfg.train.max_skipped_steps) as guard:
            for step in range(start, end):
                for each micro-batch, for each trained engine:
                    guard.backward(engine, loss)        # instead of engine.backward(loss)
                    guard.step(engine)                  # instead of engine.step()
                out = guard.end_step(step + 1, loss)    # collective, once per step
                (log; out.loss may be NaN, which MetricsLogger writes as null)
                if out.diverged: raise Diverged(out.diverged)
                if a save is due (or guard.stop_requested) and not out.skipped \
                        and guard.weights_finite(step + 1, *engines):
                    save(step + 1)
                if guard.stop_requested: raise guard.preempted(step + 1, saved)

    A non-finite loss is turned into non-finite gradients (the loss times NaN, times exactly 1 when
    finite), so one test covers both: the global gradient norm. DeepSpeed's optimizer wrappers
    skip such an update themselves; for the bare torch optimizer (fp32 without ZeRO) the guard
    checks the all-reduced gradients and runs the step without an update (distributed/deepspeed.py).
    In fp16 the loss scaler's own overflow skips are normal and not counted: only a non-finite
    loss counts there. The signal handlers only set a flag; end_step sums it over ranks, so all
    stop after the same step however the signal reached them (SLURM and torchrun signal every
    rank, `kill` may reach one).
    """

    def __init__(self, max_skipped_steps: int):
        self.max_skipped = max_skipped_steps
        self.skipped_steps = 0  # skipped steps since this process started
        self.stop_requested = False
        self.signal_name: str | None = None
        self._signal: int | None = None
        self._streak, self._streak_start = 0, 0
        self._bad_loss = self._step_skip = self._unguarded = None
        self._previous: dict = {}

    def __enter__(self) -> RunGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        # only a flag: printing here could re-enter a print the signal interrupted
        if self._signal is None:
            self._signal = signum

    def _flag(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old | value)

    def backward(self, engine, loss: torch.Tensor) -> None:
        """engine.backward(loss), with NaN gradients when the loss is not finite (no host sync)."""
        finite = torch.isfinite(loss.detach())
        self._flag("_bad_loss", ~finite.all())
        engine.backward(loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype))

    def step(self, engine) -> None:
        """engine.step(); at an accumulation boundary, no update when the gradients are not finite."""
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return
        bad_loss, self._bad_loss = self._bad_loss, None
        if not ds.skips_nonfinite_updates(engine):
            if ds.grads_finite(engine):
                engine.step()
            else:
                with ds.no_update(engine):
                    engine.step()
                self._step_skip = torch.ones((), dtype=torch.bool, device=env.device())
            return
        engine.step()
        if ds.step_applied(engine):
            if bad_loss is not None:  # DeepSpeed's own check is off (raw ds_config): the update went in
                self._flag("_unguarded", bad_loss)
        elif not ds.uses_loss_scaler(engine):
            self._step_skip = torch.ones((), dtype=torch.bool, device=env.device())
        elif bad_loss is not None:  # fp16: count it only when a loss was not finite
            self._flag("_step_skip", bad_loss)

    def end_step(self, step: int, loss: torch.Tensor | float) -> StepOutcome:
        """After every rank's last engine.step() of optimizer step `step` (1-based): one all-reduce
        of (loss, skipped, unguarded, one flag per stop signal); counts skipped steps and notices
        stop signals that reached any rank."""
        dev = env.device()
        flags = [self._step_skip, self._unguarded]
        local = torch.stack([torch.as_tensor(loss).detach().double().reshape(()).to(dev)]
                            + [(f if f is not None else torch.zeros((), device=dev)).double() for f in flags]
                            + [torch.tensor(float(self._signal == sig), dtype=torch.float64, device=dev)
                               for sig in STOP_SIGNALS])
        total, skip, unguarded, *received = env.all_reduce_sum(local).tolist()
        self._step_skip = self._unguarded = None
        mean = total / env.world_size()
        skipped = not math.isfinite(mean) or skip > 0
        if any(received) and not self.stop_requested:
            self.stop_requested = True
            self.signal_name = "/".join(sig.name for sig, n in zip(STOP_SIGNALS, received) if n)
            env.print0(f"received {self.signal_name}: stopping after step {step} with a checkpoint")
        diverged = None
        if skipped:
            self.skipped_steps += 1
            self._streak += 1
            if self._streak == 1:
                self._streak_start = step
            if env.is_main():
                what = f"loss {mean:.4g}" if not math.isfinite(mean) else "global gradient norm not finite"
                print(f"warning: step {step}: {what}: update skipped ({self._streak} in a row, "
                      f"train.max_skipped_steps={self.max_skipped})", file=sys.stderr, flush=True)
            if self._streak > self.max_skipped:
                diverged = (f"training diverged at step {step}: the loss or the global gradient norm was not finite "
                            f"in {self._streak} consecutive steps ({self._streak_start}-{step}), more than "
                            f"train.max_skipped_steps={self.max_skipped}. Their updates were skipped and no checkpoint "
                            f"was written from step {self._streak_start} on; lower train.lr (or look at the data of "
                            "those steps) and resume from the last checkpoint")
        else:
            self._streak = 0
        if unguarded:
            diverged = (f"training diverged at step {step}: the loss was not finite and DeepSpeed applied the update "
                        "anyway (its non-finite gradient check is off in the deepspeed config: "
                        "zero_optimization.compute_grad_norm / bf16.check_grad_overflow); no checkpoint written")
        return StepOutcome(loss=mean, skipped=skipped, diverged=diverged)

    def ended_skipped(self, step: int) -> str:
        """The message when the last step of a run was skipped (its final checkpoint is not written)."""
        return (f"training diverged at step {step}, the last step: the loss or the global gradient norm was not "
                f"finite in steps {self._streak_start}-{step}, so the final checkpoint was not written; the last "
                f"checkpoint is from before step {self._streak_start}")

    def weights_finite(self, step: int, *engines) -> bool:
        """True when every engine's parameters are finite on every rank (collective); else raises
        Diverged, so non-finite weights never reach a checkpoint."""
        bad = sum(not ds.params_finite(e) for e in engines)
        if env.all_reduce_sum(torch.tensor(float(bad), device=env.device())).item():
            raise Diverged(f"training diverged at step {step}: the weights are not finite, so no checkpoint was "
                           "written (the earlier ones are kept); lower train.lr and resume from the last checkpoint")
        return True

    def preempted(self, step: int, saved: bool) -> Preempted:
        """The exception that ends a run stopped by a signal (exit 75: run the same command to resume)."""
        if saved:
            return Preempted(f"stopped by {self.signal_name} after step {step}; its checkpoint is saved. Run the same "
                             "command again to resume (train.resume=auto)")
        return Preempted(f"stopped by {self.signal_name} after step {step}, whose update was skipped (not finite), so "
                         "no checkpoint of it was written; run the same command again to resume from the last one")
