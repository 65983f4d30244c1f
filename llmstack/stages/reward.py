"""`llmstack rm`: a reward model trained on preference pairs (Bradley-Terry).

Recipe: tokenizer (the starting model's) -> ScalarHeadModel (GPT backbone + Linear(C, 1), from an
SFT checkpoint with a fresh head, or from scratch) -> engine -> preference pairs -> the one loop.
Each micro-batch holds m pairs as 2m right-padded sequences (chosen rows, then rejected rows);
the reward of a sequence is the head's output at its last real token (the EOS that ends the
conversation), and the loss is -log sigmoid(r_chosen - r_rejected - margin).

The pair pipeline here (loading, batching, validation over pairs, per-step statistics) is also
what `llmstack dpo` uses: both read the same preference data.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Iterator

import torch

from data_pipeline.errors import DataError, ErrorLog
from data_pipeline.formats import encode_preference, iter_preference_records
from llmstack.config import RMConfig
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.models.heads import ScalarHeadModel, sequence_scores
from llmstack.rlhf.losses import pairwise_loss
from llmstack.stages import common
from llmstack.stages.pretrain import ds_config_for
from llmstack.train import checkpoint as ckpt
from llmstack.train.loop import train_with
from llmstack.train.metrics import MetricsLogger

# ---------------------------------------------------------------------------------------------
# Preference pairs: load, batch, evaluate
# ---------------------------------------------------------------------------------------------


def load_pairs(sources, tokenizer, seq_len: int, on_error: str, limit: int | None = None) -> tuple[list[dict], ErrorLog]:
    """Encoded pairs of all sources, in order (at most `limit`), and the skipped records.

    A pair whose longer conversation exceeds seq_len tokens is skipped and counted as too_long
    (with on_error=fail: an error naming it); nothing is truncated.
    """
    errors, pairs = ErrorLog(), []
    try:
        for src in sources:
            for i, (where, (prompt, chosen, rejected)) in enumerate(
                    iter_preference_records(src.path, on_error=on_error, errors=errors)):
                enc = encode_preference(tokenizer, prompt, chosen, rejected)
                longest = max(len(enc["chosen_ids"]), len(enc["rejected_ids"]))
                if longest > seq_len:
                    msg = f"pair of {longest} tokens exceeds data.seq_len={seq_len}"
                    if on_error == "fail":
                        raise UsageError(f"{where}: {msg}")
                    errors.add(src.path, "pair", i, "too_long", msg)
                    continue
                pairs.append(enc)
                if limit is not None and len(pairs) >= limit:
                    return pairs, errors
    except FileNotFoundError as e:
        raise UsageError(f"preference data not found: {e}") from None
    except (DataError, ValueError) as e:
        raise UsageError(f"preference data: {e}") from None
    return pairs, errors


def report_skipped(errors: ErrorLog, what: str) -> None:
    if errors.total:
        env.print0(f"{what}: skipped {errors.total} records")
        for line in errors.report():
            env.print0("  " + line)


def collate(pairs: list[dict], pad_id: int, indices: list[int] | None = None) -> dict[str, torch.Tensor]:
    """m pairs -> ids (2m, T) right-padded (chosen rows first), valid (2m, T), label_mask (2m, T)
    marking the answer tokens, weight (m,) (0 for filler pairs), index (m,)."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    label_mask = torch.zeros((len(seqs), T))
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.as_tensor(s)
        valid[i, :len(s)] = True
        label_mask[i, :len(s)] = (torch.as_tensor(lab) != -100).float()
    idx = torch.as_tensor(indices if indices is not None else list(range(len(pairs))), dtype=torch.long)
    return {"ids": ids, "valid": valid, "label_mask": label_mask, "weight": (idx >= 0).float(), "index": idx.clamp(min=0)}


def rank_indices(n: int, per_rank: int, world: int, rank: int, seed: int, k: int) -> list[int]:
    """Item indices of global step k for this rank, from an endless stream of seeded epochs:
    epoch e visits the n items in a permutation seeded by (seed, e); step k covers stream
    positions [k*per_rank*world, (k+1)*per_rank*world) and rank r takes its r-th slice. Any
    world size with the same global batch sees the same global steps, so a resumed run (start at
    its step) sees exactly what the uninterrupted run would have."""
    first = k * per_rank * world + rank * per_rank
    out = []
    for pos in range(first, first + per_rank):
        epoch, j = divmod(pos, n)
        out.append(int(_permutation(n, seed, epoch)[j]))
    return out


def pair_batches(pairs: list[dict], *, micro: int, world: int, rank: int, seed: int, pad_id: int,
                 start: int = 0) -> Iterator[dict]:
    """This rank's collated micro-batches, forever, from micro-step `start` (see rank_indices)."""
    if len(pairs) < micro * world:
        raise UsageError(f"{len(pairs)} training pairs are fewer than one micro-batch on every process "
                         f"({micro} x {world})")
    k = start
    while True:
        idx = rank_indices(len(pairs), micro, world, rank, seed, k)
        yield collate([pairs[i] for i in idx], pad_id, idx)
        k += 1


_PERM: dict = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM:
        _PERM.clear()  # one epoch's permutation is kept: the stream moves forward
        _PERM[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return _PERM[key]


@torch.no_grad()
def evaluate_pairs(engine, pairs: list[dict], micro: int, pad_id: int,
                   pair_stats: Callable[[object, dict], dict[str, torch.Tensor]]) -> dict[str, float]:
    """Means over held-out pairs of the per-pair statistics `pair_stats(engine, batch)` returns
    ({name: (m,) tensor}). Pairs are dealt round-robin to ranks; every rank runs the same number
    of forwards (ZeRO-3 gathers are collective), filler pairs having weight 0."""
    world, rank = env.world_size(), env.rank()
    mine = list(range(rank, len(pairs), world))
    per_rank = -(-len(pairs) // world)
    mine += [-1] * (per_rank - len(mine))
    module = getattr(engine, "module", engine)
    was_training = module.training
    module.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64)
    for s in range(0, per_rank, micro):
        idx = mine[s:s + micro]
        batch = collate([pairs[max(i, 0)] for i in idx], pad_id, idx)
        batch = {k: v.to(env.device()) for k, v in batch.items()}
        w = batch["weight"].double()
        for name, v in pair_stats(engine, batch).items():
            sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64, device=w.device)) + (v.double() * w).sum()
        count = count.to(w.device) + w.sum()
    if was_training:
        module.train()
    total = env.all_reduce_sum(count)
    return {k: float(env.all_reduce_sum(v) / total.clamp(min=1)) for k, v in sorted(sums.items())}


class StatsLogger:
    """Adds per-step statistics (means over the steps since the last log line, all ranks) and the
    latest validation metrics to the records the loop logs."""

    def __init__(self, logger: MetricsLogger):
        self.logger, self.window, self.val = logger, {}, {}

    def add(self, **stats: torch.Tensor) -> None:
        for k, v in stats.items():
            s, n = self.window.get(k, (0.0, 0))
            self.window[k] = (s + float(v.detach() if torch.is_tensor(v) else v), n + 1)

    def advance(self, n: int = 1) -> None:
        self.logger.advance(n)

    def log(self, record: dict) -> None:
        if "loss" in record and self.window:
            keys = sorted(self.window)
            t = torch.tensor([self.window[k][0] / max(1, self.window[k][1]) for k in keys], dtype=torch.float64)
            t = env.all_reduce_mean(t.to(env.device()))
            record.update({k: float(v) for k, v in zip(keys, t)})
            self.window = {}
        if "val_loss" in record:
            record.update(self.val)
        self.logger.log(record)

    def close(self) -> None:
        self.logger.close()


def build_pair_data(cfg, tokenizer):
    """(train pairs, validation pairs) of a preference-data config section, skipped ones reported."""
    d = cfg.data
    train_pairs, train_err = load_pairs(d.sources, tokenizer, d.seq_len, d.on_error)
    val_pairs, val_err = load_pairs(d.val_sources, tokenizer, d.seq_len, d.on_error, limit=d.val_pairs)
    report_skipped(train_err, "training pairs")
    report_skipped(val_err, "validation pairs")
    if not val_pairs:
        raise UsageError("no usable validation pairs in data.val_sources")
    env.print0(f"preference pairs: {len(train_pairs)} training, {len(val_pairs)} validation "
               f"(skipped {train_err.total} + {val_err.total})")
    return train_pairs, val_pairs, {"train_skipped": train_err.counts(), "val_skipped": val_err.counts()}


def mean_tokens(pairs: list[dict]) -> float:
    return sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs) / max(1, len(pairs))


# ---------------------------------------------------------------------------------------------
# The reward-model stage
# ---------------------------------------------------------------------------------------------


def rm_pair_stats(engine, batch: dict, margin: float = 0.0) -> dict[str, torch.Tensor]:
    """Per pair: Bradley-Terry loss, correct (r_chosen > r_rejected), margin r_chosen - r_rejected."""
    scores = sequence_scores(engine(batch["ids"]), batch["valid"])  # (2m,)
    m = scores.shape[0] // 2
    diff = scores[:m] - scores[m:]
    return {"loss": pairwise_loss(scores[:m], scores[m:], margin, reduce=False), "accuracy": (diff > 0).float(),
            "margin": diff}


def run(cfg: RMConfig) -> dict:
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    world, rank = env.world_size(), env.rank()
    ds_config, accum, global_batch = ds_config_for(cfg, world)
    run_dir, t = cfg.run.path, cfg.train
    ckpt_root = run_dir / "checkpoints"

    _, tokenizer, arch, resume_from, model = common.finetune_setup(cfg, ScalarHeadModel, ds_config, ckpt_root)
    engine = common.train_engine(model, t, ds_config)
    pad = tokenizer.pad_id or 0

    train_pairs, val_pairs, skipped = build_pair_data(cfg, tokenizer)
    common.prepare_run_dir(run_dir, cfg, tokenizer.hash, {"pairs": {"train": len(train_pairs), "val": len(val_pairs),
                                                                     **skipped}, "params": model.num_params()})
    start_step = 0
    if resume_from is not None:
        meta, _ = ckpt.load(engine, resume_from)
        start_step = meta["step"]
        env.print0(f"resumed from {resume_from} at step {start_step}")
    batches = pair_batches(train_pairs, micro=t.micro_batch, world=world, rank=rank, seed=cfg.seed, pad_id=pad,
                           start=start_step * accum)
    margin = cfg.rm.margin
    logger = StatsLogger(MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps,
                                       start_step=start_step, progress=t.progress))

    def loss_fn(eng, batch):
        stats = rm_pair_stats(eng, batch, margin)
        logger.add(accuracy=stats["accuracy"].mean(), margin=stats["margin"].mean())
        return stats["loss"].mean()

    def eval_fn() -> float:
        val = evaluate_pairs(engine, val_pairs, t.micro_batch, pad, lambda e, b: rm_pair_stats(e, b, margin))
        logger.val = {"val_accuracy": val["accuracy"], "val_margin": val["margin"]}
        return val["loss"]

    def save(step: int, tokens: int) -> None:
        meta = common.rlhf_meta(step, world, cfg.zero.stage, cfg.precision, tokenizer, arch, cfg, "scalar", tokens=tokens)
        path = ckpt.save(engine, ckpt_root, step, meta, {"step": step}, t.keep_last)
        env.print0(f"saved checkpoint {path}")

    before = evaluate_pairs(engine, val_pairs, t.micro_batch, pad, lambda e, b: rm_pair_stats(e, b, margin))
    env.print0(f"validation before training: accuracy {before['accuracy']:.3f}, margin {before['margin']:.3f}")
    env.print0(f"rm {run_dir}: world {world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, {global_batch} pairs/step "
               f"(micro {t.micro_batch} x accum {accum} x world {world}), steps {start_step}->{t.max_steps}")
    t0 = time.perf_counter()
    try:
        result = train_with(
            t, engine, batches, loss_fn=loss_fn, start_step=start_step, grad_accum=accum,
            tokens_per_step=int(global_batch * mean_tokens(train_pairs)), flops_per_token=0.0, peak_flops=None,
            logger=logger, eval_fn=eval_fn, save_fn=save)
    finally:
        logger.close()
    summary = {"run_dir": str(run_dir), "steps": result.step, "final_loss": result.last_loss,
               "val_loss": result.last_val_loss, "val_accuracy": logger.val.get("val_accuracy"),
               "val_margin": logger.val.get("val_margin"), "val_accuracy_before": before["accuracy"],
               "val_margin_before": before["margin"], "val_pairs": len(val_pairs),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
