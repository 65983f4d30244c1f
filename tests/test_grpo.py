"""`llmstack grpo` end to end on the builtin arithmetic task with the numeric-answer verifier.

A tiny GPT from scratch, 8 prompts x 8 completions per step: the verifier pays 0.5 for a number
and 1 more for the right one, so the mean reward must rise clearly (the model learns to answer
with a number) while the k3 KL to the reference stays bounded (it plateaus). The sampler's own log-probs equal
the training forward's within 1e-5 in fp32 at every step (left-padded prompts of uneven length),
and stay small in bf16; a run stopped and resumed logs what the uninterrupted run logged.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, llmstack_cmd, run_cmd

STEPS = 40
GRPO_TINY = ["actor.init=null", "actor.n_layer=2", "actor.d_model=64", "actor.n_head=4", "actor.max_seq_len=96",
             "train.lr=3e-3", "train.log_every=1", "train.progress=false", "train.save_every=0", "dist.timeout_s=120",
             "grpo.kl_coef=0.05"]
LOGGED = ("reward", "reward_std", "equal_groups", "kl", "clipfrac", "response_len", "stop_frac", "logp_gap_max",
          "logp_gap_mean", "logp_gap_train", "policy_loss", "loss", "lr", "time_generate", "time_score", "time_train")


def grpo_cmd(tmp, tokenizer_dir, name, *extra, steps=STEPS, nprocs=1):
    run_dir = tmp / name
    args = ["grpo", str(REPO / "configs/grpo/demo.yaml"), *GRPO_TINY, f"tokenizer.path={tokenizer_dir}",
            f"run.dir={run_dir}", f"train.max_steps={steps}", *extra]
    return llmstack_cmd(args, nprocs, "python" if nprocs == 1 else "deepspeed"), run_dir


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("grpo")
    cmd, run_dir = grpo_cmd(tmp, tokenizer_dir, "demo")
    proc = run_cmd(cmd, cwd=tmp, timeout=600)
    return proc, run_dir


def test_verifiable_reward_rises_with_bounded_kl(demo_run):
    proc, run_dir = demo_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    print("\nGRPO on builtin-arith: step reward kl\n" + " ".join(f"{r['step']}:{r['reward']:.2f}/{r['kl']:.3f}"
                                                             for r in rows))
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.1, (first, last)
    assert abs(rows[0]["kl"]) < 1e-6  # the first rollout comes from the reference's own weights
    # KL per completion of 8 tokens: learning the format moves a near-uniform policy by 10-20 nats,
    # then the k3 term holds it there (measured: 12-22 from step 15 on; a policy that put all its
    # mass on one token per position would be 8 ln(1024) = 55 nats from the reference)
    assert max(r["kl"] for r in rows) < 30.0
    assert sum(r["kl"] for r in rows[-10:]) / 10 < 25.0
    for key in LOGGED:
        assert all(key in r for r in rows), key
    # log-prob parity: the sampler's decode-time log-probs are the training forward's
    assert all(r["logp_gap_max"] <= 1e-5 and r["logp_gap_train"] == 0.0 for r in rows)
    summary = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("done: "))
    assert summary["reward_last"] > summary["reward_first"]


def test_resume_is_exact(demo_run, tmp_path, tokenizer_dir):
    _, full_dir = demo_run
    for stop in (2, 3):
        cmd, run_dir = grpo_cmd(tmp_path, tokenizer_dir, "resumed", f"train.stop_at={stop}")
        proc = run_cmd(cmd, cwd=tmp_path)
    assert "resumed from" in proc.stdout
    full, resumed = metrics(full_dir)[:3], metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward", "kl", "loss", "clipfrac", "response_len", "equal_groups"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key


@pytest.mark.parametrize("algo", ["dr_grpo", "rloo", "reinforce_pp"])
def test_every_algorithm_trains(algo, tmp_path, tokenizer_dir):
    cmd, run_dir = grpo_cmd(tmp_path, tokenizer_dir, algo, f"grpo.algo={algo}", "grpo.overlong=filter",
                            "grpo.kl_in=reward", steps=3)
    proc = run_cmd(cmd, cwd=tmp_path)
    assert f"{algo} (" in proc.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["logp_gap_max"] <= 1e-5 for r in rows)


def test_bf16_log_prob_gap_is_small(tmp_path, tokenizer_dir):
    cmd, run_dir = grpo_cmd(tmp_path, tokenizer_dir, "bf16", "precision=bf16", "actor.zero.stage=1", steps=2)
    run_cmd(cmd, cwd=tmp_path)
    rows = metrics(run_dir)
    print("\nbf16 sampler vs trainer log-prob gap (max, mean):",
          [(r["logp_gap_max"], r["logp_gap_mean"]) for r in rows])
    assert all(r["logp_gap_max"] < 0.05 and r["logp_gap_mean"] < 0.01 for r in rows)


def test_bad_verifier_is_a_clear_error(tmp_path, tokenizer_dir):
    cmd, _ = grpo_cmd(tmp_path, tokenizer_dir, "bad", "reward.kwargs={extract: nonsense}", steps=1)
    proc = run_cmd(cmd, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "reward.function=llmstack.rlhf.verifiers:numeric_answer" in proc.stderr
    assert "Traceback" not in proc.stderr
