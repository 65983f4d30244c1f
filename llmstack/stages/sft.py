"""`llmstack sft`: supervised fine-tuning of a GPT on chat records, full or LoRA, under ZeRO.

The recipe: tokenizer -> model (from model.init, its architecture and tokenizer) -> LoRA
adapters (optional) -> engine -> conversations -> resume -> the shared loop.

Design choices:
- conversations are read and encoded once per process (formats.py: chat template, labels on
  assistant turns only) and kept in memory; bad records are skipped and counted or stop the run
  (data.on_error), over-long ones are truncated or dropped and counted (sft.overlong).
- the global order is a function of (seed, epoch) alone: each epoch is shuffled, then packed
  (several conversations per row, positions restarting and attention confined to each
  conversation) or kept one conversation per row (padded to the longest in the micro-batch).
  Global step s takes rows [s*G, (s+1)*G) (G = micro x accum x world), and rank r's j-th
  micro-batch of the step is the slice (j*world + r)*micro, so every world size sees the same
  global batches and resuming needs only the step number.
- loss normalisation: every process knows the whole step's rows, hence the number N of
  supervised tokens in the global batch. A micro-batch's loss is its *summed* cross-entropy
  times accum*world/N; DeepSpeed divides by accum and averages over ranks, so the gradient is
  (sum over the global batch) / N: the token mean of one big batch, for any split into
  micro-batches and ranks (a per-micro-batch mean would weight short responses more).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from data_pipeline import formats
from data_pipeline.errors import DataError, ErrorLog
from data_pipeline.objectives import IGNORE, pack_greedy, sft_collate, sft_fit
from llmstack.config import SFTConfig, to_yaml
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.models import lora as lora_lib
from llmstack.stages import common
from llmstack.stages.pretrain import ds_config_for, micro_str, model_stats
from llmstack.train import checkpoint as ckpt
from llmstack.train.loop import train_with
from llmstack.train.metrics import MetricsLogger

MODEL_INPUTS = ("position_ids", "attn_mask")


# ---------------------------------------------------------------------------------------------
# Data: records -> encoded conversations -> the global row order -> micro-batches


def load_conversations(specs: list[str], tokenizer, *, seq_len: int, train_on: str, overlong: str, side: str,
                       on_error: str, limit: int | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """(examples, stats): every usable conversation of the sources as shifted (inputs, targets)
    of at most seq_len positions, in source order; stats count what was skipped, cut or dropped."""
    errors = ErrorLog()
    stats = {"records": 0, "truncated": 0, "dropped_overlong": 0, "dropped_unsupervised": 0}
    examples = []
    for spec in specs:
        try:
            for _, messages in formats.iter_chat_records(spec, on_error=on_error, errors=errors):
                stats["records"] += 1
                ids, labels = formats.encode_chat(tokenizer, messages, train_on=train_on)
                over = len(ids) > seq_len + 1
                fitted = sft_fit(ids, labels, seq_len, overlong=overlong, side=side)
                if fitted is None:  # dropped as over-long, or no response token survived the cut
                    stats["dropped_overlong" if over and overlong == "drop" else "dropped_unsupervised"] += 1
                    continue
                stats["truncated"] += over
                examples.append(fitted)
                if limit and len(examples) >= limit:
                    break
        except FileNotFoundError as e:
            raise UsageError(f"data source not found: {e}") from None
        except (DataError, ValueError) as e:
            raise UsageError(f"{spec}: {e}") from None
    stats["skipped_records"] = errors.total
    stats["skipped_by_kind"] = {k: n for counts in errors.counts().values() for k, n in counts.items()}
    stats["skipped_report"] = errors.report()
    stats["conversations"] = len(examples)
    stats["tokens"] = int(sum(len(x) for x, _ in examples))
    stats["supervised_tokens"] = int(sum(int((y != IGNORE).sum()) for _, y in examples))
    return examples, stats


class SFTBatches:
    """The global row order over epochs and this rank's micro-batches, step by step (see the
    module docstring). Iterating yields micro-batch dicts from `start_step` on; `step_counts(s)`
    gives (tokens, supervised tokens, positions) of global step s."""

    def __init__(self, examples, *, seq_len: int, packed: bool, micro: int, accum: int, world: int, rank: int,
                 seed: int, pad_id: int, shuffle: bool = True, start_step: int = 0):
        if not examples:
            raise UsageError("no usable training conversations (see the skipped-record report above)")
        self.examples, self.seq_len, self.packed = examples, seq_len, packed
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.seed, self.pad_id, self.shuffle = seed, pad_id, shuffle
        self.rows_per_step = micro * accum * world
        self.step = start_step
        self._epochs: dict[int, list[list[int]]] = {}
        self._lens: dict[int, int] = {}
        self._lengths = [len(x) for x, _ in examples]
        self._sup = [int((y != IGNORE).sum()) for _, y in examples]

    def epoch_rows(self, e: int) -> list[list[int]]:
        """Rows (lists of example indices) of epoch e: shuffled with (seed, e), then packed."""
        if e not in self._epochs:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            if self.packed:
                rows = [[int(order[i]) for i in row] for row in pack_greedy([self._lengths[i] for i in order], self.seq_len)]
            else:
                rows = [[int(i)] for i in order]
            if len(self._epochs) > 2:  # keep a few epochs: steps move forward
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = rows
        return self._epochs[e]

    def epoch_len(self, e: int) -> int:
        if e not in self._lens:
            self._lens[e] = len(self.epoch_rows(e))
        return self._lens[e]

    def step_rows(self, step: int) -> list[list[int]]:
        """The G rows of global step `step` (spanning an epoch boundary where needed)."""
        start, out, e = step * self.rows_per_step, [], 0
        while start >= self.epoch_len(e):  # find the epoch of row `start`
            start -= self.epoch_len(e)
            e += 1
        while len(out) < self.rows_per_step:
            rows = self.epoch_rows(e)
            out += rows[start:start + self.rows_per_step - len(out)]
            start, e = 0, e + 1
        return out

    def step_counts(self, step: int) -> tuple[int, int]:
        """(tokens, supervised tokens) of global step `step`, all ranks together."""
        rows = self.step_rows(step)
        return (sum(self._lengths[i] for r in rows for i in r), sum(self._sup[i] for r in rows for i in r))

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's `accum` micro-batches of global step `step` (tensors), with `loss_scale`."""
        rows = self.step_rows(step)
        n_sup = sum(self._sup[i] for r in rows for i in r)
        scale = torch.tensor(self.accum * self.world / n_sup, dtype=torch.float32)
        out = []
        for j in range(self.accum):
            a = (j * self.world + self.rank) * self.micro
            mine = [[self.examples[i] for i in r] for r in rows[a:a + self.micro]]
            batch = {k: torch.from_numpy(v) for k, v in sft_collate(mine, pad_id=self.pad_id, packed=self.packed).items()}
            out.append({**batch, "loss_scale": scale})
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not hasattr(self, "_pending") or not self._pending:
            self._pending = self.micro_batches(self.step)
            self.step += 1
        return self._pending.pop(0)


def validation_batches(examples, *, micro: int, packed: bool, seq_len: int, pad_id: int) -> list[dict]:
    """All validation conversations in order, as micro-batches (packed or padded like training)."""
    if packed:
        rows = [[examples[i] for i in row] for row in pack_greedy([len(x) for x, _ in examples], seq_len)]
    else:
        rows = [[ex] for ex in examples]
    return [{k: torch.from_numpy(v) for k, v in sft_collate(rows[a:a + micro], pad_id=pad_id, packed=packed).items()}
            for a in range(0, len(rows), micro)]


# ---------------------------------------------------------------------------------------------
# Loss and validation


def summed_loss(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over supervised targets, their count) of one micro-batch."""
    extra = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    count = (batch["labels"] != IGNORE).sum()
    mean = engine(batch["input_ids"], labels=batch["labels"], **extra)
    return mean * count, count


def sft_loss(engine, batch: dict) -> torch.Tensor:
    """The micro-batch's share of the global token-mean loss (see the module docstring)."""
    total, _ = summed_loss(engine, batch)
    return total * batch["loss_scale"]


@torch.no_grad()
def evaluate_tokens(engine, batches: list[dict]) -> float:
    """Mean cross-entropy per supervised token over all validation batches and ranks.

    Rank r takes batches r, r + world, ...; every rank runs the same number of forwards (ZeRO-3
    gathers inside forward are collective), a rank without a batch left re-runs its first one
    and discards it.
    """
    dev, world, rank = env.device(), env.world_size(), env.rank()
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    was_training = engine.module.training
    engine.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    for i in range(rounds):
        batch = {k: v.to(dev) for k, v in (mine[i] if i < len(mine) else batches[0]).items()}
        total, count = summed_loss(engine, batch)
        if i < len(mine):
            acc += torch.stack([total.double(), count.double()])
    if was_training:
        engine.train()
    acc = env.all_reduce_sum(acc)
    return float(acc[0] / acc[1].clamp(min=1))


class SFTStatsLogger:
    """Wraps a MetricsLogger: metric lines get the real (non-pad) and supervised token counts
    and rates of the steps since the last line, which vary per step in SFT, plus skipped records."""

    def __init__(self, logger, batches: SFTBatches, *, nominal_tokens_per_step: int, start_step: int, skipped: int,
                 flops_per_token: float, peak: float | None):
        self.logger, self.batches, self.nominal = logger, batches, nominal_tokens_per_step
        self.last, self.skipped, self.flops, self.peak = start_step, skipped, flops_per_token, peak
        self.tokens = self.sup_tokens = 0
        for s in range(start_step):  # totals so far (a resumed run continues the counts)
            t, n = batches.step_counts(s)
            self.tokens, self.sup_tokens = self.tokens + t, self.sup_tokens + n

    def log(self, record: dict) -> None:
        if "tokens_per_s" in record:
            steps = range(self.last, record["step"])
            counts = [self.batches.step_counts(s) for s in steps]
            tok, sup = sum(c[0] for c in counts), sum(c[1] for c in counts)
            seconds = self.nominal * len(steps) / max(record["tokens_per_s"], 1e-9)  # the loop's window time
            self.tokens, self.sup_tokens, self.last = self.tokens + tok, self.sup_tokens + sup, record["step"]
            record = {**record, "tokens_per_s": tok / seconds, "sup_tokens_per_s": sup / seconds,
                      "tokens": self.tokens, "sup_tokens": self.sup_tokens}
            if self.peak:
                record["mfu"] = tok / seconds * self.flops / (self.peak * env.world_size())
            if self.skipped:
                record["skipped_records"] = self.skipped
        self.logger.log(record)

    def __getattr__(self, name):
        return getattr(self.logger, name)


# ---------------------------------------------------------------------------------------------
# Config checks


def check_config(cfg: SFTConfig) -> None:
    if cfg.model.family != "gpt":
        raise UsageError(f"model.family={cfg.model.family}: SFT trains decoder-only gpt models")
    if cfg.lora.enabled and cfg.zero.stage == 3:
        raise UsageError("lora.enabled with zero.stage=3 is not supported (peft's injected layers are created "
                         "outside ZeRO-3's partitioned construction); use zero.stage 0, 1 or 2 (LoRA's optimizer "
                         "state is tiny, so stage 3 saves little)")
    for i, s in enumerate([*cfg.data.sources, *cfg.data.val_sources]):
        if s.weight != 1.0:
            raise UsageError(f"data.sources[{i}].weight={s.weight}: SFT reads every source once per epoch "
                             "(weights are not supported)")
    for key in ("label_smoothing", "z_loss"):
        if getattr(cfg.train, key, 0.0):
            raise UsageError(f"train.{key} is not supported by sft (its loss is the plain token mean)")


def data_fingerprint(stats: dict, cfg: SFTConfig) -> str:
    key = [stats["conversations"], stats["tokens"], stats["supervised_tokens"], cfg.seed, cfg.data.seq_len,
           cfg.sft.packing, cfg.sft.train_on, [s.path for s in cfg.data.sources]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def dry_run(cfg: SFTConfig) -> None:
    """Print the resolved config and the DeepSpeed config; touch nothing."""
    check_config(cfg)
    ds_config, _, _ = ds_config_for(cfg, env.world_size())
    print("# resolved config")
    print(to_yaml(cfg), end="")
    print(f"# deepspeed config (world size {env.world_size()})")
    print(json.dumps(ds_config, indent=2))


# ---------------------------------------------------------------------------------------------
# The recipe


def _check_resume_model(cfg: SFTConfig, saved: dict, vocab_size: int, where) -> None:
    """Refuse to resume a checkpoint of another model than the config's: model.init's recorded
    architecture (or the model fields, without model.init) against the checkpoint's. A Hugging
    Face model.init is not converted for this: its path must be the one the run started from."""
    if cfg.model.init is None:
        planned = common.model_config(cfg.model, vocab_size, cfg.data.seq_len, cfg.train.activation_checkpointing)
        common.check_resume_architecture(saved, "gpt", planned, where)
        return
    recorded = common.recorded_architecture(cfg.model.init)
    if recorded is not None:
        common.check_resume_architecture(saved, recorded[0], recorded[1], where)
        return
    was = ((saved.get("config") or {}).get("model") or {}).get("init")
    if was is not None and was != cfg.model.init:
        raise UsageError(f"cannot resume from {where}: it was trained from model.init={was}, the config names "
                         f"model.init={cfg.model.init}; resume with the original model.init, or start a new run "
                         "(another run.dir, or train.resume=none)")


def run(cfg: SFTConfig) -> dict:
    """Fine-tune as `cfg` says; returns a summary (validation loss before/after, steps, tokens)."""
    check_config(cfg)
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    ds.check_precision(cfg.precision)  # before the data and the model are built
    world, rank = env.world_size(), env.rank()
    ds_config, accum, global_batch = ds_config_for(cfg, world)
    run_dir, t = cfg.run.path, cfg.train
    ckpt_root = run_dir / "checkpoints"

    resume_from = common.find_resume_checkpoint(t.resume, ckpt_root)
    if resume_from is None:
        init = common.read_init(cfg.model.init)  # (source, info, state): architecture, tokenizer, weights
    else:  # architecture and tokenizer as the run recorded them; the weights come from the engine state
        saved = ckpt.read_meta(resume_from)
        init = (resume_from, {"model_family": "gpt", "model": saved["model"], "tokenizer_hash": saved.get("tokenizer_hash"),
                              "tokenizer_path": saved.get("tokenizer_path")}, None)
        if saved.get("zero_stage", 0) > 0 and saved.get("world_size") != world and not saved.get("universal"):
            raise UsageError(f"{resume_from} holds ZeRO-{saved['zero_stage']} partitions of {saved.get('world_size')} "
                             f"processes; this run has {world}. Resume with the same number of processes")
    tokenizer = common.finetune_tokenizer(cfg.tokenizer, init)
    if init is not None:
        common.check_tokenizer(init[1].get("tokenizer_hash"), tokenizer.hash, init[0])
    try:
        formats.chat_tokens(tokenizer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    arch = common.rlhf_arch(cfg.model, init, tokenizer.vocab_size, cfg.data.seq_len, t.activation_checkpointing)
    if resume_from is not None:  # the checkpoint must hold the model the config names (model.init or fields)
        _check_resume_model(cfg, saved, tokenizer.vocab_size, resume_from)

    # conversations (every process reads all of them: the global order is computed everywhere)
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

    model = common.build_model(arch, ds_config, cfg.zero.stage, cfg.seed)
    if init is not None and init[2] is not None:
        ds.load_state_dict_into(model, init[2], cfg.zero.stage)
        env.print0(f"initialised weights from {init[0]}")
    init = None  # the state dict is no longer needed
    lora_meta = None
    if cfg.lora.enabled:
        torch.manual_seed(cfg.seed)  # the adapters' A matrices: the same on every rank
        try:
            names = lora_lib.apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                        targets=cfg.lora.target)
        except ValueError as e:
            raise UsageError(f"lora.target: {e}") from None
        lora_meta = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "scaling": cfg.lora.alpha / cfg.lora.r, "modules": names}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        env.print0(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {len(names)} layers: {trainable} trainable parameters")
    engine = common.train_engine(model, t, ds_config)  # compiled through the engine when train.compile

    params, flops_tok = model_stats(arch, cfg.data.seq_len)
    fingerprint = data_fingerprint(stats, cfg)
    public = {k: v for k, v in stats.items() if k != "skipped_report"}
    common.prepare_run_dir(run_dir, cfg, tokenizer.hash, {"data": {"train": public, "fingerprint": fingerprint},
                                                          "params": params, "lora": lora_meta})
    start_step = 0
    torch.manual_seed(cfg.seed + rank)
    if resume_from is not None:
        meta, _ = ckpt.load(engine, resume_from)
        if meta.get("data_fingerprint") not in (None, fingerprint):
            raise UsageError(f"cannot resume from {resume_from}: the SFT data or its settings changed "
                             "(conversations, seq_len, packing, train_on, seed or sources)")
        start_step = meta["step"]
        env.print0(f"resumed from {resume_from} at step {start_step}")

    batches = SFTBatches(train_ex, seq_len=cfg.data.seq_len, packed=s.packing, micro=t.micro_batch, accum=accum,
                         world=world, rank=rank, seed=cfg.seed, pad_id=tokenizer.pad_id or 0,
                         shuffle=cfg.data.shuffle, start_step=start_step)
    val_batches = validation_batches(val_ex, micro=t.micro_batch, packed=s.packing, seq_len=cfg.data.seq_len,
                                     pad_id=tokenizer.pad_id or 0)
    rows_epoch = len(batches.epoch_rows(0))
    env.print0(f"sft {run_dir}: world {world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, {'LoRA' if lora_meta else 'full'}, "
               f"global batch {global_batch} rows ({micro_str(t.micro_batch, accum, world)}), "
               f"{'packed' if s.packing else 'padded'} rows of <= {cfg.data.seq_len} tokens, {rows_epoch} rows/epoch "
               f"({rows_epoch / global_batch:.1f} steps), steps {start_step}->{t.max_steps}")

    val_before = evaluate_tokens(engine, val_batches) if val_batches and start_step == 0 else None
    if val_before is not None:
        env.print0(f"validation loss before fine-tuning: {val_before:.4f}")

    def save(step: int, tokens: int) -> None:
        meta = {"step": step, "tokens": tokens, "world_size": world, "zero_stage": cfg.zero.stage,
                "precision": cfg.precision, "tokenizer_hash": tokenizer.hash, "tokenizer_path": tokenizer.path,
                "model_family": "gpt", "model": arch.__dict__, "config": cfg.model_dump(mode="json"),
                "stage": "sft", "lora": lora_meta, "data_fingerprint": fingerprint, "time": time.time()}
        path = ckpt.save(engine, ckpt_root, step, meta, {"step": step}, t.keep_last)
        env.print0(f"saved checkpoint {path}")

    nominal = global_batch * cfg.data.seq_len
    peak = common.peak_flops(cfg.precision)
    logger = SFTStatsLogger(MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps,
                                          start_step=start_step, progress=t.progress),
                            batches, nominal_tokens_per_step=nominal, start_step=start_step,
                            skipped=stats["skipped_records"], flops_per_token=flops_tok, peak=peak)
    if val_before is not None:
        logger.log({"step": start_step, "val_loss": val_before})
    t0 = time.perf_counter()
    try:
        result = train_with(
            t, engine, batches, loss_fn=sft_loss, start_step=start_step, grad_accum=accum,
            tokens_per_step=nominal, flops_per_token=flops_tok, peak_flops=None, logger=logger,
            eval_fn=(lambda: evaluate_tokens(engine, val_batches)) if val_batches else None, save_fn=save,
        )
    finally:
        logger.close()
    summary = {"run_dir": str(run_dir), "steps": result.step, "tokens": logger.tokens,
               "supervised_tokens": logger.sup_tokens, "final_loss": result.last_loss, "val_loss_before": val_before,
               "val_loss_after": result.last_val_loss, "train_conversations": stats["conversations"],
               "skipped_records": stats["skipped_records"], "truncated": stats["truncated"],
               "dropped": stats["dropped_overlong"] + stats["dropped_unsupervised"], "lora": bool(lora_meta),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
