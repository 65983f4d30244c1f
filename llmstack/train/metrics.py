"""Run metrics: metrics.jsonl, TensorBoard, a progress bar, and the FLOPs peak that MFU divides by."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

# Vendor dense peaks (FLOP/s) for MFU on GPUs (DESIGN.md "Measuring speed").
VENDOR_PEAK = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12}, "A100": {"bf16": 312e12, "fp32": 19.5e12}}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5, n: int = 1024) -> float:
    """Dense matmul FLOP/s measured now on this device: the best of short timed bursts of n x n matmuls.

    The operands come from a private generator: the stages measure after restoring a checkpoint's
    RNG state, and draws from the global generator there would shift every later dropout mask,
    so a resumed run would no longer repeat the uninterrupted one.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm up kernels / thread pool
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def vendor_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "bf16" if precision in ("bf16", "fp16") else "fp32"
    return next((p[key] for k, p in VENDOR_PEAK.items() if k in name), None)


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
            print(
                f"step {step}/{self.total} loss {loss}{val} lr {record['lr']:.3g} "
                f"tok/s {record.get('tokens_per_s', 0):.0f} mfu {100 * record.get('mfu', 0):.1f}% "
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
