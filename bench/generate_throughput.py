#!/usr/bin/env python
"""Generation throughput: llmstack's KV-cache decoding against transformers' generate.

Both decode the same weights: a randomly initialised llmstack model is exported with
llmstack.models.hf and loaded back with AutoModelFor*.from_pretrained, so the two sides run the
same architecture and numbers. Greedy decoding of `--new-tokens` tokens for batches of 1 and 16
prompts of different lengths (left padding), no stop token, so both generate exactly the same
number of tokens; the generated tokens are compared too.

Timings are medians over --reps alternating repetitions taken side by side in one run (on a
shared machine a single absolute number means little; the ratio is the figure to read).

  python bench/generate_throughput.py                       # gpt2-tiny on CPU
  python bench/generate_throughput.py --preset llama-tiny   # llama-style (rotary, GQA)
  python bench/generate_throughput.py --preset t5-tiny      # encoder-decoder
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
    p.add_argument("--preset", default="gpt2-tiny", help="any gpt2-*, llama-* or t5-* preset (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt-len", default="16,48", help="prompt lengths are drawn from this range (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side and batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build(args, out_dir: Path):
    import transformers as tf

    from llmstack import models
    from llmstack.models import hf

    family = models.family_of_preset(args.preset)
    if family not in ("gpt", "t5"):
        raise SystemExit(f"--preset {args.preset}: generation needs a gpt or t5 preset")
    torch.manual_seed(0)
    cfg = models.build_config(family, args.preset, args.vocab, dropout=0.0)
    ours = models.build_model(family, cfg)
    ours.init_weights()
    # no eos in the exported config: transformers then generates exactly --new-tokens, as we do
    hf.save_pretrained(family, cfg, dict(ours.state_dict()), out_dir, pad_id=0, bos_id=1, eos_id=None)
    auto = tf.AutoModelForSeq2SeqLM if family == "t5" else tf.AutoModelForCausalLM
    theirs = auto.from_pretrained(out_dir).eval().to(args.device)
    return ours.eval().to(args.device), theirs, family, cfg


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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from llmstack.generate import generate

    lo, hi = (int(x) for x in args.prompt_len.split(","))
    with tempfile.TemporaryDirectory() as d:
        ours, theirs, family, cfg = build(args, Path(d))
    n_params = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
    print(f"model: {args.preset} ({family}, {n_params / 1e6:.1f}M parameters, vocab {args.vocab}), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, greedy, {args.new_tokens} new tokens, prompts {lo}-{hi} tokens")
    print(f"{'batch':>5} | {'llmstack tok/s':>14} | {'transformers tok/s':>18} | {'speedup':>7} | same tokens")
    print("-" * 66)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompts_for(batch, lo, hi, args.vocab, seed=batch)
        ids, mask = hf_inputs(prompts, args.device)

        def run_ours():
            return generate(ours, prompts, max_new_tokens=args.new_tokens, pad_id=0)

        def run_theirs():
            with torch.inference_mode():
                return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                       do_sample=False, pad_token_id=0)

        a, b = run_ours(), run_theirs()  # warm-up (and the comparison)
        b = (b[:, ids.shape[1]:] if family == "gpt" else b[:, 1:]).tolist()
        same = a == b
        t_ours, t_theirs = [], []
        for _ in range(args.reps):  # alternate, so both sides see the same machine load
            for fn, acc in ((run_ours, t_ours), (run_theirs, t_theirs)):
                sync(args.device)
                t0 = time.perf_counter()
                fn()
                sync(args.device)
                acc.append(time.perf_counter() - t0)
        tokens = batch * args.new_tokens
        ours_tps, theirs_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_theirs)
        print(f"{batch:>5} | {ours_tps:>14.0f} | {theirs_tps:>18.0f} | {ours_tps / theirs_tps:>6.2f}x | "
              f"{'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
