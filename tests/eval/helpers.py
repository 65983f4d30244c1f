"""A tiny trained GPT, its Hugging Face export, and a local multiple-choice task, for eval tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import pretrain, run_cmd

# Few-shot prompts for the tiny model's 64-token context: prompts are short, some still need
# left truncation (which both we and the harness then apply and count).
MC_TASK = """\
task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    train: {train}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "Q: {{{{context}}}}"
doc_to_target: label
doc_to_choice: choices
target_delimiter: " "
fewshot_delimiter: "\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


ROLLING_TASK = """\
task: local_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


LASTWORD_TASK = """\
task: local_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
fewshot_split: test  # examples from the evaluated split, never the document itself (as the harness then does)
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""


def build_model(tmp: Path, tokenizer: Path) -> dict:
    """{run, checkpoint, hf, task}: a 30-step tiny GPT trained with ZeRO-3 (so every eval test reads
    a partitioned checkpoint, consolidated on load), its export, and a local 2-split MC task."""
    _, run_dir = pretrain(tmp, tokenizer, "gpt", "train.max_steps=30", "zero.stage=3", "train.micro_batch=8")
    hf = tmp / "hf"
    run_cmd([sys.executable, "-m", "llmstack", "export", str(run_dir / "checkpoints" / "latest"), "--out", str(hf)],
            cwd=tmp)
    from eval.demo import demo_mc

    task_dir = tmp / "tasks"
    task_dir.mkdir()
    for split, n in (("test", 24), ("train", 12)):
        with open(task_dir / f"{split}.jsonl", "w") as f:
            for d in demo_mc(split)[:n]:
                f.write(json.dumps(d) + "\n")
    (task_dir / "local_mc.yaml").write_text(MC_TASK.format(test=task_dir / "test.jsonl", train=task_dir / "train.jsonl"))
    from data_pipeline.sources import builtin_texts

    # documents longer than the 64-token context: several windows each
    docs = [t[:700] for _, t in zip(range(4), builtin_texts("validation"))]
    (task_dir / "roll.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (task_dir / "local_roll.yaml").write_text(ROLLING_TASK.format(test=task_dir / "roll.jsonl"))
    # LAMBADA-style: the last word of a sentence given the rest
    sentences = [d["context"] + " " + d["choices"][d["label"]] for d in demo_mc("test")[:20]]
    (task_dir / "lastword.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences))
    (task_dir / "local_lastword.yaml").write_text(LASTWORD_TASK.format(test=task_dir / "lastword.jsonl"))
    return {"run": run_dir, "checkpoint": run_dir / "checkpoints" / "latest", "hf": hf, "task": task_dir / "local_mc.yaml",
            "rolling_task": task_dir / "local_roll.yaml", "lastword_task": task_dir / "local_lastword.yaml",
            "task_dir": task_dir}
