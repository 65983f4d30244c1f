"""`llmstack dpo`: direct preference optimisation (Rafailov et al. 2023), no reward model.

Recipe: run -> tokenizer and architecture (the starting model's) -> policy (a PolicyLM from
model.init) -> engine -> frozen reference (the same starting weights; its own engine under
ZeRO-3) -> preference pairs (data_pipeline/pairs.py, as the reward model reads them) -> Trainer.

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

from data_pipeline.pairs import collate
from llmstack.config import DPOConfig
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.models.heads import PolicyLM
from llmstack.rlhf.losses import dpo_loss
from llmstack.rlhf.rollout import sequence_logprobs
from llmstack.stages import common
from llmstack.train import run as train_run
from llmstack.train.trainer import StatWindow

dry_run = train_run.dry_run


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


class Reference:
    """The reference log-probs of a pair batch: from the precomputed tables, or the frozen model."""

    def __init__(self, model, tables: dict | None):
        self.model, self.tables = model, tables

    def __call__(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tables is not None:
            row = self.tables[split][batch["index"]]
            return row[:, 0], row[:, 1]
        with torch.no_grad():
            return pair_logps(self.model, batch)


def make_reference(cfg: DPOConfig, run, arch, init, tokenizer, train_pairs, val_pairs) -> Reference:
    """The frozen starting point (model.init, or the same seeded initialisation); with
    dpo.reference=precompute, its log-probs of every pair, and the model dropped."""
    init = init or common.read_init(cfg.model.init)  # a resumed run reads the starting weights again
    model = ds.create_inference_engine(common.build_model(
        arch, run.ds_config, cfg.zero.stage, cfg.seed, cls=PolicyLM, init=init, tokenizer_hash=tokenizer.hash),
        run.ds_config)
    if cfg.dpo.reference != "precompute":
        return Reference(model, None)
    t0, micro, pad = time.perf_counter(), cfg.train.micro_batch, tokenizer.pad_id or 0
    tables = {"train": reference_table(model, train_pairs, micro, pad), "val": reference_table(model, val_pairs, micro, pad)}
    env.print0(f"reference log-probs of {len(train_pairs) + len(val_pairs)} pairs in {time.perf_counter() - t0:.1f}s")
    return Reference(None, tables)


def run(cfg: DPOConfig) -> dict:
    run, t, opt = train_run.start(cfg), cfg.train, cfg.dpo
    tokenizer, arch, init = common.finetune_start(run, cfg, seq_len=cfg.data.seq_len)
    policy = common.build_model(arch, run.ds_config, cfg.zero.stage, cfg.seed, cls=PolicyLM, init=init,
                                tokenizer_hash=tokenizer.hash)
    engine = common.train_engine(policy, t, run.ds_config)
    train_pairs, val_pairs = common.preference_data(run, cfg.data, tokenizer, policy.num_params())
    reference = make_reference(cfg, run, arch, init, tokenizer, train_pairs, val_pairs)
    init = None

    def pair_stats(eng, batch: dict, split: str) -> dict[str, torch.Tensor]:
        loss, st = dpo_loss(*pair_logps(eng, batch), *reference(batch, split), opt.beta, opt.label_smoothing,
                            reduce=False)
        return {"loss": loss, "accuracy": st["reward_accuracy"], "margin": st["reward_margin"],
                "chosen_reward": st["chosen_reward"], "rejected_reward": st["rejected_reward"]}

    meta = lambda step, tokens: run.meta(step, tokens, tokenizer=tokenizer, arch=arch, zero_stage=cfg.zero.stage,  # noqa
                                         stage="dpo")
    window = StatWindow()

    def loss_fn(eng, batch):
        loss, stats = dpo_loss(*pair_logps(eng, batch), *reference(batch, "train"), opt.beta, opt.label_smoothing)
        window.add(accuracy=stats["reward_accuracy"], margin=stats["reward_margin"],
                   chosen_reward=stats["chosen_reward"], rejected_reward=stats["rejected_reward"])
        return loss

    trainer = common.pair_trainer(run, cfg, engine, meta, train_pairs, val_pairs, tokenizer.pad_id or 0, loss_fn,
                                  lambda e, b: pair_stats(e, b, "val"), window)
    start = trainer.start_step
    before = trainer.validate()
    env.print0(f"validation before training: implicit reward margin {before['val_margin']:.4f}, "
               f"accuracy {before['val_accuracy']:.3f}")
    env.print0(f"dpo {run.dir}: world {run.world}, ZeRO-{cfg.zero.stage}, beta {opt.beta}, reference {opt.reference}, "
               f"{run.global_batch} pairs/step, steps {start}->{t.max_steps}")
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"run_dir": str(run.dir), "steps": result.step, "final_loss": result.last_loss,
               "val_loss": result.last_val_loss, "val_margin_before": before["val_margin"],
               "val_accuracy_before": before["val_accuracy"], "val_margin": result.val.get("val_margin"),
               "val_accuracy": result.val.get("val_accuracy"), "val_pairs": len(val_pairs),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
