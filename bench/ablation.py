#!/usr/bin/env python
"""Ablation of component options on the builtin corpus, through the real pretraining stage.

Validation loss after a fixed token budget for {learned, sinusoidal, rotary, ALiBi} positions x
{LayerNorm, RMSNorm} x {GELU, SwiGLU} MLPs on a tiny GPT (every other setting equal, the gated MLP
at 2/3 width so parameter counts match), mean over seeds. Each run is `llmstack pretrain`'s own
recipe (`stages.pretrain.run`, one process, ZeRO-0, AdamW, warmup + cosine) in this process, so
the data order, optimizer and schedule are the ones users get. Prints a table sorted by loss and
writes a PNG bar chart.

It first prints the per-token cost of the attention patterns: keys each query sees (the FLOPs
that a block-sparse kernel would do) and the measured time of masked SDPA against full causal
SDPA (a mask over SDPA still computes every score: it saves no time on CPU).

    python bench/ablation.py                       # ~15 minutes on a shared 2-core CPU
    python bench/ablation.py --tokens 100000 --seeds 1 --out runs/ablation-quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

POSITIONS = ["learned", "sinusoidal", "rotary", "alibi"]
NORMS = ["layernorm", "rmsnorm"]
MLPS = ["gelu", "swiglu"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="runs/ablation", help="run directories, results.json and ablation.png")
    p.add_argument("--tokens", type=int, default=150_000, help="training tokens per run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: as fast for this model size, and immune to a shared machine's "
                        "oversubscription, which slowed 2-thread runs several-fold)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--skip-costs", action="store_true", help="skip the attention-pattern cost table")
    return p.parse_args(argv)


def pattern_costs(T: int = 256, d: int = 256, heads: int = 4, reps: int = 20) -> None:
    """Keys per query and masked-SDPA time of each pattern at context T (forward + backward)."""
    import torch
    import torch.nn.functional as F

    from llmstack.models.layers import pattern_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, heads, T, d // heads, requires_grad=True) for _ in range(3))
    pos = torch.arange(T)
    cases = [("full (causal kernel)", None), ("full (as a mask)", pattern_mask("full", pos, pos)),
             ("sliding w=32", pattern_mask("sliding", pos, pos, window=32)),
             ("strided l=16", pattern_mask("strided", pos, pos, block=16)),
             ("fixed l=16 c=2", pattern_mask("fixed", pos, pos, block=16, summary=2))]

    def step(mask):
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y.sum().backward()

    times = {name: [] for name, _ in cases}
    for _ in range(3):
        for _, m in cases:
            step(m)  # warm up
    for _ in range(reps):  # interleaved, so every case sees the same machine load
        for name, m in cases:
            t0 = time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
    print(f"# attention patterns at T={T}, batch 4, {heads} heads of {d // heads}: per-token cost")
    print(f"{'pattern':<22} {'keys/query':>10} {'of full':>8} {'ms/step':>8}")
    full_keys = (T + 1) / 2
    for name, m in cases:
        keys = full_keys if m is None else m.sum().item() / T
        print(f"{name:<22} {keys:>10.1f} {keys / full_keys:>7.0%} {statistics.median(times[name]) * 1e3:>8.2f}")
    print()


def run_one(args, out: Path, pos: str, norm: str, mlp: str, seed: int) -> float:
    from llmstack.config import PretrainConfig, load_config
    from llmstack.stages import pretrain

    steps = max(1, args.tokens // (args.batch * args.seq_len))
    name = f"{pos}-{norm}-{mlp}-s{seed}"
    overrides = [
        f"run.dir={out / name}", "train.resume=none", f"seed={seed}", "zero.stage=0",
        f"tokenizer.path={out / 'tokenizer'}", f"tokenizer.vocab_size={args.vocab}", "tokenizer.max_chars=4000000",
        "model.preset=gpt2-tiny", f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", "model.n_head=4",
        f"model.max_seq_len={args.seq_len}", f"model.pos={pos}", f"model.norm={norm}", f"model.mlp={mlp}",
        f"data.seq_len={args.seq_len}", f"train.micro_batch={args.batch}", f"train.max_steps={steps}",
        f"train.lr={args.lr}", f"train.warmup_steps={max(1, steps // 20)}", f"train.log_every={steps}",
        "train.eval_every=0", f"train.eval_batches={args.eval_batches}", "train.save_every=0", "train.progress=false",
    ]
    cfg = load_config(PretrainConfig, None, overrides)
    return pretrain.run(cfg)["final_val_loss"]


def chart(rows: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r[0] for r in rows]
    ax.bar(range(len(rows)), [r[1] for r in rows], yerr=[r[2] for r in rows], capsize=3,
           color=["tab:green" if i == 0 else "tab:blue" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
    lo = min(r[1] for r in rows)
    ax.set_ylim(lo - 0.15, max(r[1] for r in rows) + 0.1)
    ax.set_ylabel("validation loss (mean of seeds)")
    ax.set_title("positions x norm x MLP on the tiny GPT, fixed token budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_costs:
        pattern_costs()
    grid = list(itertools.product(POSITIONS, NORMS, MLPS))
    results: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i, (pos, norm, mlp) in enumerate(grid):
        key = f"{pos} / {norm} / {mlp}"
        results[key] = [run_one(args, out, pos, norm, mlp, seed) for seed in range(1, args.seeds + 1)]
        done = time.perf_counter() - t0
        print(f"[{i + 1}/{len(grid)}] {key}: val loss {statistics.mean(results[key]):.4f} "
              f"(seeds {', '.join(f'{x:.4f}' for x in results[key])}), eta {done / (i + 1) * (len(grid) - i - 1):.0f}s",
              flush=True)
    rows = sorted(((k, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in results.items()),
                  key=lambda r: r[1])
    (out / "results.json").write_text(json.dumps({"args": vars(args), "val_loss": results}, indent=1))
    chart(rows, out / "ablation.png")
    print(f"\n# validation loss after {args.tokens} tokens, {args.n_layer} layers x {args.d_model}, mean of "
          f"{args.seeds} seed(s) (lower is better)")
    print(f"{'positions / norm / mlp':<34} {'val loss':>9} {'spread':>8}")
    for k, m, s in rows:
        print(f"{k:<34} {m:>9.4f} {s:>8.4f}")
    for axis, values in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
        means = {v: statistics.mean(m for k, m, _ in rows if v in k.split(" / ")) for v in values}
        print(f"{axis}: " + ", ".join(f"{v} {m:.4f}" for v, m in sorted(means.items(), key=lambda x: x[1])))
    print(f"winner: {rows[0][0]} ({rows[0][1]:.4f}); chart: {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
