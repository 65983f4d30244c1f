"""`llmstack ppo`: PPO against a reward model or a rule-based reward (Ouyang et al. 2022 recipe).

Four models, each with its own ZeRO stage: the actor (a PolicyLM) and the critic (a
ScalarHeadModel) are trained, each in its own DeepSpeed engine; the reference (the actor's
starting weights) and the reward model are frozen (an optimizer-less engine under ZeRO-3, a
plain module otherwise). The Trainer runs the steps (learning rate, logging, checkpoints of
both trained engines, divergence and preemption); one step (`PPOStep`) is:

1. generate: each process samples responses to its share of the prompts with the KV-cache
   decoder (generate.py), straight from the actor's weights (ZeRO 0-2: the same tensors, no
   copy; ZeRO-3: a plain copy in the training dtype, refilled once per rollout by gathering one
   module at a time, not a gather per token); stop at <|end|> / EOS.
2. score (a typed `Rollout`, rlhf/rollout.py): actor (old) and reference log-probs of the
   response tokens and critic values, in the first epoch's micro-batches (so the old log-probs
   are bit for bit those of the first training forward: logged as logp_gap_train), and the
   score of each conversation (reward model at its last token, or reward.function on the text).
   Log-probs never form the (B, R, V) logits (models/heads.py token_logprobs).
3. train: per-token rewards -kl_coef * KL + score at the last token, GAE, whitened advantages;
   ppo.epochs passes of mini-batches of train.micro_batch x train.grad_accum rows, each one
   optimizer step of the actor (clipped policy loss - entropy bonus) and of the critic (clipped
   value loss); then the adaptive KL update. A micro-batch's losses are scaled so that the
   accumulated gradient is the token mean over the whole mini-batch: any grad_accum gives the
   update of one big batch.

train.compile is not offered: rollouts decode straight from the actor's module with a KV cache
whose shapes change at every generated token, so a compiled actor would recompile throughout
generation. The math is in llmstack/rlhf/ (unit-tested); this file is the control flow.
"""

from __future__ import annotations

import json
import time

import torch

from data_pipeline.pairs import load_prompts, rank_indices
from llmstack.config import ModelConfig, PPOConfig
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.generate import left_pad
from llmstack.models.heads import PolicyLM, ScalarHeadModel, is_scalar_state
from llmstack.rlhf import advantages as A
from llmstack.rlhf import rollout
from llmstack.rlhf.losses import policy_loss, value_loss
from llmstack.rlhf.rollout import Rollout
from llmstack.stages import common
from llmstack.stages.policy import Sampler, chat_stops, max_gap, minibatches, reward_function
from llmstack.train import run as train_run
from llmstack.train.metrics import rollout_flops
from llmstack.train.trainer import Callback, Checkpointer, CheckpointPart, StatWindow, StepOutput, Trainer

dry_run = train_run.dry_run


class Scorer:
    """Scores whole conversations: a frozen reward model, or a rule-based function on the text."""

    def __init__(self, model=None, fn=None, kwargs=None, tokenizer=None, end_ids=(), pad_id: int = 0):
        self.model, self.fn, self.kwargs, self.tok = model, fn, kwargs or {}, tokenizer
        self.end_ids, self.pad = end_ids, pad_id

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], texts: list[str], contents: list[list[int]]) -> torch.Tensor:
        if self.fn is not None:
            try:
                out = self.fn(texts, [self.tok.decode(c) for c in contents], **self.kwargs)
            except TypeError as e:  # the call does not fit the function's signature
                raise UsageError(f"reward.function cannot be called as f(prompts, responses, **reward.kwargs) with "
                                 f"reward.kwargs={self.kwargs}: {e}") from None
            if len(out) != len(contents):
                raise UsageError(f"reward.function returned {len(out)} scores for {len(contents)} responses")
            return torch.as_tensor([float(x) for x in out], dtype=torch.float32, device=env.device())
        # the conversation as the chat template renders it (and as the reward model was trained):
        # prompt, answer content, <|end|>, EOS; the reward is read at that EOS
        seqs = [p + c + list(self.end_ids) for p, c in zip(prompts, contents)]
        ids, valid = left_pad(seqs, self.pad, env.device())
        return rollout.scores(self.model, ids, valid).float()

class PPOModels:
    """The four models of a PPO run and the tokenizer they share (see the module docstring)."""

    def __init__(self, cfg: PPOConfig, run):
        t, world, r = cfg.train, run.world, cfg.rollout
        if cfg.reward.init is None and cfg.reward.function is None:
            raise UsageError("no reward: set reward.init (a reward model from `llmstack rm`) or "
                             "reward.function=module:function")
        seq_len, ckpting = cfg.data.max_prompt_len + r.max_new_tokens, t.activation_checkpointing
        tok, self.actor_arch, actor_init = common.finetune_start(run, cfg, seq_len=seq_len, model_cfg=cfg.actor)
        self.tokenizer = tok
        self.end_ids, self.pad = chat_stops(tok)
        actor_init = actor_init or common.read_init(cfg.actor.init, cfg.actor.backend)  # the reference's weights, resumed or not
        critic_init = common.read_init(cfg.critic.init, cfg.critic.backend) if cfg.critic.init else actor_init
        self.critic_arch = common.finetune_arch(cfg.critic, critic_init, tok.vocab_size, seq_len, ckpting)
        self.actor_lr, self.critic_lr = cfg.actor.lr or t.lr, cfg.critic.lr or t.lr
        accum = t.grad_accum

        def config(zero, rows, accum, lr):
            return run.engine_config(train_run.ds_config_for(cfg, world, zero, micro_batch=rows, grad_accum=accum,
                                                             lr=lr)[0])

        fresh = run.saved is None
        actor_ds = config(cfg.actor.zero, t.micro_batch, accum, self.actor_lr)
        critic_ds = config(cfg.critic.zero, t.micro_batch, accum, self.critic_lr)
        self.actor = common.train_engine(common.build_model(
            self.actor_arch, actor_ds, cfg.actor.zero.stage, cfg.seed, cls=PolicyLM, init=actor_init if fresh else None,
            tokenizer_hash=tok.hash, what="actor.init"), t, actor_ds, lr=self.actor_lr)
        self.critic = common.train_engine(common.build_model(
            self.critic_arch, critic_ds, cfg.critic.zero.stage, cfg.seed + 1, cls=ScalarHeadModel,
            init=critic_init if fresh else None, tokenizer_hash=tok.hash, what="critic.init"), t, critic_ds,
            lr=self.critic_lr)
        ref_ds = config(cfg.reference.zero, r.batch, 1, t.lr)
        self.reference = ds.create_inference_engine(common.build_model(
            self.actor_arch, ref_ds, cfg.reference.zero.stage, cfg.seed, cls=PolicyLM, init=actor_init,
            tokenizer_hash=tok.hash, what="actor.init"), ref_ds)
        self.scorer = self.make_scorer(cfg, config(cfg.reward.zero, r.batch, 1, t.lr), seq_len)
        self.sampler = Sampler(self.actor, self.actor_arch, cfg.actor.zero.stage, seed=cfg.seed,
                               max_new_tokens=r.max_new_tokens, temperature=r.temperature, end_ids=self.end_ids,
                               pad_id=self.pad)

    def make_scorer(self, cfg: PPOConfig, ds_config: dict, seq_len: int) -> Scorer:
        if cfg.reward.init is None:
            return Scorer(fn=reward_function(cfg.reward.function), kwargs=cfg.reward.kwargs, tokenizer=self.tokenizer)
        init = common.read_init(cfg.reward.init)
        if not is_scalar_state(init[2]):
            raise UsageError(f"reward.init={cfg.reward.init} is not a reward model (no scalar head): "
                             "train one with `llmstack rm`")
        arch = common.finetune_arch(ModelConfig(), init, self.tokenizer.vocab_size, seq_len + 2, False)
        model = ds.create_inference_engine(common.build_model(
            arch, ds_config, cfg.reward.zero.stage, cfg.seed, cls=ScalarHeadModel, init=init,
            tokenizer_hash=self.tokenizer.hash, what="reward.init"), ds_config)
        return Scorer(model=model, end_ids=self.end_ids, pad_id=self.pad)


class PPOStep:
    """The Trainer's step function of PPO: collect a scored Rollout, then train on it."""

    def __init__(self, cfg: PPOConfig, m: PPOModels, prompts: list[list[int]], texts: list[str], window: StatWindow):
        self.cfg, self.m, self.prompts, self.texts, self.window = cfg, m, prompts, texts, window
        p = cfg.ppo
        self.kl_ctl = A.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
        self.moments = A.RunningMoments()
        self.history: list[dict] = []
        self.model_flops = None  # (actor, critic, reward model) FLOPs counts, for MFU

    def state_dict(self) -> dict:
        return {"kl": self.kl_ctl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])

    def __call__(self, trainer: Trainer, step: int) -> StepOutput:
        cfg, world, rank = self.cfg, env.world_size(), env.rank()
        idx = rank_indices(len(self.prompts), cfg.rollout.batch, world, rank, cfg.seed, step)
        t0 = time.perf_counter()
        responses = self.m.sampler.sample(step, [self.prompts[i] for i in idx])
        t1 = time.perf_counter()
        order = torch.Generator().manual_seed(cfg.seed + step)
        ro, epochs, gap_decoder = self.score(step, [self.prompts[i] for i in idx], [self.texts[i] for i in idx],
                                             responses, order)
        t2 = time.perf_counter()
        local = self.train(trainer, ro, epochs)
        gap_train = local.pop("gap_train")
        t3 = time.perf_counter()
        local.update(reward=float(ro.reward.mean()), score=float(ro.score.mean()),
                     reward_normalized=float(ro.reward_normalized.mean()), kl=float((ro.kl * ro.mask).sum(-1).mean()),
                     response_len=float(ro.mask.sum(-1).mean()), stop_frac=float(ro.stopped.float().mean()),
                     advantage_std=float(ro.advantages[ro.mask.bool()].std()) if ro.mask.sum() > 1 else 0.0,
                     time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2)
        keys = sorted(local)
        mean = env.all_reduce_mean(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=env.device()))
        record = {k: float(v) for k, v in zip(keys, mean)}
        record["kl_coef"] = self.kl_ctl.value
        # max |logp_rollout - logp| over response tokens, the largest on any rank: against the training
        # forward before the first update (0 by construction), and against the decoding copy
        gaps = env.all_gather_object((gap_train, gap_decoder))
        record["logp_gap_train"], record["logp_gap_decoder"] = (max(g[i] for g in gaps) for i in range(2))
        self.kl_ctl.update(record["kl"], cfg.rollout.batch * world)
        tokens, flops = env.all_reduce_sum(torch.tensor([float(ro.valid.sum()), self.flops(ro, len(epochs))],
                                                        dtype=torch.float64, device=env.device())).tolist()
        record["gen_tokens_per_s"] = float(ro.mask.sum()) * world / max(t1 - t0, 1e-9)
        self.history.append(record)
        self.window.add(**record)
        return StepOutput(loss=torch.tensor(record["policy_loss"], dtype=torch.float64), tokens=int(tokens),
                          flops=flops)

    def flops(self, ro: Rollout, epochs: int) -> float:
        """Model FLOPs of this rank's step for MFU (DESIGN.md "Measuring speed", metrics.rollout_flops):
        the actor's forwards (sampling, old log-probs), the reference's, the critic's and the reward
        model's (when the reward is a model), then `epochs` forward + backward passes of actor and critic."""
        m = self.m
        if self.model_flops is None:  # counted once, on meta copies
            rm = m.scorer.model
            self.model_flops = (common.model_flops(m.actor_arch, PolicyLM),
                                common.model_flops(m.critic_arch, ScalarHeadModel),
                                None if rm is None else common.model_flops(getattr(rm, "module", rm).config,
                                                                           ScalarHeadModel))
        actor, critic, reward = self.model_flops
        passes = [(actor, False)] * 3 + [(critic, False)] + [(reward, False)] * (reward is not None) \
            + [(actor, True), (critic, True)] * epochs
        return rollout_flops(ro.valid, ro.prompt_len, passes)

    @torch.no_grad()
    def score(self, step: int, prompts, texts, responses, order_gen) -> tuple[Rollout, list, float]:
        """The scored Rollout, the epochs' mini-batches, and the decoder's log-prob gap (ZeRO-3)."""
        m, p, t, temp = self.m, self.cfg.ppo, self.cfg.train, self.cfg.rollout.temperature
        batch = rollout.pack(prompts, responses, m.pad, env.device())
        ids, valid, mask, P = batch["ids"], batch["valid"], batch["response_mask"], batch["prompt_len"]
        stopped = torch.tensor([bool(x) and x[-1] in m.end_ids for x in responses], device=env.device())
        contents = [x[:-1] if s else x for x, s in zip(responses, stopped.tolist())]
        epochs = [minibatches(torch.randperm(ids.shape[0], generator=order_gen), mask, P, t.micro_batch, t.grad_accum)
                  for _ in range(p.epochs)]
        # Scored in the first epoch's micro-batches, each forward shaped as that epoch's training
        # forward of the same rows: until the first update the rollout log-probs are the training
        # forward's own, bit for bit (same engine, weights and inputs), so the first ratios are
        # exactly 1 in any precision. It also bounds the activations to one micro-batch.
        old_lp, ref_lp, old_values = (torch.zeros_like(mask) for _ in range(3))
        for mb, cols in (x for minibatch in epochs[0] for x in minibatch):
            rows = (ids[mb, :cols], valid[mb, :cols], P)
            old_lp[mb, :cols - P] = rollout.response_logprobs(m.actor, *rows, temperature=temp)[0]
            ref_lp[mb, :cols - P] = rollout.response_logprobs(m.reference, *rows, temperature=temp)[0]
            old_values[mb, :cols - P] = rollout.response_values(m.critic, *rows)
        gap_decoder = 0.0  # ZeRO 0-2: the decoder is the actor's module itself
        if m.sampler.zero3:  # the decoding copy against the partitioned actor, on the first micro-batch
            mb, cols = epochs[0][0][0]
            dec_lp, _ = rollout.response_logprobs(m.sampler.decoder, ids[mb, :cols], valid[mb, :cols], P,
                                                  temperature=temp)
            gap_decoder = max_gap(dec_lp, old_lp[mb, :cols - P], mask[mb, :cols - P])
        score = m.scorer(prompts, texts, contents)
        raw = score - p.missing_stop_penalty * (~stopped).float()  # the reward PPO maximises
        if p.reward_norm:
            self.moments.update(torch.cat([torch.as_tensor(x) for x in env.all_gather_object(raw.cpu().tolist())]))
        scores = A.normalize_scores(raw, self.moments if p.reward_norm else None, p.reward_clip)
        rewards, kl = A.penalized_rewards(scores, old_lp, ref_lp, mask, self.kl_ctl.value, p.kl_estimator)
        adv, returns = A.gae(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:  # over this process's rollouts
            adv = A.whiten(adv, mask)
        ro = Rollout(ids=ids, valid=valid, mask=mask, prompt_len=P, old_logp=old_lp, ref_logp=ref_lp,
                     values=old_values, advantages=adv, returns=returns, kl=kl, score=score, reward=raw,
                     reward_normalized=scores, stopped=stopped)
        return ro, epochs, gap_decoder

    def train(self, trainer: Trainer, ro: Rollout, epochs) -> dict:
        """ppo.epochs passes of optimizer steps over the rollout; this rank's mean loss statistics."""
        m, p, temp, P = self.m, self.cfg.ppo, self.cfg.rollout.temperature, ro.prompt_len
        m.actor.train()
        m.critic.train()
        sums: dict[str, float] = {}
        n_mb, gap_train = 0, 0.0
        for minibatch in (mbs for epoch in epochs for mbs in epoch):
            tokens = sum(float(ro.mask[mb].sum()) for mb, _ in minibatch)
            for mb, cols in minibatch:
                ids, valid, mask = ro.rows(mb, cols)
                R = cols - P
                # masked means over this micro-batch, weighted to the token mean of the mini-batch
                share = len(minibatch) * float(mask.sum()) / max(tokens, 1.0) if len(minibatch) > 1 else 1.0
                lp, ent = rollout.response_logprobs(m.actor, ids, valid, P, temperature=temp, with_entropy=True)
                if n_mb == 0:  # before the first update: the rollout log-probs must be these
                    gap_train = max_gap(lp.detach(), ro.old_logp[mb, :R], mask)
                pl, pstats = policy_loss(lp, ro.old_logp[mb, :R], ro.advantages[mb, :R], mask, p.clip)
                entropy = A.masked_mean(ent, mask)
                trainer.backward(m.actor, (pl - p.entropy_coef * entropy) * share)
                trainer.optimizer_step(m.actor)
                v = rollout.response_values(m.critic, ids, valid, P)
                vl, vstats = value_loss(v, ro.values[mb, :R], ro.returns[mb, :R], mask, p.value_clip)
                trainer.backward(m.critic, vl * share)
                trainer.optimizer_step(m.critic)
                for key, val in (("policy_loss", pl), ("entropy", entropy), ("value_loss", vl), *pstats.items(),
                                 *vstats.items()):
                    sums[key] = sums.get(key, 0.0) + float(val.detach())
                n_mb += 1
        m.actor.module.eval()
        return {**{k: v / n_mb for k, v in sums.items()}, "gap_train": gap_train}


class PPOProgress(Callback):
    """The console line of PPO's own metrics at each logged step."""

    def on_log(self, trainer, r: dict) -> None:
        if "reward" in r:
            env.print0(f"  reward {r['reward']:.4f} kl {r['kl']:.4f} entropy {r['entropy']:.3f} clipfrac "
                       f"{r['clipfrac']:.3f} value_loss {r['value_loss']:.4f} len {r['response_len']:.1f} | generate "
                       f"{r['time_generate']:.2f}s score {r['time_score']:.2f}s train {r['time_train']:.2f}s")


def run(cfg: PPOConfig) -> dict:
    run = train_run.start(cfg, ckpt_root=cfg.run.path / "checkpoints" / "actor")
    t, r = cfg.train, cfg.rollout
    m = PPOModels(cfg, run)
    prompts, texts, errors = load_prompts(cfg.data.sources, m.tokenizer, cfg.data.max_prompt_len, cfg.data.on_error)
    common.report_skipped(errors, "prompts")
    if len(prompts) < r.batch * run.world:
        raise UsageError(f"{len(prompts)} usable prompts are fewer than one rollout batch ({r.batch} x {run.world})")
    env.print0(f"prompts: {len(prompts)} (skipped {errors.total})")
    run.record(m.tokenizer.hash, prompts=len(prompts), skipped=errors.counts(), actor_params=m.actor.module.num_params(),
               critic_params=m.critic.module.num_params())
    window = StatWindow()
    step_fn = PPOStep(cfg, m, prompts, texts, window)
    critic = CheckpointPart(m.critic, run.dir / "checkpoints" / "critic", lambda s, n: run.meta(
        s, n, tokenizer=m.tokenizer, arch=m.critic_arch, zero_stage=cfg.critic.zero.stage, head="scalar",
        stage="ppo-critic"))
    actor = CheckpointPart(m.actor, run.ckpt_root, lambda s, n: run.meta(
        s, n, tokenizer=m.tokenizer, arch=m.actor_arch, zero_stage=cfg.actor.zero.stage, stage="ppo-actor",
        ppo=step_fn.state_dict()))
    checkpointer = Checkpointer([critic, actor], t.keep_last)
    start = 0
    if run.resume_from is not None:
        saved = checkpointer.restore(run.resume_from)
        step_fn.load_state_dict(saved.ppo)
        start = saved.step
    env.print0(f"ppo {run.dir}: world {run.world}; actor ZeRO-{cfg.actor.zero.stage}, critic ZeRO-{cfg.critic.zero.stage}"
               f", reference ZeRO-{cfg.reference.zero.stage}, reward "
               f"{'ZeRO-%d' % cfg.reward.zero.stage if cfg.reward.init else cfg.reward.function}; {r.batch * run.world} "
               f"rollouts/step, {cfg.ppo.epochs} epochs of mini-batches of {t.micro_batch} x {t.grad_accum}; "
               f"steps {start}->{t.max_steps}")
    trainer = Trainer(t, [(m.actor, m.actor_lr), (m.critic, m.critic_lr)], step_fn, run_dir=run.dir, start_step=start,
                      checkpointer=checkpointer, callbacks=[window, PPOProgress()],
                      peak_flops=common.peak_flops(cfg.precision))
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = summarize(step_fn.history)
    summary.update(run_dir=str(run.dir), steps=result.step, seconds=round(time.perf_counter() - t0, 1))
    env.print0("done: " + json.dumps(summary))
    return summary


def summarize(history: list[dict]) -> dict:
    """Reward at the start and end of the run (means over a window of steps), KL, time split."""
    def mean_of(key: str, rows: list[dict]) -> float | None:
        return sum(x[key] for x in rows) / len(rows) if rows else None

    k = max(1, min(5, len(history) // 4))
    return {"reward_first": mean_of("reward", history[:k]), "reward_last": mean_of("reward", history[-k:]),
            "kl_last": mean_of("kl", history[-k:]), "kl_max": max((x["kl"] for x in history), default=None),
            "window": k, "time_generate": mean_of("time_generate", history),
            "time_score": mean_of("time_score", history), "time_train": mean_of("time_train", history)}
