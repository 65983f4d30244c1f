"""Checkpoint faults with real runs: damaged files, rollbacks, a full disk, two runs on one run dir.

Each test drives `llmstack pretrain` as a user would (tiny model, one process unless said) and
damages what a fault would: a truncated or bit-flipped file, a checkpoint from before manifests
existed, a filesystem with no space left, a second run started on the same run directory.
The protocol itself is unit-tested in tests/train/test_checkpoint_integrity.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from llmstack.train import checkpoint as ckpt
from tests.conftest import REPO, TINY, child_env, llmstack_cmd, losses, pretrain

pytestmark = pytest.mark.slow

ONE_PROC = ["train.micro_batch=4", "train.grad_accum=2", "train.max_steps=20"]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def test_damaged_checkpoints_named_or_skipped(tmp_path, tokenizer_dir):
    """A bit flip in optimizer state: exit 2 naming the file when that checkpoint is named,
    skipped (saying why) by resume=auto, which continues exactly from the previous checkpoint,
    here one written before manifests existed (which still loads)."""
    common = ["zero.stage=1", "train.save_every=5", "train.keep_last=3", *ONE_PROC]
    _, run_dir = pretrain(tmp_path, tokenizer_dir, "run", *common, "train.stop_at=10")
    first = losses(run_dir)
    ckpts = run_dir / "checkpoints"
    optim = ckpts / "step_10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_byte(optim)

    proc, _ = pretrain(tmp_path, tokenizer_dir, "run", *common, f"train.resume={ckpts / 'step_10'}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{optim} does not match its sha256 in the manifest" in proc.stderr
    assert "Traceback" not in proc.stderr

    # step_5 as a checkpoint from before manifests: no manifest.json, no format key in meta.json
    (ckpts / "step_5" / ckpt.MANIFEST).unlink()
    meta = json.loads((ckpts / "step_5" / ckpt.META).read_text())
    del meta["checkpoint_format"]
    (ckpts / "step_5" / ckpt.META).write_text(json.dumps(meta))
    proc, _ = pretrain(tmp_path, tokenizer_dir, "run", *common, "train.stop_at=10")
    assert f"skipping checkpoint {ckpts / 'step_10'}: {optim} does not match its sha256" in proc.stdout
    assert f"resumed from {ckpts / 'step_5'} at step 5" in proc.stdout
    resumed = losses(run_dir)
    for s in range(6, 11):
        assert resumed[s] == first[s], f"step {s}: {resumed[s]!r} != {first[s]!r}"
    aside = list(ckpts.glob("abandoned_*/step_10"))
    assert len(aside) == 1 and ckpt.verify(aside[0]) != []  # kept for inspection, still damaged
    assert ckpt.verify(ckpts / "step_10") == []  # the new step_10


def test_rollback_keeps_the_new_branch(tmp_path, tokenizer_dir):
    """Resuming from step_8 while step_12 exists used to save step_10 and have keep_last delete
    it, so the next resume=auto went on with the abandoned step_12."""
    common = ["zero.stage=0", "train.save_every=4", *ONE_PROC]
    _, run_dir = pretrain(tmp_path, tokenizer_dir, "run", *common, "train.keep_last=2", "train.stop_at=12")
    ckpts = run_dir / "checkpoints"
    assert [n for n, _ in ckpt.step_dirs(ckpts)] == [8, 12]
    proc, _ = pretrain(tmp_path, tokenizer_dir, "run", *common, "train.keep_last=1", "train.stop_at=10",
                       f"train.resume={ckpts / 'step_8'}")
    assert "moved step_12 aside to" in proc.stdout
    assert [n for n, _ in ckpt.step_dirs(ckpts)] == [10]
    assert (ckpts / "latest").read_text() == "step_10"
    assert ckpt.find_resume(ckpts) == ckpts / "step_10"  # what the next resume=auto takes
    assert len(list(ckpts.glob("abandoned_*/step_12/manifest.json"))) == 1  # nothing deleted


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs a small filesystem: mounting a tmpfs failed ({proc.stderr.strip()})")


def test_disk_full_while_saving(tmp_path, tokenizer_dir):
    """A real full filesystem (a 16 MB tmpfs mounted on run.dir/checkpoints): exit 2 with a clear
    message, the temp dir removed, the previous checkpoint intact, and resume works on the same
    disk once there is room again."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    _mount_tmpfs(ckpts, "16m")
    try:
        common = ["zero.stage=0", "train.save_every=5", "train.keep_last=1", *ONE_PROC]
        pretrain(tmp_path, tokenizer_dir, "run", *common, "train.stop_at=5")
        size = sum(p.stat().st_size for p in (ckpts / "step_5").iterdir())
        # leave room for half a checkpoint: the save of step 10 runs out of space
        st = os.statvfs(ckpts)
        ballast = ckpts / "ballast"
        ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - size // 2))

        proc, _ = pretrain(tmp_path, tokenizer_dir, "run", *common, "train.stop_at=10", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "no space left on device while saving step 10" in proc.stderr
        assert "the newest complete checkpoint, step_5, is intact" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (ckpts / ".tmp_step_10").exists() and not (ckpts / "step_10").exists()
        assert ckpt.verify(ckpts / "step_5") == [] and (ckpts / "latest").read_text() == "step_5"
        trained = losses(run_dir)  # steps 6-10 ran before the save failed

        ballast.unlink()  # the user frees space
        proc, _ = pretrain(tmp_path, tokenizer_dir, "run", *common, "train.stop_at=10")
        assert f"resumed from {ckpts / 'step_5'} at step 5" in proc.stdout
        resumed = losses(run_dir)
        assert [resumed[s] for s in range(6, 11)] == [trained[s] for s in range(6, 11)]
        assert [n for n, _ in ckpt.step_dirs(ckpts)] == [10] and ckpt.verify(ckpts / "step_10") == []
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)


def test_second_run_on_a_run_dir_exits_2(tmp_path, tokenizer_dir):
    """A run is training; a second (two-process) run on the same run dir exits 2 on every rank,
    promptly, naming the first run's pid; the first run's files are untouched by it."""
    run_dir = tmp_path / "run"
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={tokenizer_dir}", "zero.stage=0", "train.max_steps=1000000", "train.save_every=0",
            "train.log_every=1000000"]
    first = subprocess.Popen(llmstack_cmd(args, 1, "python"), cwd=tmp_path, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / "run.lock"
        deadline = time.monotonic() + 300
        while not (run_dir / "run.json").is_file():  # written after the lock is taken
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.5)
        assert json.loads(lock.read_text())["pid"] == first.pid
        def files():  # run.json less the MFU peak, which the first run itself records once it is measured
            got = {name: (run_dir / name).read_text() for name in ("config.yaml", "run.lock")}
            got["run.json"] = {k: v for k, v in json.loads((run_dir / "run.json").read_text()).items()
                               if k != "mfu_peak"}
            return got

        recorded = files()
        t0 = time.monotonic()
        proc, _ = pretrain(tmp_path, tokenizer_dir, "run", "zero.stage=2", "train.micro_batch=4", "train.max_steps=20",
                           nprocs=2, launcher="deepspeed", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        assert out.count(f"error: run.dir {run_dir} is in use by another run: pid {first.pid} on host") == 1, out[-3000:]
        assert time.monotonic() - t0 < 120
        assert first.poll() is None  # the first run goes on
        assert files() == recorded
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
