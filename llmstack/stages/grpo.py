"""`llmstack grpo`: critic-free, group-relative RL on verifiable rewards (GRPO, Dr. GRPO, RLOO,
REINFORCE++), the same engines, ZeRO stages and launcher as PPO but no critic and no reward model.

One step (`GRPOStep`, run by the Trainer like every stage's):
1. sample: each process takes its rollout.prompts prompts and samples rollout.group_size
   completions of each from the actor (stages/policy.py Sampler: the KV-cache decoder on the
   actor's own weights), keeping the sampler's log-prob of every generated token.
2. score: the verifier (reward.function, e.g. llmstack.rlhf.verifiers:numeric_answer) gets the
   prompt texts, the decoded completions and each record's reference (data.reference_field);
   overlong completions (no stop token) are kept, filtered out of the loss, or penalised;
   group-relative advantages (rlhf/group.py, formulas there); with grpo.dynamic_sampling the
   groups whose rewards are all equal carry no loss (counted).
3. train: the old log-probs come from the actor's forwards in the first epoch's micro-batches,
   the very forwards training repeats, so the first ratios are exactly 1; grpo.epochs passes of
   mini-batches (train.micro_batch x train.grad_accum completions) with the clipped objective
   (asymmetric clip), k3 KL in the loss or KL in the reward, aggregated as the algorithm's paper
   does (each micro-batch's share of the mini-batch's aggregate, so accumulation is exact).

Log-prob parity is logged at every step: max and mean |log p_sampler - log p_trainer| over the
generated tokens (logp_gap_max, logp_gap_mean), the sampler's decode-time log-probs against the
training forward: ~1e-6 in fp32, small in bf16 (tests/test_grpo.py, one and two processes).
Ranks stay in step: every rank trains on the same number of micro-batches whatever its rewards
(rows without loss are masked, never dropped).
"""

from __future__ import annotations

import json
import time

import torch

from data_pipeline.pairs import load_tasks, rank_indices
from llmstack.config import GRPOConfig
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.models.heads import PolicyLM
from llmstack.rlhf import group as G
from llmstack.rlhf import rollout
from llmstack.rlhf.advantages import masked_mean
from llmstack.stages import common
from llmstack.stages.policy import Sampler, chat_stops, minibatches, reward_function
from llmstack.train import run as train_run
from llmstack.train.metrics import rollout_flops
from llmstack.train.trainer import Callback, Checkpointer, CheckpointPart, StatWindow, StepOutput, Trainer

dry_run = train_run.dry_run


class GRPOModels:
    """The trained actor, its sampler, and the frozen reference (built only with a KL term)."""

    def __init__(self, cfg: GRPOConfig, run):
        t, r = cfg.train, cfg.rollout
        tok, self.arch, init = common.finetune_start(run, cfg, seq_len=cfg.data.max_prompt_len + r.max_new_tokens,
                                                     model_cfg=cfg.actor)
        self.tokenizer = tok
        end_ids, pad = chat_stops(tok)
        self.lr = cfg.actor.lr or t.lr
        actor_ds = run.engine_config(train_run.ds_config_for(cfg, run.world, cfg.actor.zero, micro_batch=t.micro_batch,
                                                             lr=self.lr)[0])
        self.actor = common.train_engine(common.build_model(
            self.arch, actor_ds, cfg.actor.zero.stage, cfg.seed, cls=PolicyLM, init=init, tokenizer_hash=tok.hash,
            what="actor.init"), t, actor_ds, lr=self.lr)
        self.reference = None
        if cfg.grpo.kl_coef > 0:  # the starting weights, frozen
            init = init or common.read_init(cfg.actor.init, cfg.actor.backend)
            ref_ds = run.engine_config(train_run.ds_config_for(cfg, run.world, cfg.reference.zero,
                                                               micro_batch=t.micro_batch, grad_accum=1)[0])
            self.reference = ds.create_inference_engine(common.build_model(
                self.arch, ref_ds, cfg.reference.zero.stage, cfg.seed, cls=PolicyLM, init=init,
                tokenizer_hash=tok.hash, what="actor.init"), ref_ds)
        self.sampler = Sampler(self.actor, self.arch, cfg.actor.zero.stage, seed=cfg.seed, max_new_tokens=r.max_new_tokens,
                               temperature=r.temperature, end_ids=end_ids, pad_id=pad)


class GRPOStep:
    """The Trainer's step function of GRPO (see the module docstring)."""

    def __init__(self, cfg: GRPOConfig, m: GRPOModels, prompts, texts, references, window: StatWindow):
        self.cfg, self.m, self.window = cfg, m, window
        self.prompts, self.texts, self.references = prompts, texts, references
        self.verify = reward_function(cfg.reward.function)
        self.agg = cfg.grpo.loss_agg or G.DEFAULT_AGG[cfg.grpo.algo]
        self.history: list[dict] = []
        self.model_flops = None  # the actor's FLOPs count, for MFU

    def __call__(self, trainer: Trainer, step: int) -> StepOutput:
        cfg, n = self.cfg, self.cfg.rollout.group_size
        idx = rank_indices(len(self.prompts), cfg.rollout.prompts, env.world_size(), env.rank(), cfg.seed, step)
        idx = [i for i in idx for _ in range(n)]  # each prompt's group: contiguous rows
        prompts = [self.prompts[i] for i in idx]
        t0 = time.perf_counter()
        responses, sampler_lp = self.m.sampler.sample(step, prompts, with_logprobs=True)
        t1 = time.perf_counter()
        ro, stats = self.score(step, prompts, [self.texts[i] for i in idx], [self.references[i] for i in idx],
                               responses, sampler_lp)
        t2 = time.perf_counter()
        stats |= self.train(trainer, ro)
        t3 = time.perf_counter()
        stats |= dict(time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2)
        gap_max = stats.pop("logp_gap_max")
        keys = sorted(stats)
        mean = env.all_reduce_mean(torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=env.device()))
        record = {k: float(v) for k, v in zip(keys, mean)}
        record["logp_gap_max"] = max(env.all_gather_object(gap_max))
        tokens, flops = env.all_reduce_sum(torch.tensor([float(ro["valid"].sum()), self.flops(ro)],
                                                        dtype=torch.float64, device=env.device())).tolist()
        self.history.append(record)
        self.window.add(**record)
        return StepOutput(loss=torch.tensor(record["policy_loss"], dtype=torch.float64), tokens=int(tokens),
                          flops=flops)

    def flops(self, ro: dict) -> float:
        """Model FLOPs of this rank's step for MFU (DESIGN.md "Measuring speed", metrics.rollout_flops):
        the actor's forwards (sampling, old log-probs), the reference's (with a KL term), then
        grpo.epochs forward + backward passes of the actor over every row (rows without loss too)."""
        if self.model_flops is None:  # counted once, on a meta copy
            self.model_flops = common.model_flops(self.m.arch, PolicyLM)
        actor = self.model_flops
        passes = [(actor, False)] * (2 + (self.m.reference is not None)) + [(actor, True)] * len(ro["epochs"])
        return rollout_flops(ro["valid"], ro["P"], passes)

    @torch.no_grad()
    def score(self, step: int, prompts, texts, references, responses, sampler_lp) -> tuple[dict, dict]:
        """The rollout batch (rlhf/rollout.py layout) with old / reference log-probs, the rows'
        loss weights and advantages; and this rank's statistics of it."""
        cfg, m, g = self.cfg, self.m, self.cfg.grpo
        temp, n = cfg.rollout.temperature, cfg.rollout.group_size
        dev = env.device()
        batch = rollout.pack(prompts, responses, m.sampler.pad, dev)
        ids, valid, mask, P = batch["ids"], batch["valid"], batch["response_mask"], batch["prompt_len"]
        stopped = torch.tensor([bool(x) and x[-1] in m.sampler.end_ids for x in responses], device=dev)
        contents = [x[:-1] if s else x for x, s in zip(responses, stopped.tolist())]
        epochs = [minibatches(torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(cfg.seed + step)),
                              mask, P, cfg.train.micro_batch, cfg.train.grad_accum) for _ in range(g.epochs)]
        old_lp, ref_lp = torch.zeros_like(mask), torch.zeros_like(mask)
        for mb, cols in (x for minibatch in epochs[0] for x in minibatch):  # the first epoch's forwards
            rows = (ids[mb, :cols], valid[mb, :cols], P)
            old_lp[mb, :cols - P] = rollout.response_logprobs(m.actor, *rows, temperature=temp)[0]
            if m.reference is not None:
                ref_lp[mb, :cols - P] = rollout.response_logprobs(m.reference, *rows, temperature=temp)[0]
        lp_sampler = torch.zeros_like(mask)
        for i, row in enumerate(sampler_lp):
            lp_sampler[i, :len(row)] = torch.tensor(row, dtype=mask.dtype, device=dev)
        gap = (lp_sampler - old_lp).abs() * mask

        try:
            raw = self.verify(texts, [m.tokenizer.decode(c) for c in contents], references, **cfg.reward.kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"reward.function={cfg.reward.function} with reward.kwargs={cfg.reward.kwargs}: {e}") \
                from None
        reward = torch.as_tensor([float(x) for x in raw], dtype=torch.float32, device=dev)
        if len(reward) != len(contents):
            raise UsageError(f"reward.function returned {len(reward)} scores for {len(contents)} responses")
        weight = torch.ones_like(reward)  # rows carrying loss
        if g.overlong == "penalty":
            reward = reward - g.overlong_penalty * (~stopped).float()
        elif g.overlong == "filter":
            weight = weight * stopped.float()
        seq_kl = ((old_lp - ref_lp) * mask).sum(-1) if m.reference is not None else torch.zeros_like(reward)
        # (the k1 estimate of KL(policy || reference) of each completion)
        shaped = reward - g.kl_coef * seq_kl if g.kl_coef and g.kl_in == "reward" else reward
        adv = G.group_advantages(shaped, n, g.algo)
        equal = G.equal_groups(shaped, n)
        if g.dynamic_sampling:
            weight = weight * G.keep_rows(~equal, n).float()
        ro = {"ids": ids, "valid": valid, "mask": mask * weight[:, None], "P": P, "old_lp": old_lp, "ref_lp": ref_lp,
              "adv": adv[:, None].expand_as(mask), "epochs": epochs}
        tokens = mask.sum().clamp(min=1)
        stats = {"reward": float(reward.mean()), "reward_std": float(reward.std()) if len(reward) > 1 else 0.0,
                 "equal_groups": float(equal.float().mean()), "response_len": float(mask.sum(-1).mean()),
                 "stop_frac": float(stopped.float().mean()), "kl": float(seq_kl.mean()),
                 "logp_gap_mean": float(gap.sum() / tokens), "logp_gap_max": float(gap.max()) if gap.numel() else 0.0}
        return ro, stats

    def train(self, trainer: Trainer, ro: dict) -> dict:
        """grpo.epochs passes of optimizer steps over the rollout; this rank's mean statistics."""
        g, m, P, temp = self.cfg.grpo, self.m, ro["P"], self.cfg.rollout.temperature
        m.actor.train()
        sums, n_mb, gap_train = {"policy_loss": 0.0, "clipfrac": 0.0}, 0, 0.0
        for minibatch in (mbs for epoch in ro["epochs"] for mbs in epoch):
            rows = sum(float((ro["mask"][mb].sum(-1) > 0).sum()) for mb, _ in minibatch)
            tokens = sum(float(ro["mask"][mb].sum()) for mb, _ in minibatch)
            for mb, cols in minibatch:
                R, mask = cols - P, ro["mask"][mb, :cols - P]
                lp, _ = rollout.response_logprobs(m.actor, ro["ids"][mb, :cols], ro["valid"][mb, :cols], P,
                                                  temperature=temp)
                old = ro["old_lp"][mb, :R]
                if n_mb == 0:  # before the first update: the old log-probs must be these
                    gap_train = float(((lp.detach() - old).abs() * mask).max()) if mask.numel() else 0.0
                per_token, clipped = G.clipped_objective(lp, old, ro["adv"][mb, :R], g.clip_low, g.clip_high)
                if g.kl_coef and g.kl_in == "loss":
                    per_token = per_token + g.kl_coef * G.k3_kl(lp, ro["ref_lp"][mb, :R])
                loss = G.aggregate(per_token, mask, self.agg, self.cfg.rollout.max_new_tokens, total_rows=max(rows, 1),
                                   total_tokens=max(tokens, 1)) * len(minibatch)  # DeepSpeed divides by accum
                trainer.backward(m.actor, loss)
                trainer.optimizer_step(m.actor)
                sums["policy_loss"] += float(loss.detach()) / len(minibatch)
                sums["clipfrac"] += float(masked_mean(clipped, mask))
                n_mb += 1
        m.actor.module.eval()
        n_steps = sum(len(epoch) for epoch in ro["epochs"])
        return {"policy_loss": sums["policy_loss"] / n_steps, "clipfrac": sums["clipfrac"] / n_mb,
                "logp_gap_train": gap_train}


class GRPOProgress(Callback):
    """The console line of GRPO's own metrics at each logged step."""

    def on_log(self, trainer, r: dict) -> None:
        if "reward" in r:
            env.print0(f"  reward {r['reward']:.4f} (std {r['reward_std']:.3f}, equal groups {r['equal_groups']:.2f}) "
                       f"kl {r['kl']:.4f} clipfrac {r['clipfrac']:.3f} len {r['response_len']:.1f} logp gap "
                       f"{r['logp_gap_max']:.2e} | generate {r['time_generate']:.2f}s score {r['time_score']:.2f}s "
                       f"train {r['time_train']:.2f}s")


def run(cfg: GRPOConfig) -> dict:
    run, t, r = train_run.start(cfg), cfg.train, cfg.rollout
    m = GRPOModels(cfg, run)
    d = cfg.data
    prompts, texts, references, errors = load_tasks(d.sources, m.tokenizer, d.max_prompt_len, d.on_error,
                                                    d.reference_field)
    common.report_skipped(errors, "prompts")
    if len(prompts) < r.prompts * run.world:
        raise UsageError(f"{len(prompts)} usable prompts are fewer than one rollout batch ({r.prompts} x {run.world})")
    run.record(m.tokenizer.hash, prompts=len(prompts), skipped=errors.counts(), params=m.actor.module.num_params())
    window = StatWindow()
    step_fn = GRPOStep(cfg, m, prompts, texts, references, window)
    meta = lambda step, tokens: run.meta(step, tokens, tokenizer=m.tokenizer, arch=m.arch,  # noqa: E731
                                         zero_stage=cfg.actor.zero.stage, stage="grpo")
    checkpointer = Checkpointer([CheckpointPart(m.actor, run.ckpt_root, meta)], t.keep_last)
    start = checkpointer.restore(run.resume_from).step if run.resume_from else 0
    env.print0(f"grpo {run.dir}: world {run.world}, actor ZeRO-{cfg.actor.zero.stage}, {cfg.grpo.algo} "
               f"({step_fn.agg}), {r.prompts * run.world} prompts x {r.group_size} completions/step, "
               f"{cfg.grpo.epochs} epochs of mini-batches of {t.micro_batch} x {t.grad_accum}; "
               f"{len(prompts)} prompts (skipped {errors.total}); steps {start}->{t.max_steps}")
    trainer = Trainer(t, [(m.actor, m.lr)], step_fn, run_dir=run.dir, start_step=start, checkpointer=checkpointer,
                      callbacks=[window, GRPOProgress()], peak_flops=common.peak_flops(cfg.precision))
    t0 = time.perf_counter()
    result = trainer.fit()
    hist = step_fn.history
    k = max(1, min(5, len(hist) // 4))
    summary = {"run_dir": str(run.dir), "steps": result.step, "window": k,
               "reward_first": sum(x["reward"] for x in hist[:k]) / k if hist else None,
               "reward_last": sum(x["reward"] for x in hist[-k:]) / k if hist else None,
               "kl_max": max((x["kl"] for x in hist), default=None),
               "logp_gap_max": max((x["logp_gap_max"] for x in hist), default=None),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
