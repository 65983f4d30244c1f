"""train.compile=true compiles the model through the DeepSpeed engine, after deepspeed.initialize
(ds.compile_engine), at ZeRO-0 and under ZeRO-3 with two processes; a compiled run's per-step
losses equal the eager run's.

Tolerance: inductor fuses kernels (layer norm, GELU, softmax, their backward) and so reorders the
float32 additions inside reductions; the losses of a compiled run may differ from the eager run's
in the last bits (seen: up to 1e-7 relative over 4 steps), so they are compared at 1e-5
relative, the bound the ZeRO equivalence tests use. Compilation dominates these tests: each
compiled run takes about 1-2 minutes on a loaded 2-core CPU with a cold inductor cache.
"""

from __future__ import annotations

import pytest

from tests.conftest import child_env, losses, pretrain

pytestmark = pytest.mark.slow

# one layer: compiling a tiny model costs the same per distinct layer shape, not per layer
SMALL = ["model.n_layer=1", "train.max_steps=4", "train.eval_batches=1", "train.save_every=0",
         "dist.timeout_s=600"]  # the first step waits for every rank's compilation


def assert_same_losses(got: dict, ref: dict):
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), f"step {s}: compiled {got[s]!r}, eager {ref[s]!r}"


@pytest.fixture
def compile_env(tmp_path):
    """The children's inductor cache: a fresh one per test (hermetic; it shows that this run compiled)."""
    cache = tmp_path / "inductor"
    return cache, child_env(TORCHINDUCTOR_CACHE_DIR=cache)


@pytest.fixture(scope="module")
def eager(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("eager")
    _, run_dir = pretrain(tmp, tokenizer_dir, "eager", *SMALL, "zero.stage=0", "train.micro_batch=4")
    return losses(run_dir)


def test_compiled_run_matches_eager_zero0(eager, tokenizer_dir, tmp_path, compile_env):
    cache, env = compile_env
    proc, run_dir = pretrain(tmp_path, tokenizer_dir, "compiled", *SMALL, "zero.stage=0", "train.micro_batch=4",
                             "train.compile=true", env=env)
    assert any(cache.rglob("*.py")), "nothing was compiled"  # inductor writes the generated code here
    assert_same_losses(losses(run_dir), eager)


def test_compiled_run_matches_eager_zero3_two_processes(eager, tokenizer_dir, tmp_path, compile_env):
    cache, env = compile_env
    # the same global batch of 4 sequences: 2 per process
    proc, run_dir = pretrain(tmp_path, tokenizer_dir, "compiled-z3", *SMALL, "zero.stage=3", "train.micro_batch=2",
                             "train.compile=true", nprocs=2, launcher="deepspeed", env=env)
    assert "ZeRO-3" in proc.stdout
    assert any(cache.rglob("*.py")), "nothing was compiled"
    assert_same_losses(losses(run_dir), eager)
