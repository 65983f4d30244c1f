"""PPO end to end on the tiny model with a rule-based reward, plus its input checks.

The run starts from a random tiny GPT (its next-token distribution is almost uniform), and the
reward is 1 when the decoded response contains "an" (about 30% of random responses do): PPO
must raise the mean reward clearly within a few dozen steps while the per-sequence KL to the
reference stays bounded by the penalty. The curves are printed (pytest -s shows them).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, llmstack_cmd, run_cmd

STEPS = 40
# a tiny actor / critic (2 layers, width 64), short responses, big steps
PPO_TINY = [
    "actor.init=null", "actor.n_layer=2", "actor.d_model=64", "actor.n_head=4", "actor.max_seq_len=96",
    "critic.n_layer=2", "critic.d_model=64", "critic.n_head=4", "critic.max_seq_len=96",
    "data.max_prompt_len=40", "rollout.max_new_tokens=16", "rollout.batch=32", "train.micro_batch=16",
    "ppo.epochs=4", "ppo.kl_coef=0.05", "ppo.reward_norm=false", "ppo.missing_stop_penalty=0",
    "actor.lr=3e-3", "critic.lr=3e-3", "train.progress=false", "train.resume=none", "dist.timeout_s=120",
]
RULE = ["reward.init=null", "reward.function=llmstack.rlhf.rewards:contains", "reward.kwargs={target: an}"]
LOGGED = ("reward", "kl", "entropy", "clipfrac", "value_loss", "approx_kl", "response_len", "time_generate",
          "time_score", "time_train", "loss", "lr", "tokens_per_s", "kl_coef", "logp_gap_train", "logp_gap_decoder")


def ppo_cmd(tmp, tokenizer_dir, name, *extra, steps=STEPS, nprocs=1):
    run_dir = tmp / name
    args = ["ppo", str(REPO / "configs/ppo/demo.yaml"), *PPO_TINY, f"tokenizer.path={tokenizer_dir}",
            f"run.dir={run_dir}", f"train.max_steps={steps}", *extra]
    return llmstack_cmd(args, nprocs, "python" if nprocs == 1 else "deepspeed"), run_dir


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def print_curves(title, rows):
    print(f"\n{title}: step reward kl")
    print(" ".join(f"{r['step']}:{r['reward']:.2f}/{r['kl']:.1f}" for r in rows))


@pytest.fixture(scope="module")
def rule_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("ppo")
    cmd, run_dir = ppo_cmd(tmp, tokenizer_dir, "rule", *RULE)
    proc = run_cmd(cmd, cwd=tmp, timeout=600)
    return proc, run_dir


def test_rule_reward_rises_with_bounded_kl(rule_run):
    proc, run_dir = rule_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    print_curves("PPO, reward = response contains 'an'", rows)
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert max(r["kl"] for r in rows) < 15.0  # nats per response: held by the 0.05 per-token penalty
    assert abs(rows[0]["kl"]) < 1e-4  # the first rollout comes from the reference itself
    for key in LOGGED:
        assert all(key in r for r in rows), key
    # the rollout log-probs are the first training forward's (scored in the same mini-batches)
    assert all(r["logp_gap_train"] <= 1e-6 and r["logp_gap_decoder"] == 0.0 for r in rows)
    summary = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("done: "))
    assert summary["reward_last"] > summary["reward_first"]


def test_resume_is_exact(rule_run, tmp_path, tokenizer_dir):
    """Stopped after step 2 and resumed (actor, critic, KL coefficient, data position), the run logs
    exactly what the uninterrupted run logged for step 3."""
    _, full_dir = rule_run
    cmd, run_dir = ppo_cmd(tmp_path, tokenizer_dir, "resumed", *RULE, "train.resume=auto", "train.stop_at=2")
    run_cmd(cmd, cwd=tmp_path)
    cmd, _ = ppo_cmd(tmp_path, tokenizer_dir, "resumed", *RULE, "train.resume=auto", "train.stop_at=3")
    proc = run_cmd(cmd, cwd=tmp_path)
    assert "resumed from" in proc.stdout
    full, resumed = metrics(full_dir)[:3], metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward", "kl", "loss", "value_loss", "entropy", "clipfrac"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key


def test_actor_checkpoint_is_a_plain_gpt(rule_run):
    """The actor checkpoint loads for generation (same keys as any GPT); the critic keeps its head."""
    from llmstack.generate import generate
    from llmstack.train.checkpoint import load_for_inference, read_weights

    _, run_dir = rule_run
    model, tok, info = load_for_inference(run_dir / "checkpoints/actor/latest")
    out = generate(model, [[tok.bos_id, 5, 6]], max_new_tokens=4)
    assert len(out[0]) == 4
    _, cinfo, cstate = read_weights(run_dir / "checkpoints/critic/latest")
    assert cinfo["head"] == "scalar" and "head.weight" in cstate


@pytest.mark.parametrize("tie", [True, False])
def test_decoding_copy_is_the_actor_in_its_dtype(tie):
    """The ZeRO-3 decoding copy: the actor's dtype (bf16 here, not fp32), tied weights still tied,
    and after copy_full_weights (module by module) the actor's exact values."""
    import torch

    from llmstack.distributed.deepspeed import copy_full_weights
    from llmstack.models.gpt import GPTConfig
    from llmstack.models.heads import PolicyLM
    from llmstack.stages.ppo import decoding_copy

    arch = GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=32, tie_embeddings=tie)
    torch.manual_seed(0)
    actor = PolicyLM(arch)
    actor.init_weights()
    actor = actor.bfloat16()
    decoder = decoding_copy(arch, actor, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in decoder.parameters())
    assert (decoder.lm_head.weight is decoder.wte.weight) == tie
    copy_full_weights(actor, decoder, 0)
    want, got = actor.state_dict(), decoder.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_mismatched_tokenizer_is_refused():
    from llmstack.errors import UsageError
    from llmstack.models.gpt import GPTConfig
    from llmstack.models.heads import ScalarHeadModel
    from llmstack.stages.common import build_rlhf_model

    arch = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    init = ("rm/step_5", {"tokenizer_hash": "aaaa"}, ScalarHeadModel(arch).state_dict())
    with pytest.raises(UsageError, match="tokenizer mismatch: reward.init rm/step_5"):
        build_rlhf_model(ScalarHeadModel, arch, {}, 0, 0, init, "bbbb", "reward.init")


def test_prompt_input_errors(tmp_path, tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.config import SourceConfig
    from llmstack.errors import UsageError
    from llmstack.stages.ppo import load_prompts, reward_function

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "short question?"}\n{"prompt": "' + "long words " * 40 + '"}\nnot json\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    tok = load_tokenizer(tokenizer_dir)
    ids, texts, errors = load_prompts([SourceConfig(path=str(f))], tok, 32, "skip")
    assert texts == ["short question?", "hi"]  # the trailing assistant turn is dropped
    assert errors.counts() == {str(f): {"too_long": 1, "malformed_json": 1}}
    with pytest.raises(UsageError, match="exceeds data.max_prompt_len=32"):
        load_prompts([SourceConfig(path=str(f))], tok, 32, "fail")
    with pytest.raises(UsageError, match="no_such_module"):
        reward_function("no_such_module:f")
    with pytest.raises(UsageError, match="prompt data not found"):
        load_prompts([SourceConfig(path=str(tmp_path / "missing.jsonl"))], tok, 32, "skip")


def test_cli_without_reward_exits_2(tmp_path, tokenizer_dir):
    cmd, _ = ppo_cmd(tmp_path, tokenizer_dir, "none", "reward.init=null", steps=1)
    proc = run_cmd(cmd, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "no reward: set reward.init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ppo_config_rejects_bad_keys(tmp_path):
    from llmstack.config import PPOConfig, load_config
    from llmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="ppo.cliprange: unknown key"):
        load_config(PPOConfig, str(REPO / "configs/ppo/demo.yaml"), ["ppo.cliprange=0.1"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(PPOConfig, str(REPO / "configs/ppo/demo.yaml"), ["reward.function=m:f"])
