"""A pretraining run without GPUs: refused before any work when the memory planner's estimate does
not fit the host's memory, announced when its steps are slow; small CPU runs (smoke tests of a big
config included) pass untouched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmstack.config import PretrainConfig, load_config
from llmstack.distributed import preflight
from tests.conftest import REPO, child_env

GB = 1024**3
BIG = str(REPO / "configs/pretrain/gpt-1.3b.yaml")
TINY_CFG = str(REPO / "configs/pretrain/gpt-tiny.yaml")


def check(path, overrides=(), *, available=16 * GB, peak=4e11, local=1, world=1):
    calls = []

    def measure():
        calls.append(1)
        return peak

    cfg = load_config(PretrainConfig, path, list(overrides))
    error, note = preflight.cpu_pretrain_check(cfg, world=world, local_procs=local, available=available,
                                               peak_flops=measure)
    return error, note, len(calls)


def test_gpu_sized_config_is_refused_with_the_planner_figures(monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_CHECK_ENV, raising=False)
    error, note, _ = check(BIG, available=16 * GB)
    assert note is None
    # ZeRO-3 bf16 on one process: 1316M parameters x (2 weights + 4 fp32 gradients + 12 optimizer)
    # bytes = 22 GB of states alone, over 16 GB
    assert "1316M parameters, ZeRO-3, bf16" in error and "16.0 GB are available" in error
    assert "optimizer 14.7" in error and "weights 2.5" in error
    assert "llmstack plan" in error and "model.n_layer=2" in error and preflight.SKIP_MEMORY_CHECK_ENV in error
    assert "\n" not in error


def test_processes_on_one_host_share_its_memory(monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_CHECK_ENV, raising=False)
    # 8 processes, ZeRO-3: each holds an eighth of the states (9.3 GB with its working set, the
    # gathered parameters included); all eight on this host need 75 GB, one per host fits in 32 GB
    one_host = check(BIG, available=32 * GB, local=8, world=8)[0]
    spread = check(BIG, available=32 * GB, local=1, world=8)[0]
    assert one_host is not None and "9.3 GB per process" in one_host
    assert "x 8 processes on this host = 74.8 GB" in one_host
    assert spread is None


def test_enough_memory_but_hours_per_step_is_announced_not_refused(monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_CHECK_ENV, raising=False)
    error, note, calls = check(BIG, available=1024 * GB, peak=4e11)
    assert error is None and calls == 1
    # 6N + attention FLOPs/token x 1024 x 2048 tokens x 4/3 (recomputed forward) at 400 GFLOP/s
    assert note.startswith("note: on CPU one optimizer step (1024 sequences x 2048 tokens") and " h at " in note
    assert "400 GFLOP/s" in note and "train.global_batch" in note


def test_smoke_test_of_the_big_config_is_not_refused(monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_CHECK_ENV, raising=False)
    # two layers of the 1.3b width fit in 16 GB: started, with a warning about its full-size batch
    error, note, _ = check(BIG, ["model.n_layer=2"], available=16 * GB)
    assert error is None and "takes at least" in note and "of 16.0 GB available" in note
    # ... and with the batch shrunk too, nothing to say
    small = ["model.n_layer=2", "train.global_batch=8", "data.seq_len=256"]
    assert check(BIG, small, available=16 * GB) == (None, None, 0)


def test_tiny_runs_pass_without_measuring(monkeypatch):
    monkeypatch.delenv(preflight.SKIP_MEMORY_CHECK_ENV, raising=False)
    assert check(TINY_CFG, available=2 * GB) == (None, None, 0)  # no matmul peak measured for them
    assert check(str(REPO / "configs/pretrain/bert-tiny.yaml"), available=1) == (None, None, 0)  # not modelled


def test_override_starts_it_anyway_with_a_note(monkeypatch):
    monkeypatch.setenv(preflight.SKIP_MEMORY_CHECK_ENV, "1")
    error, note, _ = check(BIG, available=16 * GB)
    assert error is None and "more than the 16.0 GB available" in note


def test_available_memory_reads_this_host():
    avail = preflight.available_memory()
    assert avail is None or 0 < avail < 1 << 50


def test_cli_refuses_before_the_tokenizer_or_run_directory(tmp_path):
    """`llmstack pretrain` of a model no host can hold (2000 layers of 2048: ~100B parameters):
    exit 2 with one error line, and neither its tokenizer nor its run directory was made."""
    env = child_env(CUDA_VISIBLE_DEVICES="")
    env.pop(preflight.SKIP_MEMORY_CHECK_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "llmstack", "pretrain", BIG, "model.n_layer=2000",
                           f"tokenizer.path={tmp_path / 'tok'}", f"run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit this machine without a GPU" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "tok").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("seconds,text", [(30, "30 s"), (600, "10 min"), (9000, "2.5 h"), (3e6, "35 days")])
def test_duration(seconds, text):
    assert preflight._duration(seconds) == text
