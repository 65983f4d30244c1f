"""Nothing lost, nothing hung: real runs that diverge, get preempted, or resume with dropout.

- a non-finite loss or gradient skips the update (every ZeRO stage, fp32 and bf16), is logged,
  and too many in a row stop the run with exit status 3 and without a checkpoint of the bad state;
- SIGTERM makes the run finish its step, save and exit 75, every rank at the same step, and the
  resumed run repeats the uninterrupted one exactly;
- with dropout, a stopped and resumed run repeats the uninterrupted one exactly.

Runs share the tiny model and batch layout of test_pretrain_runs.py and are memoised per module.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN, REPO, TINY, child_env, free_port, llmstack_cmd, losses, pretrain, run_cmd
from tests.distributed.test_pretrain_runs import ONE_PROC, TWO_PROC, Runs

pytestmark = pytest.mark.slow

DROPOUT_1P = ["zero.stage=0", "train.max_steps=20", "model.dropout=0.1", *ONE_PROC]
DROPOUT_2P = ["zero.stage=2", "train.max_steps=20", "model.dropout=0.1", *TWO_PROC]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    return Runs(tmp_path_factory.mktemp("reliability"), tokenizer_dir)


def assert_equal_losses(got: dict, ref: dict, steps=range(1, 21)):
    for s in steps:
        assert got[s] == ref[s], f"step {s}: {got[s]!r} != uninterrupted {ref[s]!r}"


def strict_records(run_dir) -> list[dict]:
    """metrics.jsonl parsed by a JSON parser that rejects NaN and Infinity."""
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir) -> tuple[str, list[str]]:
    root = run_dir / "checkpoints"
    return (root / "latest").read_text().strip(), sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


# --- exact resume with dropout (the RNG stream survives a restart) ---------------------------


def test_dropout_resume_exact_one_process(runs):
    ref = losses(runs.get("1p-dropout", *DROPOUT_1P))
    pretrain(runs.tmp, runs.tok, "1p-dropout-resume", *DROPOUT_1P, "train.stop_at=10")
    proc, run_dir = pretrain(runs.tmp, runs.tok, "1p-dropout-resume", *DROPOUT_1P)
    assert "resumed from" in proc.stdout and "step_10" in proc.stdout
    assert_equal_losses(losses(run_dir), ref)


def test_dropout_resume_exact_two_processes_zero2(runs):
    ref = losses(runs.get("2p-dropout", *DROPOUT_2P, nprocs=2))
    runs.get("2p-dropout-resume", *DROPOUT_2P, "train.stop_at=10", nprocs=2)
    proc, run_dir = pretrain(runs.tmp, runs.tok, "2p-dropout-resume", *DROPOUT_2P, nprocs=2, launcher="deepspeed")
    assert "resumed from" in proc.stdout
    assert_equal_losses(losses(run_dir), ref)


# --- preemption: SIGTERM -> finish the step, save, exit 75; the resumed run is exact ----------


def start(runs, name: str, overrides: list[str], nprocs: int):
    """Start a pretraining in the background (output to files, not pipes that could fill)."""
    run_dir = runs.tmp / name
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={runs.tok}", *overrides]
    out = open(runs.tmp / f"{name}.out", "w")
    proc = subprocess.Popen(llmstack_cmd(args, nprocs, "python" if nprocs == 1 else "deepspeed"), cwd=runs.tmp,
                            env=child_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, run_dir, runs.tmp / f"{name}.out"


def wait_for_step(proc, run_dir, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def stopped_run_checks(run_dir, log, rc: int) -> int:
    """The run stopped at a step before the end, with its checkpoint as `latest`; returns the step."""
    out = log.read_text()
    assert rc == 75, out[-3000:]
    stop = max(losses(run_dir))
    assert stop < 20, "the signal came too late: the run had finished"
    assert f"stopped by SIGTERM after step {stop}; its checkpoint is saved" in out
    latest, _ = checkpoints(run_dir)
    assert latest == f"step_{stop}"
    assert json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())["step"] == stop
    return stop


def test_sigterm_saves_and_resumes_exactly_one_process(runs):
    ref = losses(runs.get("1p-dropout", *DROPOUT_1P))
    proc, run_dir, log = start(runs, "1p-sigterm", DROPOUT_1P, nprocs=1)
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    stop = stopped_run_checks(run_dir, log, proc.wait(timeout=300))
    resumed, _ = pretrain(runs.tmp, runs.tok, "1p-sigterm", *DROPOUT_1P)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stop}'}" in resumed.stdout
    assert_equal_losses(losses(run_dir), ref)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(runs):
    """Only rank 1 gets the signal (a `kill` of one process; SLURM and torchrun signal every rank):
    the ranks agree on the step through their per-step all-reduce, save together, and the deepspeed
    launcher passes the status on."""
    import psutil

    ref = losses(runs.get("2p-dropout", *DROPOUT_2P, nprocs=2))
    proc, run_dir, log = start(runs, "2p-sigterm", DROPOUT_2P, nprocs=2)
    wait_for_step(proc, run_dir, 3)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "llmstack" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(ranks) == 1, ranks
    ranks[0].send_signal(signal.SIGTERM)
    stop = stopped_run_checks(run_dir, log, proc.wait(timeout=300))
    ckpt = run_dir / "checkpoints" / f"step_{stop}"
    assert len(list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # both ranks' partitions
    resumed, _ = pretrain(runs.tmp, runs.tok, "2p-sigterm", *DROPOUT_2P, nprocs=2, launcher="deepspeed")
    assert "resumed from" in resumed.stdout
    assert_equal_losses(losses(run_dir), ref)


# --- divergence: skip, count, stop with exit 3, keep the good checkpoints -------------------


def nan_run(runs, name: str, calls: str, overrides: list[str], nprocs: int = 1, rank: int | None = None):
    """A pretraining through tests/distributed/nan_driver.py: NaN losses from micro-batch `calls` on."""
    run_dir = runs.tmp / name
    driver = [str(REPO / "tests/distributed/nan_driver.py"), calls, *([str(rank)] if rank is not None else []), "--"]
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={runs.tok}", *overrides]
    if nprocs == 1:
        cmd = [sys.executable, *driver, *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), *driver, *args]
    return run_cmd(cmd, cwd=runs.tmp, check=False), run_dir


def test_nonfinite_losses_are_skipped_then_stop_the_run_with_status_3(runs):
    # NaN from the 11th micro-batch: step 6 on (2 per step); 3 skipped steps are tolerated, the 4th stops
    proc, run_dir = nan_run(runs, "1p-nan", "10", ["zero.stage=0", "train.max_steps=20", "train.save_every=2",
                                                    "train.keep_last=2", *ONE_PROC])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: training diverged at step 9" in proc.stderr and "(6-9)" in proc.stderr
    assert "done:" not in proc.stdout
    latest, kept = checkpoints(run_dir)
    assert latest == "step_4" and kept == ["step_2", "step_4"]  # no save at 6 or 8, nothing rotated away
    records = {r["step"]: r for r in strict_records(run_dir)}
    assert sorted(records) == list(range(1, 10))
    for s in range(1, 6):
        assert records[s]["skipped_steps"] == 0 and not records[s].get("skipped")
    for s in range(6, 10):
        assert records[s]["loss"] is None and records[s]["skipped"] is True and records[s]["skipped_steps"] == s - 5


def test_lr_1e30_diverges_and_stops_zero2(runs):
    """The reported case: train.lr=1e30 gives a NaN loss from step 2 (ZeRO-2: DeepSpeed's own skip)."""
    proc, run_dir = pretrain(runs.tmp, runs.tok, "1p-lr1e30", "zero.stage=2", "train.lr=1e30", "train.max_steps=20",
                             "train.save_every=1", "train.keep_last=2", *ONE_PROC, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: training diverged at step 5" in proc.stderr
    assert checkpoints(run_dir) == ("step_1", ["step_1"])
    records = strict_records(run_dir)
    assert [r["step"] for r in records if r.get("skipped")] == [2, 3, 4, 5]


def test_nan_on_one_rank_is_skipped_by_all_and_training_recovers_zero2(runs):
    """Rank 1's losses of steps 6-7 are NaN: both ranks skip both updates (within the limit), the
    save due at step 6 waits for step 8, and the run finishes normally."""
    proc, run_dir = nan_run(runs, "2p-nan", "5:7", ["zero.stage=2", "train.max_steps=12", "train.save_every=3",
                                                     "train.keep_last=5", *TWO_PROC], nprocs=2, rank=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["step"]: r for r in strict_records(run_dir)}
    assert [s for s, r in records.items() if r.get("skipped")] == [6, 7]
    assert records[12]["skipped_steps"] == 2 and records[12]["loss"] < records[1]["loss"]
    latest, kept = checkpoints(run_dir)
    assert latest == "step_12" and set(kept) == {"step_3", "step_8", "step_9", "step_12"}


def test_skipped_step_changes_no_weights_or_optimizer_state(tmp_path):
    """tests/distributed/skip_matrix.py on two processes: every ZeRO stage, fp32 and bf16."""
    out = tmp_path / "skip.json"
    run_cmd([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
             str(REPO / "tests/distributed/skip_matrix.py"), "--out", str(out)], cwd=tmp_path)
    results = json.loads(out.read_text())
    for precision in ("fp32", "bf16"):
        for stage in ("0", "1", "2", "3"):
            steps = results[precision][stage]
            where = f"{precision} ZeRO-{stage}: {steps}"
            assert [s["skipped"] for s in steps] == [False, True, True, True, False], where
            assert [s["unchanged"] for s in steps[1:4]] == [True] * 3, where  # no update, no optimizer state change
            assert not steps[4]["unchanged"] and all(s["finite"] for s in steps), where  # then training goes on
            assert not any(s["diverged"] for s in steps), where
