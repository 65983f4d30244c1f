"""`llmstack pretrain`: causal-LM pretraining of a GPT with DeepSpeed ZeRO.

The recipe: tokenizer -> model (under ZeRO-3 init) -> engine -> data -> resume -> loop.
"""

from __future__ import annotations

import json
import time

import torch

from data_pipeline.stream import GlobalBatches, PackedSequences, cached_tokens
from llmstack.config import PretrainConfig, to_yaml
from llmstack.dist import deepspeed as ds
from llmstack.dist import env
from llmstack.errors import UsageError
from llmstack.models.gpt import GPT
from llmstack.stages import common
from llmstack.train import checkpoint as ckpt
from llmstack.train.loop import evaluate, train_loop
from llmstack.train.metrics import MetricsLogger
from llmstack.train.optim import lr_at, param_groups


def causal_lm_loss(engine, batch: dict) -> torch.Tensor:
    return engine(batch["input_ids"], labels=batch["labels"])


def ds_config_for(cfg: PretrainConfig, world: int) -> tuple[dict, int, int]:
    """(ds_config, grad_accum, global_batch) for this config and world size."""
    t = cfg.train
    micro, accum, global_batch = ds.resolve_batch(t.micro_batch, t.grad_accum, t.global_batch, world)
    ds_config = ds.build_ds_config(
        micro_batch=micro, grad_accum=accum, world=world, precision=cfg.precision, zero_stage=cfg.zero.stage,
        offload_optimizer=cfg.zero.offload_optimizer, offload_params=cfg.zero.offload_params,
        grad_clip=t.grad_clip, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, extra=cfg.deepspeed,
    )
    return ds_config, accum, global_batch


def dry_run(cfg: PretrainConfig) -> None:
    """Print the resolved config, the DeepSpeed config and the model's size; touch nothing."""
    ds_config, _, _ = ds_config_for(cfg, env.world_size())
    vocab = -(-cfg.tokenizer.vocab_size // 64) * 64
    arch = common.gpt_config(cfg.model, vocab, cfg.data.seq_len, cfg.train.activation_checkpointing)
    params, flops = model_stats(arch, cfg.data.seq_len)
    print("# resolved config")
    print(to_yaml(cfg), end="")
    print(f"# deepspeed config (world size {env.world_size()})")
    print(json.dumps(ds_config, indent=2))
    print(f"# model: {params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs/token (vocab {vocab} assumed)")


def load_corpus(sources, tokenizer, seq_len: int, split: str) -> PackedSequences:
    texts = lambda: common.source_texts(sources)  # noqa: E731 (called only on a cache miss)
    key = [split, *(f"{s.path}|{s.text_field}" for s in sources)]
    if any(s.weight != sources[0].weight for s in sources):
        raise UsageError("data.sources with different weights need the streaming pipeline's mixing; "
                         "the in-memory dataset concatenates sources (use equal weights)")
    with env.rank0_first():
        tokens = cached_tokens(key, tokenizer, texts)
    seqs = PackedSequences(tokens, seq_len)
    if len(seqs) == 0:
        raise UsageError(f"{split} data has {len(tokens)} tokens: not enough for one sequence of {seq_len + 1}")
    return seqs


def run(cfg: PretrainConfig) -> dict:
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    world, rank = env.world_size(), env.rank()
    ds_config, accum, global_batch = ds_config_for(cfg, world)
    run_dir, t = cfg.run.path, cfg.train
    ckpt_root = run_dir / "checkpoints"

    tokenizer = common.ensure_tokenizer(cfg.tokenizer, cfg.data.sources)
    arch = common.gpt_config(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, t.activation_checkpointing)
    resume_from = common.find_resume_checkpoint(t.resume, ckpt_root)
    if resume_from is not None:
        saved = ckpt.read_meta(resume_from)
        common.check_tokenizer(saved.get("tokenizer_hash"), tokenizer.hash, resume_from)
        if saved.get("universal"):  # made by `llmstack checkpoint reshape`: loads on any world size
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        elif saved.get("zero_stage", 0) > 0 and saved.get("world_size") != world:
            raise UsageError(f"{resume_from} holds ZeRO-{saved['zero_stage']} partitions of {saved.get('world_size')} "
                             f"processes; this run has {world}. Resume with the same number of processes, or "
                             f"convert it first: llmstack checkpoint reshape {resume_from}")

    model = common.build_model(arch, ds_config, cfg.zero.stage, cfg.seed)
    if cfg.model.init and resume_from is None:
        src = common.load_init_weights(model, cfg.model.init, cfg.zero.stage, tokenizer.hash)
        env.print0(f"initialised weights from {src}")
    if t.compile:
        model.compile()
    engine = ds.create_engine(model, param_groups(model, t.weight_decay), ds_config, lr=t.lr, betas=t.betas, eps=t.eps)

    train_seqs = load_corpus(cfg.data.sources, tokenizer, cfg.data.seq_len, "train")
    val_seqs = load_corpus(cfg.data.val_sources, tokenizer, cfg.data.seq_len, "validation")
    batches = GlobalBatches(train_seqs, seed=cfg.seed, micro_batch=t.micro_batch, grad_accum=accum, rank=rank, world=world)
    val_iter = GlobalBatches(val_seqs, seed=cfg.seed, micro_batch=t.micro_batch, grad_accum=1, rank=rank, world=world, shuffle=False)
    val_batches = [next(val_iter) for _ in range(t.eval_batches)]
    manifest = {"train_sequences": len(train_seqs), "train_tokens": len(train_seqs.tokens),
                "train_remainder_tokens": train_seqs.remainder_tokens, "val_sequences": len(val_seqs),
                "seq_len": cfg.data.seq_len, "sources": [s.model_dump() for s in cfg.data.sources]}
    params, flops_tok = model_stats(arch, cfg.data.seq_len)
    common.prepare_run_dir(run_dir, cfg, tokenizer.hash, {"data": manifest, "params": params, "flops_per_token": flops_tok})

    start_step, tokens_seen = 0, 0
    torch.manual_seed(cfg.seed + rank)  # per-rank stream for dropout; replaced by the saved one on resume
    if resume_from is not None:
        meta, client = ckpt.load(engine, resume_from)
        try:
            batches.load_state_dict(client["data"])
        except ValueError as e:
            raise UsageError(f"cannot resume from {resume_from}: {e}") from None
        start_step, tokens_seen = meta["step"], meta["tokens"]
        env.print0(f"resumed from {resume_from} at step {start_step}")

    peak = common.peak_flops(cfg.precision)
    tokens_per_step = global_batch * cfg.data.seq_len
    env.print0(f"pretrain {run_dir}: world {world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, global batch {global_batch} "
               f"({micro_str(t.micro_batch, accum, world)}), {tokens_per_step} tokens/step, steps {start_step}->{t.max_steps}")

    def save(step: int, tokens: int) -> None:
        meta = {"step": step, "tokens": tokens, "world_size": world, "zero_stage": cfg.zero.stage,
                "precision": cfg.precision, "tokenizer_hash": tokenizer.hash, "tokenizer_path": cfg.tokenizer.path,
                "model_family": "gpt", "model": arch.__dict__, "config": cfg.model_dump(mode="json"),
                "data": batches.state_dict(), "time": time.time()}
        path = ckpt.save(engine, ckpt_root, step, meta, {"data": batches.state_dict(), "step": step, "tokens": tokens}, t.keep_last)
        env.print0(f"saved checkpoint {path}")

    logger = MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps, start_step=start_step,
                           progress=t.progress)
    t0 = time.perf_counter()
    try:
        result = train_loop(
            engine, batches, loss_fn=causal_lm_loss, start_step=start_step, max_steps=t.max_steps, grad_accum=accum,
            lr_fn=lambda s: lr_at(s, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                                  schedule=t.schedule, min_lr_ratio=t.min_lr_ratio),
            tokens_per_step=tokens_per_step, flops_per_token=flops_tok, peak_flops=peak, logger=logger,
            log_every=t.log_every, eval_every=t.eval_every,
            eval_fn=lambda: evaluate(engine, val_batches, causal_lm_loss),
            save_every=t.save_every, save_fn=save, tokens_seen=tokens_seen, stop_at=t.stop_at,
        )
    finally:
        logger.close()
    summary = {"run_dir": str(run_dir), "steps": result.step, "tokens": result.tokens, "final_loss": result.last_loss,
               "final_val_loss": result.last_val_loss, "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary


def micro_str(micro: int, accum: int, world: int) -> str:
    return f"micro {micro} x accum {accum} x world {world}"


def model_stats(arch, seq_len: int) -> tuple[int, float]:
    """(parameters, training FLOPs/token), counted on a meta-device copy: ZeRO-3 has already
    partitioned the real model's parameters, so it cannot be counted directly."""
    with torch.device("meta"):
        model = GPT(arch)
    return model.num_params(), model.flops_per_token(seq_len)
