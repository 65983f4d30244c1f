"""Test entry point: every model family under every ZeRO stage in fp32 and bf16, as one rank of a launch.

    deepspeed --num_gpus 2 tests/distributed/precision_matrix.py --out FILE [--steps 3]
    python tests/distributed/precision_matrix.py --out FILE                          (one process)

For each (family, precision, stage) the model is built and initialised the way the stages do it
(stages/common.build_model: under `deepspeed.zero.Init` for ZeRO-3, module-by-module init), wrapped
in a real DeepSpeed engine with AdamW, and trained for --steps steps on fixed token rows with the
family's loss (causal LM; masked LM at fixed positions; T5 with the row's second half as target).
Each process takes its rows of a global batch of 8, so one and two processes see the same data.

Rank 0 writes {family: {precision: {stage: {"losses": [...], "weights": sha256 of the initial
weights gathered to fp32, "grad_accum_dtype", "comm_dtype": the engine's}}}}; losses are averaged
over ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch

FAMILIES = {  # preset + overrides: small, and every feature of the preset kept
    "gpt2-tiny": ("gpt", dict(n_layer=2, n_head=4, d_model=64, max_seq_len=64)),  # tied, learned positions
    "llama-tiny": ("gpt", dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64)),  # rotary, GQA
    "bert-tiny": ("bert", dict(n_layer=2, n_head=4, d_model=64, max_seq_len=64)),
    "t5-tiny": ("t5", dict(n_layer=2, n_head=4, d_model=64, d_ff=160, max_seq_len=64)),
}
VOCAB, SEQ, GLOBAL, LR = 512, 32, 8, 3e-3


def batches(family: str, steps: int) -> list[dict]:
    """`steps` global batches (GLOBAL rows each) of the family's inputs, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        rows = torch.randint(4, VOCAB, (GLOBAL, SEQ + 1), generator=g)
        if family == "gpt":
            out.append({"input_ids": rows[:, :-1], "labels": rows[:, 1:]})
        elif family == "bert":  # 5 positions of each row masked (id 3) and predicted; the same count in
            # every row, so the mean of the ranks' mean losses is the mean over the global batch
            order = torch.rand(GLOBAL, SEQ, generator=g).argsort(dim=1)
            chosen = torch.zeros(GLOBAL, SEQ, dtype=torch.bool).scatter_(1, order[:, :5], True)
            out.append({"input_ids": rows[:, :-1].masked_fill(chosen, 3),
                        "labels": rows[:, :-1].masked_fill(~chosen, -100)})
        else:  # t5: encode the first half, decode the second
            half = SEQ // 2
            out.append({"input_ids": rows[:, :half], "labels": rows[:, half:SEQ]})
    return out


def weights_digest(model, stage: int) -> str:
    """sha256 of every parameter (gathered under ZeRO-3), as fp32, in name order."""
    import deepspeed

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        ctx = deepspeed.zero.GatheredParameters([p]) if stage == 3 else torch.no_grad()
        with ctx:
            h.update(name.encode())
            h.update(p.data.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(preset: str, precision: str, stage: int, steps: int) -> dict:
    from llmstack import models
    from llmstack.distributed import deepspeed as ds
    from llmstack.distributed import env
    from llmstack.stages import common

    family, overrides = FAMILIES[preset]
    world, rank = env.world_size(), env.rank()
    micro = GLOBAL // world
    ds_config = ds.build_ds_config(micro_batch=micro, grad_accum=1, world=world, precision=precision,
                                   zero_stage=stage, offload_optimizer=False, offload_params=False, grad_clip=1.0,
                                   lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    arch = models.build_config(family, preset, VOCAB, **overrides)
    model = common.build_model(arch, ds_config, stage, seed=0)
    engine = ds.create_engine(model, [{"params": [p for p in model.parameters()], "weight_decay": 0.1}], ds_config,
                              lr=LR, betas=(0.9, 0.95), eps=1e-8)
    digest = weights_digest(engine.module, stage)  # as trained: cast to bf16 by the engine or at construction
    losses = []
    for batch in batches(family, steps):
        mine = {k: v[rank * micro:(rank + 1) * micro].to(engine.device) for k, v in batch.items()}
        loss = engine(mine["input_ids"], labels=mine["labels"])
        engine.backward(loss)
        engine.step()
        losses.append(float(env.all_reduce_mean(loss.detach().float()).item()))
    _, accum_dtype = engine.get_data_types()
    return {"losses": losses, "weights": digest, "grad_accum_dtype": str(accum_dtype),
            "comm_dtype": str(engine.communication_data_type)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = p.parse_args()

    from llmstack.distributed import env

    env.init("auto", 300)
    results: dict = {}
    for preset in args.families.split(","):
        for precision in args.precisions.split(","):
            for stage in map(int, args.stages.split(",")):
                out = run(preset, precision, stage, args.steps)
                results.setdefault(preset, {}).setdefault(precision, {})[str(stage)] = out
                env.print0(f"{preset} {precision} ZeRO-{stage}: {out}")
    if env.is_main():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    env.exit_after_group(0)


if __name__ == "__main__":
    main()
