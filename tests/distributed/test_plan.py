"""`llmstack plan`: ZeRO accounting, the command line, and estimates against a measured CPU peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmstack.models.gpt import gpt_config_from_preset
from llmstack.stages.plan import activation_bytes_per_token_layer, estimate
from tests.conftest import BIN, REPO, child_env

ARCH = gpt_config_from_preset("gpt2-124m", 50304)


def test_zero_partitioning_and_offload_accounting():
    kw = dict(seq_len=1024, micro_batch=4, world=8, precision="bf16")
    e0, e1, e2, e3 = (estimate(ARCH, zero_stage=s, **kw) for s in range(4))
    n = e0.weights / 2
    assert e0.optimizer == 12 * n and e1.optimizer == 12 * n / 8  # fp32 master + Adam moments, partitioned by ZeRO-1
    assert e0.grads == 2 * n  # bf16 gradients without ZeRO (DeepSpeed accumulates them in bf16 there)
    assert e1.grads == 4 * n and e2.grads == 4 * n / 8  # fp32-accumulated gradients, partitioned from ZeRO-2
    assert e2.weights == 2 * n and e3.weights == 2 * n / 8  # weights partitioned by ZeRO-3
    off = estimate(ARCH, zero_stage=3, offload_optimizer=True, offload_params=True, **kw)
    assert off.optimizer == 0 and off.weights == 0 and off.host == e3.optimizer + e3.weights
    ckpt = estimate(ARCH, zero_stage=3, activation_checkpointing=True, **kw)
    # checkpointing keeps each block's input and recomputes one block at a time
    per_layer, tokens, L = activation_bytes_per_token_layer(ARCH, 2), 4 * 1024, ARCH.n_layer
    saved = tokens * (L * per_layer - L * ARCH.d_model * 2 - per_layer)
    assert e3.activations - ckpt.activations == pytest.approx(saved)


def test_plan_command_table_and_refusal(tmp_path):
    cfg = str(REPO / "configs/pretrain/gpt-1.3b.yaml")
    ok = subprocess.run([str(BIN / "llmstack"), "plan", cfg, "--gpus", "16", "--gpu-mem", "80"],
                        env=child_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "1315.8M parameters" in ok.stdout
    assert "ZeRO-3 +off-opt +off-par" in ok.stdout and "max micro" in ok.stdout
    bad = subprocess.run([str(BIN / "llmstack"), "plan", cfg, "--gpus", "1", "--gpu-mem", "1"],
                         env=child_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "no ZeRO setting fits" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_estimate_within_20_percent_of_measured_peak(tokenizer_dir, tmp_path, stage):
    """A real one-process pretraining run (DeepSpeed engine, CPU) measured from model construction on."""
    from data_pipeline.tokenizer import load_tokenizer

    overrides = [f"tokenizer.path={tokenizer_dir}", f"run.dir={tmp_path / 'run'}", "train.resume=none",
                 "train.max_steps=3", "train.eval_every=0", "train.progress=false", f"zero.stage={stage}",
                 "model.preset=gpt2-tiny", "data.seq_len=256", "train.micro_batch=8", "train.grad_accum=1"]
    proc = subprocess.run([sys.executable, str(REPO / "tests/distributed/memory_probe.py"),
                           str(REPO / "configs/pretrain/gpt-tiny.yaml"), *overrides],
                          env=child_env(OMP_NUM_THREADS=2), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    arch = gpt_config_from_preset("gpt2-tiny", load_tokenizer(tokenizer_dir).vocab_size)
    est = estimate(arch, seq_len=256, micro_batch=8, zero_stage=stage, world=1, precision="fp32", device="cpu").total
    print(f"ZeRO-{stage}: estimated {est / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB")
    assert abs(est - measured) <= 0.2 * measured, (est, measured)
