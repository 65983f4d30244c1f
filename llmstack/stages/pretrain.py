"""`llmstack pretrain`: pretraining of a GPT, BERT or T5 with DeepSpeed ZeRO.

The recipe: tokenizer -> model (under ZeRO-3 init) -> engine -> data -> resume -> loop. The model
family decides the objective (stages/objectives.py): causal LM, masked LM or span corruption.
"""

from __future__ import annotations

import json
import time

import torch

from data_pipeline.stream import merge_states
from llmstack.config import PretrainConfig, to_yaml
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack import models
from llmstack.stages import common, objectives
from llmstack.stages import data as data_stage
from llmstack.train import checkpoint as ckpt
from llmstack.train.loop import evaluate, train_with
from llmstack.train.metrics import MetricsLogger


# Inputs for packed documents (data.doc_mask=true) travel with the batch as keyword arguments.
MODEL_INPUTS = ("position_ids", "attn_mask")


def causal_lm_loss(engine, batch: dict) -> torch.Tensor:
    extra = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return engine(batch["input_ids"], labels=batch["labels"], **extra)


def train_loss(cfg: PretrainConfig):
    """The training loss: causal_lm_loss, plus label smoothing / z-loss when set (GPT only);
    validation always reports the plain loss, so runs stay comparable."""
    t = cfg.train
    if not (t.label_smoothing or t.z_loss):
        return causal_lm_loss
    if cfg.model.family != "gpt":
        raise UsageError("train.label_smoothing / train.z_loss apply to GPT models, "
                         f"not model.family={cfg.model.family}")

    def loss(engine, batch: dict) -> torch.Tensor:
        extra = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return engine(batch["input_ids"], labels=batch["labels"], label_smoothing=t.label_smoothing, z_loss=t.z_loss,
                      **extra)
    return loss


def ds_config_for(cfg: PretrainConfig, world: int) -> tuple[dict, int, int]:
    """(ds_config, grad_accum, global_batch) for this config and world size."""
    t = cfg.train
    micro, accum, global_batch = ds.resolve_batch(t.micro_batch, t.grad_accum, t.global_batch, world)
    ds_config = ds.build_ds_config(
        micro_batch=micro, grad_accum=accum, world=world, precision=cfg.precision, zero_stage=cfg.zero.stage,
        offload_optimizer=cfg.zero.offload_optimizer, offload_params=cfg.zero.offload_params,
        grad_clip=t.grad_clip, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
        comm_dtype=cfg.zero.comm_dtype, extra=cfg.deepspeed,
    )
    return ds_config, accum, global_batch


def dry_run(cfg: PretrainConfig) -> None:
    """Print the resolved config, the DeepSpeed config and the model's size; touch nothing."""
    ds_config, _, _ = ds_config_for(cfg, env.world_size())
    vocab = -(-cfg.tokenizer.vocab_size // 64) * 64
    arch = common.model_config(cfg.model, vocab, cfg.data.seq_len, cfg.train.activation_checkpointing)
    params, flops = model_stats(arch, cfg.data.seq_len)
    print("# resolved config")
    print(to_yaml(cfg), end="")
    print(f"# deepspeed config (world size {env.world_size()})")
    print(json.dumps(ds_config, indent=2))
    print(f"# model: {params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs/token (vocab {vocab} assumed)")


def run(cfg: PretrainConfig) -> dict:
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    ds.check_precision(cfg.precision)  # before the tokenizer, data and model are built
    world, rank = env.world_size(), env.rank()
    ds_config, accum, global_batch = ds_config_for(cfg, world)
    run_dir, t = cfg.run.path, cfg.train
    ckpt_root = run_dir / "checkpoints"

    tokenizer = common.ensure_tokenizer(cfg.tokenizer, cfg.data.sources)
    arch = common.model_config(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, t.activation_checkpointing,
                               pad_id=tokenizer.pad_id)
    transform = objectives.make_transform(cfg.model.family, tokenizer, cfg.data.seq_len)  # None for gpt
    resume_from = common.find_resume_checkpoint(t.resume, ckpt_root)
    data_state = None
    if resume_from is not None:
        saved = ckpt.read_meta(resume_from)
        # The data position is world-size independent (all streams' cursors), so only the ZeRO
        # partitions below tie a resume to the saved number of processes.
        data_state = saved.get("data")
        common.check_tokenizer(saved.get("tokenizer_hash"), tokenizer.hash, resume_from)
        common.check_resume_architecture(saved, cfg.model.family, arch, resume_from)
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
    engine = common.train_engine(model, t, ds_config)  # compiled through the engine when train.compile

    train_sources = data_stage.resolve_sources(cfg.data.sources, tokenizer.hash, cfg.data.max_record_bytes)
    val_sources = data_stage.resolve_sources(cfg.data.val_sources, tokenizer.hash, cfg.data.max_record_bytes)
    val_batches = data_stage.validation_batches(cfg.data, val_sources, tokenizer, cfg.seed, micro_batch=t.micro_batch,
                                                batches=t.eval_batches)
    val_batches = objectives.transform_val(val_batches, transform, seed=cfg.seed)
    try:
        batches = data_stage.loader(cfg.data, train_sources, tokenizer, cfg.seed, micro_batch=t.micro_batch,
                                    state=data_state)
    except UsageError as e:
        if data_state is None:
            raise
        raise UsageError(f"cannot resume from {resume_from}: {e}") from None
    manifest = {"seq_len": cfg.data.seq_len, "streams": cfg.data.streams, "sources": [s.model_dump() for s in cfg.data.sources],
                "files": {s.spec: len(s.units) for s in train_sources}, "val_sources": [s.spec for s in val_sources],
                "fingerprint": batches.loader.fp}
    params, flops_tok = model_stats(arch, cfg.data.seq_len)
    common.prepare_run_dir(run_dir, cfg, tokenizer.hash, {"data": manifest, "params": params, "flops_per_token": flops_tok})

    start_step, tokens_seen = 0, 0
    torch.manual_seed(cfg.seed + rank)  # per-rank stream for dropout; replaced by the saved one on resume
    if resume_from is not None:
        meta, _ = ckpt.load(engine, resume_from)
        start_step, tokens_seen = meta["step"], meta["tokens"]
        env.print0(f"resumed from {resume_from} at step {start_step}")
    train_batches = objectives.wrap_train(batches, transform, seed=cfg.seed, accum=accum, start_step=start_step)

    peak = common.peak_flops(cfg.precision)
    tokens_per_step = global_batch * cfg.data.seq_len
    env.print0(f"pretrain {run_dir}: world {world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, global batch {global_batch} "
               f"({micro_str(t.micro_batch, accum, world)}), {tokens_per_step} tokens/step, steps {start_step}->{t.max_steps}")

    def save(step: int, tokens: int) -> None:
        data = merge_states(env.all_gather_object(batches.loader.state_dict()))  # every stream's cursor
        meta = {"step": step, "tokens": tokens, "world_size": world, "zero_stage": cfg.zero.stage,
                "precision": cfg.precision, "tokenizer_hash": tokenizer.hash, "tokenizer_path": cfg.tokenizer.path,
                "model_family": cfg.model.family, "model": arch.__dict__, "config": cfg.model_dump(mode="json"),
                "data": data, "time": time.time()}
        path = ckpt.save(engine, ckpt_root, step, meta, {"data": data, "step": step, "tokens": tokens}, t.keep_last)
        env.print0(f"saved checkpoint {path}")

    logger = data_stage.DataStatsLogger(
        MetricsLogger(run_dir if env.is_main() else None, total_steps=t.max_steps, start_step=start_step,
                      progress=t.progress), batches.loader)
    t0 = time.perf_counter()
    try:
        result = train_with(
            t, engine, train_batches, loss_fn=train_loss(cfg), start_step=start_step, grad_accum=accum,
            tokens_per_step=tokens_per_step, flops_per_token=flops_tok, peak_flops=peak, logger=logger,
            eval_fn=lambda: evaluate(engine, val_batches, causal_lm_loss), save_fn=save, tokens_seen=tokens_seen,
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
        model = models.build_model(models.family_of_config(arch), arch)
    return model.num_params(), model.flops_per_token(seq_len)
