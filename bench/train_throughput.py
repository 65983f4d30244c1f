#!/usr/bin/env python
"""Training throughput and MFU: our GPT against Hugging Face GPT2LMHeadModel of the same size.

Both models get the same weights (ours copied into HF, checked by comparing logits), the same
token batches, the same torch AdamW (implementation and hyperparameters) and the same thread
settings. A timed step is a full training step: forward + loss, backward, optimizer step,
zero_grad. Steps of the two models are interleaved (the order alternating every round) and
each round also times one dense square matmul, so the throughputs and the matmul peak are
sampled under the same load; the figures are medians over rounds (DESIGN.md, "Measuring speed").

FLOPs per token follow the PaLM convention, 6N + 12*L*H*Q*T with N the matmul parameters (LM head
included); `GPT.flops_per_token(T)` implements it and the same figure is used for HF, whose
model has the same shapes. MFU = tokens/s * FLOPs/token / peak, against the matmul peak
measured in this run (and, on GPUs, against the vendor peak too).

CPU (default): preset gpt2-tiny, batch 8, seq 256, vocab 8192, fp32 then bf16 autocast.
  python bench/train_throughput.py
GPU: bf16 autocast, gpt2-124m / gpt2-350m at seq 1024, vocab 50257 by default.
  python bench/train_throughput.py --device cuda --preset gpt2-124m --batch 16

The last line printed is `ours/hf tokens/s ratio: R, MFU: M%` for the first dtype measured
(fp32 on CPU, bf16 on GPU unless --dtype says otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

H100_SXM_BF16_TFLOPS = 989.0  # dense, NVIDIA datasheet


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Training tokens/s and MFU of llmstack's GPT vs transformers.GPT2LMHeadModel (same size).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default=None, help="GPT preset (gpt2-* only: HF side is GPT-2); default gpt2-tiny on CPU, gpt2-124m on CUDA")
    p.add_argument("--batch", type=int, default=None, help="sequences per step; default 8 on CPU, 16 on CUDA")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    p.add_argument("--vocab", type=int, default=None, help="default 8192 on CPU, 50257 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model and dtype; default 30 on CPU, 50 on CUDA")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model and dtype first; default 4 on CPU, 10 on CUDA")
    p.add_argument(
        "--dtype", default=None,
        help="comma list of fp32, bf16 (bf16 = torch.autocast bfloat16, fp32 master weights); default fp32,bf16 on CPU, bf16 on CUDA",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run (both models); default: torch's default")
    p.add_argument(
        "--adamw", choices=["auto", "fused", "foreach"], default="auto",
        help="torch AdamW implementation, the same for both models; auto times both on our model's parameters and takes the faster",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--compile", action="store_true", help="torch.compile OUR model (nn.Module.compile(): inductor, in place, same state_dict names); eager otherwise")
    p.add_argument("--compile-hf", action="store_true", help="torch.compile the HF model too (same way)")
    p.add_argument("--peak-size", type=int, default=None, help="square matmul size for the peak; default: the fastest of 512/1024/2048 (CPU), 8192 (CUDA)")
    p.add_argument("--vendor-peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS, help="GPU only: vendor bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.preset = a.preset or ("gpt2-124m" if gpu else "gpt2-tiny")
    a.batch = a.batch or (16 if gpu else 8)
    a.vocab = a.vocab or (50257 if gpu else 8192)
    a.steps = a.steps or (50 if gpu else 30)
    a.warmup = a.warmup if a.warmup is not None else (10 if gpu else 4)
    a.dtype = [d.strip() for d in (a.dtype or ("bf16" if gpu else "fp32,bf16")).split(",") if d.strip()]
    for d in a.dtype:
        if d not in ("fp32", "bf16"):
            p.error(f"--dtype: unknown {d!r} (allowed: fp32, bf16)")
    if not a.preset.startswith("gpt2-"):
        p.error(f"--preset {a.preset}: the HF reference is GPT-2, use a gpt2-* preset")
    return a


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def build_models(args, dev):
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmstack.models.gpt import GPT, gpt_config_from_preset

    transformers.logging.set_verbosity_error()  # bos/eos id 50256 outside a 8192 vocab: irrelevant here
    cfg = gpt_config_from_preset(args.preset, args.vocab, dropout=0.0, attn_dropout=0.0)
    T = args.seq_len or cfg.max_seq_len
    if T > cfg.max_seq_len:
        raise SystemExit(f"error: --seq-len {T} exceeds {args.preset}'s max_seq_len {cfg.max_seq_len}")
    torch.manual_seed(args.seed)
    ours = GPT(cfg)
    ours.init_weights()
    hf_cfg = GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model, n_positions=cfg.max_seq_len,
        vocab_size=cfg.vocab_size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, attn_implementation="sdpa",
    )
    hf = GPT2LMHeadModel(hf_cfg)
    copy_weights_into_hf(ours, hf)
    ours.to(dev).train()
    hf.to(dev).train()
    return cfg, T, ours, hf


def copy_weights_into_hf(ours, hf) -> None:
    """Our state into GPT2LMHeadModel (Conv1D weights are (in, out): transposed Linear)."""
    import torch

    sd = ours.state_dict()
    tgt = {}
    tgt["transformer.wte.weight"] = sd["wte.weight"]
    tgt["transformer.wpe.weight"] = sd["wpe.weight"]
    for i in range(ours.config.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b, t in [
            ("ln_1", "ln_1", False), ("ln_2", "ln_2", False), ("attn.qkv", "attn.c_attn", True),
            ("attn.proj", "attn.c_proj", True), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True),
        ]:
            tgt[h + b + ".weight"] = sd[o + a + ".weight"].t() if t else sd[o + a + ".weight"]
            tgt[h + b + ".bias"] = sd[o + a + ".bias"]
    tgt["transformer.ln_f.weight"] = sd["ln_f.weight"]
    tgt["transformer.ln_f.bias"] = sd["ln_f.bias"]
    with torch.no_grad():
        params = dict(hf.named_parameters())
        if set(params) != set(tgt):
            raise SystemExit(f"error: HF parameter names differ: {sorted(set(params) ^ set(tgt))}")
        for k, v in tgt.items():
            if params[k].shape != v.shape:
                raise SystemExit(f"error: {k}: HF shape {tuple(params[k].shape)} vs ours {tuple(v.shape)}")
            params[k].copy_(v)


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------


def make_sync(dev):
    import torch

    if dev.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def matmul_gflops_fn(n, dtype, dev, reps):
    """Closure running `reps` (n x n) @ (n x n) matmuls; returns the FLOPs it did."""
    import torch

    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)

    def run():
        for _ in range(reps):
            torch.mm(a, b)
        return 2.0 * n**3 * reps

    return run


def pick_peak_size(args, dtype, dev, sync):
    """CPU: the square size (512/1024/2048) with the best median throughput, ~0.2 s per size."""
    if args.peak_size:
        return args.peak_size
    if dev.type == "cuda":
        return 8192
    best, best_n = 0.0, 1024
    for n in (512, 1024, 2048):
        fn = matmul_gflops_fn(n, dtype, dev, reps=1)
        fn()
        rates = []
        for _ in range(max(3, int(8 * (1024 / n) ** 3))):
            dt = timed(fn, sync)
            rates.append(2.0 * n**3 / dt)
        r = statistics.median(rates)
        if r > best:
            best, best_n = r, n
    return best_n


def choose_adamw(args, ours, dev, sync):
    """Median step time of fused vs foreach AdamW on our model's parameters (with gradients)."""
    import torch

    if args.adamw != "auto":
        return args.adamw, {}
    params = [p for p in ours.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    saved = [p.detach().clone() for p in params]
    opts = {k: torch.optim.AdamW(params, lr=1e-9, **{k: True}) for k in ("fused", "foreach")}
    times = {k: [] for k in opts}
    for i in range(12):
        for k, o in opts.items():
            dt = timed(o.step, sync)
            if i >= 2:
                times[k].append(dt)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    med = {k: statistics.median(v) for k, v in times.items()}
    return min(med, key=med.get), med


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'})"
        )
    dev = torch.device(args.device)
    sync = make_sync(dev)
    if args.threads:
        torch.set_num_threads(args.threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (no silent TF32) for both models and the peak
        torch.backends.cudnn.allow_tf32 = False

    import transformers

    cfg, T, ours, hf = build_models(args, dev)
    B = args.batch
    tokens_per_step = B * T
    flops_tok = ours.flops_per_token(T)
    n_hf = sum(p.numel() for p in hf.parameters())
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} logical cores"
    print(f"device: {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"torch threads: {torch.get_num_threads()} (both models)")
    print(f"model: {args.preset} (L={cfg.n_layer}, H={cfg.n_head}, C={cfg.d_model}, V={cfg.vocab_size}), batch {B} x seq {T} "
          f"= {tokens_per_step} tokens/step; params ours {ours.num_params():,} / HF {n_hf:,}; "
          f"matmul params N={ours.matmul_params():,}")
    print(f"FLOPs/token (PaLM, 6N + 12*L*H*Q*T): {flops_tok / 1e6:.2f} M; step = fwd + loss + bwd + AdamW step + zero_grad")

    # Same data for both: next-token targets of random tokens. HF shifts `labels` itself; we pass it
    # the already shifted targets as `shift_labels` so both models score the same B*T positions.
    g = torch.Generator().manual_seed(args.seed)
    data = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(dev) for _ in range(4)]
    batches = [(d[:, :T].contiguous(), d[:, 1:].contiguous()) for d in data]

    # same weights: logits must agree (fp32)
    with torch.no_grad():
        x0 = batches[0][0][:2]
        d_logits = (ours(x0) - hf(input_ids=x0).logits).abs().max().item()
        l_ours = ours(x0, labels=batches[0][1][:2]).item()
        l_hf = hf(input_ids=x0, labels=x0, shift_labels=batches[0][1][:2]).loss.item()
    print(f"same weights check: max |logits ours - HF| = {d_logits:.2e}; loss ours {l_ours:.5f}, HF {l_hf:.5f}")
    if not d_logits < 1e-3:
        raise SystemExit("error: the two models do not compute the same function")

    impl, impl_times = choose_adamw(args, ours, dev, sync)
    hp = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)
    opt_ours = torch.optim.AdamW(ours.parameters(), **hp, **{impl: True})
    opt_hf = torch.optim.AdamW(hf.parameters(), **hp, **{impl: True})
    timing = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in impl_times.items())
    print(f"optimizer: torch.optim.AdamW({impl}=True, lr={args.lr}, betas=(0.9, 0.95), eps=1e-8, "
          f"weight_decay={args.weight_decay}) for both" + (f"; step on our params: {timing}" if timing else ""))

    compiled = []  # compilation happens lazily, in the first (warm-up) steps
    if args.compile:
        ours.compile()
        compiled.append("ours")
    if args.compile_hf:
        hf.compile()
        compiled.append("hf")

    def step_fn(model, opt, is_ours, amp):
        it = [0]

        def step():
            x, y = batches[it[0] % len(batches)]
            it[0] += 1
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                if is_ours:
                    loss = model(x, labels=y)
                else:
                    loss = model(input_ids=x, labels=x, shift_labels=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step.last_loss = loss.detach()

        return step

    results = {}
    for dname in args.dtype:
        amp = dname == "bf16"
        mm_dtype = torch.bfloat16 if amp else torch.float32
        n = pick_peak_size(args, mm_dtype, dev, sync)
        peak_reps = max(1, round((1024 / n) ** 3 * (4 if dev.type == "cpu" else 1))) if dev.type == "cpu" else 20
        peak_fn = matmul_gflops_fn(n, mm_dtype, dev, reps=peak_reps)
        s_ours = step_fn(ours, opt_ours, True, amp)
        s_hf = step_fn(hf, opt_hf, False, amp)
        warm = {}
        for name, s in (("ours", s_ours), ("hf", s_hf)):
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                s()
            sync()
            warm[name] = time.perf_counter() - t0
        for name in compiled:
            print(f"torch.compile ({name}): the {args.warmup} {dname} warm-up steps took {warm[name]:.1f} s (compilation included)")
        peak_fn()
        t_ours, t_hf, peaks = [], [], []
        for i in range(args.steps):
            order = [(t_ours, s_ours), (t_hf, s_hf)]
            if i % 2:
                order.reverse()
            for acc, s in order:
                acc.append(timed(s, sync))
            dt = timed(peak_fn, sync)
            peaks.append(2.0 * n**3 * peak_reps / dt)
        m_ours, m_hf, peak = statistics.median(t_ours), statistics.median(t_hf), statistics.median(peaks)
        tps_ours, tps_hf = tokens_per_step / m_ours, tokens_per_step / m_hf
        r = dict(
            tps_ours=tps_ours, tps_hf=tps_hf, ratio=tps_ours / tps_hf, peak=peak, peak_n=n,
            mfu_ours=tps_ours * flops_tok / peak, mfu_hf=tps_hf * flops_tok / peak,
            loss_ours=s_ours.last_loss.item(), loss_hf=s_hf.last_loss.item(),
            spread_ours=(min(t_ours), max(t_ours)), spread_hf=(min(t_hf), max(t_hf)),
        )
        results[dname] = r
        unit, scale = ("TFLOP/s", 1e12) if dev.type == "cuda" else ("GFLOP/s", 1e9)
        label = f"{dname} (torch.autocast bfloat16)" if amp else dname
        print(f"\n== {label}: {args.steps} interleaved steps per model after {args.warmup} warm-up, medians ==")
        print(f"  matmul peak ({dname}, {n}x{n} square, median over rounds): {peak / scale:.1f} {unit}")
        for who, tps, mfu, mt, sp, loss in (
            ("ours", tps_ours, r["mfu_ours"], m_ours, r["spread_ours"], r["loss_ours"]),
            ("HF  ", tps_hf, r["mfu_hf"], m_hf, r["spread_hf"], r["loss_hf"]),
        ):
            extra = ""
            if dev.type == "cuda" and amp:
                extra = f", MFU vs vendor {args.vendor_peak_tflops:.0f} TFLOP/s: {100 * tps * flops_tok / (args.vendor_peak_tflops * 1e12):.1f}%"
            print(f"  {who} {tps:9.0f} tokens/s  step {mt * 1e3:7.1f} ms (min {sp[0] * 1e3:.1f}, max {sp[1] * 1e3:.1f})  "
                  f"{tps * flops_tok / scale:7.1f} {unit}  MFU {100 * mfu:5.1f}%{extra}  last loss {loss:.4f}")
        print(f"  ours/HF tokens/s ratio: {r['ratio']:.3f}")

    unit, scale = ("TFLOP/s", 1e12) if dev.type == "cuda" else ("GFLOP/s", 1e9)
    print("\nsummary: " + "; ".join(
        f"{d}: ours {r['tps_ours']:.0f} tok/s, HF {r['tps_hf']:.0f} tok/s, ratio {r['ratio']:.3f}, "
        f"MFU ours {100 * r['mfu_ours']:.1f}% / HF {100 * r['mfu_hf']:.1f}% of measured {r['peak'] / scale:.0f} {unit}"
        for d, r in results.items()))
    first = results[args.dtype[0]]
    print(f"ours/hf tokens/s ratio: {first['ratio']:.3f}, MFU: {100 * first['mfu_ours']:.1f}%")


if __name__ == "__main__":
    main()
