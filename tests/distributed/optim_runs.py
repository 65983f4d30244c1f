"""Test entry point: every optimizer trains the tiny GPT under each ZeRO stage, as one rank of a launch.

    deepspeed --num_gpus 2 tests/distributed/optim_runs.py --out FILE --tokenizer TOK [--stages 0,2] [--optimizers ...]

For each (stage, optimizer): a straight run of --steps steps, and a run stopped after half of them,
checkpointed (train/checkpoint.py), rebuilt from scratch and resumed; a combination the engine
refuses records its error message instead. One launch covers every
combination, so the engines, DeepSpeed's partitioning and the checkpoint round trip are real while
the launcher's start-up cost is paid once. Rank 0 writes {stage: {optimizer: {straight, resumed}}}
with the per-step losses averaged over ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Learning rates at which each optimizer moves the tiny model within a few steps (LAMB's step is
# lr x the weight norm; SGD needs a large lr on a freshly initialised transformer).
LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.5, "adafactor": 3e-3, "lamb": 2e-2}
MICRO, SEQ = 4, 32


def token_rows(tokenizer_path: str, n_rows: int) -> torch.Tensor:
    """(n_rows, SEQ + 1) consecutive tokens of the builtin corpus."""
    from data_pipeline.sources import builtin_texts
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids: list[int] = []
    for text in builtin_texts("train"):
        ids += tok.encode(text)
        if len(ids) >= n_rows * (SEQ + 1):
            break
    return torch.tensor(ids[: n_rows * (SEQ + 1)]).view(n_rows, SEQ + 1), tok.vocab_size


def run(name: str, stage: int, rows: torch.Tensor, vocab: int, steps: int, *, start: int = 0, stop: int | None = None,
        ckpt_root: Path | None = None) -> list[float]:
    from llmstack.distributed import deepspeed as ds
    from llmstack.distributed import env
    from llmstack.models.gpt import gpt_config_from_preset
    from llmstack.stages import common
    from llmstack.train import checkpoint as ckpt
    from llmstack.train.meta import CheckpointMeta
    from llmstack.train.optim import lr_at, param_groups

    world, rank = env.world_size(), env.rank()
    lr = LR[name]
    ds_config = ds.build_ds_config(micro_batch=MICRO, grad_accum=1, world=world, precision="fp32", zero_stage=stage,
                                   offload_optimizer=False, offload_params=False, grad_clip=1.0, lr=lr,
                                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    arch = gpt_config_from_preset("gpt2-tiny", vocab, n_layer=2, n_head=4, d_model=64, max_seq_len=64)
    model = common.build_model(arch, ds_config, stage, seed=0)
    engine = ds.create_engine(model, param_groups(model, 0.1), ds_config, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                              optimizer=name, momentum=0.9)
    if start:
        ckpt.load(engine, ckpt_root / f"step_{start}")
    losses = []
    for step in range(start, stop or steps):
        ds.set_lr(engine, lr_at(step, lr=lr, warmup_steps=2, max_steps=steps, schedule="cosine", min_lr_ratio=0.1))
        lo = (step * world + rank) * MICRO  # this rank's rows of the global batch
        batch = rows[lo: lo + MICRO]
        loss = engine(batch[:, :-1], labels=batch[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(float(env.all_reduce_mean(loss.detach()).item()))
    if stop:
        meta = CheckpointMeta(step=stop, world_size=world, zero_stage=stage)
        ckpt.save(engine, ckpt_root, stop, meta, {}, keep_last=1)
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--stages", default="0,2")
    p.add_argument("--optimizers", default=",".join(LR))
    p.add_argument("--steps", type=int, default=6)
    args, _ = p.parse_known_args()  # the deepspeed launcher appends --local_rank=N

    from llmstack.distributed import env
    from llmstack.errors import UsageError

    env.init("gloo", 120)
    out = Path(args.out)
    rows, vocab = token_rows(args.tokenizer, args.steps * env.world_size() * MICRO)
    half = args.steps // 2
    results: dict = {}
    for stage in map(int, args.stages.split(",")):
        for name in args.optimizers.split(","):
            try:
                straight = run(name, stage, rows, vocab, args.steps)
            except UsageError as e:  # raised on every rank alike, before any collective
                results.setdefault(stage, {})[name] = {"error": str(e)}
                continue
            root = out.parent / f"ckpt-{stage}-{name}"
            first = run(name, stage, rows, vocab, args.steps, stop=half, ckpt_root=root)
            rest = run(name, stage, rows, vocab, args.steps, start=half, ckpt_root=root)
            results.setdefault(stage, {})[name] = {"straight": straight, "resumed": first + rest}
    if env.is_main():
        out.write_text(json.dumps(results, indent=1))
    env.exit_after_group(0)


if __name__ == "__main__":
    main()
