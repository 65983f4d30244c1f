"""PPO in two processes under the real deepspeed launcher: actor and critic each a ZeRO-2 engine
(optimizer states and gradients partitioned over the two ranks), the frozen reference a ZeRO-3
inference engine (parameters partitioned, gathered layer by layer in its forwards), rewards
from a rule. One launch, shared by the assertions."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cmd
from tests.test_rlhf_ppo import RULE, metrics, ppo_cmd

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("ppo2")
    cmd, run_dir = ppo_cmd(tmp, tokenizer_dir, "zero2", *RULE, "actor.zero.stage=2", "critic.zero.stage=2",
                           "reference.zero.stage=3", "rollout.batch=16", "train.micro_batch=8", "ppo.epochs=2",
                           f"train.save_every={STEPS}", steps=STEPS, nprocs=2)
    proc = run_cmd(cmd, cwd=tmp, timeout=600)
    return proc, run_dir


def test_two_processes_train(two_proc_run):
    proc, run_dir = two_proc_run
    assert "world 2; actor ZeRO-2, critic ZeRO-2, reference ZeRO-3" in proc.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert 0.0 <= r["reward"] <= 1.0
    # step 1 samples from the starting weights: the actor equals the (partitioned) reference
    assert abs(rows[0]["kl"]) < 1e-4
    assert rows[-1]["kl"] > 0  # ... and the actor moved afterwards
    assert all(r["logp_gap_train"] <= 1e-6 for r in rows)  # rollout log-probs = the first training forward's
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2


def test_partitioned_checkpoints_consolidate(two_proc_run):
    from llmstack.generate import generate
    from llmstack.train.weights import load_for_inference, read_weights

    _, run_dir = two_proc_run
    for part in ("actor", "critic"):
        step = run_dir / "checkpoints" / part / f"step_{STEPS}"
        assert len(list(step.glob("*zero_pp_rank_*_optim_states.pt"))) == 2, part  # one partition per rank
    model, tok, _ = load_for_inference(run_dir / "checkpoints/actor/latest")
    assert len(generate(model, [[tok.bos_id, 7]], max_new_tokens=3)[0]) == 3
    _, _, critic = read_weights(run_dir / "checkpoints/critic/latest")
    assert critic["head.weight"].shape == (1, 64)
