"""A rank that stops answering ends the job within dist.timeout_s (plus a margin), with a message
naming it, instead of leaving the other ranks waiting forever (llmstack/distributed/watchdog.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, child_env, free_port, llmstack_cmd

pytestmark = pytest.mark.slow

TIMEOUT_S = 20
MARGIN_S = 25  # noticing (a few heartbeat periods), reporting, and the launcher's teardown


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank) and "LOCAL_RANK" in child.environ():
                return child.pid
    return None


def test_stopped_rank_ends_the_job_naming_it(tmp_path, tokenizer_dir):
    """SIGSTOP rank 1 of a 2-process ZeRO-2 run a few steps in: the job exits non-zero within
    dist.timeout_s + margin, and the output names rank 1 as the one that stopped answering."""
    run_dir = tmp_path / "run"
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={tokenizer_dir}", "zero.stage=2", "train.max_steps=100000", "train.micro_batch=4",
            "train.save_every=0", f"dist.timeout_s={TIMEOUT_S}"]
    proc = subprocess.Popen(llmstack_cmd(args, 2), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    stopped = None
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, "".join(out)[-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        stopped = _rank_pid(proc.pid, 1)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=TIMEOUT_S + MARGIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {TIMEOUT_S + MARGIN_S} s after rank 1 stopped "
                        f"(dist.timeout_s={TIMEOUT_S})")
        elapsed = time.monotonic() - t0
        reader.join(timeout=10)
        text = "".join(out)
        assert proc.returncode != 0
        assert f"rank 1 (pid {stopped} on host" in text and "stopped answering" in text, text[-4000:]
        assert elapsed < TIMEOUT_S + MARGIN_S
    finally:
        if stopped is not None:
            with contextlib.suppress(OSError):
                os.kill(stopped, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# Two bare processes: a group made by new_group() without a timeout (as DeepSpeed makes its
# data-parallel groups) must time out after the timeout given to init, not torch's 30 minutes.
PROBE = """
import os, signal, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from llmstack.distributed.watchdog import default_group_timeout
rank = int(sys.argv[1])
default_group_timeout(timedelta(seconds=5))
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=5))
group = dist.new_group([0, 1])
x = torch.ones(4)
dist.all_reduce(x, group=group)
if rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
t0 = time.monotonic()
try:
    dist.all_reduce(x, group=group)
except RuntimeError as e:
    print(f"raised after {time.monotonic() - t0:.1f} s: {e}", flush=True)
    os._exit(3)
os._exit(0)
"""


def test_groups_made_later_get_the_timeout(tmp_path):
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    peer = subprocess.Popen([sys.executable, "-c", PROBE, "1"], cwd=tmp_path, env=env)
    try:
        t0 = time.monotonic()
        main = subprocess.run([sys.executable, "-c", PROBE, "0"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert main.returncode == 3, main.stdout + main.stderr
        assert "Timed out" in main.stdout
        assert time.monotonic() - t0 < 60
    finally:
        peer.kill()
        peer.wait()
