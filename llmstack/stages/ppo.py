"""`llmstack ppo`: PPO against a reward model or a rule-based reward (Ouyang et al. 2022 recipe).

Four models, each with its own ZeRO stage: the actor (a PolicyLM) and the critic (a
ScalarHeadModel) are trained, each in its own DeepSpeed engine; the reference (the actor's
starting weights) and the reward model are frozen (an optimizer-less engine under ZeRO-3, a
plain module otherwise). One PPO step:

1. generate: each process samples responses to its share of the prompts with the KV-cache
   decoder (generate.py), straight from the actor's weights (ZeRO 0-2: the same tensors, no
   copy; ZeRO-3: a plain copy in the training dtype, refilled once per rollout by gathering one
   module at a time, not a gather per token); stop at <|end|> / EOS.
2. score: actor (old) and reference log-probs of the response tokens and critic values, in the
   first epoch's mini-batches (so the old log-probs are bit for bit those of the first training
   forward: logged as logp_gap_train), and the score of each conversation (reward model at its
   last token, or reward.function on the text). Log-probs never form the (B, R, V) logits
   (models/heads.py token_logprobs: row chunks, fp32 log-softmax per chunk).
3. train: per-token rewards -kl_coef * KL + score at the last token, GAE, whitened advantages;
   ppo.epochs passes of mini-batches (train.micro_batch rows): clipped policy loss (- entropy
   bonus) on the actor, clipped value loss on the critic; then the adaptive KL update.

The math is in llmstack/rlhf/ (unit-tested); this file is the control flow.
"""

from __future__ import annotations

import importlib
import json
import time

import torch

from data_pipeline.errors import DataError, ErrorLog
from data_pipeline.formats import chat_tokens, encode_prompt, iter_prompt_records
from llmstack.config import ModelConfig, PPOConfig
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.generate import generate, left_pad
from llmstack.models.heads import PolicyLM, ScalarHeadModel, is_scalar_state
from llmstack.rlhf import advantages as A
from llmstack.rlhf import rollout
from llmstack.rlhf.losses import policy_loss, value_loss
from llmstack.stages import common
from llmstack.stages.reward import rank_indices, report_skipped
from llmstack.train import checkpoint as ckpt
from llmstack.train.metrics import MetricsLogger
from llmstack.train.optim import lr_at


def load_prompts(sources, tokenizer, max_len: int, on_error: str) -> tuple[list[list[int]], list[str], ErrorLog]:
    """(prompt ids under the chat template, last user message texts, skipped records).

    A prompt longer than max_len tokens is skipped and counted as too_long (fail: an error)."""
    errors, ids, texts = ErrorLog(), [], []
    try:
        for src in sources:
            for i, (where, messages) in enumerate(iter_prompt_records(src.path, on_error=on_error, errors=errors)):
                p = encode_prompt(tokenizer, messages)
                if len(p) > max_len:
                    msg = f"prompt of {len(p)} tokens exceeds data.max_prompt_len={max_len}"
                    if on_error == "fail":
                        raise UsageError(f"{where}: {msg}")
                    errors.add(src.path, "record", i, "too_long", msg)
                    continue
                ids.append(p)
                texts.append(next(m["content"] for m in reversed(messages) if m["role"] != "assistant"))
    except FileNotFoundError as e:
        raise UsageError(f"prompt data not found: {e}") from None
    except (DataError, ValueError) as e:
        raise UsageError(f"prompt data: {e}") from None
    return ids, texts, errors


def reward_function(spec: str):
    """The callable named by 'module:function'."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"reward.function={spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise UsageError(f"reward.function={spec} is not callable")
    return fn


def engine_ds_config(cfg: PPOConfig, zero, rows: int, world: int, lr: float) -> dict:
    """The ds_config of one of the four engines: its own ZeRO section, no accumulation (each
    mini-batch is one optimizer step)."""
    t = cfg.train
    return ds.build_ds_config(micro_batch=rows, grad_accum=1, world=world, precision=cfg.precision,
                              zero_stage=zero.stage, offload_optimizer=zero.offload_optimizer,
                              offload_params=zero.offload_params, grad_clip=t.grad_clip, lr=lr, betas=t.betas,
                              eps=t.eps, weight_decay=t.weight_decay, comm_dtype=zero.comm_dtype,
                              extra=cfg.deepspeed)


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


def run(cfg: PPOConfig) -> dict:
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    world, rank = env.world_size(), env.rank()
    t, r, p = cfg.train, cfg.rollout, cfg.ppo
    if r.batch % t.micro_batch:
        raise UsageError(f"rollout.batch={r.batch} must be a multiple of train.micro_batch={t.micro_batch} "
                         "(the PPO mini-batch)")
    run_dir = cfg.run.path
    actor_root, critic_root = run_dir / "checkpoints" / "actor", run_dir / "checkpoints" / "critic"

    # -- models ------------------------------------------------------------------------------
    actor_init = common.read_init(cfg.actor.init)
    tokenizer = common.finetune_tokenizer(cfg.tokenizer, actor_init)
    try:
        chat = chat_tokens(tokenizer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    pad = tokenizer.pad_id or 0
    seq_len = cfg.data.max_prompt_len + r.max_new_tokens
    ckpting = t.activation_checkpointing
    actor_arch = common.rlhf_arch(cfg.actor, actor_init, tokenizer.vocab_size, seq_len, ckpting)
    critic_init = common.read_init(cfg.critic.init) if cfg.critic.init else actor_init
    critic_arch = common.rlhf_arch(cfg.critic, critic_init, tokenizer.vocab_size, seq_len, ckpting)
    if cfg.reward.init is None and cfg.reward.function is None:
        raise UsageError("no reward: set reward.init (a reward model from `llmstack rm`) or "
                         "reward.function=module:function")
    reward_init = common.read_init(cfg.reward.init) if cfg.reward.init else None
    if reward_init is not None and not is_scalar_state(reward_init[2]):
        raise UsageError(f"reward.init={cfg.reward.init} is not a reward model (no scalar head): "
                         "train one with `llmstack rm`")
    resume_from = common.find_resume_checkpoint(t.resume, actor_root)

    actor_lr, critic_lr = cfg.actor.lr or t.lr, cfg.critic.lr or t.lr
    ds_actor = engine_ds_config(cfg, cfg.actor.zero, t.micro_batch, world, actor_lr)
    ds_critic = engine_ds_config(cfg, cfg.critic.zero, t.micro_batch, world, critic_lr)
    ds_ref = engine_ds_config(cfg, cfg.reference.zero, r.batch, world, t.lr)
    ds_reward = engine_ds_config(cfg, cfg.reward.zero, r.batch, world, t.lr)
    h = tokenizer.hash
    fresh = resume_from is None
    actor = common.build_rlhf_model(PolicyLM, actor_arch, ds_actor, cfg.actor.zero.stage, cfg.seed,
                                    actor_init if fresh else None, h, "actor.init")
    actor_engine = common.train_engine(actor, t, ds_actor, lr=actor_lr)
    critic = common.build_rlhf_model(ScalarHeadModel, critic_arch, ds_critic, cfg.critic.zero.stage, cfg.seed + 1,
                                     critic_init if fresh else None, h, "critic.init")
    critic_engine = common.train_engine(critic, t, ds_critic, lr=critic_lr)
    reference = ds.create_inference_engine(common.build_rlhf_model(
        PolicyLM, actor_arch, ds_ref, cfg.reference.zero.stage, cfg.seed, actor_init, h, "actor.init"), ds_ref)
    end_ids = (chat["end"], chat["eos"])
    if reward_init is not None:
        reward_arch = common.rlhf_arch(ModelConfig(), reward_init, tokenizer.vocab_size, seq_len + 2, False)
        reward_model = ds.create_inference_engine(common.build_rlhf_model(
            ScalarHeadModel, reward_arch, ds_reward, cfg.reward.zero.stage, cfg.seed, reward_init, h, "reward.init"),
            ds_reward)
        scorer = Scorer(model=reward_model, end_ids=end_ids, pad_id=pad)
    else:
        scorer = Scorer(fn=reward_function(cfg.reward.function), kwargs=cfg.reward.kwargs, tokenizer=tokenizer)
    # ZeRO-3 partitions the actor: rollouts decode from one gathered copy per step
    zero3 = cfg.actor.zero.stage == 3
    decoder = decoding_copy(actor_arch, actor_engine.module, env.device()) if zero3 else actor_engine.module

    # -- data --------------------------------------------------------------------------------
    prompts, prompt_texts, errors = load_prompts(cfg.data.sources, tokenizer, cfg.data.max_prompt_len,
                                                 cfg.data.on_error)
    report_skipped(errors, "prompts")
    if len(prompts) < r.batch * world:
        raise UsageError(f"{len(prompts)} usable prompts are fewer than one rollout batch ({r.batch} x {world})")
    env.print0(f"prompts: {len(prompts)} (skipped {errors.total})")
    common.prepare_run_dir(run_dir, cfg, h, {"prompts": len(prompts), "skipped": errors.counts(),
                                             "actor_params": actor.num_params(), "critic_params": critic.num_params()})

    kl_ctl = A.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
    moments = A.RunningMoments()
    start_step = 0
    if resume_from is not None:
        meta, _ = ckpt.load(actor_engine, resume_from)
        start_step = meta["step"]
        critic_dir = critic_root / f"step_{start_step}"
        if not (critic_dir / ckpt.META).is_file():
            raise UsageError(f"cannot resume from {resume_from}: the critic checkpoint {critic_dir} is missing")
        ckpt.load(critic_engine, critic_dir, restore_rng=False)
        kl_ctl.load_state_dict(meta["ppo"]["kl"])
        moments.load_state_dict(meta["ppo"]["moments"])
        env.print0(f"resumed from {resume_from} at step {start_step}")

    def save(step: int) -> None:
        base = dict(world=world, precision=cfg.precision, tokenizer=tokenizer, cfg=cfg)
        ckpt.save(critic_engine, critic_root, step, common.rlhf_meta(
            step, zero_stage=cfg.critic.zero.stage, arch=critic_arch, head="scalar", **base), {"step": step}, t.keep_last)
        state = {"kl": kl_ctl.state_dict(), "moments": moments.state_dict()}
        path = ckpt.save(actor_engine, actor_root, step, common.rlhf_meta(
            step, zero_stage=cfg.actor.zero.stage, arch=actor_arch, head=None, ppo=state, **base), {"step": step},
            t.keep_last)
        env.print0(f"saved checkpoint {path} (critic: {critic_root / path.name})")

    logger = MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps, start_step=start_step,
                           progress=t.progress)
    env.print0(f"ppo {run_dir}: world {world}; actor ZeRO-{cfg.actor.zero.stage}, critic ZeRO-{cfg.critic.zero.stage}, "
               f"reference ZeRO-{cfg.reference.zero.stage}, reward "
               f"{'ZeRO-%d' % cfg.reward.zero.stage if reward_init else cfg.reward.function}; {r.batch * world} "
               f"rollouts/step, {p.epochs} epochs of mini-batches of {t.micro_batch}; steps {start_step}->{t.max_steps}")
    history: list[dict] = []
    end = min(t.max_steps, t.stop_at or t.max_steps)
    t_start = time.perf_counter()
    try:
        for step in range(start_step, end):
            lr_scale = lr_at(step, lr=1.0, warmup_steps=t.warmup_steps, max_steps=t.max_steps, schedule=t.schedule,
                             min_lr_ratio=t.min_lr_ratio)
            ds.set_lr(actor_engine, actor_lr * lr_scale)
            ds.set_lr(critic_engine, critic_lr * lr_scale)
            idx = rank_indices(len(prompts), r.batch, world, rank, cfg.seed, step)
            record = ppo_step(cfg, step, [prompts[i] for i in idx], [prompt_texts[i] for i in idx], actor_engine,
                              critic_engine, reference, scorer, decoder, zero3, kl_ctl, moments, end_ids, pad)
            record.update(step=step + 1, lr=actor_lr * lr_scale)
            history.append(record)
            logger.advance()
            if (step + 1) % t.log_every == 0 or step + 1 == end:
                logger.log(record)
                env.print0(f"  reward {record['reward']:.4f} kl {record['kl']:.4f} entropy {record['entropy']:.3f} "
                           f"clipfrac {record['clipfrac']:.3f} value_loss {record['value_loss']:.4f} "
                           f"len {record['response_len']:.1f} | generate {record['time_generate']:.2f}s "
                           f"score {record['time_score']:.2f}s train {record['time_train']:.2f}s")
            if (t.save_every and (step + 1) % t.save_every == 0) or step + 1 == end:
                save(step + 1)
    finally:
        logger.close()

    def mean_of(key: str, rows: list[dict]) -> float | None:
        return sum(x[key] for x in rows) / len(rows) if rows else None

    k = max(1, min(5, len(history) // 4))
    summary = {"run_dir": str(run_dir), "steps": end, "reward_first": mean_of("reward", history[:k]),
               "reward_last": mean_of("reward", history[-k:]), "kl_last": mean_of("kl", history[-k:]),
               "kl_max": max((x["kl"] for x in history), default=None), "window": k,
               "time_generate": mean_of("time_generate", history), "time_score": mean_of("time_score", history),
               "time_train": mean_of("time_train", history), "seconds": round(time.perf_counter() - t_start, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary


def decoding_copy(arch, actor: torch.nn.Module, device) -> PolicyLM:
    """The plain model that a ZeRO-3 actor's rollouts decode from (ds.copy_full_weights fills it
    at each step): made once, on `device`, in the dtype the actor trains in, so a bf16 run keeps a
    bf16 copy (half an fp32 one) that holds the very weights the training forward uses. Built on
    the meta device and allocated in that dtype: no fp32 instance exists even briefly."""
    dtype = next(actor.parameters()).dtype  # (a partitioned ZeRO-3 parameter keeps its dtype)
    with torch.device("meta"):
        model = PolicyLM(arch).to(dtype)
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # where each parameter is registered
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((m, n))
    model.to_empty(device=device)
    for (m0, n0), *others in places.values():  # to_empty gives every place its own tensor: tie them again
        for m, n in others:
            setattr(m, n, getattr(m0, n0))
    return model.eval().requires_grad_(False)


def minibatches(order: torch.Tensor, mask: torch.Tensor, prompt_len: int, size: int) -> list[tuple[torch.Tensor, int]]:
    """One epoch's mini-batches: (row indices, columns to keep), `size` rows each in `order`; the
    columns end with the longest response among those rows (columns that are padding in every
    row are dropped)."""
    out = []
    for s in range(0, len(order), size):
        mb = order[s:s + size].to(mask.device)
        out.append((mb, prompt_len + max(1, int(mask[mb].sum(-1).max()))))
    return out


def max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| over the positions where mask is 1 (0.0 when there are none)."""
    return float((a.float() - b.float()).abs().masked_fill(mask == 0, 0.0).max()) if a.numel() else 0.0


def ppo_step(cfg: PPOConfig, step: int, prompts: list[list[int]], texts: list[str], actor, critic, reference,
             scorer: Scorer, decoder, zero3: bool, kl_ctl, moments, end_ids, pad: int) -> dict:
    """One rollout batch and its PPO updates on this process; returns the step's metrics (all ranks)."""
    r, p, t = cfg.rollout, cfg.ppo, cfg.train
    dev = env.device()
    world, rank = env.world_size(), env.rank()

    # 1. generate -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    actor.module.eval()
    if zero3:
        ds.copy_full_weights(actor.module, decoder, 3)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + step * 4099 + rank)
    responses = generate(decoder, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                         stop_ids=end_ids, pad_id=pad, generator=gen)
    t1 = time.perf_counter()

    # 2. score ----------------------------------------------------------------------------------
    batch = rollout.pack(prompts, responses, pad, dev)
    ids, valid, mask, P = batch["ids"], batch["valid"], batch["response_mask"], batch["prompt_len"]
    stopped = torch.tensor([bool(x) and x[-1] in end_ids for x in responses], device=dev)
    contents = [x[:-1] if s else x for x, s in zip(responses, stopped.tolist())]
    order_gen = torch.Generator().manual_seed(cfg.seed + step)
    epochs = [minibatches(torch.randperm(ids.shape[0], generator=order_gen), mask, P, t.micro_batch)
              for _ in range(p.epochs)]
    with torch.no_grad():
        # Scored in the first epoch's mini-batches, each forward shaped as that epoch's training
        # forward of the same rows: until the first update the rollout log-probs are the training
        # forward's own, bit for bit (same engine, weights and inputs), so the first ratios are
        # exactly 1 in any precision. It also bounds the activations to one mini-batch.
        old_lp, ref_lp, old_values = (torch.zeros_like(mask) for _ in range(3))
        for mb, cols in epochs[0]:
            rows = (ids[mb, :cols], valid[mb, :cols], P)
            old_lp[mb, :cols - P] = rollout.response_logprobs(actor, *rows, temperature=r.temperature)[0]
            ref_lp[mb, :cols - P] = rollout.response_logprobs(reference, *rows, temperature=r.temperature)[0]
            old_values[mb, :cols - P] = rollout.response_values(critic, *rows)
        gap_decoder = 0.0  # ZeRO 0-2: the decoder is the actor's module itself
        if zero3:  # the decoding copy against the partitioned actor, on the first mini-batch
            mb, cols = epochs[0][0]
            dec_lp, _ = rollout.response_logprobs(decoder, ids[mb, :cols], valid[mb, :cols], P,
                                                  temperature=r.temperature)
            gap_decoder = max_gap(dec_lp, old_lp[mb, :cols - P], mask[mb, :cols - P])
        score = scorer(prompts, texts, contents)
        raw = score - p.missing_stop_penalty * (~stopped).float()  # the reward PPO maximises
        if p.reward_norm:
            moments.update(torch.cat([torch.as_tensor(x) for x in env.all_gather_object(raw.cpu().tolist())]))
        scores = A.normalize_scores(raw, moments if p.reward_norm else None, p.reward_clip)
        rewards, kl = A.penalized_rewards(scores, old_lp, ref_lp, mask, kl_ctl.value, p.kl_estimator)
        adv, returns = A.gae(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:  # over this process's rollouts
            adv = A.whiten(adv, mask)
    t2 = time.perf_counter()

    # 3. train ----------------------------------------------------------------------------------
    actor.train()
    critic.train()
    sums: dict[str, float] = {}
    n_mb = 0
    for epoch in epochs:
        for mb, cols in epoch:
            mb_ids, mb_valid, m = ids[mb, :cols], valid[mb, :cols], mask[mb, :cols - P]
            lp, ent = rollout.response_logprobs(actor, mb_ids, mb_valid, P, temperature=r.temperature,
                                                with_entropy=True)
            if n_mb == 0:  # before the first update: the rollout log-probs must be these
                gap_train = max_gap(lp.detach(), old_lp[mb, :cols - P], m)
            pl, pstats = policy_loss(lp, old_lp[mb, :cols - P], adv[mb, :cols - P], m, p.clip)
            entropy = A.masked_mean(ent, m)
            actor.backward(pl - p.entropy_coef * entropy)
            actor.step()
            v = rollout.response_values(critic, mb_ids, mb_valid, P)
            vl, vstats = value_loss(v, old_values[mb, :cols - P], returns[mb, :cols - P], m, p.value_clip)
            critic.backward(vl)
            critic.step()
            for key, val in (("policy_loss", pl), ("entropy", entropy), ("value_loss", vl), *pstats.items(),
                             *vstats.items()):
                sums[key] = sums.get(key, 0.0) + float(val.detach())
            n_mb += 1
    actor.module.eval()
    t3 = time.perf_counter()

    # metrics, averaged over ranks ----------------------------------------------------------------
    local = {k: v / n_mb for k, v in sums.items()}
    seq_kl = (kl * mask).sum(-1)  # (B,) KL of each response to the reference
    local.update(reward=float(raw.mean()), score=float(score.mean()), reward_normalized=float(scores.mean()),
                 kl=float(seq_kl.mean()),
                 response_len=float(mask.sum(-1).mean()), stop_frac=float(stopped.float().mean()),
                 advantage_std=float(adv[mask.bool()].std()) if mask.sum() > 1 else 0.0,
                 time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2)
    keys = sorted(local)
    mean = env.all_reduce_mean(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=dev))
    record = {k: float(v) for k, v in zip(keys, mean)}
    record["loss"] = record["policy_loss"]
    record["kl_coef"] = kl_ctl.value
    # max |logp_rollout - logp| over response tokens, the largest on any rank: against the training
    # forward before the first update (0 by construction), and against the decoding copy
    gaps = env.all_gather_object((gap_train, gap_decoder))
    record["logp_gap_train"], record["logp_gap_decoder"] = (max(g[i] for g in gaps) for i in range(2))
    kl_ctl.update(record["kl"], r.batch * world)
    tokens = env.all_reduce_sum(torch.tensor(float(valid.sum()), dtype=torch.float64, device=dev))
    record["tokens_per_s"] = float(tokens) / max(t3 - t0, 1e-9)
    record["gen_tokens_per_s"] = float(mask.sum()) * world / max(t1 - t0, 1e-9)
    return record
