"""Data-parallel evaluation: `deepspeed --num_gpus 2 --module eval` (two CPU processes over gloo)
gives exactly the results of one process, for multiple choice, perplexity and generation."""

from __future__ import annotations

import json

import pytest

from eval.evaluator import evaluate
from tests.conftest import BIN, free_port, run_cmd

pytestmark = pytest.mark.slow


def test_two_process_evaluation_equals_one_process(tmp_path_factory, eval_model):
    tmp = tmp_path_factory.mktemp("eval-dp")
    tiny = eval_model
    docs = tmp / "docs.jsonl"
    from data_pipeline.sources import builtin_texts

    docs.write_text("".join(json.dumps({"text": t[:2000]}) + "\n" for _, t in zip(range(3), builtin_texts("validation"))))
    tasks = [str(tiny["task"]), f"ppl:{docs}", "icl_topic_gen"]
    out = tmp / "two.json"
    proc = run_cmd([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "eval",
                    "--model", str(tiny["checkpoint"]), "--tasks", ",".join(tasks), "--num-fewshot", "2",
                    "--truncate", "left", "--context", "32", "--stride", "12", "--log-samples", "--no-progress",
                    "--output", str(out)], cwd=tmp, timeout=300)
    two = json.loads(out.read_text())
    assert two["config"]["world_size"] == 2 and proc.stdout.count("wrote ") == 1  # rank 0 writes once
    one = evaluate(str(tiny["checkpoint"]), tasks, num_fewshot=2, truncate="left", context=32, stride=12,
                   log_samples=True, progress=False)
    assert one["config"]["world_size"] == 1
    assert two["tasks"] == json.loads(json.dumps(one["tasks"]))  # exact, through the same JSON encoding
