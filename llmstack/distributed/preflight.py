"""`llmstack preflight --hostfile FILE`: the same software and resources on every node, before launch.

Each host is probed (locally in a subprocess, remotely over ssh with the same Python path, as the
deepspeed launcher assumes a shared install): Python, torch, CUDA, deepspeed, transformers and
llmstack versions, GPU count and model, whether the rendezvous port is free on the first host, and
the NCCL settings in the environment. The table shows every host; any mismatch exits with 1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from llmstack.errors import UsageError

VERSION_KEYS = ("python", "torch", "cuda", "deepspeed", "transformers", "llmstack")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
# a hostfile name: host, user@host, an IPv4/IPv6 address; never an option (leading '-')
_HOST_RE = re.compile(r"[\w.%:@\[\]][\w.%:@\[\]-]*")


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """[(host, slots)] from a DeepSpeed hostfile ("host slots=N" per line, # comments)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"hostfile not found: {p}")
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(probe(int(sys.argv[2]))))
