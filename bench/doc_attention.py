#!/usr/bin/env python
"""Packed documents without a dense mask: step time and peak memory against one-document rows.

A training step (forward + backward, fp32 or bf16) of a GPT on rows holding several documents
(segment ids, `models.layers.SegmentPlan`) against the same rows as one document each (SDPA's
causal kernel), and against the former dense (B, 1, T, T) mask as a reference. Step times are
medians of alternating repetitions in one process; peak memory is the peak resident-set growth of
a fresh process per mode (one step after building the model and batch), so modes never share an
allocator's cache.

Targets (CPU): 4 documents per 1024-token row <= 1.15x the one-document step time; peak memory at
T=4096 with documents <= 1.1x without.

  python bench/doc_attention.py                 # both measurements, defaults below
  python bench/doc_attention.py --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

MODES = ("one_doc", "segments", "dense_reference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Packed-document attention (segment ids) vs one-document rows: "
                                "step time at T=1024 and peak memory at T=4096.")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--docs", type=int, default=4, help="documents per row (default: %(default)s)")
    p.add_argument("--time-len", type=int, default=1024, help="row length of the timing (default: %(default)s)")
    p.add_argument("--time-batch", type=int, default=4)
    p.add_argument("--mem-len", type=int, default=4096, help="row length of the memory figure (default: %(default)s)")
    p.add_argument("--mem-batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, the work itself, "
                   "unaffected by time spent descheduled on a busy machine) (default: %(default)s)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: one mode's peak memory
    return p.parse_args(argv)


def build(args, T: int):
    from llmstack.models.gpt import GPT, gpt_config_from_preset

    torch.manual_seed(0)
    m = GPT(gpt_config_from_preset("gpt2-tiny", args.vocab, n_layer=args.layers, d_model=args.d_model,
                                   n_head=args.heads, max_seq_len=T, dropout=0.0, attn_dropout=0.0))
    m.init_weights()
    return m.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).train()


def batch(args, B: int, T: int, mode: str) -> dict:
    """Ids plus the mode's attention inputs: `docs` documents of uneven length per row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (B, T), generator=g)
    out = {"input_ids": ids, "labels": ids}
    if mode == "one_doc":
        return out
    seg = torch.empty(B, T, dtype=torch.long)
    pos = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        w = torch.rand(args.docs, generator=g) + 0.5
        cuts = [0] + [int(x) for x in (w.cumsum(0) / w.sum() * T).round().tolist()]
        for d, (a, e) in enumerate(zip(cuts, cuts[1:])):
            seg[b, a:e], pos[b, a:e] = d, torch.arange(e - a)
    out["position_ids"] = pos
    if mode == "segments":
        out["segment_ids"] = seg
    else:
        out["attn_mask"] = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    return out


def step(model, inputs: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**inputs).backward()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args) -> None:
    start = peak_rss_mb()  # torch imported, nothing built
    T, B = args.mem_len, args.mem_batch
    model = build(args, T)
    inputs = batch(args, B, T, args.memory_child)
    step(model, inputs)
    step(model, inputs)
    print(json.dumps({"mode": args.memory_child, "growth_mb": peak_rss_mb() - start}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_time:
        time_steps(args)
    if not args.skip_memory:
        memory(args, argv)


def time_steps(args) -> None:
    T, B = args.time_len, args.time_batch
    model = build(args, T)
    inputs = {m: batch(args, B, T, m) for m in MODES}
    for m in MODES:
        step(model, inputs[m])  # warm-up
    times = {m: [] for m in MODES}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.reps):
        for m in MODES:
            t = clock()
            step(model, inputs[m])
            times[m].append(clock() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"step time, {args.dtype}, B={B} T={T}, {args.docs} documents per row, "
          f"d_model {args.d_model} x {args.layers} layers, {torch.get_num_threads()} threads, {args.clock} clock "
          f"(median of {args.reps}):")
    for m in MODES:
        print(f"  {m:16s} {1000 * med[m]:8.1f} ms  ({med[m] / med['one_doc']:.3f}x one_doc)")
    print(f"segments / one_doc step time: {med['segments'] / med['one_doc']:.3f} (target <= 1.15)")


def memory(args, argv) -> None:
    print(f"peak memory, {args.dtype}, B={args.mem_batch} T={args.mem_len} (one fresh process per mode; "
          "growth over the process's peak before the model was built):")
    peaks = {}
    for m in MODES:
        cmd = [sys.executable, __file__, "--memory-child", m, *[a for a in (argv or sys.argv[1:])]]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[m] = json.loads(res.stdout.strip().splitlines()[-1])["growth_mb"]
        print(f"  {m:16s} peak RSS growth {peaks[m]:8.0f} MB")
    print(f"segments / one_doc peak memory: {peaks['segments'] / peaks['one_doc']:.3f} (target <= 1.1); "
          f"dense_reference / one_doc: {peaks['dense_reference'] / peaks['one_doc']:.3f}")


if __name__ == "__main__":
    main()
