"""Checkpoint files are data: a crafted pickle inside one is refused, never executed.

Unit tests of the weights-only loading in llmstack/distributed/deepspeed.py, and (slow) the commands a
user types on a real ZeRO-2 checkpoint with one file replaced by a crafted one: `generate`,
resume and `model.init` exit 2 and the crafted code never runs.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest
import torch

from llmstack.distributed import deepspeed as ds
from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt
from tests.conftest import pretrain, run_cmd


class Crafted:
    """Unpickling this creates `marker`: stands for any code a crafted checkpoint would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def craft(path: pathlib.Path, marker: pathlib.Path) -> None:
    """Replace a checkpoint file by one that keeps its contents plus a Crafted object, and keep
    the checkpoint's manifest consistent (an attacker who can write the file can write that too),
    so what stops the load is the refusal to unpickle code, not an integrity check."""
    state = ds.safe_load(path, deepspeed_state=True) if path.is_file() else {}
    torch.save({**state, "payload": Crafted(marker)}, path)
    if (path.parent / "manifest.json").is_file() and hasattr(ckpt, "write_manifest"):
        ckpt.write_manifest(path.parent)


def test_the_crafted_file_runs_code_when_fully_unpickled(tmp_path):
    """The control: the file below is a real exploit for torch.load(weights_only=False)."""
    marker = tmp_path / "marker"
    craft(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_safe_load_refuses_crafted_file(tmp_path):
    marker = tmp_path / "marker"
    craft(tmp_path / "x.pt", marker)
    with pytest.raises(UsageError, match=r"refusing to load .*x\.pt: it holds Python objects other than weights"):
        ds.safe_load(tmp_path / "x.pt")
    assert not marker.exists()


def test_explicit_weights_only_false_is_overridden_inside_the_block(tmp_path):
    """DeepSpeed passes weights_only=False itself; inside weights_only_loads that is not honoured."""
    marker = tmp_path / "marker"
    craft(tmp_path / "x.pt", marker)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(UsageError, match="refusing to load a DeepSpeed checkpoint"):
        with ds.weights_only_loads("a DeepSpeed checkpoint", deepspeed_state=False):
            torch.load(tmp_path / "x.pt", weights_only=False)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # restored


def test_stage0_weights_are_refused(tmp_path):
    marker = tmp_path / "marker"
    step = tmp_path / "step_1"
    step.mkdir()
    craft(step / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UsageError, match="refusing to load"):
        ds.consolidated_state_dict(step)
    assert not marker.exists()


def test_rng_state_loads_weights_only(tmp_path):
    """The RNG state files hold numpy arrays: allowed, and restored exactly."""
    import random

    import numpy as np

    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ds.safe_load(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# -- the commands, on a real checkpoint ---------------------------------------------------------

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("safe-load")
    _, run_dir = pretrain(tmp, tokenizer_dir, "z2", "zero.stage=2", "train.max_steps=2")
    return tmp, run_dir


def crafted_copy(zero2_run, name: str, file: str) -> tuple[pathlib.Path, pathlib.Path]:
    tmp, run_dir = zero2_run
    run = tmp / name
    shutil.copytree(run_dir, run)
    (run / "run.lock").unlink(missing_ok=True)
    marker = tmp / f"{name}.marker"
    craft(ckpt.resolve(run) / file, marker)
    return run, marker


def refused(proc, marker):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "refusing to load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("file", [OPTIM, MODEL])
def test_generate_and_model_init_refuse_crafted_checkpoint(zero2_run, tokenizer_dir, file):
    tmp, _ = zero2_run
    run, marker = crafted_copy(zero2_run, f"gen-{file[:4]}", file)
    refused(run_cmd([sys.executable, "-m", "llmstack", "generate", str(run), "--prompt", "def ",
                     "--max-new-tokens", "2"], cwd=tmp, check=False), marker)
    proc, _ = pretrain(tmp, tokenizer_dir, f"init-{file[:4]}", "zero.stage=0", "train.max_steps=1",
                       f"model.init={run}", check=False)
    refused(proc, marker)


@pytest.mark.slow
@pytest.mark.parametrize("file", [OPTIM, "rng_rank0.pt"])
def test_resume_refuses_crafted_checkpoint(zero2_run, tokenizer_dir, file):
    tmp, _ = zero2_run
    run, marker = crafted_copy(zero2_run, f"res-{file[:4]}", file)
    proc, _ = pretrain(tmp, tokenizer_dir, run.name, "zero.stage=2", "train.max_steps=3", check=False)
    refused(proc, marker)
