"""Run metrics: metrics.jsonl, TensorBoard, a progress bar; MFU, its FLOPs counts and the peak it divides by."""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# Rated dense peaks (FLOP/s, no structured sparsity) of known accelerators, by the compute type
# of a run's matmuls: bf16 / fp16 tensor cores (fp32 accumulate), TF32 tensor cores (fp32 runs
# with torch.backends.cuda.matmul.allow_tf32), plain fp32. Datasheet figures, sparse ones halved.
# Entries are tried in order; the first whose pattern matches torch.cuda.get_device_name wins
# (so "H100 PCIe" before "H100", whose bare names are the SXM part). A device or compute type
# missing here is measured instead (measure_matmul_peak).
RATED_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"\bgh200\b", "GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bh200\b.*\bnvl\b", "H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bh200\b", "H200 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"\bh100\b.*\bnvl\b", "H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bh100\b", "H100 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\ba100\b", "A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    # the A10G is the A10's cloud variant; NVIDIA publishes no sheet of its own: the A10's figures
    (r"\ba10g?\b", "A10 / A10G", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bl40s\b", "L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bl40\b", "L40", {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bl4\b", "L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    # Volta and Turing have fp16 tensor cores only: a bf16 run there is measured
    (r"\bv100s\b", "V100S PCIe", {"fp16": 130e12, "fp32": 16.4e12}),
    (r"\bv100\b.*\bpcie\b", "V100 PCIe", {"fp16": 112e12, "fp32": 14e12}),
    (r"\bv100\b", "V100 SXM2", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bt4\b", "T4", {"fp16": 65e12, "fp32": 8.1e12}),
    # GeForce: tensor-core figures with fp32 accumulate (what torch's matmuls use)
    (r"\brtx 4090\b", "RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\brtx 3090\b", "RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"\bmi300x\b", "MI300X", {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
]

# A measured peak is measured again at the first log line (side by side with the first window),
# then at a log line once this long has passed since the last measurement, or sooner when a
# window ran faster than it (see mfu_fields); the best is kept.
REMEASURE_EVERY_S = 10.0
REMEASURE_S = 0.2  # the length of a later measurement (the first takes device_peak's `seconds`)


def rated_peak(device_name: str, compute: str) -> tuple[str, float] | None:
    """(table entry, FLOP/s) of the first RATED_PEAKS entry matching `device_name` (as
    torch.cuda.get_device_name gives it) with a figure for `compute` (bf16, fp16, tf32, fp32);
    None for a device or compute type the table does not know."""
    name = device_name.lower()
    for pattern, label, peaks in RATED_PEAKS:
        if re.search(pattern, name):
            return (label, peaks[compute]) if compute in peaks else None
    return None


def compute_type(precision: str, device: torch.device) -> str:
    """What a run's matmuls compute in: bf16 / fp16 for those precisions; for fp32, tf32 when
    torch lets CUDA matmuls use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 or
    torch.set_float32_matmul_precision("high" / "medium")), else fp32."""
    if precision in ("bf16", "fp16"):
        return precision
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def _operands(device: torch.device, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A private generator: the stages measure after restoring a checkpoint's RNG state, and draws
    # from the global generator there would shift every later dropout mask, so a resumed run would
    # no longer repeat the uninterrupted one.
    gen = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(n, n, device=device, generator=gen).to(dtype),
            torch.randn(n, n, device=device, generator=gen).to(dtype))


def _timed_matmuls(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return time.perf_counter() - t


def matmul_size(device: torch.device, dtype: torch.dtype = torch.float32, min_seconds: float = 0.02,
                max_seconds: float = 0.25) -> int:
    """The square size a peak measurement uses on this device and dtype: from 512, doubled while
    one matmul takes < min_seconds (at most 4096 on CPU, 8192 on GPU) or the size is below 1024
    and the next one would stay under max_seconds, or halved while one takes > max_seconds (to
    128: bf16 emulated by a CPU without bf16 units runs at ~1 GFLOP/s). A matmul too small for
    the device (thread wake-up and barriers, kernel launch) understates the peak, so that MFU
    would overstate, and on a busy shared CPU a small one suffers most."""
    def fastest(size: int) -> float:
        a, b = _operands(device, dtype, size)
        t = _timed_matmuls(a, b, 1)  # warms up; already too slow is slow enough
        return t if t > max_seconds else min(t, _timed_matmuls(a, b, 1))

    n, largest = 512, 8192 if device.type == "cuda" else 4096
    t = fastest(n)
    while t > max_seconds and n > 128:
        n //= 2
        t = fastest(n)
    while n < largest and (t < min_seconds or (n < 1024 and 8 * t <= max_seconds)):
        n *= 2
        t = fastest(n)
    return n


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5,
                        n: int | None = None) -> float:
    """Dense matmul FLOP/s measured now on this device, with this process's threads (torch's
    intra-op pool, which the model's matmuls use too): the best of timed bursts of two n x n
    matmuls during `seconds` (at least one burst). `n`: default matmul_size's."""
    n = n or matmul_size(device, dtype)
    a, b = _operands(device, dtype, n)
    _timed_matmuls(a, b, 1)  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        best = max(best, 2 * 2 * n**3 / _timed_matmuls(a, b, 2))
        if time.perf_counter() >= deadline:
            return best


@dataclass
class Peak:
    """The FLOP/s of one rank that MFU divides by: a rated (datasheet) figure, or one measured on
    this machine during the run (CPUs, accelerators the table does not know), which
    `remeasure` raises to the best measurement so far: the peak is what the hardware can do,
    and a shared machine shows it only when it is not busy with other work."""

    flops: float
    source: str  # "rated" | "measured"
    device: str
    compute: str  # bf16, fp16, tf32, fp32
    measure: Callable[[], float] | None = field(default=None, repr=False, compare=False)
    measured_at: float | None = field(default=None, repr=False, compare=False)  # last remeasure (monotonic)

    def __float__(self) -> float:
        return float(self.flops)

    def remeasure(self) -> float:
        """Measure again (a measured peak) and keep the best; returns the peak."""
        if self.measure is not None:
            self.flops = max(self.flops, self.measure())
            self.measured_at = time.monotonic()
        return self.flops

    def describe(self) -> str:
        unit, scale = ("TFLOP/s", 1e12) if self.flops >= 1e12 else ("GFLOP/s", 1e9)
        return f"{self.flops / scale:.1f} {unit} {self.compute}, {self.source} ({self.device})"

    def as_dict(self) -> dict:
        return {"flops": self.flops, "source": self.source, "device": self.device, "compute": self.compute}


def device_peak(device: torch.device, precision: str, seconds: float = 0.5) -> Peak:
    """The rated dense peak of this device for the run's precision (RATED_PEAKS), or, on a CPU
    or an accelerator the table does not know, a peak measured now at the run's dtype."""
    compute = compute_type(precision, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rated = rated_peak(name, compute)
        if rated is not None:
            return Peak(rated[1], "rated", f"{name}: {rated[0]} datasheet", compute)
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = matmul_size(device, dtype)
    measure = lambda: measure_matmul_peak(device, dtype, seconds=REMEASURE_S, n=n)  # noqa: E731
    first = measure_matmul_peak(device, dtype, seconds=seconds, n=n)
    return Peak(first, "measured", f"{device.type}: {name}, {n}x{n} matmuls", compute, measure=measure)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform's), or "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | Peak, world: int = 1) -> float:
    """Model FLOPs utilisation, the one definition every stage logs (DESIGN.md "Measuring speed"):
    the model FLOPs the run did per second, tokens_per_s (all ranks) x flops_per_token (the PaLM
    count 6N + 12·L·H·Q·T for training; a stage with several models or forward-only passes sums
    them per token), over the peak of the `world` ranks (`peak`: one rank's FLOP/s)."""
    return tokens_per_s * flops_per_token / (float(peak) * world)


def mfu_fields(peak: Peak, tokens_per_s: float, flops_per_token: float, world: int) -> dict:
    """The metrics fields of a logged window: mfu and the peak_flops it divides by. A measured
    peak is measured again at the first window, when REMEASURE_EVERY_S has passed, or when the
    window ran faster than the peak allows (mfu > 1: the peak was measured while the machine was
    busier); what is logged is then against the new best, whatever it gives (never clamped)."""
    value = mfu(tokens_per_s, flops_per_token, peak, world)
    due = peak.measured_at is None or time.monotonic() - peak.measured_at >= REMEASURE_EVERY_S
    if peak.measure is not None and (value > 1 or due):
        value = mfu(tokens_per_s, flops_per_token, peak.remeasure(), world)
    return {"mfu": value, "peak_flops": peak.flops}


def record_peak(run_dir: Path, peak: Peak) -> None:
    """Add the peak (flops, source rated / measured, device, compute type) to run_dir/run.json
    as "mfu_peak" (the stage wrote run.json before; a missing one is started)."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    info["mfu_peak"] = peak.as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, default=str))


@dataclass(frozen=True)
class ModelFlops:
    """The PaLM count of one decoder-style model (DESIGN.md "Measuring speed"): N parameters in
    matmuls (Linear weights, the LM or scalar head included, lookup embeddings excluded),
    L layers of attention H·Q wide; `head`: the part of N in the output head, which some passes
    apply to only some positions (an RL policy's log-probs: the response tokens)."""

    n_matmul: int
    layers: int
    attn_dim: int
    head: int = 0

    def per_token(self, seq_len: float, *, train: bool = True) -> float:
        """FLOPs per token at sequence length T: forward 2N + 4·L·H·Q·T; training (forward and
        backward, twice the forward) 6N + 12·L·H·Q·T."""
        forward = 2 * self.n_matmul + 4 * self.layers * self.attn_dim * seq_len
        return 3 * forward if train else forward

    def flops(self, tokens: float, seq_len: float, *, head_tokens: float | None = None, train: bool = True) -> float:
        """FLOPs of a pass over `tokens` tokens (per_token's count), the head applied to
        `head_tokens` of them (default: all)."""
        head_tokens = tokens if head_tokens is None else head_tokens
        forward = tokens * self.per_token(seq_len, train=False) - 2 * self.head * (tokens - head_tokens)
        return 3 * forward if train else forward


def rollout_flops(valid: torch.Tensor, prompt_len: int, passes: list[tuple[ModelFlops, bool]]) -> float:
    """Model FLOPs of `passes` (model, train: forward + backward or forward only) over the rows
    of an RL rollout: `valid` (B, P + R) marks each row's real tokens, left-padded prompts in
    the first P columns then the response. Every pass runs over every real token, its head over
    the response tokens (a sampler's logits, log-probs, values); T is the rows' token-weighted
    mean length. Sampling with a KV cache counts as one forward over the rows: the same matmuls
    token by token, attention counted without the causal discount, as for training."""
    lengths = valid.sum(-1).tolist()
    tokens, head_tokens, seq = sum(lengths), float(valid[:, prompt_len:].sum()), attention_len(lengths)
    return sum(m.flops(tokens, seq, head_tokens=head_tokens, train=train) for m, train in passes)


def matmul_params(model: torch.nn.Module) -> int:
    """N of the PaLM count: the weights of every Linear (a head tied to the embedding included),
    and of transformers' Conv1D (GPT-2-style models under model.backend=hf)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def attention_len(lengths) -> float:
    """The T of the attention term for sequences of these lengths: their token-weighted mean
    length sum(L²) / sum(L), so that per-token 12·L·H·Q·T summed over all tokens is each
    sequence's 12·L·H·Q·L_i² (the convention's count of its attention)."""
    lengths = [int(x) for x in lengths]
    return sum(x * x for x in lengths) / max(1, sum(lengths))


def json_safe(value):
    """`value` with every non-finite float (NaN, inf: a diverged loss, an overflowed gradient norm)
    replaced by None, so it serialises as strict JSON (null) that every JSON parser reads."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsLogger:
    """Writes one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

    Only rank 0 writes; other ranks get a logger whose methods do nothing. Lines are strict JSON:
    a non-finite value is written as null (the console line still shows nan / inf).
    """

    def __init__(self, run_dir: Path | None, *, total_steps: int, start_step: int, progress: bool):
        self.enabled = run_dir is not None
        self.bar = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
            self.tb = None
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "val_loss", "lr", "tokens_per_s", "mfu") if k in record}
            self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False)
        elif "loss" in record:  # no terminal for a bar (logs, CI): one plain line per logged step
            step = record["step"]
            eta = (time.perf_counter() - self.t0) / max(1, step - self.start) * (self.total - step)
            val = f" val_loss {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
            loss = f"{record['loss']:.4f}" if record["loss"] is not None else "none"
            skipped = " (update skipped: not finite)" if record.get("skipped") else ""
            mfu_shown = f"mfu {100 * record['mfu']:.1f}% " if record.get("mfu") is not None else ""
            print(
                f"step {step}/{self.total} loss {loss}{val} lr {record['lr']:.3g} "
                f"tok/s {record.get('tokens_per_s', 0):.0f} {mfu_shown}"
                f"eta {eta:.0f}s{skipped}",
                flush=True,
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
