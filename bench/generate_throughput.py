#!/usr/bin/env python
"""Generation throughput: llmstack's KV-cache decoding against transformers' generate.

Both decode the same weights: a randomly initialised llmstack model is exported with
llmstack.models.hf and loaded back with AutoModelFor*.from_pretrained, so the two sides run the
same architecture and numbers. Greedy decoding of `--new-tokens` tokens for batches of 1 and 16
prompts of different lengths (left padding), no stop token, so both generate exactly the same
number of tokens; the generated tokens are compared too.

Two rates per side:
- decode tok/s: the tokens after the first, over the time they add. Each side also generates 1
  token from the same prompts (prefill + first token), and decode = B * (N - 1) / (t_N - t_1).
- end-to-end tok/s: B * N over the whole call, the prompt's forward pass included.
Timings are medians over --reps repetitions, alternating the two sides (and the long and short
calls) so both see the same machine load; on a shared machine a single absolute number means
little, the ratio is the figure to read. On a machine whose cores other work is using, torch's
intra-op threads wait for each other at every operation (a decoding step is hundreds of small
ones): compare --threads 1 there.

  python bench/generate_throughput.py                           # gpt2-tiny (~5M) and gpt2-small (~23M)
  python bench/generate_throughput.py --presets llama-tiny      # llama-style (rotary, GQA)
  python bench/generate_throughput.py --presets t5-tiny         # encoder-decoder
  python bench/generate_throughput.py --step eager              # on a GPU: without the CUDA graph
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generated tokens/s: llmstack KV-cache decoding vs transformers generate "
                                "on the same exported model, batch 1 and batch 16.")
    p.add_argument("--presets", "--preset", default="gpt2-tiny,gpt2-small",
                   help="comma-separated gpt2-*, llama-* or t5-* presets (default: %(default)s, ~5M and ~23M "
                        "parameters at the default vocabulary)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt-len", default="16,48",
                   help="prompt lengths are drawn from this range (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side and batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="both sides' weights (default: %(default)s)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, what the work "
                        "itself took, unaffected by time spent descheduled on a busy machine; CPU only) "
                        "(default: %(default)s)")
    p.add_argument("--step", default="auto", help="llmstack's decoding step: auto, eager, static, cuda_graph "
                   "(default: %(default)s = cuda_graph on a GPU, eager on CPU)")
    return p.parse_args(argv)


def build(preset: str, args, out_dir: Path):
    import transformers as tf

    from llmstack import models
    from llmstack.models import hf

    family = models.family_of_preset(preset)
    if family not in ("gpt", "t5"):
        raise SystemExit(f"--presets {preset}: generation needs a gpt or t5 preset")
    torch.manual_seed(0)
    cfg = models.build_config(family, preset, args.vocab, dropout=0.0)
    ours = models.build_model(family, cfg)
    ours.init_weights()
    # no eos in the exported config: transformers then generates exactly --new-tokens, as we do
    hf.save_pretrained(family, cfg, dict(ours.state_dict()), out_dir, pad_id=0, bos_id=1, eos_id=None)
    auto = tf.AutoModelForSeq2SeqLM if family == "t5" else tf.AutoModelForCausalLM
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    theirs = auto.from_pretrained(out_dir).eval().to(args.device, dtype)
    return ours.eval().to(args.device, dtype), theirs, family


def prompts_for(batch: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]


def hf_inputs(prompts, device):
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_preset(preset: str, args, lo: int, hi: int) -> None:
    from llmstack.generate import generate

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as d:
        ours, theirs, family = build(preset, args, Path(d))
    n_params = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
    N = args.new_tokens
    print(f"\nmodel: {preset} ({family}, {n_params / 1e6:.1f}M parameters, vocab {args.vocab}), {args.dtype}, "
          f"greedy, {N} new tokens, prompts {lo}-{hi} tokens, llmstack step {args.step}")
    print(f"{'batch':>5} | {'decode tok/s: llmstack':>22} | {'transformers':>12} | {'speedup':>7} || "
          f"{'end-to-end: llmstack':>20} | {'transformers':>12} | {'speedup':>7} | same tokens")
    print("-" * 125)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompts_for(batch, lo, hi, args.vocab, seed=batch)
        ids, mask = hf_inputs(prompts, args.device)

        def run_ours(n):
            return generate(ours, prompts, max_new_tokens=n, pad_id=0, step=args.step)

        def run_theirs(n):
            with torch.inference_mode():
                return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)

        a, b = run_ours(N), run_theirs(N)  # warm-up (and the comparison)
        run_ours(1), run_theirs(1)
        b = (b[:, ids.shape[1]:] if family == "gpt" else b[:, 1:]).tolist()
        same = a == b
        times = {(side, n): [] for side in ("ours", "theirs") for n in (N, 1)}
        for _ in range(args.reps):  # alternate, so both sides see the same machine load
            for (side, n), acc in times.items():
                fn = run_ours if side == "ours" else run_theirs
                sync(args.device)
                t0 = clock()
                fn(n)
                sync(args.device)
                acc.append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {}
        for side in ("ours", "theirs"):
            decode_s = med[side, N] - med[side, 1]
            rate[side, "decode"] = batch * (N - 1) / decode_s if decode_s > 0 else float("nan")
            rate[side, "e2e"] = batch * N / med[side, N]
        print(f"{batch:>5} | {rate['ours', 'decode']:>22.0f} | {rate['theirs', 'decode']:>12.0f} | "
              f"{rate['ours', 'decode'] / rate['theirs', 'decode']:>6.2f}x || {rate['ours', 'e2e']:>20.0f} | "
              f"{rate['theirs', 'e2e']:>12.0f} | {rate['ours', 'e2e'] / rate['theirs', 'e2e']:>6.2f}x | "
              f"{'yes' if same else 'NO'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu: a GPU's work is not this process's CPU time; use --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    print(f"device {args.device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}; medians of "
          f"{args.reps} alternating repetitions, {args.clock} clock")
    for preset in args.presets.split(","):
        bench_preset(preset.strip(), args, lo, hi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
