"""`llmstack pretrain`: pretraining of a GPT, BERT or T5 with DeepSpeed ZeRO.

The recipe: run -> tokenizer -> model (under ZeRO-3 init) -> engine -> data -> Trainer. The model
family decides the objective (stages/objectives.py): causal LM, masked LM or span corruption.
"""

from __future__ import annotations

import json
import time

import torch

from data_pipeline.stream import merge_states
from llmstack.config import PretrainConfig
from llmstack.distributed import env
from llmstack.distributed import preflight
from llmstack.errors import UsageError
from llmstack.stages import common, objectives
from llmstack.stages import data as data_stage
from llmstack.train import run as train_run
from llmstack.train import task_eval
from llmstack.train.evaluate import evaluate_batches
from llmstack.train.trainer import Checkpointer, CheckpointPart, MicroBatches, Trainer

# Inputs for packed documents (data.doc_mask=true) travel with the batch as keyword arguments.
MODEL_INPUTS = ("position_ids", "segment_ids")


def causal_lm_loss(engine, batch: dict, **loss_options) -> torch.Tensor:
    extra = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return engine(batch["input_ids"], labels=batch["labels"], **loss_options, **extra)


def train_loss(cfg: PretrainConfig):
    """The training loss: causal_lm_loss, plus label smoothing / z-loss when set (GPT only);
    validation always reports the plain loss, so runs stay comparable."""
    t = cfg.train
    if not (t.label_smoothing or t.z_loss):
        return causal_lm_loss
    if cfg.model.family != "gpt":
        raise UsageError("train.label_smoothing / train.z_loss apply to GPT models, "
                         f"not model.family={cfg.model.family}")
    return lambda engine, batch: causal_lm_loss(engine, batch, label_smoothing=t.label_smoothing, z_loss=t.z_loss)


def dry_run(cfg: PretrainConfig) -> None:
    """The resolved config, the DeepSpeed config and the model's size; touches nothing."""
    train_run.dry_run(cfg)
    vocab = -(-cfg.tokenizer.vocab_size // 64) * 64
    arch = common.model_config(cfg.model, vocab, cfg.data.seq_len, cfg.train.activation_checkpointing)
    params, flops = common.model_stats(arch, cfg.data.seq_len)
    print(f"# model: {params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs/token (vocab {vocab} assumed)")


def run(cfg: PretrainConfig) -> dict:
    run, t = train_run.start(cfg, open_run=False), cfg.train
    preflight.check_cpu_pretrain(cfg, run.world)  # without GPUs: exit 2 if it cannot fit this host, before any work
    tasks = task_eval.start(t)  # train.eval_tasks loaded once: a bad task exits 2 before any heavy work
    tokenizer = common.ensure_tokenizer(cfg.tokenizer, cfg.data.sources)  # no run directory if this fails
    run.open()
    arch = common.model_config(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, t.activation_checkpointing,
                               pad_id=tokenizer.pad_id)
    run.check_resume(tokenizer.hash, cfg.model.family, arch)
    if tasks is not None:  # every prompt fits the model (else exit 2 now, not at the first evaluation)
        tasks.check(tokenizer, arch, seq_len=cfg.data.seq_len, bos=cfg.data.bos,
                    batch_size=t.micro_batch)
    transform = objectives.make_transform(cfg.model.family, tokenizer, cfg.data.seq_len)  # None for gpt
    init = common.read_init(cfg.model.init) if run.saved is None else None
    model = common.build_model(arch, run.ds_config, cfg.zero.stage, cfg.seed, init=init, tokenizer_hash=tokenizer.hash)
    engine = common.train_engine(model, t, run.ds_config)  # compiled through the engine when train.compile

    # The data position is world-size independent (all streams' cursors), so only the ZeRO
    # partitions tie a resume to the saved number of processes (checked by train_run.start).
    data = data_stage.pretrain_data(cfg.data, tokenizer, cfg.seed, t.micro_batch, t.eval_batches,
                                    state=run.saved.data if run.saved else None, resume_from=run.resume_from)
    val_batches = objectives.transform_val(data.val, transform, seed=cfg.seed)
    params, flops_tok = common.model_stats(arch, cfg.data.seq_len)
    run.record(tokenizer.hash, data=data.manifest, params=params, flops_per_token=flops_tok)

    def meta(step: int, tokens: int):
        cursors = merge_states(env.all_gather_object(data.train.loader.state_dict()))  # every stream's cursor
        return run.meta(step, tokens, tokenizer=tokenizer, arch=arch, zero_stage=cfg.zero.stage,
                        family=cfg.model.family, data=cursors)

    checkpointer = Checkpointer([CheckpointPart(engine, run.ckpt_root, meta, lambda m: {
        "data": m.data, "step": m.step, "tokens": m.tokens})], t.keep_last)
    torch.manual_seed(cfg.seed + run.rank)  # per-rank stream for dropout; replaced by the saved one on resume
    saved = checkpointer.restore(run.resume_from) if run.resume_from else None
    start = saved.step if saved else 0
    batches = objectives.wrap_train(data.train, transform, seed=cfg.seed, accum=run.accum, start_step=start)
    tokens_per_step = run.global_batch * cfg.data.seq_len
    env.print0(f"pretrain {run.dir}: world {run.world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, global batch "
               f"{run.global_batch} (micro {t.micro_batch} x accum {run.accum} x world {run.world}), "
               f"{tokens_per_step} tokens/step, steps {start}->{t.max_steps}")
    trainer = Trainer(t, [(engine, t.lr)], MicroBatches(engine, batches, train_loss(cfg), run.accum),
                      run_dir=run.dir, start_step=start, tokens=saved.tokens if saved else 0,
                      tokens_per_step=tokens_per_step, flops_per_token=flops_tok,
                      peak_flops=common.peak_flops(cfg.precision), checkpointer=checkpointer,
                      evaluate=task_eval.with_tasks(
                          lambda: {"val_loss": evaluate_batches(engine, val_batches, causal_lm_loss)},
                          tasks, engine, cfg.zero.stage),
                      callbacks=[data_stage.DataStats(data.train.loader)])
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"run_dir": str(run.dir), "steps": result.step, "tokens": result.tokens, "final_loss": result.last_loss,
               "final_val_loss": result.last_val_loss, "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
