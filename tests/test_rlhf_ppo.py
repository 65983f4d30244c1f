"""PPO end to end on the tiny model with a rule-based reward, plus its input checks.

The run starts from a random tiny GPT (its next-token distribution is almost uniform), and the
reward is 1 when the decoded response contains "an" (about 30% of random responses do): PPO
must raise the mean reward clearly within a few dozen steps while the per-sequence KL to the
reference stays bounded by the penalty. The curves are printed (pytest -s shows them).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, StandInEngine, StandInTrainer, llmstack_cmd, run_cmd

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
    from llmstack.train.weights import load_for_inference, read_weights

    _, run_dir = rule_run
    model, tok, info = load_for_inference(run_dir / "checkpoints/actor/latest")
    out = generate(model, [[tok.bos_id, 5, 6]], max_new_tokens=4)
    assert len(out[0]) == 4
    _, cinfo, cstate = read_weights(run_dir / "checkpoints/critic/latest")
    assert cinfo.head == "scalar" and "head.weight" in cstate


@pytest.mark.parametrize("tie", [True, False])
def test_decoding_copy_is_the_actor_in_its_dtype(tie):
    """The ZeRO-3 decoding copy: the actor's dtype (bf16 here, not fp32), tied weights still tied,
    and after copy_full_weights (module by module) the actor's exact values."""
    import torch

    from llmstack.distributed.deepspeed import copy_full_weights
    from llmstack.models.gpt import GPTConfig
    from llmstack.models.heads import PolicyLM
    from llmstack.stages.policy import decoding_copy

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
    from llmstack.stages.common import build_model
    from llmstack.train.meta import CheckpointMeta

    arch = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    init = ("rm/step_5", CheckpointMeta(tokenizer_hash="aaaa"), ScalarHeadModel(arch).state_dict())
    with pytest.raises(UsageError, match="tokenizer mismatch: reward.init rm/step_5"):
        build_model(arch, {}, 0, 0, cls=ScalarHeadModel, init=init, tokenizer_hash="bbbb", what="reward.init")


def test_prompt_input_errors(tmp_path, tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.config import SourceConfig
    from data_pipeline.errors import DataError
    from data_pipeline.pairs import load_prompts
    from llmstack.errors import UsageError
    from llmstack.stages.ppo import reward_function

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "short question?"}\n{"prompt": "' + "long words " * 40 + '"}\nnot json\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    tok = load_tokenizer(tokenizer_dir)
    ids, texts, errors = load_prompts([SourceConfig(path=str(f))], tok, 32, "skip")
    assert texts == ["short question?", "hi"]  # the trailing assistant turn is dropped
    assert errors.counts() == {str(f): {"too_long": 1, "malformed_json": 1}}
    with pytest.raises(DataError, match="exceeds data.max_prompt_len=32"):
        load_prompts([SourceConfig(path=str(f))], tok, 32, "fail")
    with pytest.raises(UsageError, match="no_such_module"):
        reward_function("no_such_module:f")
    with pytest.raises(DataError, match="prompt data not found"):
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


def test_grad_accum_equals_one_big_batch(tmp_path, tokenizer_dir):
    """End to end through DeepSpeed's accumulation: train.micro_batch=4 x train.grad_accum=2 makes
    the updates of one micro-batch of 8 (the rollouts, the scoring and the optimizer steps line
    up). Plain SGD, so the weights differ only by rounding when the gradients agree; the control
    (micro 4, no accumulation: two smaller updates) shows the test can fail. The weighting of
    uneven responses is checked on its own below."""
    import torch

    from llmstack.train.weights import read_weights

    common = [*RULE, "rollout.batch=8", "ppo.epochs=2", "train.optimizer=sgd", "train.warmup_steps=0"]
    state = {}
    for name, micro, accum in (("big", 8, 1), ("accum", 4, 2), ("control", 4, 1)):
        cmd, run_dir = ppo_cmd(tmp_path, tokenizer_dir, name, *common, f"train.micro_batch={micro}",
                               f"train.grad_accum={accum}", steps=1)
        run_cmd(cmd, cwd=tmp_path)
        state[name] = {part: read_weights(run_dir / f"checkpoints/{part}/latest")[2] for part in ("actor", "critic")}
    for part in ("actor", "critic"):
        big, acc, control = state["big"][part], state["accum"][part], state["control"][part]
        for k in big:
            torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6, msg=f"{part} {k}")
        assert max(float((control[k] - big[k]).abs().max()) for k in big) > 1e-4, part


def test_ppo_minibatch_gradient_is_the_token_mean_for_any_accumulation():
    """The gradients of one PPO mini-batch of 8 rollouts with responses of uneven length are the
    same as one micro-batch of 8 or 4 x 2 accumulated (a mean of per-micro-batch means would
    weight the short responses more)."""
    import types

    import torch

    from llmstack.config import PPOConfig
    from llmstack.models.gpt import GPTConfig
    from llmstack.models.heads import PolicyLM, ScalarHeadModel
    from llmstack.rlhf import rollout
    from llmstack.rlhf.rollout import Rollout
    from llmstack.stages.policy import minibatches
    from llmstack.stages.ppo import PPOStep

    arch = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    B, P, R = 8, 3, 6
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (B, P + R), generator=g)
    lengths = torch.tensor([6, 1, 2, 6, 1, 5, 3, 1])  # response tokens per row: uneven
    valid = torch.ones(B, P + R, dtype=torch.bool)
    for i, n in enumerate(lengths):
        valid[i, P + n:] = False
    mask = valid[:, P:].float()

    def grads(micro: int, accum: int) -> dict:
        torch.manual_seed(1)
        actor, critic = PolicyLM(arch), ScalarHeadModel(arch)
        actor.init_weights(), critic.init_weights()
        with torch.no_grad():
            old = rollout.response_logprobs(actor, ids, valid, P)[0]
            values = rollout.response_values(critic, ids, valid, P)
        adv = torch.randn(B, R, generator=torch.Generator().manual_seed(2)) * mask
        ro = Rollout(ids=ids, valid=valid, mask=mask, prompt_len=P, old_logp=old, ref_logp=old, values=values,
                     advantages=adv, returns=values + adv, kl=torch.zeros(B, R), score=torch.zeros(B),
                     reward=torch.zeros(B), reward_normalized=torch.zeros(B), stopped=torch.ones(B, dtype=torch.bool))
        cfg = PPOConfig.model_validate({"rollout": {"batch": 8}, "train": {"micro_batch": micro, "grad_accum": accum},
                                        "ppo": {"entropy_coef": 0.01}})
        models = types.SimpleNamespace(actor=StandInEngine(actor), critic=StandInEngine(critic))
        step = PPOStep(cfg, models, [], [], None)
        step.train(StandInTrainer(accum), ro, [minibatches(torch.arange(B), mask, P, micro, accum)])
        return {**{f"actor.{n}": p.grad for n, p in actor.named_parameters()},
                **{f"critic.{n}": p.grad for n, p in critic.named_parameters()}}

    one, split = grads(8, 1), grads(4, 2)
    for k in one:
        torch.testing.assert_close(split[k], one[k], rtol=1e-5, atol=1e-7, msg=k)


def test_divergence_stops_with_status_3_and_keeps_the_good_checkpoint(tmp_path, tokenizer_dir):
    """PPO trains under the same guard as every stage: with a learning rate of 1e30 the losses turn
    non-finite after the first update; those steps are skipped and counted, the run stops with exit
    status 3 past train.max_skipped_steps, metrics.jsonl stays strict JSON, and the only checkpoint
    (actor and critic) is the one of step 1."""
    cmd, run_dir = ppo_cmd(tmp_path, tokenizer_dir, "diverged", *RULE, "actor.lr=1e30", "critic.lr=1e30",
                           "train.warmup_steps=0", "train.save_every=1", "train.max_skipped_steps=2",
                           "rollout.batch=8", "train.micro_batch=8", "ppo.epochs=1", steps=8)
    proc = run_cmd(cmd, cwd=tmp_path, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training diverged at step 4" in proc.stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["loss"] is not None
    assert all(r["skipped"] and r["loss"] is None for r in rows[1:]) and rows[-1]["skipped_steps"] == 3
    for part in ("actor", "critic"):
        ckpts = run_dir / "checkpoints" / part
        assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_1"], part
