"""The loop's guards in-process: strict JSON metrics, the matmul probe's RNG, skip counting, signals.

Real runs (divergence, SIGTERM, exact resume with dropout) are in tests/distributed/test_reliability.py.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from llmstack.train.guard import RunGuard
from llmstack.train.metrics import MetricsLogger, measure_matmul_peak


def strict(line: str):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=reject)


def test_metrics_lines_are_strict_json(tmp_path, capsys):
    log = MetricsLogger(tmp_path, total_steps=10, start_step=0, progress=False)
    log.log({"step": 1, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf"),
             "source_tokens": {"a": 3}, "per_rank": [1.0, float("-inf")], "skipped": True})
    log.log({"step": 2, "loss": 2.5, "lr": 1e-3, "val_loss": float("nan")})
    log.close()
    first, second = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first == {"step": 1, "loss": None, "lr": 1e-3, "grad_norm": None, "source_tokens": {"a": 3},
                     "per_rank": [1.0, None], "skipped": True}
    assert second["loss"] == 2.5 and second["val_loss"] is None
    out = capsys.readouterr().out
    assert "step 1/10 loss nan" in out and "update skipped" in out  # the console still says what happened


def test_matmul_probe_leaves_the_global_rng_alone():
    """Stages measure the peak after restoring a checkpoint's RNG state: the probe must not draw from it."""
    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert measure_matmul_peak(torch.device("cpu"), seconds=0.01, n=32) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_guard_skips_counts_and_stops_after_too_many_in_a_row():
    nan, inf = float("nan"), float("inf")
    with RunGuard(max_skipped_steps=2) as guard:
        outs = [guard.end_step(step, torch.tensor(loss, dtype=torch.float64))
                for step, loss in enumerate([2.0, nan, inf, 1.5, nan, nan], 1)]
        assert [o.skipped for o in outs] == [False, True, True, False, True, True]
        assert not any(o.diverged for o in outs)  # at most 2 in a row so far
        assert outs[0].loss == 2.0 and math.isnan(outs[1].loss)
        last = guard.end_step(7, torch.tensor(nan, dtype=torch.float64))
    assert guard.skipped_steps == 5
    assert last.diverged and "diverged at step 7" in last.diverged and "(5-7)" in last.diverged
    assert "train.max_skipped_steps=2" in last.diverged


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_guard_turns_a_stop_signal_into_a_stop_request(sig):
    before = signal.getsignal(sig)
    with RunGuard(max_skipped_steps=3) as guard:
        assert signal.getsignal(sig) == guard._on_signal  # else the kill below would end the test run
        assert not guard.end_step(1, torch.tensor(1.0)).skipped and not guard.stop_requested
        os.kill(os.getpid(), sig)
        guard.end_step(2, torch.tensor(1.0))
        assert guard.stop_requested and guard.signal_name == sig.name
        assert "stopped by " + sig.name + " after step 2; its checkpoint is saved" in str(guard.preempted(2, True))
        assert guard.preempted(2, True).exit_code == 75
    assert signal.getsignal(sig) == before  # handlers restored when the loop ends
