#!/usr/bin/env python
"""SFT throughput on the demo pairs: packing against padding, total and supervised tokens/s.

Both modes train the same model (same initial weights) through the same pieces `llmstack sft`
uses: conversations encoded under the chat template, `SFTBatches` (packed rows with per-
conversation positions and block-diagonal attention, or one conversation per row padded to the
longest in the micro-batch), the summed-token loss, a DeepSpeed engine (ZeRO-0) and AdamW. A timed
step is forward + backward + optimizer step for one global batch of `--micro` rows. Steps of the
two modes are interleaved (the order alternating every round), so both are sampled under the
same machine load; figures are medians over rounds (DESIGN.md, "Measuring speed").

Reported per mode: total tokens/s (real conversation tokens, padding excluded), supervised
tokens/s (assistant tokens that carry loss), positions/s (what the model computes, padding
included) and the fill ratio tokens/positions. The last line is `packing/padding supervised
tokens/s ratio: R`.

  python bench/sft_throughput.py                      # gpt2-tiny, rows of 128 tokens, micro 16
  python bench/sft_throughput.py --seq-len 256 --rounds 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", help="tokenizer dir (default: a 4096-token BPE trained now on the builtin corpus)")
    p.add_argument("--preset", default="gpt2-tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro", type=int, default=16, help="rows per step")
    p.add_argument("--rounds", type=int, default=12, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from data_pipeline.sources import builtin_texts
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from llmstack import models
    from llmstack.distributed import deepspeed as ds
    from llmstack.distributed import env
    from data_pipeline.chat_batches import SFTBatches, load_conversations
    from llmstack.stages import common, sft
    from llmstack.train.optim import param_groups

    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="sft-bench-")) / "tok"
        tok = train_tokenizer(builtin_texts("train"), tmp, kind="bpe", vocab_size=4096, num_sentinels=0,
                              max_chars=5_000_000)
    examples, stats = load_conversations(["builtin-sft:train"], tok, seq_len=args.seq_len, train_on="all",
                                         overlong="truncate", side="right", on_error="skip")
    print(f"demo pairs: {stats['conversations']} conversations, {stats['tokens']} tokens "
          f"({stats['supervised_tokens']} supervised), {stats['truncated']} truncated to {args.seq_len + 1} tokens")

    env.init("gloo", 600)
    arch = models.build_config("gpt", args.preset, tok.vocab_size, max_seq_len=max(args.seq_len, 64))
    ds_config = ds.build_ds_config(micro_batch=args.micro, grad_accum=1, world=1, precision="fp32", zero_stage=0,
                                   offload_optimizer=False, offload_params=False, grad_clip=1.0, lr=1e-3,
                                   betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    modes = {}
    for name, packed in (("packing", True), ("padding", False)):
        model = common.build_model(arch, ds_config, 0, seed=0)
        engine = ds.create_engine(model, param_groups(model, 0.0), ds_config, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        batches = SFTBatches(examples, seq_len=args.seq_len, packed=packed, micro=args.micro, accum=1, world=1,
                             rank=0, seed=0, pad_id=tok.pad_id)
        modes[name] = {"engine": engine, "batches": batches, "times": [], "tokens": [], "sup": [], "positions": []}

    def step(m: dict, timed: bool) -> None:
        k = m["batches"].step
        batch = next(m["batches"])
        t0 = time.perf_counter()
        loss = sft.summed_loss(m["engine"], batch) / sft.supervised(batch)  # the token mean of the micro-batch
        m["engine"].backward(loss)
        m["engine"].step()
        dt = time.perf_counter() - t0
        if timed:
            tokens, sup = m["batches"].step_counts(k)
            m["times"].append(dt)
            m["tokens"].append(tokens / dt)
            m["sup"].append(sup / dt)
            m["positions"].append(batch["input_ids"].numel() / dt)

    names = list(modes)
    for _ in range(args.warmup):
        for n in names:
            step(modes[n], timed=False)
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            step(modes[n], timed=True)

    print(f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, preset "
          f"{args.preset}, rows of <= {args.seq_len} positions, {args.micro} rows/step, {args.rounds} rounds")
    print(f"{'mode':<8} {'tokens/s':>10} {'supervised/s':>13} {'positions/s':>12} {'fill':>6} {'s/step':>7}")
    med = {}
    for n, m in modes.items():
        med[n] = {k: statistics.median(m[k]) for k in ("tokens", "sup", "positions", "times")}
        fill = sum(m["tokens"]) / sum(m["positions"])
        print(f"{n:<8} {med[n]['tokens']:>10.0f} {med[n]['sup']:>13.0f} {med[n]['positions']:>12.0f} {fill:>6.2f} "
              f"{med[n]['times']:>7.3f}")
    print(f"packing/padding supervised tokens/s ratio: {med['packing']['sup'] / med['padding']['sup']:.2f}")


if __name__ == "__main__":
    main()
