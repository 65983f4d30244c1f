"""train.eval_tasks in real runs: the task metrics a training run logs at its last step equal
`llmstack-eval` on the checkpoint it saved at that step.

- two processes under the deepspeed launcher, ZeRO-3, bf16. DeepSpeed keeps tensors of up to
  1e5 elements whole on every rank (stage3_param_persistence_threshold), which is every tensor of
  this tiny model: the threshold is set to 0 so that every parameter is partitioned and the
  evaluation's forwards really gather them, on both ranks in the same order.
- one process, ZeRO-2, fp32, with dropout, evaluated at steps 2 and 4: the same comparison,
  tighter, and the per-step losses equal those of the same run without eval tasks (the
  evaluation leaves the model in train mode and takes nothing from the random streams).
- SFT, one process: the tasks are scored before fine-tuning (step 0) and at its end.
- a bad task name exits 2 with one line naming train.eval_tasks, before any work (no run directory).

Tolerance of the bf16 comparison: the weights are the same (the engine's bf16 weights are its fp32
master weights rounded, as llmstack-eval rounds the saved ones), but ZeRO-3 gathers them into
buffers at other addresses, and the CPU GEMM kernels then block the same sums differently (in fp32
the results differ by ~1e-9). bf16 keeps 8 significant bits, so such reordering moves a logit by
up to ~2e-3 of itself, at random in sign; over the few hundred tokens scored this averages to about
1e-6 of the mean log-likelihood (seen: 1.3e-6). The log-likelihood behind every metric (nll per
token, bits per byte, the log of each perplexity) is held to 1e-4 relative, ~75x that and ~50x
below what one training step moves it; accuracies must be equal. fp32 one process: 1e-5.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import REPO, llmstack_cmd, pretrain, run_cmd

pytestmark = pytest.mark.slow

STEPS = ["train.max_steps=4", "train.micro_batch=4", "train.grad_accum=1", "train.eval_tasks_limit=8"]
LOG_DOMAIN = ("nll_per_token", "bits_per_byte")  # compared as they are; the perplexities through their log


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-tasks")
    from data_pipeline.sources import builtin_texts

    docs = tmp / "docs.jsonl"  # a small perplexity source: three documents of the held-out corpus
    texts = [t[:1500] for _, t in zip(range(3), builtin_texts("validation"))]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return tmp, ["demo_mc", f"ppl:{docs}"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def task_metrics(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k.startswith("eval/")}


def assert_match(logged: dict, results: dict, rel: float, acc_equal: bool = True) -> None:
    """Every logged eval/<task>/<metric> against llmstack-eval's results for that task and metric."""
    assert logged
    for key, value in logged.items():
        task, metric = key[len("eval/"):].rsplit("/", 1)
        ref = results["tasks"][task][metric]
        if metric.startswith("acc"):
            assert value == ref, f"{key}: logged {value!r}, llmstack-eval {ref!r}"
        else:
            a, b = (value, ref) if metric in LOG_DOMAIN else (math.log(value), math.log(ref))
            assert abs(a - b) <= rel * abs(b), f"{key}: logged {value!r}, llmstack-eval {ref!r}"
    for task, res in results["tasks"].items():  # nothing llmstack-eval reports is missing from the log
        wanted = {"acc", "acc_norm"} if "acc" in res else {"nll_per_token", "perplexity", "bits_per_byte"}
        assert {f"eval/{task}/{m}" for m in wanted} <= set(logged), (task, sorted(logged))


def test_zero3_bf16_two_processes_log_what_llmstack_eval_gives(work, tokenizer_dir):
    tmp, tasks = work
    proc, run_dir = pretrain(tmp, tokenizer_dir, "z3", "zero.stage=3", "precision=bf16", *STEPS,
                             f"train.eval_tasks=[{','.join(tasks)}]",
                             "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
                             nprocs=2, launcher="deepspeed")
    recs = records(run_dir)
    evaluated = [r for r in recs if task_metrics(r)]
    # train.eval_every=0: the tasks are scored once, at the last step, in the line with its loss
    assert [r["step"] for r in evaluated] == [4] and "loss" in evaluated[0] and "val_loss" in evaluated[0]
    assert proc.stdout.count("eval tasks (") == 1 and "demo_mc acc " in proc.stdout
    out = tmp / "z3-eval.json"
    run_cmd([sys.executable, "-m", "eval", "--model", str(run_dir / "checkpoints" / "step_4"),
             "--tasks", ",".join(tasks), "--limit", "8", "--dtype", "bf16", "--no-progress", "--output", str(out)],
            cwd=tmp)
    results = json.loads(out.read_text())
    assert results["step"] == 4 and results["config"]["dtype"] == "bf16"
    assert_match(task_metrics(evaluated[0]), results, rel=1e-4)


def test_zero2_fp32_one_process_matches_and_leaves_training_unchanged(work, tokenizer_dir):
    from eval.evaluator import evaluate

    tmp, tasks = work
    common = ["zero.stage=2", "precision=fp32", *STEPS, "train.eval_every=2", "model.dropout=0.1"]
    _, plain = pretrain(tmp, tokenizer_dir, "z2-plain", *common)
    _, run_dir = pretrain(tmp, tokenizer_dir, "z2", *common, f"train.eval_tasks=[{','.join(tasks)}]")
    recs = records(run_dir)
    evaluated = {r["step"]: task_metrics(r) for r in recs if task_metrics(r)}
    assert sorted(evaluated) == [2, 4] and evaluated[2] != evaluated[4]  # the model changed in between
    # dropout is on: a model left in eval mode, or a random draw taken, would change steps 3 and 4
    assert [(r["step"], r["loss"]) for r in recs if "loss" in r] == \
        [(r["step"], r["loss"]) for r in records(plain) if "loss" in r]
    results = evaluate(str(run_dir / "checkpoints" / "step_4"), tasks, limit=8, dtype="fp32", progress=False)
    assert_match(evaluated[4], results, rel=1e-5)


def test_sft_scores_the_tasks_before_and_after_fine_tuning(work, tokenizer_dir):
    from eval.evaluator import evaluate

    tmp, tasks = work
    run_dir = tmp / "sft"
    args = ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), "model.init=null", f"tokenizer.path={tokenizer_dir}",
            "model.preset=gpt2-tiny", "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64",
            "data.seq_len=64", "sft.packing=false", "sft.eval_max=8", "train.eval_every=0", "train.log_every=1",
            "train.progress=false", "train.save_every=0", "zero.stage=2", "dist.timeout_s=120", *STEPS,
            f"train.eval_tasks=[{','.join(tasks)}]", f"run.dir={run_dir}"]
    run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp)
    evaluated = {r["step"]: task_metrics(r) for r in records(run_dir) if task_metrics(r)}
    assert sorted(evaluated) == [0, 4]
    results = evaluate(str(run_dir / "checkpoints" / "step_4"), tasks, limit=8, dtype="fp32", progress=False)
    assert_match(evaluated[4], results, rel=1e-5)


def test_a_bad_task_name_exits_2_before_any_work(work, tokenizer_dir):
    tmp, _ = work
    proc, run_dir = pretrain(tmp, tokenizer_dir, "bad", "train.eval_tasks=[demo_mc,no_such_task]", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines and lines[0].startswith("error: train.eval_tasks: unknown task 'no_such_task' (builtin: ")
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # stopped before the run directory, the tokenizer, the model and the data
