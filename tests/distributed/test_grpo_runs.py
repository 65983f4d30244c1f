"""`llmstack grpo` with two processes under the deepspeed launcher (ZeRO-2): the sampler's
log-probs equal the training forward's within 1e-5 on every rank at every step, and a run stopped
after step 2 and resumed logs exactly what the uninterrupted run logged."""

from __future__ import annotations

import pytest

from tests.conftest import run_cmd
from tests.test_grpo import grpo_cmd, metrics

pytestmark = pytest.mark.slow

TWO = ["actor.zero.stage=2", "rollout.prompts=4", "train.micro_batch=8", "train.grad_accum=2"]


def test_two_processes_parity_and_exact_resume(tmp_path, tokenizer_dir):
    cmd, straight = grpo_cmd(tmp_path, tokenizer_dir, "straight", *TWO, steps=4, nprocs=2)
    proc = run_cmd(cmd, cwd=tmp_path, timeout=600)
    assert "world 2" in proc.stdout
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["logp_gap_max"] <= 1e-5 and r["logp_gap_train"] == 0.0 for r in rows), rows
    for stop in (2, 4):
        cmd, resumed = grpo_cmd(tmp_path, tokenizer_dir, "resumed", *TWO, f"train.stop_at={stop}", steps=4, nprocs=2)
        proc = run_cmd(cmd, cwd=tmp_path, timeout=600)
    assert "resumed from" in proc.stdout
    for key in ("reward", "kl", "loss", "clipfrac", "equal_groups", "response_len"):
        assert [r[key] for r in metrics(resumed)] == [r[key] for r in rows], key
