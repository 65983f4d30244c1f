"""SFT, reward-model and DPO runs resume from a universal checkpoint on another world size.

Each stage: two processes (ZeRO-2) stop after step 2; `llmstack checkpoint reshape` converts the
checkpoint; one process resumes from it (same global batch: micro-batch x accumulation 2) and
must log steps 3-4 as a one-process run that was never interrupted does (the global order of
every fine-tuning stage is the same for any world size). The plain ZeRO-2 checkpoint is refused
on one process, naming the conversion.
"""

from __future__ import annotations

import pytest

from tests.conftest import BIN, REPO, llmstack_cmd, losses, run_cmd

pytestmark = pytest.mark.slow

MODEL = ["model.init=null", "model.preset=gpt2-tiny", "model.n_layer=2", "model.n_head=4", "model.d_model=64",
         "model.max_seq_len=64", "data.seq_len=64", "train.lr=3e-3", "train.warmup_steps=1", "train.log_every=1",
         "train.eval_every=0", "train.save_every=0", "train.max_steps=4", "train.progress=false",
         "dist.timeout_s=120", "train.micro_batch=4"]
STAGES = {
    "sft": ("configs/sft/gpt-tiny-demo.yaml", ["sft.eval_max=8", "sft.packing=false"]),
    "rm": ("configs/rm/demo.yaml", ["data.val_pairs=8"]),
    "dpo": ("configs/dpo/demo.yaml", ["data.val_pairs=8", "dpo.reference=online"]),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_resume_from_universal_checkpoint_on_another_world_size(stage, tmp_path, tokenizer_dir):
    config, extra = STAGES[stage]

    def launch(name, *overrides, nprocs=1, check=True):
        args = [stage, str(REPO / config), *MODEL, *extra, f"tokenizer.path={tokenizer_dir}",
                f"run.dir={tmp_path / name}", *overrides]
        return run_cmd(llmstack_cmd(args, nprocs, "deepspeed" if nprocs > 1 else "python"), cwd=tmp_path,
                       timeout=600, check=check)

    launch("straight", "zero.stage=2", "train.grad_accum=2")
    launch("two", "zero.stage=2", "train.grad_accum=1", "train.stop_at=2", nprocs=2)
    step2 = tmp_path / "two" / "checkpoints" / "step_2"
    refused = launch("refused", "zero.stage=2", "train.grad_accum=2", f"train.resume={step2}", check=False)
    assert refused.returncode == 2 and "partitions of 2 processes" in refused.stderr \
        and "llmstack checkpoint reshape" in refused.stderr, refused.stderr[-2000:]
    run_cmd([str(BIN / "llmstack"), "checkpoint", "reshape", str(step2)], cwd=tmp_path)
    universal = tmp_path / "two" / "checkpoints" / "step_2_universal"
    proc = launch("two", "zero.stage=2", "train.grad_accum=2", f"train.resume={universal}")
    assert "world 1" in proc.stdout and f"resumed from {universal}" in proc.stdout
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "two")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), (step, resumed, straight)
