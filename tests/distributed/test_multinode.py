"""Two "nodes" on one machine, two processes each: the deepspeed launcher started twice
(hostfile, --no_ssh, node_rank 0/1) and torchrun with --nnodes 2 (c10d rendezvous) both train
to the same losses as a four-process single-node run."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, REPO, TINY, child_env, free_port, losses, pretrain

pytestmark = pytest.mark.slow

FOUR = ["zero.stage=2", "train.max_steps=6", "train.micro_batch=2", "train.grad_accum=1"]


@pytest.fixture(scope="module")
def single_node_4(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("mn")
    _, run_dir = pretrain(tmp, tokenizer_dir, "4p", *FOUR, nprocs=4, launcher="deepspeed")
    return losses(run_dir)


def run_nodes(cmds, cwd):
    procs = [subprocess.Popen(c, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def args_for(run_dir, tok):
    return ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={tok}", *FOUR]


def test_deepspeed_two_nodes_of_two(single_node_4, tokenizer_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    port, run_dir = free_port(), tmp_path / "ds2x2"
    outs = run_nodes([[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                       "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "llmstack",
                       *args_for(run_dir, tokenizer_dir)] for r in (0, 1)], tmp_path)
    assert "world 4" in outs[0]
    got = losses(run_dir)
    for s in range(1, 7):
        assert got[s] == pytest.approx(single_node_4[s], rel=1e-5), s


def test_torchrun_two_nodes_of_two(single_node_4, tokenizer_dir, tmp_path):
    port, run_dir = free_port(), tmp_path / "tr2x2"
    outs = run_nodes([[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "2",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "llmstack-test",
                       "-m", "llmstack", *args_for(run_dir, tokenizer_dir)] for r in (0, 1)], tmp_path)
    assert any("world 4" in o for o in outs)
    got = losses(run_dir)
    for s in range(1, 7):
        assert got[s] == pytest.approx(single_node_4[s], rel=1e-5), s
