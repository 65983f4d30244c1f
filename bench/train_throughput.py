#!/usr/bin/env python
"""Training throughput and MFU of the engine `llmstack pretrain` runs.

The model, the DeepSpeed engine (ZeRO stage, precision, optimizer, gradient clipping: the
ds_config the pretraining stage generates from the same config), the step (MicroBatches through
the Trainer, its RunGuard included) and the MFU figure (train/metrics.mfu against
stages/common.peak_flops) are the stage's own; only the data differs: random token batches, so
that the figure is the engine's and not the data pipeline's. One process (a single rank).

FLOPs per token: the PaLM count 6N + 12*L*H*Q*T (DESIGN.md "Measuring speed", GPT.flops_per_token).
MFU is printed against the peak the training logs use, the device's rated (datasheet) dense peak
on a known GPU, and against a matmul peak measured after every step (square matmuls sized as
the stage's measured peak sizes them, at the run's dtype, with the same threads), whose median
is taken side by side with the steps' (on a shared machine an absolute figure alone means little).

CPU (default): configs/pretrain/gpt-tiny.yaml (4 layers, width 256, seq 256, micro-batch 8), fp32, ZeRO-1.
  python bench/train_throughput.py
  python bench/train_throughput.py --zero-stage 3 --precision bf16
GPU: configs/pretrain/gpt-124m.yaml (bf16, seq 1024, micro-batch 16), ZeRO-1.
  python bench/train_throughput.py --config configs/pretrain/gpt-124m.yaml
Any pretraining config key may follow as key=value (model.preset=gpt2-350m, train.micro_batch=8, ...).

The last line printed is `MFU: M% of the <rated|measured> peak (P FLOP/s), T tokens/s`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without install


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Tokens/s and MFU of the DeepSpeed engine `llmstack pretrain` builds (random token batches, one process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None,
                   help="pretraining config (GPT family); default configs/pretrain/gpt-tiny.yaml, or gpt-124m.yaml with a GPU")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default: the config's zero.stage")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: the config's precision")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the config's train.micro_batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps; default 20 on CPU, 50 on GPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 3 on CPU, 10 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's default")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    config = args.config or str(REPO / "configs/pretrain" / ("gpt-124m.yaml" if gpu else "gpt-tiny.yaml"))
    steps = args.steps or (50 if gpu else 20)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    from llmstack.config import PretrainConfig
    from llmstack.config_loading import load_config
    from llmstack.distributed import env
    from llmstack.stages import common
    from llmstack.stages.pretrain import causal_lm_loss
    from llmstack.train import metrics
    from llmstack.train import run as train_run
    from llmstack.train.trainer import Callback, MicroBatches, Trainer

    tmp = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    overrides = [f"run.dir={tmp / 'run'}", "train.global_batch=null", f"train.grad_accum={args.grad_accum}",
                 f"train.max_steps={warmup + steps}", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
                 "train.progress=false", "train.resume=none", "train.warmup_steps=0"]
    for key, value in (("zero.stage", args.zero_stage), ("precision", args.precision),
                       ("train.micro_batch", args.micro_batch), ("data.seq_len", args.seq_len)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(PretrainConfig, config, [*overrides, *args.overrides])
    if cfg.model.family != "gpt":
        raise SystemExit(f"error: {config}: model.family={cfg.model.family}; this benchmark feeds causal-LM batches "
                         "(a gpt-family config)")
    t, T = cfg.train, cfg.data.seq_len
    run = train_run.start(cfg)
    vocab = -(-cfg.tokenizer.vocab_size // 64) * 64  # as the stage pads the tokenizer's vocabulary
    arch = common.model_config(cfg.model, vocab, T, t.activation_checkpointing)
    model = common.build_model(arch, run.ds_config, cfg.zero.stage, cfg.seed)
    engine = common.train_engine(model, t, run.ds_config)
    params, flops_tok = common.model_stats(arch, T)
    dev = env.device()

    gen = torch.Generator().manual_seed(cfg.seed)
    pool = [torch.randint(0, vocab, (t.micro_batch, T + 1), generator=gen) for _ in range(4)]

    def batches():
        i = 0
        while True:
            x = pool[i % len(pool)]
            i += 1
            yield {"input_ids": x[:, :T].contiguous(), "labels": x[:, 1:].contiguous()}

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {metrics.cpu_name()}"
    print(f"device: {name}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"config: {Path(config).name}: {cfg.model.preset or 'custom'} (L={arch.n_layer}, H={arch.n_head}, "
          f"C={arch.d_model}, V={vocab}), {params / 1e6:.1f}M parameters; ZeRO-{cfg.zero.stage}, {cfg.precision}, "
          f"micro-batch {t.micro_batch} x accum {run.accum} x seq {T} = {run.global_batch * T} tokens/step")
    print(f"FLOPs/token (PaLM, 6N + 12*L*H*Q*T): {flops_tok / 1e6:.2f} M; a step: the Trainer's, through the engine "
          f"({warmup} warm-up + {steps} timed)")
    peak = common.peak_flops(cfg.precision)  # the stage's: rated on a known GPU, else measured now
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    n = metrics.matmul_size(dev, dtype)
    side = []  # a matmul peak measured after every step: side by side with the step times

    class SideBySide(Callback):
        def on_step_end(self, trainer, step):
            side.append(metrics.measure_matmul_peak(dev, dtype, seconds=0.05, n=n))

    tokens_per_step = run.global_batch * T
    trainer = Trainer(t, [(engine, t.lr)], MicroBatches(engine, batches(), causal_lm_loss, run.accum),
                      run_dir=run.dir, tokens_per_step=tokens_per_step, flops_per_token=flops_tok, peak_flops=peak,
                      callbacks=[SideBySide()])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's own per-step lines
        trainer.fit()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    achieved = tps * flops_tok
    measured = statistics.median(side[warmup:])
    unit, scale = ("TFLOP/s", 1e12) if dev.type == "cuda" else ("GFLOP/s", 1e9)

    print(f"\n{len(timed)} timed steps (medians), {wall:.1f} s in all; final loss {rows[-1]['loss']:.4f}")
    print(f"  tokens/s {tps:.0f} (min {min(r['tokens_per_s'] for r in timed):.0f}, "
          f"max {max(r['tokens_per_s'] for r in timed):.0f}); model {achieved / scale:.2f} {unit}")
    print(f"  matmul peak measured after each step ({n}x{n}, {cfg.precision}): median {measured / scale:.2f} {unit} "
          f"-> MFU {100 * metrics.mfu(tps, flops_tok, measured):.1f}%")
    if peak.source == "rated":
        print(f"  rated peak: {peak.describe()} -> MFU {100 * metrics.mfu(tps, flops_tok, peak):.1f}%")
    logged = statistics.median(r["mfu"] for r in timed)
    print(f"  the training log's mfu (median): {100 * logged:.1f}% against {peak.describe()}")
    ref = peak if peak.source == "rated" else measured
    print(f"MFU: {100 * metrics.mfu(tps, flops_tok, ref):.1f}% of the {peak.source} peak "
          f"({float(ref) / scale:.2f} {unit}), {tps:.0f} tokens/s")


if __name__ == "__main__":
    main()
