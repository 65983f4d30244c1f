"""`llmstack preflight --hostfile FILE`: the same software and resources on every node, before launch.

Each host is probed (locally in a subprocess, remotely over ssh with the same Python path, as the
deepspeed launcher assumes a shared install): Python, torch, CUDA, deepspeed, transformers and
llmstack versions, GPU count and model, whether the rendezvous port is free on the first host, and
the NCCL settings in the environment. The table shows every host; any mismatch exits with 1.
A missing hostfile is an error (exit 2) pointing at launch/hostfile.example.

`check_cpu_pretrain`: before a pretraining run without GPUs does any work, its memory planner
estimate against this host's available memory (refused when it does not fit) and a lower bound of
its time per step (announced when long).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from llmstack.errors import UsageError

VERSION_KEYS = ("python", "torch", "cuda", "deepspeed", "transformers", "llmstack")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
# a hostfile name: host, user@host, an IPv4/IPv6 address; never an option (leading '-')
_HOST_RE = re.compile(r"[\w.%:@\[\]][\w.%:@\[\]-]*")
HOSTFILE_EXAMPLE = "launch/hostfile.example"


def missing_hostfile(path: Path) -> str:
    """The message for a hostfile that is not there: the one in launch/ is each cluster's own (git
    ignores it), made from the example."""
    what = f"hostfile {path} is a directory" if path.is_dir() else f"hostfile not found: {path}"
    return (f"{what}; copy the example there and list your nodes in it, one '<host> slots=<GPUs>' line each: "
            f"cp {HOSTFILE_EXAMPLE} {path}")


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """[(host, slots)] from a DeepSpeed hostfile ("host slots=N" per line, # comments)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(missing_hostfile(p))
    hosts = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise UsageError(f"{p}:{lineno}: expected '<host> slots=<N>', got {line!r}")
        if not _HOST_RE.fullmatch(parts[0]):
            raise UsageError(f"{p}:{lineno}: {parts[0]!r} is not a host name (letters, digits, '.', '-', '_', ':', "
                             "'@', '%', '[]'; not starting with '-')")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise UsageError(f"{p}: no hosts")
    return hosts


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def probe(port: int) -> dict:
    """Facts about this host (runs on the probed host)."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": version("deepspeed"),
        "transformers": version("transformers"),
        "llmstack": version("llmstack"),
        "gpus": gpus,
        "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
        "port_free": _port_free(port),
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
    }


def probe_argv(host: str, port: int, timeout: int = 60) -> list[str]:
    """The command that probes `host`: this Python locally, or over ssh for another host.

    The host comes after `--`, so a name that looks like an option (`-oProxyCommand=...`) cannot
    become one (parse_hostfile refuses such names too); the remote command is one shell-quoted
    string, since ssh hands it to the remote shell.
    """
    if host.startswith("-"):
        raise UsageError(f"{host!r} is not a host name")
    cmd = [sys.executable, "-m", "llmstack.distributed.preflight", "--probe", str(int(port))]
    if host in LOCAL_NAMES or host == socket.gethostname():
        return cmd
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={min(timeout, 15)}", "--", host, shlex.join(cmd)]


def collect(host: str, port: int, timeout: int = 60) -> dict:
    """Run the probe on `host` and return its facts, or {"host": host, "error": ...}."""
    cmd = probe_argv(host, port, timeout)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"host": host, "error": f"{type(e).__name__}: {e}"}
    if out.returncode != 0:
        return {"host": host, "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    facts["hostfile_name"] = host
    return facts


def compare(rows: list[dict], slots: list[int]) -> list[str]:
    """Problems that would make the launch fail or misbehave; [] if none."""
    problems = [f"{r['host']}: unreachable ({r['error']})" for r in rows if "error" in r]
    good = [(r, s) for r, s in zip(rows, slots) if "error" not in r]
    if not good:
        return problems
    ref = good[0][0]
    for r, _ in good[1:]:
        for k in VERSION_KEYS:
            if r.get(k) != ref.get(k):
                problems.append(f"{r['hostfile_name']}: {k} {r.get(k)} differs from {ref['hostfile_name']}'s {ref.get(k)}")
    if any(r["gpus"] for r, _ in good):  # a GPU cluster: every slot needs a GPU
        problems += [f"{r['hostfile_name']}: {s} slots but {r['gpus']} GPUs" for r, s in good if r["gpus"] < s]
    if not good[0][0]["port_free"]:
        problems.append(f"{ref['hostfile_name']}: rendezvous port is in use")
    return problems


def table(rows: list[dict], slots: list[int]) -> str:
    cols = ["host", "slots", *VERSION_KEYS, "gpus", "gpu_name", "port_free"]
    data = [[str(r.get("hostfile_name", r["host"])), str(s),
             *(str(r.get(k, "-")) if "error" not in r else "?" for k in cols[2:])] for r, s in zip(rows, slots)]
    widths = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*d) for d in data)])


def run(hostfile: str, port: int) -> int:
    hosts = parse_hostfile(hostfile)
    rows = [collect(h, port) for h, _ in hosts]
    slots = [s for _, s in hosts]
    print(table(rows, slots))
    nccl = {json.dumps(r.get("nccl_env"), sort_keys=True) for r in rows if "error" not in r}
    if len(nccl) > 1:
        print("note: NCCL_* settings differ between hosts")
    problems = compare(rows, slots)
    for p in problems:
        print(f"MISMATCH {p}")
    print("preflight: ok" if not problems else f"preflight: {len(problems)} problem(s)")
    return 1 if problems else 0


# --- a pretraining run without GPUs: does it fit this host, and how long would a step take? -------
#
# A config sized for GPUs (gpt-1.3b) started on a CPU machine used to train a tokenizer, build the
# model and the data loader, and then be killed for memory or crawl for hours per step. Memory
# that does not fit is refused: the run cannot succeed, and the estimate (stages/plan.py, within
# about 10% of the measured CPU peak, tests/distributed/test_plan.py) is known before any work. A
# slow step is only announced: a smoke test on CPU (model.n_layer=2, a smaller batch) is
# legitimate, and only the user knows how long they mean to wait.

SKIP_MEMORY_CHECK_ENV = "LLMSTACK_SKIP_MEMORY_CHECK"  # =1: start a CPU run that does not fit anyway
SLOW_STEP_S = 60.0  # a CPU step slower than this (at the matmul peak: a lower bound) is announced
CPU_PEAK_BOUND = 1e13  # FLOP/s no CPU process reaches: steps below SLOW_STEP_S at it need no measurement
GB = 1024**3


def available_memory() -> int | None:
    """Bytes this host can still give: MemAvailable, within a container's cgroup (v2) limit less
    what the container holds (page cache that can be dropped not counted); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    cg = Path("/sys/fs/cgroup")
    try:
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cg / "memory.current").read_text())
            stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
            avail = min(avail, int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h" if s < 3 * 86400 else f"{s / 86400:.0f} days"


def cpu_pretrain_check(cfg, *, world: int, local_procs: int, available: int | None,
                       peak_flops: Callable[[], float] | None) -> tuple[str | None, str | None]:
    """(refusal, note) for pretraining `cfg` in `world` CPU processes, `local_procs` of them on
    this host: a refusal when the memory planner's estimate for this host's processes exceeds
    `available` bytes, a note when one optimizer step would take more than SLOW_STEP_S at the
    matmul peak `peak_flops()` returns (FLOP/s of one process; called only for steps that could be
    that slow; None: not estimated). (None, None) for BERT and T5, which the planner does not model."""
    import torch

    from llmstack.distributed.deepspeed import resolve_batch
    from llmstack.models.gpt import GPT
    from llmstack.stages import plan
    from llmstack.stages.common import model_config

    if cfg.model.family != "gpt":
        return None, None
    t, seq = cfg.train, cfg.data.seq_len
    vocab = -(-cfg.tokenizer.vocab_size // 64) * 64  # as the model pads it; the tokenizer may not exist yet
    arch = model_config(cfg.model, vocab, seq, t.activation_checkpointing)
    micro, accum, global_batch = resolve_batch(t.micro_batch, t.grad_accum, t.global_batch, world)
    with torch.device("meta"):
        model = GPT(arch)
    est = plan.estimate(arch, seq_len=seq, micro_batch=micro, zero_stage=cfg.zero.stage, world=world,
                        precision=cfg.precision, offload_optimizer=cfg.zero.offload_optimizer,
                        offload_params=cfg.zero.offload_params, activation_checkpointing=t.activation_checkpointing,
                        device="cpu", grad_accum=accum, segments=cfg.data.doc_mask)
    need = est.total + est.host  # without a GPU, offloaded states stay in the same memory
    what = (f"{model.num_params() / 1e6:.0f}M parameters, ZeRO-{cfg.zero.stage}, {cfg.precision}, micro-batch "
            f"{micro} x {seq} tokens")
    memory = (f"the memory planner's estimate is {need / GB:.1f} GB per process (weights {est.weights / GB:.1f}, "
              f"gradients {(est.grads + est.grads_step) / GB:.1f}, optimizer "
              f"{(est.master + est.optimizer + est.host) / GB:.1f}, working set {est.working / GB:.1f} GB) "
              f"x {local_procs} "
              f"process{'es' if local_procs > 1 else ''} on this host")
    notes = []
    if available is not None and need * local_procs > available:
        if os.environ.get(SKIP_MEMORY_CHECK_ENV) != "1":
            return (f"this run does not fit this machine without a GPU ({what}): {memory} = "
                    f"{need * local_procs / GB:.1f} GB, and {available / GB:.1f} GB are available, so it would run "
                    "out of memory once the tokenizer, data and model are built. The config is sized for GPUs "
                    "(`llmstack plan CONFIG --gpus N --gpu-mem GB` shows what fits them); to try it on CPU, "
                    "shrink it (e.g. model.n_layer=2 train.global_batch=8 data.seq_len=256), or set "
                    f"{SKIP_MEMORY_CHECK_ENV}=1 to start it anyway"), None
        notes.append(f"{memory}, more than the {available / GB:.1f} GB available ({SKIP_MEMORY_CHECK_ENV}=1)")
    recompute = 4 / 3 if t.activation_checkpointing else 1.0  # one more forward per step
    step_flops = model.flops_per_token(seq) * recompute * global_batch * seq / world
    peak = peak_flops() if peak_flops and step_flops > SLOW_STEP_S * CPU_PEAK_BOUND else None
    if peak:
        step_s = step_flops / peak
        if step_s > SLOW_STEP_S:
            notes.append(f"on CPU one optimizer step ({global_batch} sequences x {seq} tokens, {what}) takes at "
                         f"least {_duration(step_s)} at this machine's measured matmul peak of "
                         f"{peak / 1e9:.0f} GFLOP/s per process, {_duration(step_s * t.max_steps)} for "
                         f"train.max_steps={t.max_steps}; for a CPU smoke test shrink the batch and sequence "
                         "too (train.global_batch / train.micro_batch, data.seq_len)")
            if not any(n.startswith("the memory") for n in notes) and available is not None:
                notes.append(f"{memory}, of {available / GB:.1f} GB available")
    return None, ("note: " + "; ".join(notes)) if notes else None


def check_cpu_pretrain(cfg, world: int) -> None:
    """Before a pretraining run's tokenizer, data and model work, without GPUs: refuse a run that
    cannot fit this host's memory (exit 2), announce one whose steps take minutes or more
    (`cpu_pretrain_check`). Rank 0 decides for every rank (the same verdict, so all exit together)."""
    import torch

    from llmstack.distributed import env

    if torch.cuda.is_available():
        return
    verdict = None
    if env.is_main():
        from llmstack.train.metrics import measure_matmul_peak

        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        verdict = cpu_pretrain_check(cfg, world=world, local_procs=local, available=available_memory(),
                                     peak_flops=lambda: measure_matmul_peak(torch.device("cpu"), dtype, seconds=0.2))
    error, note = env.broadcast_object(verdict)
    if error:
        raise UsageError(error)
    if note:
        env.print0(note, file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(probe(int(sys.argv[2]))))
