"""Test entry point: start a training engine from other weights (`model.init`) and write its logits.

    deepspeed --num_gpus 2 tests/distributed/init_logits.py --ids IDS.pt --stage 3 \
        --run SRC PRECISION OUT.pt [--run SRC2 PRECISION2 OUT2.pt ...]

For each SRC (a checkpoint, a consolidated directory or a Hugging Face directory) the model is
built the way the stages build it (under `deepspeed.zero.Init` at ZeRO-3, in the precision's
dtype, fp32 or bf16), loaded with `stages.common.load_init_weights`, wrapped in a training engine, and run
forward in eval mode on the (B, T) token ids of IDS.pt. Rank 0 saves the fp32 logits to OUT.pt.
"""

from __future__ import annotations

import argparse

import torch


def logits_from(src: str, ids: torch.Tensor, stage: int, precision: str) -> torch.Tensor:
    from llmstack import models
    from llmstack.distributed import deepspeed as ds
    from llmstack.distributed import env
    from llmstack.stages import common
    from llmstack.train import weights

    _, info, _ = weights.read_weights(src)
    arch = models.config_from_dict(info.model_family, info.model)
    ds_config = ds.build_ds_config(micro_batch=ids.shape[0], grad_accum=1, world=env.world_size(), precision=precision,
                                   zero_stage=stage, offload_optimizer=False, offload_params=False, grad_clip=1.0,
                                   lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    model = common.build_model(arch, ds_config, stage, seed=0)
    common.load_init_weights(model, src, stage, info.tokenizer_hash or "")
    engine = ds.create_engine(model, [{"params": list(model.parameters()), "weight_decay": 0.0}], ds_config,
                              lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    engine.eval()
    with torch.no_grad():
        return engine(ids.to(engine.device)).float().cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", required=True)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--run", nargs=3, action="append", metavar=("SRC", "PRECISION", "OUT"), required=True)
    p.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = p.parse_args()

    from llmstack.distributed import env

    env.init("auto", 300)
    ids = torch.load(args.ids)
    for src, precision, out in args.run:
        logits = logits_from(src, ids, args.stage, precision)
        if env.is_main():
            torch.save(logits, out)
    env.exit_after_group(0)


if __name__ == "__main__":
    main()
