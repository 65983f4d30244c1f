"""Test entry point: a non-finite step applies no update under every ZeRO stage, fp32 and bf16.

    deepspeed --num_gpus 2 tests/distributed/skip_matrix.py --out FILE
    python tests/distributed/skip_matrix.py --out FILE                       (one process)

For each (precision, stage) a tiny GPT in a real DeepSpeed engine (AdamW, 2 micro-batches per
step) trains through train/guard.py's RunGuard for these steps:

    ok         a normal step
    nan_loss   the loss of the last rank's second micro-batch is NaN (the other ranks' are finite)
    inf_loss   a loss is +inf while its gradients are finite (loss + inf)
    nan_grad   the loss is finite but its gradients are NaN (a hook on the loss)
    ok         a normal step again

After each step every rank compares what it holds with the state after the previous applied
step: the model's parameters (its ZeRO-3 partition), the optimizer's fp32 master copies and its
moment and step tensors. Rank 0 writes {precision: {stage: [per step: {"skipped", "unchanged",
"finite"} with "unchanged"/"finite" true only if true on every rank]}}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

STEPS = ["ok", "nan_loss", "inf_loss", "nan_grad", "ok"]
VOCAB, SEQ, GLOBAL, ACCUM = 512, 32, 8, 2


def snapshot(engine) -> list[torch.Tensor]:
    """Copies of every tensor an update would change, as this rank holds them."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):  # DeepSpeed's wrappers hold the torch optimizer they drive
        opt = opt.optimizer
    tensors = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    tensors += [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in tensors]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def run(precision: str, stage: int) -> list[dict]:
    from llmstack.distributed import deepspeed as ds
    from llmstack.distributed import env
    from llmstack.models.gpt import gpt_config_from_preset
    from llmstack.stages import common
    from llmstack.train.guard import RunGuard
    from llmstack.train.optim import param_groups

    world, rank = env.world_size(), env.rank()
    micro = GLOBAL // world // ACCUM
    ds_config = ds.build_ds_config(micro_batch=micro, grad_accum=ACCUM, world=world, precision=precision,
                                   zero_stage=stage, offload_optimizer=False, offload_params=False, grad_clip=1.0,
                                   lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    arch = gpt_config_from_preset("gpt2-tiny", VOCAB, n_layer=2, n_head=4, d_model=64, max_seq_len=64)
    model = common.build_model(arch, ds_config, stage, seed=0)
    engine = ds.create_engine(model, param_groups(model, 0.1), ds_config, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1234)
    out, before = [], None
    with RunGuard(max_skipped_steps=len(STEPS)) as guard:
        for step, kind in enumerate(STEPS, 1):
            rows = torch.randint(4, VOCAB, (GLOBAL, SEQ + 1), generator=g)
            for m in range(ACCUM):
                lo = (rank * ACCUM + m) * micro
                batch = rows[lo: lo + micro].to(engine.device)
                loss = engine(batch[:, :-1], labels=batch[:, 1:])
                if kind == "nan_loss" and rank == world - 1 and m == 1:
                    loss = loss * float("nan")
                elif kind == "inf_loss" and m == 0:
                    loss = loss + float("inf")
                elif kind == "nan_grad" and m == 0:
                    loss.register_hook(lambda grad: grad * float("nan"))
                guard.backward(engine, loss)
                guard.step(engine)
            res = guard.end_step(step, loss.detach().float())
            now = snapshot(engine)
            finite = all(bool(torch.isfinite(t).all()) for t in now if t.is_floating_point())
            unchanged = before is not None and same(before, now)
            agree = env.all_reduce_sum(torch.tensor([float(unchanged), float(finite)], device=env.device())).tolist()
            out.append({"kind": kind, "skipped": res.skipped, "unchanged": agree[0] == world,
                        "finite": agree[1] == world, "diverged": res.diverged})
            if not res.skipped:
                before = now
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = p.parse_args()

    from llmstack.distributed import env

    env.init("auto", 300)
    results: dict = {}
    for precision in args.precisions.split(","):
        for stage in map(int, args.stages.split(",")):
            t0 = time.perf_counter()
            results.setdefault(precision, {})[str(stage)] = out = run(precision, stage)
            env.print0(f"{precision} ZeRO-{stage} ({time.perf_counter() - t0:.1f}s): "
                       f"{[(r['kind'], r['skipped'], r['unchanged']) for r in out]}")
    if env.is_main():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    env.exit_after_group(0)


if __name__ == "__main__":
    main()
