"""`llmstack sft`: supervised fine-tuning of a GPT (or an imported Gemma) on chat records, full or
LoRA, under ZeRO.

The recipe: run -> tokenizer and architecture (model.init's, or the resumed checkpoint's) ->
conversations (data_pipeline/chat_batches.py: the global row order, the same for any world size)
-> model -> LoRA adapters (optional) -> engine -> Trainer. The loss of a micro-batch is its
*summed* cross-entropy over assistant tokens; the Trainer normalises it by the supervised tokens
of the whole global batch (MicroBatches with `count`), so the gradient is the token mean of one
big batch for any split into micro-batches and ranks.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch

from data_pipeline import formats
from data_pipeline.chat_batches import SFTBatches, load_conversations, validation_batches
from data_pipeline.objectives import IGNORE
from llmstack.config import SFTConfig
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack import models
from llmstack.models import lora as lora_lib
from llmstack.stages import common
from llmstack.train import run as train_run
from llmstack.train import task_eval
from llmstack.train.metrics import mfu_fields
from llmstack.train.trainer import Callback, Checkpointer, CheckpointPart, MicroBatches, Trainer

MODEL_INPUTS = ("position_ids", "segment_ids")
# the decoder families SFT trains: llmstack's GPT (Llama, Qwen2, Phi-3, ... import as one) and an
# imported Gemma 2/3, its family taken from model.init's recorded weights
FAMILIES = ("gpt", "gemma")
dry_run = train_run.dry_run


def summed_loss(engine, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over the supervised targets of one micro-batch."""
    extra = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return engine(batch["input_ids"], labels=batch["labels"], **extra) * supervised(batch)


def supervised(batch: dict) -> torch.Tensor:
    return (batch["labels"] != IGNORE).sum()


@torch.no_grad()
def evaluate_tokens(engine, batches: list[dict]) -> float:
    """Mean cross-entropy per supervised token over all validation batches and ranks. Rank r
    takes batches r, r + world, ...; every rank runs the same number of forwards (ZeRO-3 gathers
    inside forward are collective): a rank without a batch left re-runs its first and discards it."""
    dev, world, rank = env.device(), env.world_size(), env.rank()
    mine, rounds = batches[rank::world], -(-len(batches) // world)
    was_training = engine.module.training
    engine.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    for i in range(rounds):
        batch = env.to_device(mine[i] if i < len(mine) else batches[0], dev)
        total = summed_loss(engine, batch)
        if i < len(mine):
            acc += torch.stack([total.double(), supervised(batch).double()])
    if was_training:
        engine.train()
    acc = env.all_reduce_sum(acc)
    return float(acc[0] / acc[1].clamp(min=1))


class SFTStats(Callback):
    """Metric lines get the real (non-pad) and supervised token counts and rates of the steps
    since the last line, which vary per step in SFT, and the skipped records."""

    def __init__(self, batches: SFTBatches, *, nominal: int, start_step: int, skipped: int, flops: float, peak):
        self.batches, self.nominal, self.last, self.skipped, self.flops, self.peak = (
            batches, nominal, start_step, skipped, flops, peak)
        counts = [batches.step_counts(s) for s in range(start_step)]  # a resumed run continues the totals
        self.tokens, self.sup_tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)

    def on_log(self, trainer, record: dict) -> None:
        if "tokens_per_s" not in record:
            return
        steps = range(self.last, record["step"])
        counts = [self.batches.step_counts(s) for s in steps]
        tok, sup = sum(c[0] for c in counts), sum(c[1] for c in counts)
        seconds = self.nominal * len(steps) / max(record["tokens_per_s"], 1e-9)  # the window's time
        self.tokens, self.sup_tokens, self.last = self.tokens + tok, self.sup_tokens + sup, record["step"]
        record.update(tokens_per_s=tok / seconds, sup_tokens_per_s=sup / seconds, tokens=self.tokens,
                      sup_tokens=self.sup_tokens)
        if self.peak is not None:  # over the real (non-pad) tokens
            record.update(mfu_fields(self.peak, tok / seconds, self.flops, env.world_size()))
        if self.skipped:
            record["skipped_records"] = self.skipped


def read_data(cfg: SFTConfig, tokenizer) -> tuple[list, list, dict]:
    """(training, validation conversations, training stats), what was skipped reported."""
    s = cfg.sft
    load = dict(seq_len=cfg.data.seq_len, train_on=s.train_on, overlong=s.overlong, side=s.truncation_side,
                on_error=cfg.data.on_error)
    train_ex, stats = load_conversations([x.path for x in cfg.data.sources], tokenizer, **load)
    val_ex, val_stats = load_conversations([x.path for x in cfg.data.val_sources], tokenizer, limit=s.eval_max, **load)
    for name, st in (("train", stats), ("validation", val_stats)):
        env.print0(f"sft {name} data: {st['conversations']} conversations of {st['records']} records, {st['tokens']} "
                   f"tokens ({st['supervised_tokens']} supervised); skipped {st['skipped_records']} bad records "
                   f"{st['skipped_by_kind'] or ''}, truncated {st['truncated']}, dropped {st['dropped_overlong']} "
                   f"over-long and {st['dropped_unsupervised']} without supervised tokens")
        for line in st["skipped_report"]:
            env.print0(f"  {line}")
    key = [stats["conversations"], stats["tokens"], stats["supervised_tokens"], cfg.seed, cfg.data.seq_len,
           s.packing, s.train_on, [x.path for x in cfg.data.sources]]
    stats["fingerprint"] = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return train_ex, val_ex, stats


def add_lora(model, cfg: SFTConfig) -> dict | None:
    """peft LoRA adapters on lora.target (the same A matrices on every rank); their record."""
    if not cfg.lora.enabled:
        return None
    torch.manual_seed(cfg.seed)
    try:
        names = lora_lib.apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                    targets=cfg.lora.target)
    except ValueError as e:
        raise UsageError(f"lora.target: {e}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    env.print0(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {len(names)} layers: {trainable} trainable parameters")
    return {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "scaling": cfg.lora.alpha / cfg.lora.r, "modules": names}


def run(cfg: SFTConfig) -> dict:
    """Fine-tune as `cfg` says; returns a summary (validation loss before/after, steps, tokens)."""
    run, t, s = train_run.start(cfg), cfg.train, cfg.sft
    tasks = task_eval.start(t)  # train.eval_tasks loaded once: a bad task exits 2 before any heavy work
    tokenizer, arch, init = common.finetune_start(run, cfg, seq_len=cfg.data.seq_len, families=FAMILIES)
    family = models.family_of_config(arch)
    if tasks is not None and family != "gpt":  # (task_eval's runners read a GPT)
        what = "a model.backend=hf" if family == "hf" else "a gemma"
        raise UsageError(f"train.eval_tasks scores gpt models, this run trains {what} model: evaluate its "
                         "checkpoints with llmstack-eval instead (export it first for model.backend=hf)")
    if tasks is not None:  # every prompt fits the model (else exit 2 now, not at the first evaluation)
        tasks.check(tokenizer, arch, seq_len=cfg.data.seq_len, bos=False,  # no data.bos here
                    batch_size=t.micro_batch)
    try:  # llmstack's chat tokens, or the tokenizer's own chat template (a model brought from elsewhere)
        chat = formats.check_chat_tokenizer(tokenizer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if chat["template"] == "own":
        env.print0(f"chat template: the tokenizer's own ({tokenizer.path}); loss on assistant spans from its "
                   f"{'{% generation %} blocks' if chat['markers'] else 'rendered prefixes'}; EOS id {chat['eos']}")
    train_ex, val_ex, stats = read_data(cfg, tokenizer)  # every process: the global order is computed everywhere
    if run.saved is not None and run.saved.data_fingerprint not in (None, stats["fingerprint"]):
        raise UsageError(f"cannot resume from {run.resume_from}: the SFT data or its settings changed "
                         "(conversations, seq_len, packing, train_on, seed or sources)")
    model = common.build_model(arch, run.ds_config, cfg.zero.stage, cfg.seed, init=init)
    init = None  # the state dict is no longer needed
    lora = add_lora(model, cfg)
    engine = common.train_engine(model, t, run.ds_config)  # compiled through the engine when train.compile
    params, flops_tok = common.model_stats(arch, cfg.data.seq_len)
    public = {k: v for k, v in stats.items() if k != "skipped_report"}
    run.record(tokenizer.hash, data={"train": public, "fingerprint": stats["fingerprint"]}, params=params, lora=lora)

    meta = lambda step, tokens: run.meta(step, tokens, tokenizer=tokenizer, arch=arch, zero_stage=cfg.zero.stage,  # noqa
                                         stage="sft", lora=lora, data_fingerprint=stats["fingerprint"])
    checkpointer = Checkpointer([CheckpointPart(engine, run.ckpt_root, meta)], t.keep_last)
    torch.manual_seed(cfg.seed + run.rank)
    start = checkpointer.restore(run.resume_from).step if run.resume_from else 0
    pad = tokenizer.pad_id or 0
    batches = SFTBatches(train_ex, seq_len=cfg.data.seq_len, packed=s.packing, micro=t.micro_batch, accum=run.accum,
                         world=run.world, rank=run.rank, seed=cfg.seed, pad_id=pad, shuffle=cfg.data.shuffle,
                         start_step=start)
    val_batches = validation_batches(val_ex, micro=t.micro_batch, packed=s.packing, seq_len=cfg.data.seq_len, pad_id=pad)
    rows = len(batches.epoch_rows(0))
    env.print0(f"sft {run.dir}: world {run.world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, {'LoRA' if lora else 'full'}, "
               f"global batch {run.global_batch} rows (micro {t.micro_batch} x accum {run.accum} x world {run.world}), "
               f"{'packed' if s.packing else 'padded'} rows of <= {cfg.data.seq_len} tokens, {rows} rows/epoch "
               f"({rows / run.global_batch:.1f} steps), steps {start}->{t.max_steps}")
    nominal = run.global_batch * cfg.data.seq_len
    peak = common.peak_flops(cfg.precision)
    stats_cb = SFTStats(batches, nominal=nominal, start_step=start, skipped=stats["skipped_records"], flops=flops_tok,
                        peak=peak)
    trainer = Trainer(t, [(engine, t.lr)], MicroBatches(engine, batches, summed_loss, run.accum, count=supervised),
                      run_dir=run.dir, start_step=start, tokens_per_step=nominal, checkpointer=checkpointer,
                      peak_flops=peak,  # recorded; MFU is SFTStats' (real tokens)
                      evaluate=task_eval.with_tasks(
                          (lambda: {"val_loss": evaluate_tokens(engine, val_batches)}) if val_batches else None,
                          tasks, engine, cfg.zero.stage),
                      callbacks=[stats_cb])
    before = trainer.validate(step=start)["val_loss"] if val_batches and start == 0 else None
    if before is not None:
        env.print0(f"validation loss before fine-tuning: {before:.4f}")
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"run_dir": str(run.dir), "steps": result.step, "tokens": stats_cb.tokens,
               "supervised_tokens": stats_cb.sup_tokens, "final_loss": result.last_loss, "val_loss_before": before,
               "val_loss_after": result.last_val_loss, "train_conversations": stats["conversations"],
               "skipped_records": stats["skipped_records"], "truncated": stats["truncated"],
               "dropped": stats["dropped_overlong"] + stats["dropped_unsupervised"], "lora": bool(lora),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
