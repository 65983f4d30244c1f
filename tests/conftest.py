"""Shared test fixtures: a hermetic cache, a small tokenizer, and runners for real launches.

Multi-process tests start the real `deepspeed` launcher (or torchrun) as a subprocess, so every
run exercises the same path users take; on CPU the processes talk over gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """One cache per test session (corpus extraction, token arrays), shared by subprocesses."""
    if "LLMSTACK_TEST_CACHE" in os.environ:  # reuse between local runs to save a minute
        os.environ["LLMSTACK_CACHE"] = os.environ["LLMSTACK_TEST_CACHE"]
    else:
        os.environ["LLMSTACK_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, hermetic_cache):
    """A small byte-level BPE tokenizer (vocab 1024) trained on part of the builtin corpus."""
    from data_pipeline.sources import builtin_texts
    from data_pipeline.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "bpe-1k"
    train_tokenizer(builtin_texts("train"), out, kind="bpe", vocab_size=1024, num_sentinels=0, max_chars=2_000_000)
    return out


# A model small enough that a step takes milliseconds: launch overhead dominates the tests.
TINY = [
    "model.preset=gpt2-tiny", "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64",
    "data.seq_len=32", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
    "train.progress=false", "dist.timeout_s=120",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(cmd: list[str], *, cwd: Path, timeout: int = 600, env: dict | None = None, check: bool = True):
    proc = subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def llmstack_cmd(args: list[str], nprocs: int = 1, launcher: str = "deepspeed",
                 driver: list[str] | None = None) -> list[str]:
    """The command line a user types: plain `python -m llmstack` for one process, else a launcher.
    `driver`: a test entry point (script and its options) that runs the command after `--`."""
    if driver:
        entry = module = [str(REPO / driver[0]), *driver[1:], "--"]
    else:
        entry, module = ["-m", "llmstack"], ["--module", "llmstack"]
    if nprocs == 1 and launcher == "python":
        return [sys.executable, *entry, *args]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), *module, *args]
    if launcher == "torchrun" and not driver:
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(free_port()),
                *entry, *args]
    raise ValueError(launcher)


def pretrain(tmp: Path, tokenizer: Path, name: str, *overrides: str, nprocs: int = 1, launcher: str = "python",
             check: bool = True, env: dict | None = None, driver: list[str] | None = None):
    """Run a tiny pretraining in tmp/name; returns (process, run_dir)."""
    run_dir = tmp / name
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={tokenizer}", *overrides]
    proc = run_cmd(llmstack_cmd(args, nprocs, launcher, driver), cwd=tmp, env=env, check=check)
    return proc, run_dir


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> logged value from metrics.jsonl (later lines win, as after a resume)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


@pytest.fixture(scope="session")
def eval_model(tmp_path_factory, tokenizer_dir):
    """A tiny trained GPT checkpoint, its Hugging Face export and a local multiple-choice task
    (shared by tests/eval and the data-parallel eval test)."""
    from tests.eval.helpers import build_model

    return build_model(tmp_path_factory.mktemp("eval-model"), tokenizer_dir)


class StandInEngine:
    """What a stage's loss or step calls on a DeepSpeed engine, for arithmetic tests in one process:
    the module itself."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def train(self):
        self.module.train()


class StandInTrainer:
    """What a step function calls on the Trainer: backward divides each micro-batch's loss by
    `accum`, as DeepSpeed's does; no optimizer step (the tests compare gradients)."""

    def __init__(self, accum: int):
        self.accum = accum

    def backward(self, engine, loss):
        (loss / self.accum).backward()

    def optimizer_step(self, engine):
        pass
