"""`llmstack dpo`: direct preference optimisation (Rafailov et al. 2023), no reward model.

Recipe: run -> tokenizer and architecture (the starting model's) -> policy (a PolicyLM from
model.init) -> engine -> frozen reference (the same starting weights; its own engine under
ZeRO-3) -> preference pairs (data_pipeline/pairs.py, as the reward model reads them) -> Trainer.

A sequence's log-prob is the sum over its answer tokens (content, <|end|>, EOS) of log p(token |
prefix). With dpo.reference=precompute the reference's log-probs of every pair are computed once
before training (each process scores its share, then all share the table) and the reference
model is dropped; with `online` it stays and scores each micro-batch (less memory up front, more
compute). Logged: the DPO loss, the implicit reward margin beta((pi_c - ref_c) - (pi_r - ref_r)),
the accuracy (a pair whose margin is positive counts 1, negative 0, a tie 0.5) and the fraction of
tied pairs (ties), on training and held-out pairs. Before the first update the policy is the
reference, so every margin is 0: accuracy before training is 0.5 with every pair a tie, not 0.
"""

from __future__ import annotations

import json
import sys
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


# Two implicit rewards closer than this (relative to the summed log-probs they come from) are a
# tie: float32 rounding of the same model's log-probs in differently padded batches, not a preference.
TIE_RTOL = 1e-6


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probs (m,) of a collated pair batch."""
    lp = sequence_logprobs(model, batch["ids"], batch["label_mask"])  # (2m,)
    m = lp.shape[0] // 2
    return lp[:m], lp[m:]


def preference_accuracy(margin: torch.Tensor,
                        tolerance: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (m,): (accuracy, tie). A pair is won (1) when its implicit reward margin is above
    `tolerance`, lost (0) below -tolerance, and otherwise tied: a tie counts 0.5, so a model that
    cannot tell chosen from rejected (the policy before training, equal to the reference) scores
    chance, not 0."""
    tie = margin.abs() <= tolerance
    accuracy = torch.where(tie, torch.full_like(margin, 0.5), (margin > 0).to(margin.dtype))
    return accuracy, tie.to(margin.dtype)


def dpo_stats(logps: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], beta: float,
              label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per pair (m,): the DPO loss and {accuracy, ties, margin, chosen_reward, rejected_reward}."""
    loss, st = dpo_loss(*logps, *ref, beta, label_smoothing, reduce=False)
    with torch.no_grad():
        scale = sum(x.detach().abs() for x in (*logps, *ref))  # (m,) magnitude of the log-probs compared
        accuracy, tie = preference_accuracy(st["reward_margin"], beta * TIE_RTOL * scale)
    return loss, {"accuracy": accuracy, "ties": tie, "margin": st["reward_margin"],
                  "chosen_reward": st["chosen_reward"], "rejected_reward": st["rejected_reward"]}


class Progress:
    """Counts, rate and ETA of a long phase on stderr (rank 0 only): a bar on a terminal, as the
    training loop shows, else a plain line every `every` seconds, as training logs without one."""

    def __init__(self, what: str, total: int, unit: str, every: float = 10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.t0 = 0, time.perf_counter()
        self.last, self.bar = self.t0, None
        self.on = env.is_main() and total > 0
        if self.on and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            mininterval=1.0, leave=False)

    def update(self, n: int) -> None:
        n = min(n, self.total - self.done)
        self.done += n
        if not self.on:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            print(f"{self.what}: {self.done}/{self.total} {self.unit}s, {rate:.1f} {self.unit}s/s, "
                  f"eta {(self.total - self.done) / rate:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def reference_table(reference, pairs: list[dict], micro: int, pad_id: int,
                    progress: Progress | None = None) -> torch.Tensor:
    """(n, 2) reference log-probs (chosen, rejected) of every pair. Each rank scores pairs
    i % world == rank (the same number of forwards on every rank, for ZeRO-3), then the table is
    summed over ranks (each entry is filled by exactly one). `progress` counts the pairs scored
    (this rank's times the world size)."""
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
        if progress is not None:
            progress.update(len(idx) * world)
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
    init = init or common.read_init(cfg.model.init, cfg.model.backend)  # a resumed run reads the starting weights again
    model = ds.create_inference_engine(common.build_model(
        arch, run.ds_config, cfg.zero.stage, cfg.seed, cls=PolicyLM, init=init, tokenizer_hash=tokenizer.hash),
        run.ds_config)
    if cfg.dpo.reference != "precompute":
        return Reference(model, None)
    t0, micro, pad = time.perf_counter(), cfg.train.micro_batch, tokenizer.pad_id or 0
    progress = Progress("reference log-probs", len(train_pairs) + len(val_pairs), "pair")
    tables = {"train": reference_table(model, train_pairs, micro, pad, progress),
              "val": reference_table(model, val_pairs, micro, pad, progress)}
    progress.close()
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
        loss, st = dpo_stats(pair_logps(eng, batch), reference(batch, split), opt.beta, opt.label_smoothing)
        return {"loss": loss, **st}

    meta = lambda step, tokens: run.meta(step, tokens, tokenizer=tokenizer, arch=arch, zero_stage=cfg.zero.stage,  # noqa
                                         stage="dpo")
    window = StatWindow()

    def loss_fn(eng, batch):
        loss, stats = dpo_stats(pair_logps(eng, batch), reference(batch, "train"), opt.beta, opt.label_smoothing)
        window.add(**{k: v.mean() for k, v in stats.items()})
        return loss.mean()

    # MFU: forward + backward of the policy over every chosen and rejected token, plus the frozen
    # reference's forward when it scores each micro-batch (dpo.reference=online; precomputed
    # log-probs cost nothing during training)
    model, seq = common.model_flops(arch, PolicyLM), common.pair_attention_len(train_pairs)
    flops_tok = model.per_token(seq) + (model.per_token(seq, train=False) if reference.model is not None else 0.0)
    trainer = common.pair_trainer(run, cfg, engine, meta, train_pairs, val_pairs, tokenizer.pad_id or 0, loss_fn,
                                  lambda e, b: pair_stats(e, b, "val"), window, flops_per_token=flops_tok)
    start = trainer.start_step
    before = trainer.validate()
    env.print0(f"validation before training: implicit reward margin {before['val_margin']:.4f}, "
               f"accuracy {before['val_accuracy']:.3f} (ties count 0.5; {100 * before['val_ties']:.0f}% of pairs tied)")
    env.print0(f"dpo {run.dir}: world {run.world}, ZeRO-{cfg.zero.stage}, beta {opt.beta}, reference {opt.reference}, "
               f"{run.global_batch} pairs/step, steps {start}->{t.max_steps}")
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"run_dir": str(run.dir), "steps": result.step, "final_loss": result.last_loss,
               "val_loss": result.last_val_loss, "val_margin_before": before["val_margin"],
               "val_accuracy_before": before["val_accuracy"], "val_ties_before": before["val_ties"],
               "val_margin": result.val.get("val_margin"), "val_accuracy": result.val.get("val_accuracy"),
               "val_ties": result.val.get("val_ties"), "val_pairs": len(val_pairs),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
