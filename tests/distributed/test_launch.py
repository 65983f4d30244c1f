"""Launch scripts and preflight: SLURM command generation, shell hygiene, host checks."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from llmstack.distributed.launch import expand_hostlist, slurm_torchrun_command
from llmstack.distributed.preflight import compare, parse_hostfile
from llmstack.errors import UsageError
from tests.conftest import BIN, REPO, child_env

SLURM_ENV = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu-[007-009]",
             "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("spec,hosts", [
    ("node1", ["node1"]),
    ("gpu-[01-03,07],cpu5", ["gpu-01", "gpu-02", "gpu-03", "gpu-07", "cpu5"]),
    ("a[1-2]b[8-9]", ["a1b8", "a1b9", "a2b8", "a2b9"]),
    ("r[098-101]", ["r098", "r099", "r100", "r101"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_slurm_torchrun_command_for_a_node():
    cmd = slurm_torchrun_command(SLURM_ENV, ["pretrain", "c.yaml", "zero.stage=3"], port=29600)
    assert cmd == ["torchrun", "--nnodes=3", "--node_rank=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=gpu-007:29600", "--rdzv_id=llmstack-4242", "-m", "llmstack",
                   "pretrain", "c.yaml", "zero.stage=3"]
    typed = dict(SLURM_ENV, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4")
    assert "--nproc_per_node=4" in slurm_torchrun_command(typed, ["pretrain", "c.yaml"])
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        slurm_torchrun_command({k: v for k, v in SLURM_ENV.items() if k != "SLURM_NODEID"}, ["pretrain"])


def test_launch_module_prints_command_and_refuses_outside_slurm():
    env = child_env(**SLURM_ENV)
    out = subprocess.run([sys.executable, "-m", "llmstack.distributed.launch", "slurm", "--print", "--", "pretrain", "x.yaml"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("torchrun --nnodes=3 --node_rank=2")
    bare = {k: v for k, v in child_env().items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, "-m", "llmstack.distributed.launch", "slurm", "--", "pretrain", "x.yaml"],
                         env=bare, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch")))
def test_launch_scripts_pass_bash_n_and_shellcheck(script):
    path = REPO / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    sc = subprocess.run([str(BIN / "shellcheck"), str(path)], capture_output=True, text=True)
    assert sc.returncode == 0, sc.stdout


def test_preflight_local_hosts_ok_and_busy_port_fails(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1  # same machine twice\n")
    run = lambda port: subprocess.run([str(BIN / "llmstack"), "preflight", "--hostfile", str(hostfile), "--port", str(port)],  # noqa: E731
                                      env=child_env(), capture_output=True, text=True, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    ok = run(free)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "preflight: ok" in ok.stdout and ok.stdout.count("2.13.0") >= 2
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        bad = run(busy.getsockname()[1])
    assert bad.returncode == 1 and "rendezvous port is in use" in bad.stdout


def test_preflight_compare_names_mismatches():
    base = {"host": "a", "hostfile_name": "a", "python": "3.11.7", "torch": "2.13.0", "cuda": "12.8",
            "deepspeed": "0.19.8", "transformers": "5.23.0", "llmstack": "0.1.0", "gpus": 8, "port_free": True}
    other = dict(base, host="b", hostfile_name="b", torch="2.12.0", gpus=4)
    problems = compare([base, other, {"host": "c", "error": "ssh: timeout"}], [8, 8, 8])
    assert "b: torch 2.12.0 differs from a's 2.13.0" in problems
    assert "b: 8 slots but 4 GPUs" in problems
    assert any(p.startswith("c: unreachable") for p in problems)
    assert compare([base, dict(base, host="b", hostfile_name="b")], [8, 8]) == []


def test_preflight_bad_hostfile(tmp_path):
    bad = tmp_path / "h"
    bad.write_text("localhost slot=1\n")
    with pytest.raises(UsageError, match="h:1: expected '<host> slots=<N>'"):
        parse_hostfile(bad)
    with pytest.raises(UsageError, match="hostfile not found"):
        parse_hostfile(tmp_path / "missing")


FAKE_SRUN = """#!/usr/bin/env bash
# stands in for srun: records its arguments and a USR1 it receives, then ends with $SRUN_RC
echo "srun $*" >> "$FAKE_LOG"
trap 'echo "srun got USR1" >> "$FAKE_LOG"; exit 1' USR1
touch "$FAKE_LOG.started"
for _ in $(seq 300); do
  if [[ -n "${SRUN_RC:-}" ]]; then exit "$SRUN_RC"; fi
  sleep 0.1
done
exit 9
"""


def slurm_job(tmp_path, srun_rc: str | None = None):
    """launch/slurm.sbatch run as SLURM runs it, with srun and scontrol replaced by recorders."""
    import os
    import stat

    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "srun").write_text(FAKE_SRUN)
    (fakes / "scontrol").write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for f in fakes.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = child_env(FAKE_LOG=log, SLURM_JOB_ID="4242", PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}",
                    **({"SRUN_RC": srun_rc} if srun_rc is not None else {}))
    proc = subprocess.Popen(["bash", str(REPO / "launch/slurm.sbatch"), "cfg.yaml", "zero.stage=3"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


def test_slurm_script_passes_the_time_limit_signal_on_and_requeues(tmp_path):
    import signal
    import time

    text = (REPO / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    proc, log = slurm_job(tmp_path)
    deadline = time.time() + 30
    while not log.with_name(log.name + ".started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 does before the time limit
    out, _ = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --kill-on-bad-exit=1") and calls[0].endswith("-- pretrain cfg.yaml zero.stage=3")
    assert calls[1:] == ["srun got USR1", "scontrol requeue 4242"], out
    assert proc.returncode == 1  # srun's status (torchrun's after the stop)


@pytest.mark.parametrize("rc", ["0", "3"])
def test_slurm_script_does_not_requeue_a_run_that_ended_by_itself(tmp_path, rc):
    proc, log = slurm_job(tmp_path, srun_rc=rc)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == int(rc), out
    assert not any(c.startswith("scontrol") for c in log.read_text().splitlines())
