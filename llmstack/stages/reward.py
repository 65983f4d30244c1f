"""`llmstack rm`: a reward model trained on preference pairs (Bradley-Terry).

Recipe: run -> tokenizer and architecture (the starting model's) -> ScalarHeadModel (GPT backbone
+ Linear(C, 1), from an SFT checkpoint with a fresh head, or from scratch) -> engine -> preference
pairs (data_pipeline/pairs.py) -> Trainer. Each micro-batch holds m pairs as 2m right-padded
sequences (chosen rows, then rejected rows); the reward of a sequence is the head's output at its
last real token (the EOS that ends the conversation), and the loss is
-log sigmoid(r_chosen - r_rejected - margin).
"""

from __future__ import annotations

import json
import time

import torch

from llmstack.config import RMConfig
from llmstack.distributed import env
from llmstack.models.heads import ScalarHeadModel, sequence_scores
from llmstack.rlhf.losses import pairwise_loss
from llmstack.stages import common
from llmstack.train import run as train_run
from llmstack.train.trainer import StatWindow

dry_run = train_run.dry_run


def rm_pair_stats(engine, batch: dict, margin: float = 0.0) -> dict[str, torch.Tensor]:
    """Per pair: Bradley-Terry loss, correct (r_chosen > r_rejected), margin r_chosen - r_rejected."""
    scores = sequence_scores(engine(batch["ids"]), batch["valid"])  # (2m,)
    m = scores.shape[0] // 2
    diff = scores[:m] - scores[m:]
    return {"loss": pairwise_loss(scores[:m], scores[m:], margin, reduce=False), "accuracy": (diff > 0).float(),
            "margin": diff}


def run(cfg: RMConfig) -> dict:
    run, t, margin = train_run.start(cfg), cfg.train, cfg.rm.margin
    tokenizer, arch, init = common.finetune_start(run, cfg, seq_len=cfg.data.seq_len)
    model = common.build_model(arch, run.ds_config, cfg.zero.stage, cfg.seed, cls=ScalarHeadModel, init=init,
                               tokenizer_hash=tokenizer.hash)
    engine = common.train_engine(model, t, run.ds_config)
    train_pairs, val_pairs = common.preference_data(run, cfg.data, tokenizer, model.num_params())

    meta = lambda step, tokens: run.meta(step, tokens, tokenizer=tokenizer, arch=arch, zero_stage=cfg.zero.stage,  # noqa
                                         head="scalar", stage="rm")
    window = StatWindow()

    def loss_fn(eng, batch):
        stats = rm_pair_stats(eng, batch, margin)
        window.add(accuracy=stats["accuracy"].mean(), margin=stats["margin"].mean())
        return stats["loss"].mean()

    # MFU: forward + backward of the scalar-head model over every chosen and rejected token
    flops_tok = common.model_flops(arch, ScalarHeadModel).per_token(common.pair_attention_len(train_pairs))
    trainer = common.pair_trainer(run, cfg, engine, meta, train_pairs, val_pairs, tokenizer.pad_id or 0, loss_fn,
                                  lambda e, b: rm_pair_stats(e, b, margin), window, flops_per_token=flops_tok)
    start = trainer.start_step
    before = trainer.validate()
    env.print0(f"validation before training: accuracy {before['val_accuracy']:.3f}, margin {before['val_margin']:.3f}")
    env.print0(f"rm {run.dir}: world {run.world}, ZeRO-{cfg.zero.stage}, {cfg.precision}, {run.global_batch} pairs/step "
               f"(micro {t.micro_batch} x accum {run.accum} x world {run.world}), steps {start}->{t.max_steps}")
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = {"run_dir": str(run.dir), "steps": result.step, "final_loss": result.last_loss,
               "val_loss": result.last_val_loss, "val_accuracy": result.val.get("val_accuracy"),
               "val_margin": result.val.get("val_margin"), "val_accuracy_before": before["val_accuracy"],
               "val_margin_before": before["val_margin"], "val_pairs": len(val_pairs),
               "seconds": round(time.perf_counter() - t0, 1)}
    env.print0("done: " + json.dumps(summary))
    return summary
