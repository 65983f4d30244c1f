"""Feeding the model: the automatic loader worker count, batches that do not depend on it, the
copy to the device, and the host threads the launch scripts and the entry point give each rank."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from itertools import product

import pytest
import torch

from data_pipeline.sources import resolve_source
from data_pipeline.stream import MAX_AUTO_WORKERS, Loader, StreamConfig, auto_workers, merge_states
from data_pipeline.tokenizer import load_tokenizer
from llmstack.config import DataConfig, PretrainConfig, load_config
from llmstack.distributed import env
from llmstack.errors import ConfigError
from llmstack.stages.data import loader_workers
from tests.conftest import REPO, child_env, losses, pretrain
from tests.data_pipeline import corpus

# -- the automatic worker count ---------------------------------------------------------------


@pytest.mark.parametrize("streams,world,cores,reserved,expected", [
    (64, 8, 16, 2, 4),   # 8 GPUs on 128 cores: 14 spare, capped at 4 (8 streams per rank)
    (64, 16, 16, 2, 4),  # 4 streams per rank: 4 workers of one stream each
    (24, 4, 16, 2, 3),   # 6 streams per rank: 4 does not divide 6, 3 does
    (64, 64, 16, 2, 1),  # one stream per rank: one worker
    (64, 1, 2, 1, 1),    # 2 cores, the rank computes with 1 thread: one worker
    (64, 1, 2, 2, 0),    # the rank's threads take every core: none spare
    (64, 2, 1, 1, 0),
    (64, 1, 1, 4, 0),    # more threads than cores: none, not a negative count
    (6, 4, 16, 2, 0),    # 4 ranks do not divide 6 streams: 0 (Loader reports it, as before)
])
def test_auto_workers(streams, world, cores, reserved, expected):
    assert auto_workers(streams, world, cores, reserved) == expected


def test_auto_workers_always_satisfies_the_streams_rule():
    """Whatever the machine, the choice is within the spare cores and the cap, and keeps
    data.streams a multiple of world x max(workers, 1) whenever 0 workers would have."""
    for streams, world, cores, reserved in product([1, 2, 6, 8, 12, 24, 64, 96], [1, 2, 3, 4, 8, 16],
                                                   [1, 2, 3, 5, 8, 16, 64], [1, 2, 4]):
        n = auto_workers(streams, world, cores, reserved)
        assert 0 <= n <= min(MAX_AUTO_WORKERS, max(0, cores - reserved))
        if streams % world == 0:
            assert streams % (world * max(n, 1)) == 0, (streams, world, cores, reserved, n)
            if cores - reserved >= 1:
                assert n >= 1  # a spare core is used (1 always divides)


def test_num_workers_config_auto_by_default_and_an_integer_wins():
    assert DataConfig().num_workers == "auto"
    auto = DataConfig(streams=64)
    assert loader_workers(auto, 8, cores=16, reserved=2) == 4
    assert loader_workers(auto, 1, cores=2, reserved=2) == 0
    fixed = DataConfig(num_workers=3, streams=24)
    assert loader_workers(fixed, 1, cores=1, reserved=8) == 3  # explicit: as given, whatever the cores
    assert loader_workers(DataConfig(num_workers=0), 1, cores=64, reserved=1) == 0
    for bad in ("-1", "many", "true", "1.5"):
        with pytest.raises(ConfigError, match=r"data.num_workers: must be 'auto' or a whole number >= 0"):
            load_config(PretrainConfig, None, [f"data.num_workers={bad}"])
    assert load_config(PretrainConfig, None, ["data.num_workers=2"]).data.num_workers == 2


def test_cores_per_process():
    assert env.cores_per_process(cores=16, local_world=8) == 2
    assert env.cores_per_process(cores=17, local_world=8) == 2
    assert env.cores_per_process(cores=3, local_world=8) == 1
    assert env.cores_per_process(cores=2, local_world=1) == 2
    assert 1 <= env.available_cores() <= (os.cpu_count() or 1)


# -- the batches do not depend on the chosen count ------------------------------------------


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("feed")
    corpus.write_jsonl(d / "a.jsonl", corpus.texts(50, seed=11, hi=120, tag="a"))
    corpus.write_parquet(d / "b.parquet", corpus.texts(30, seed=12, hi=120, tag="b"), row_group_size=8)
    return [resolve_source(str(d / "a.jsonl"), weight=0.7), resolve_source(str(d / "b.parquet"), weight=0.3)]


def batches(ls, n):
    """n global batches (rows in position order) from one Loader per rank."""
    R, out = len(ls), []
    for _ in range(n):
        parts = [next(loader)["input_ids"] for loader in ls]
        rows = {r + j * R: x[j] for r, x in enumerate(parts) for j in range(len(x))}
        out.append(torch.stack([rows[p] for p in sorted(rows)]))
    return out


def make(sources, tok, cfg, world, workers, state=None):
    return [Loader(sources, cfg, tok.path, tok.hash, micro_batch=8 // world, rank=r, world=world,
                   num_workers=workers, state=state) for r in range(world)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's cores, on purpose
@pytest.mark.parametrize("world,cores", [(1, 5), (2, 4)])
def test_auto_chosen_workers_give_the_same_batches_and_resume(sources, tok, world, cores):
    """The count auto picks (4 workers on 1 rank, 2 per rank on 2) gives the batches of 0 workers,
    and a state saved with workers resumes with none (and the other way) exactly."""
    cfg = StreamConfig(seq_len=32, streams=8, seed=4)
    W = auto_workers(cfg.streams, world, cores=cores, reserved=1)
    assert W == (4 if world == 1 else 2)
    ref = batches(make(sources, tok, cfg, world, 0), 14)
    with_workers = make(sources, tok, cfg, world, W)
    got = batches(with_workers, 6)
    state = merge_states(loader.state_dict() for loader in with_workers)
    del with_workers
    assert all(torch.equal(a, b) for a, b in zip(got, ref[:6]))
    assert all(torch.equal(a, b) for a, b in zip(batches(make(sources, tok, cfg, world, 0, state), 8), ref[6:]))
    no_workers = make(sources, tok, cfg, world, 0)
    batches(no_workers, 6)
    state = merge_states(loader.state_dict() for loader in no_workers)
    assert all(torch.equal(a, b) for a, b in zip(batches(make(sources, tok, cfg, world, W, state), 8), ref[6:]))


@pytest.mark.slow
def test_pretrain_default_workers_train_as_without(tokenizer_dir, tmp_path):
    """`llmstack pretrain` with data.num_workers left at auto: run.json records the count it
    resolved to (this machine's spare cores; the tests give a rank 1 thread), and every step's
    loss equals that of data.num_workers=0."""
    text = corpus.write_jsonl(tmp_path / "docs.jsonl", corpus.texts(120, seed=21, hi=150))
    steps = ["train.max_steps=6", "train.micro_batch=4", "train.grad_accum=2", f"data.sources=[{{path: '{text}'}}]",
             f"data.val_sources=[{{path: '{text}'}}]"]
    _, auto = pretrain(tmp_path, tokenizer_dir, "auto", *steps)
    _, none = pretrain(tmp_path, tokenizer_dir, "none", *steps, "data.num_workers=0")
    expected = auto_workers(64, 1, env.available_cores(), reserved=1)  # child_env: OMP_NUM_THREADS=1
    assert json.loads((auto / "run.json").read_text())["data"]["num_workers"] == expected
    assert json.loads((none / "run.json").read_text())["data"]["num_workers"] == 0
    assert losses(auto) == losses(none) and len(losses(none)) == 6


# -- the copy to the device ------------------------------------------------------------------


def test_to_device_on_cpu_keeps_values():
    batch = {"input_ids": torch.arange(12).view(3, 4)[:, :-1], "labels": torch.arange(12).view(3, 4)[:, 1:]}
    out = env.to_device(batch, torch.device("cpu"))
    assert out.keys() == batch.keys() and all(torch.equal(out[k], batch[k]) for k in batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_on_cuda_copies_from_pinned_memory():
    tokens = torch.randint(0, 1000, (4, 33))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    out = env.to_device(batch, torch.device("cuda", 0))
    torch.cuda.synchronize()
    assert all(v.is_cuda and torch.equal(v.cpu(), batch[k]) for k, v in out.items())
    pinned = batch["input_ids"].pin_memory()  # already pinned: used as it is
    assert torch.equal(env.to_device({"x": pinned}, torch.device("cuda", 0))["x"].cpu(), pinned)


# -- host threads --------------------------------------------------------------------------------


def test_set_host_threads_only_when_unset_and_shared(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        environ: dict = {}
        n = env.set_host_threads(environ)
        assert n == env.cores_per_process(env.available_cores(), 2)
        assert environ["OMP_NUM_THREADS"] == str(n) and torch.get_num_threads() == n
        assert env.set_host_threads({"OMP_NUM_THREADS": "3"}) is None  # the user's choice stands
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert env.set_host_threads({}) is None  # alone: torch's default
    finally:
        torch.set_num_threads(before)


def fake_bin(tmp_path, *names):
    """Stand-ins for the launchers: record OMP_NUM_THREADS and their arguments, then exit 0."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in names:
        f = d / name
        f.write_text(f'#!/usr/bin/env bash\necho "{name} OMP_NUM_THREADS=${{OMP_NUM_THREADS:-unset}} $*" >> "$FAKE_LOG"\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return d


def launch_env(tmp_path, fakes, **extra):
    e = child_env(FAKE_LOG=tmp_path / "calls.log", **extra)
    e["PATH"] = f"{fakes}{os.pathsep}{e['PATH']}"
    if "OMP_NUM_THREADS" not in extra:
        e.pop("OMP_NUM_THREADS")
    return e


@pytest.mark.parametrize("script,launcher", [("deepspeed_single.sh", "deepspeed"), ("torchrun.sh", "torchrun")])
def test_launch_scripts_give_each_process_its_share_of_the_cores(tmp_path, script, launcher):
    fakes = fake_bin(tmp_path, launcher)
    cores = int(subprocess.run(["nproc"], capture_output=True, text=True, env=launch_env(tmp_path, fakes)).stdout)
    log = tmp_path / "calls.log"
    for nproc, omp, expected in [(1, None, cores), (2, None, max(1, cores // 2)), (4 * cores, None, 1), (2, "3", 3)]:
        log.unlink(missing_ok=True)
        extra = {"OMP_NUM_THREADS": omp} if omp else {}
        p = subprocess.run(["bash", str(REPO / "launch" / script), str(nproc), "cfg.yaml", "zero.stage=3"],
                           env=launch_env(tmp_path, fakes, **extra), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        line = log.read_text().strip()
        assert line.startswith(f"{launcher} OMP_NUM_THREADS={expected} ") and line.endswith("cfg.yaml zero.stage=3")
    bad = subprocess.run(["bash", str(REPO / "launch" / script), "0", "cfg.yaml"], env=launch_env(tmp_path, fakes),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "whole number >= 1, got '0'" in bad.stderr


def test_multinode_script_leaves_threads_to_each_rank(tmp_path):
    fakes = fake_bin(tmp_path, "deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    p = subprocess.run(["bash", str(REPO / "launch/deepspeed_multinode.sh"), str(hostfile), "cfg.yaml"],
                       env=launch_env(tmp_path, fakes), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "calls.log").read_text().startswith("deepspeed OMP_NUM_THREADS=unset ")


@pytest.mark.parametrize("slurm,expected", [
    ({"SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8"}, "8"),
    ({"SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"}, "16"),
    ({"SLURM_CPUS_PER_TASK": "4", "SLURM_GPUS_ON_NODE": "8"}, "1"),
    ({"SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8", "OMP_NUM_THREADS": "5"}, "5"),
])
def test_slurm_script_threads_per_gpu(tmp_path, slurm, expected):
    fakes = fake_bin(tmp_path, "srun", "scontrol")
    p = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "cfg.yaml"], cwd=tmp_path,
                       env=launch_env(tmp_path, fakes, SLURM_JOB_ID="7", **slurm), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "calls.log").read_text().startswith(f"srun OMP_NUM_THREADS={expected} ")
