"""`llmstack dpo`: direct preference optimisation (Rafailov et al. 2023), no reward model.

Recipe: tokenizer (the starting model's) -> policy (a PolicyLM from model.init) -> engine ->
frozen reference (the same starting weights; its own engine under ZeRO-3) -> preference pairs
(the reward model's data pipeline, stages/reward.py) -> the one loop.

A sequence's log-prob is the sum over its answer tokens (content, <|end|>, EOS) of log p(token |
prefix). With dpo.reference=precompute the reference's log-probs of every pair are computed once
before training (each process scores its share, then all share the table) and the reference
model is dropped; with `online` it stays and scores each micro-batch (less memory up front, more
compute). Logged: the DPO loss, the implicit reward margin beta((pi_c - ref_c) - (pi_r - ref_r))
and the fraction of pairs where it is positive (accuracy), on training and held-out pairs.
"""

from __future__ import annotations

import json
import time

import torch

from llmstack.config import DPOConfig
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.models.heads import PolicyLM
from llmstack.rlhf.losses import dpo_loss
from llmstack.rlhf.rollout import sequence_logprobs
from llmstack.stages import common
from llmstack.stages.pretrain import ds_config_for
from llmstack.stages.reward import StatsLogger, build_pair_data, collate, evaluate_pairs, mean_tokens, pair_batches
from llmstack.train import checkpoint as ckpt
from llmstack.train.loop import train_with
from llmstack.train.metrics import MetricsLogger


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probs (m,) of a collated pair batch."""
    lp = sequence_logprobs(model, batch["ids"], batch["label_mask"])  # (2m,)
    m = lp.shape[0] // 2
    return lp[:m], lp[m:]


@torch.no_grad()
def reference_table(reference, pairs: list[dict], micro: int, pad_id: int) -> torch.Tensor:
    """(n, 2) reference log-probs (chosen, rejected) of every pair. Each rank scores pairs
    i % world == rank (the same number of forwards on every rank, for ZeRO-3), then the table is
    summed over ranks (each entry is filled by exactly one)."""
    world, rank = env.world_size(), env.rank()
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=env.device())
    mine = list(range(rank, len(pairs), world))
    mine += [-1] * (-(-len(pairs) // world) - len(mine))
    for s in range(0, len(mine), micro):
        idx = mine[s:s + micro]
        batch = {k: v.to(env.device()) for k, v in collate([pairs[max(i, 0)] for i in idx], pad_id, idx).items()}
        c, r = pair_logps(reference, batch)
        keep = batch["weight"].bool()
        table[batch["index"][keep]] = torch.stack([c, r], dim=1)[keep].double()
    return env.all_reduce_sum(table).float()


def run(cfg: DPOConfig) -> dict:
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    world, rank = env.world_size(), env.rank()
    ds_config, accum, global_batch = ds_config_for(cfg, world)
    run_dir, t, opt = cfg.run.path, cfg.train, cfg.dpo
    ckpt_root = run_dir / "checkpoints"

    init, tokenizer, arch, resume_from, policy = common.finetune_setup(cfg, PolicyLM, ds_config, ckpt_root)
    engine = common.train_engine(policy, t, ds_config)
    # the reference is the starting point (model.init, or the same seeded initialisation)
    reference = ds.create_inference_engine(
        common.build_rlhf_model(PolicyLM, arch, ds_config, cfg.zero.stage, cfg.seed, init, tokenizer.hash,
                                "model.init"), ds_config)
    pad = tokenizer.pad_id or 0

    train_pairs, val_pairs, skipped = build_pair_data(cfg, tokenizer)
    common.prepare_run_dir(run_dir, cfg, tokenizer.hash, {"pairs": {"train": len(train_pairs), "val": len(val_pairs),
                                                                     **skipped}, "params": policy.num_params()})
    tables = None
    if opt.reference == "precompute":
        t_ref = time.perf_counter()
        tables = {"train": reference_table(reference, train_pairs, t.micro_batch, pad),
                  "val": reference_table(reference, val_pairs, t.micro_batch, pad)}
        reference = None  # no longer needed: its memory goes back
        env.print0(f"reference log-probs of {len(train_pairs) + len(val_pairs)} pairs in "
                   f"{time.perf_counter() - t_ref:.1f}s")

    def ref_logps(batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if tables is not None:
            row = tables[split][batch["index"]]
            return row[:, 0], row[:, 1]
        with torch.no_grad():
            return pair_logps(reference, batch)

    def pair_stats(eng, batch: dict, split: str) -> dict[str, torch.Tensor]:
        loss, st = dpo_loss(*pair_logps(eng, batch), *ref_logps(batch, split), opt.beta, opt.label_smoothing,
                            reduce=False)
        return {"loss": loss, "accuracy": st["reward_accuracy"], "margin": st["reward_margin"],
                "chosen_reward": st["chosen_reward"], "rejected_reward": st["rejected_reward"]}

    start_step = 0
    if resume_from is not None:
        meta, _ = ckpt.load(engine, resume_from)
        start_step = meta["step"]
        env.print0(f"resumed from {resume_from} at step {start_step}")
    batches = pair_batches(train_pairs, micro=t.micro_batch, world=world, rank=rank, seed=cfg.seed, pad_id=pad,
                           start=start_step * accum)
    logger = StatsLogger(MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps,
                                       start_step=start_step, progress=t.progress))

    def loss_fn(eng, batch):
        c, r = pair_logps(eng, batch)
        rc, rr = ref_logps(batch, "train")
        loss, stats = dpo_loss(c, r, rc, rr, opt.beta, opt.label_smoothing)
        logger.add(accuracy=stats["reward_accuracy"], margin=stats["reward_margin"],
                   chosen_reward=stats["chosen_reward"], rejected_reward=stats["rejected_reward"])
        return loss

    def validate() -> dict:
        return evaluate_pairs(engine, val_pairs, t.micro_batch, pad, lambda e, b: pair_stats(e, b, "val"))

    def eval_fn() -> float:
        val = validate()
        logger.val = {"val_accuracy": val["accuracy"], "val_margin": val["margin"],
                      "val_chosen_reward": val["chosen_reward"], "val_rejected_reward": val["rejected_reward"]}
        return val["loss"]

    def save(step: int, tokens: int) -> None:
        meta = common.rlhf_meta(step, world, cfg.zero.stage, cfg.precision, tokenizer, arch, cfg, None, tokens=tokens)
        path = ckpt.save(engine, ckpt_root, step, meta, {"step": step}, t.keep_last)
        env.print0(f"saved checkpoint {path}")

    before = validate()
    env.print0(f"validation before training: implicit reward margin {before['margin']:.4f}, "
               f"accuracy {before['accuracy']:.3f}")
    env.print0(f"dpo {run_dir}: world {world}, ZeRO-{cfg.zero.stage}, beta {opt.beta}, reference {opt.reference}, "
               f"{global_batch} pairs/step, steps {start_step}->{t.max_steps}")
    t0 = time.perf_counter()
    try:
        result = train_with(
            t, engine, batches, loss_fn=loss_fn, start_step=start_step, grad_accum=accum,
            tokens_per_step=int(global_batch * mean_tokens(train_pairs)), flops_per_token=0.0, peak_flops=None,
            logger=logger, eval_fn=eval_fn, save_fn=save)
    finally:
        logger.close()
    summary = {"run_dir": str(run_dir), "steps": result.step, "final_loss": result.last_loss,
               "val_loss": result.last_val_loss, "val_margin_before": before["margin"],
               "val_accuracy_before": before["accuracy"], "val_margin": logger.val.get("val_margin"),
               "val_accuracy": logger.val.get("val_accuracy"), "val_pairs": len(val_pairs),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
