"""A tokenizer that does not exist yet is trained by rank 0 while the other ranks wait on the
process group's store, not in a collective: rank 0 may take longer than dist.timeout_s (which
bounds collectives) and the run still trains; rank 0's failure ends every rank at once, exit 2,
with rank 0's message (not after a timeout)."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import BIN, REPO, TINY, child_env, free_port, losses, run_cmd

pytestmark = pytest.mark.slow

# a small tokenizer, quick to train: the test's time goes to the launch and the sleep
SMALL_TOKENIZER = ["tokenizer.vocab_size=512", "tokenizer.num_sentinels=0", "tokenizer.max_chars=300000"]
RUN = ["train.max_steps=2", "train.micro_batch=2", "train.save_every=0", "zero.stage=1"]


def launch(tmp, script: list[str], *overrides, env=None):
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={tmp / 'run'}",
            f"tokenizer.path={tmp / 'tok'}", *SMALL_TOKENIZER, *RUN, *overrides]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *script, *args]
    t0 = time.monotonic()
    proc = run_cmd(cmd, cwd=tmp, env=env, check=False, timeout=300)
    return proc, time.monotonic() - t0


def test_rank0_trains_tokenizer_longer_than_collective_timeout(tmp_path):
    # rank 0's tokenizer training takes > 15 s; collectives time out after 10 s (a barrier there
    # failed with gloo's "Timed out waiting 10000ms")
    proc, _ = launch(tmp_path, [str(REPO / "tests/distributed/slow_tokenizer.py")], "dist.timeout_s=10",
                     env=child_env(SLOW_TOKENIZER_S=15))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert "training bpe tokenizer" in out and "world 2" in out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    assert sorted(losses(tmp_path / "run")) == [1, 2]  # both ranks trained both steps together


def test_rank0_tokenizer_failure_ends_every_rank_with_its_message(tmp_path):
    # a collective timeout of 600 s: a rank left waiting in one would hold the job that long
    proc, seconds = launch(tmp_path, ["--module", "llmstack"], "dist.timeout_s=600",
                           "tokenizer.train_sources=[{path: missing/corpus.jsonl}]")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-6000:]
    # rank 1's message carries rank 0's error (rank 0 prints it too, unless the launcher, seeing
    # rank 1 exit, stops rank 0 first)
    assert (f"error: rank 0 failed training the tokenizer {tmp_path / 'tok'}: data source not found: "
            "no such file: missing/corpus.jsonl") in out
    assert "Traceback" not in out
    assert seconds < 300, f"took {seconds:.0f} s"  # the launch itself: 30-60 s on a loaded 2-core CPU
    assert not (tmp_path / "run").exists()
