#!/usr/bin/env python
"""Time of one GRPO step, split into generate / score (the actor's old log-probs, the reference's
with --kl-coef, the verifier, group advantages) / train, for one or more model sizes.

The step is the real one (llmstack.stages.grpo.GRPOStep): a DeepSpeed actor engine, the
KV-cache sampler on its weights, --prompts prompts of the demo arithmetic task (builtin-arith,
encoded with a BPE tokenizer trained at start, offline) x --group-size completions of at most
--new-tokens tokens, the numeric_answer verifier on the decoded completions, then grpo.epochs
passes of mini-batches of --micro-batch completions. Models are randomly initialised (the time of
a step does not depend on what the weights know; an untrained model rarely samples a stop token,
so completions run close to --new-tokens). Figures are medians over --steps timed steps after one
warm-up; the generation share is the figure to read (what faster rollouts would save).

  python bench/grpo_step.py                                   # gpt2-tiny (~5M), gpt2-small (~23M), CPU
  python bench/grpo_step.py --models gpt2-small:4 --steps 5   # one model, 4 layers
  python bench/grpo_step.py --models gpt2-124m --precision bf16 --prompts 16 --new-tokens 128   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-tiny", "gpt2-small"], metavar="PRESET[:LAYERS]",
                   help="gpt2-* presets, each optionally with its n_layer (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the tokenizer trained at start "
                   "(default: %(default)s)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="completion budget (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=16, help="completions per micro-batch and optimizer step "
                   "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="grpo.epochs (default: %(default)s)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="grpo.kl_coef; > 0 builds the frozen reference "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from data_pipeline.formats import chat_tokens
    from data_pipeline.pairs import load_tasks
    from data_pipeline.sources import builtin_texts
    from data_pipeline.tokenizer import train_tokenizer
    from llmstack import models
    from llmstack.config import GRPOConfig
    from llmstack.distributed import deepspeed as ds
    from llmstack.distributed import env
    from llmstack.models.heads import PolicyLM
    from llmstack.stages import common
    from llmstack.stages.grpo import GRPOStep
    from llmstack.stages.policy import Sampler
    from llmstack.train.run import ds_config_for
    from llmstack.train.trainer import StatWindow

    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as d:
        tok = train_tokenizer(builtin_texts("train"), Path(d) / "tok", kind="bpe", vocab_size=args.vocab,
                              num_sentinels=0, max_chars=5_000_000)
    cfg = GRPOConfig.model_validate({
        "precision": args.precision,
        "rollout": {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.new_tokens},
        "grpo": {"epochs": args.epochs, "kl_coef": args.kl_coef},
        "train": {"micro_batch": args.micro_batch, "lr": 1e-5},
        "reward": {"function": "llmstack.rlhf.verifiers:numeric_answer"}})
    prompts, texts, references, _ = load_tasks(cfg.data.sources, tok, cfg.data.max_prompt_len, "skip",
                                               cfg.data.reference_field)
    chat = chat_tokens(tok)
    end_ids, pad = (chat["end"], chat["eos"]), tok.pad_id or 0

    env.init("auto", 600)
    dev = env.device()
    engines = SimpleNamespace(backward=lambda engine, loss: engine.backward(loss),
                              optimizer_step=lambda engine: engine.step())  # the Trainer's part of a step
    print(f"device {dev}, {args.precision}, torch threads {torch.get_num_threads()}; {args.prompts} prompts x "
          f"{args.group_size} completions of <= {args.new_tokens} tokens (builtin-arith, vocab {tok.vocab_size}), "
          f"{args.epochs} epoch(s) of mini-batches of {args.micro_batch}, kl_coef {args.kl_coef}; "
          f"median of {args.steps} steps after one warm-up")
    for spec in args.models:
        preset, _, layers = spec.partition(":")
        fields = {"dropout": 0.0, **({"n_layer": int(layers)} if layers else {})}
        arch = models.build_config("gpt", preset, tok.vocab_size, **fields)
        dsa = ds_config_for(cfg, 1, cfg.actor.zero, micro_batch=args.micro_batch, lr=1e-5)[0]
        actor = common.train_engine(common.build_model(arch, dsa, 0, cfg.seed, cls=PolicyLM), cfg.train, dsa)
        reference = None
        if args.kl_coef > 0:
            dsf = ds_config_for(cfg, 1, cfg.reference.zero, micro_batch=args.micro_batch, grad_accum=1)[0]
            reference = ds.create_inference_engine(common.build_model(arch, dsf, 0, cfg.seed, cls=PolicyLM), dsf)
        sampler = Sampler(actor, arch, 0, seed=cfg.seed, max_new_tokens=args.new_tokens, temperature=1.0,
                          end_ids=end_ids, pad_id=pad)
        m = SimpleNamespace(actor=actor, reference=reference, sampler=sampler, tokenizer=tok)
        step_fn = GRPOStep(cfg, m, prompts, texts, references, StatWindow())
        rows = []
        for step in range(args.steps + 1):
            step_fn(engines, step)
            if step:  # the first step warms up kernels and allocators
                rows.append(step_fn.history[-1])
        med = {k: statistics.median(r[k] for r in rows) for k in ("time_generate", "time_score", "time_train")}
        total = sum(med.values())
        share = {k: 100 * v / total for k, v in med.items()}
        n_params = actor.module.num_params()
        print(f"{spec:<14} {n_params / 1e6:5.1f}M params | generate {med['time_generate']:.3f}s "
              f"({share['time_generate']:.0f}%) | score {med['time_score']:.3f}s ({share['time_score']:.0f}%) | "
              f"train {med['time_train']:.3f}s ({share['time_train']:.0f}%) | total {total:.3f}s | mean completion "
              f"{statistics.median(r['response_len'] for r in rows):.1f} tokens | generation share: "
              f"{share['time_generate']:.0f}%")
        del step_fn, m, sampler, actor, reference  # one model's engines at a time
    env.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
