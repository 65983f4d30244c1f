#!/usr/bin/env python
"""Time of one PPO step, split into generate / score (old + reference log-probs, values, reward
model) / train, and our rollout decoding against transformers' `generate` on the same model.

The step is the real one (llmstack.stages.ppo.ppo_step): actor and critic DeepSpeed engines,
frozen reference and reward models, random prompts of 16-48 tokens, sampled responses of
--new-tokens tokens, ppo.epochs passes of mini-batches. Models are randomly initialised (the
time of a step does not depend on what the weights know).

Generation comparison: the actor's weights exported with llmstack.models.hf and loaded by
transformers (GPT2LMHeadModel for gpt2-* presets); both sample (temperature 1, no top-k / top-p)
exactly --new-tokens tokens for the same left-padded batch. Medians of alternating repetitions in
one run: on a shared machine the ratio is the figure to read.

  python bench/ppo_step.py                                   # gpt2-tiny, CPU
  python bench/ppo_step.py --preset gpt2-small --layers 14   # ~48M parameters
  python bench/ppo_step.py --preset gpt2-350m --vocab 50304  # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PPO step time split (generate / score / train) and rollout decoding "
                                "speed against transformers generate.")
    p.add_argument("--preset", default="gpt2-tiny", help="a gpt2-* preset (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's n_layer")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16, help="rollouts per step (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8, help="PPO mini-batch (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs per rollout batch (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed PPO steps after one warm-up (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="generate repetitions per side (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as tf

    from llmstack import models
    from llmstack.config import PPOConfig
    from llmstack.distributed import env
    from llmstack.generate import generate
    from llmstack.models import hf
    from llmstack.models.heads import PolicyLM, ScalarHeadModel
    from llmstack.stages import common
    from llmstack.stages.policy import Sampler
    from llmstack.stages.ppo import PPOStep, Scorer
    from llmstack.train.run import ds_config_for
    from llmstack.train.trainer import StatWindow

    env.init("auto", 600)
    dev = env.device()
    fields = {"dropout": 0.0, **({"n_layer": args.layers} if args.layers else {})}
    arch = models.build_config("gpt", args.preset, args.vocab, **fields)
    cfg = PPOConfig.model_validate({
        "precision": args.precision, "rollout": {"batch": args.batch, "max_new_tokens": args.new_tokens},
        "ppo": {"epochs": args.epochs}, "train": {"micro_batch": args.micro_batch, "lr": 1e-5},
        "reward": {"function": "unused:unused"}})
    dsa = ds_config_for(cfg, 1, cfg.actor.zero, micro_batch=args.micro_batch, grad_accum=1, lr=1e-5)[0]
    dsf = ds_config_for(cfg, 1, cfg.reference.zero, micro_batch=args.batch, grad_accum=1, lr=1e-5)[0]
    actor = common.train_engine(common.build_model(arch, dsa, 0, 0, cls=PolicyLM), cfg.train, dsa)
    critic = common.train_engine(common.build_model(arch, dsa, 0, 1, cls=ScalarHeadModel), cfg.train, dsa)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    reference = common.build_model(arch, dsf, 0, 0, cls=PolicyLM).to(dev, dtype).eval()
    reward = common.build_model(arch, dsf, 0, 2, cls=ScalarHeadModel).to(dev, dtype).eval()
    scorer = Scorer(model=reward, end_ids=(8, 2), pad_id=0)
    n_params = actor.module.num_params()
    sampler = Sampler(actor, arch, 0, seed=cfg.seed, max_new_tokens=args.new_tokens, temperature=1.0, end_ids=(8, 2),
                      pad_id=0)
    four = SimpleNamespace(actor=actor, critic=critic, reference=reference, scorer=scorer, sampler=sampler,
                           end_ids=(8, 2), pad=0)

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(16, 49, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(9, args.vocab, (n,), generator=g).tolist() for n in lens]
    texts = [""] * args.batch
    ppo_step = PPOStep(cfg, four, prompts, texts, StatWindow())
    engines = SimpleNamespace(backward=lambda engine, loss: engine.backward(loss),
                              optimizer_step=lambda engine: engine.step())  # the Trainer's part of a step
    print(f"model: {args.preset}{f' x{args.layers} layers' if args.layers else ''} ({n_params / 1e6:.1f}M parameters "
          f"each for actor, critic, reference, reward), device {dev}, {args.precision}, torch threads "
          f"{torch.get_num_threads()}; {args.batch} rollouts x {args.new_tokens} new tokens, {args.epochs} epochs of "
          f"mini-batches of {args.micro_batch}")
    rows = []
    for step in range(args.steps + 1):
        ppo_step(engines, step)
        if step:  # the first step warms up kernels and allocators
            rows.append(ppo_step.history[-1])
    med = {k: statistics.median(r[k] for r in rows) for k in ("time_generate", "time_score", "time_train")}
    total = sum(med.values())
    print(f"PPO step (median of {len(rows)}): generate {med['time_generate']:.3f}s ({100 * med['time_generate'] / total:.0f}%)"
          f" | score {med['time_score']:.3f}s ({100 * med['time_score'] / total:.0f}%)"
          f" | train {med['time_train']:.3f}s ({100 * med['time_train'] / total:.0f}%) | total {total:.3f}s;"
          f" mean response {statistics.median(r['response_len'] for r in rows):.1f} tokens")

    # rollout decoding against transformers' generate on the same weights
    model = actor.module.eval()
    with tempfile.TemporaryDirectory() as d:
        state = {k: v.float().cpu() for k, v in model.state_dict().items()}
        hf.save_pretrained("gpt", arch, state, Path(d), pad_id=0, bos_id=1, eos_id=None)
        theirs = tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval().to(dev)
    L = max(lens)
    ids = torch.zeros(args.batch, L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(dev), mask.to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        return generate(model, prompts, max_new_tokens=args.new_tokens, temperature=1.0, pad_id=0,
                        generator=torch.Generator(device=dev).manual_seed(1))

    def hf_gen():
        with torch.inference_mode():
            return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                   temperature=1.0, pad_token_id=0)

    ours(), hf_gen()
    t_ours, t_hf = [], []
    for _ in range(args.reps):
        for fn, acc in ((ours, t_ours), (hf_gen, t_hf)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    tokens = args.batch * args.new_tokens
    a, b = tokens / statistics.median(t_ours), tokens / statistics.median(t_hf)
    print(f"rollout decoding, batch {args.batch}, sampling {args.new_tokens} tokens: llmstack {a:.0f} tok/s, "
          f"transformers generate {b:.0f} tok/s, speedup {a / b:.2f}x")
    env.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
