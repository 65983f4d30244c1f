"""Launch commands derived from a scheduler's environment (SLURM today).

launch/slurm.sbatch stays a thin script: it runs one task per node, and each task calls
`python -m llmstack.distributed.launch slurm -- ARGS`, which works out this node's torchrun command from
the SLURM variables (nodes, node id, GPUs, the first host of the allocation as rendezvous) and
execs it. Keeping the logic here makes it unit-testable without a cluster.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from typing import Mapping


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compact host list -> host names: "gpu-[01-03,07],cpu5" -> gpu-01 gpu-02 gpu-03 gpu-07 cpu5.

    Zero padding of ranges is kept (01-03 -> 01, 02, 03); several bracket groups in one name
    expand as a product, as SLURM does.
    """
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", spec):
        names = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            parts = [literal]
            if group:
                parts = []
                for rng in group.split(","):
                    lo, _, hi = rng.partition("-")
                    if not hi:
                        parts.append(literal + lo)
                        continue
                    if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                        raise ValueError(f"bad host range {rng!r} in {spec!r}")
                    parts.extend(f"{literal}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            names = [n + p for n in names for p in parts]
        hosts.extend(n for n in names if n)
    return hosts


def slurm_torchrun_command(env: Mapping[str, str], args: list[str], *, port: int = 29500,
                           nproc_per_node: int | None = None) -> list[str]:
    """The torchrun command for this node of a SLURM allocation (one task per node).

    Rendezvous is c10d on the allocation's first host; the job id names the rendezvous so two
    jobs on shared nodes never join each other.
    """
    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID") if k not in env]
    if missing:
        raise ValueError(f"not inside a SLURM job step: {', '.join(missing)} unset (run under sbatch/srun)")
    nodes, node_rank = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    master = expand_hostlist(env["SLURM_JOB_NODELIST"])[0]
    if nproc_per_node is None:
        # --gpus-per-node=8 or --gpus-per-node=h100:8 -> 8; no GPUs requested -> one process
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "1")
        nproc_per_node = int(gpus.rsplit(":", 1)[-1])
    return [
        "torchrun", f"--nnodes={nodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{port}", f"--rdzv_id=llmstack-{env['SLURM_JOB_ID']}",
        "-m", "llmstack", *args,
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmstack.distributed.launch",
                                description="Run this node's part of a multi-node job from the scheduler's environment.")
    sub = p.add_subparsers(dest="scheduler", required=True)
    s = sub.add_parser("slurm", help="torchrun from SLURM variables (one srun task per node)")
    s.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    s.add_argument("--nproc-per-node", type=int, help="default: SLURM_GPUS_ON_NODE, else 1")
    s.add_argument("--print", action="store_true", help="print the command instead of running it")
    s.add_argument("args", nargs=argparse.REMAINDER, help="-- then the llmstack arguments, e.g. -- pretrain CONFIG")
    ns = p.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if not args:
        p.error("no llmstack arguments given (e.g. -- pretrain configs/pretrain/gpt-1.3b.yaml)")
    try:
        cmd = slurm_torchrun_command(os.environ, args, port=ns.port, nproc_per_node=ns.nproc_per_node)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns.print:
        print(" ".join(cmd))
        return 0
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    os.execv(exe, [exe, *cmd[1:]])
    return 0  # unreachable


if __name__ == "__main__":
    sys.exit(main())
