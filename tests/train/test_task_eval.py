"""train.eval_tasks in one process: the schema, the tasks loaded and checked at the start (bad
names and too-long prompts are UsageErrors before any training), and an evaluation of a plain
model checked against log-probabilities computed here with plain forward passes. The comparison
with `llmstack-eval` on real DeepSpeed runs (ZeRO-3 bf16, two processes) is in
tests/distributed/test_eval_tasks_in_training.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from llmstack.config import PretrainConfig, RMConfig, SFTConfig, load_config
from llmstack.errors import ConfigError, UsageError
from llmstack.train import task_eval
from tests.conftest import REPO

MC_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: choices
"""


def _write_task(tmp_path, docs: list[dict]):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = tmp_path / "tiny_mc.yaml"
    spec.write_text(MC_TASK.format(test=data))
    return spec


MC_DOCS = [{"context": "The cat sat on the", "choices": ["mat.", "moon today.", "very"], "label": 0},
           {"context": "Import the module and", "choices": [" call it", " run", " the function"], "label": 2},
           {"context": "A list of numbers", "choices": ["is sorted", "was", "!"], "label": 1}]
PPL_DOCS = ["def add(a, b):\n    return a + b", "The quick brown fox jumps over the lazy dog."]


def test_schema_accepts_eval_tasks_for_pretrain_and_sft_only():
    cfg = load_config(PretrainConfig, None, ["train.eval_tasks=demo_mc, ppl:builtin:validation",
                                             "train.eval_tasks_limit=5", "train.eval_tasks_fewshot=2"])
    assert cfg.train.eval_tasks == ["demo_mc", "ppl:builtin:validation"]
    assert (cfg.train.eval_tasks_limit, cfg.train.eval_tasks_fewshot) == (5, 2)
    assert load_config(SFTConfig, None, ["train.eval_tasks=[demo_mc]"]).train.eval_tasks == ["demo_mc"]
    assert PretrainConfig().train.eval_tasks == [] and task_eval.start(PretrainConfig().train) is None
    with pytest.raises(ConfigError, match="train.eval_tasks scores decoder-only gpt models, not model.family=bert"):
        load_config(PretrainConfig, None, ["train.eval_tasks=[demo_mc]", "model.family=bert"])
    with pytest.raises(ConfigError, match="empty task name"):
        load_config(PretrainConfig, None, ["train.eval_tasks=[demo_mc, '']"])
    with pytest.raises(ConfigError, match="eval_tasks: unknown key"):  # the reward model scores no tasks
        load_config(RMConfig, None, ["train.eval_tasks=[demo_mc]"])


def test_a_run_without_eval_tasks_never_imports_the_eval_suite():
    code = ("import sys; from llmstack.config import PretrainConfig; from llmstack.stages import pretrain, sft; "
            "from llmstack.train import task_eval; assert task_eval.start(PretrainConfig().train) is None; "
            "print(sorted(m for m in sys.modules if m == 'eval' or m.startswith('eval.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _tasks(*names, limit=None, fewshot=None):
    return task_eval.TaskEval(list(names), limit=limit, fewshot=fewshot)


def test_bad_tasks_are_usage_errors_naming_the_key(tmp_path):
    with pytest.raises(UsageError, match=r"^train.eval_tasks: unknown task 'no_such_task' \(builtin: .*demo_mc"):
        _tasks("demo_mc", "no_such_task")
    with pytest.raises(UsageError, match="^train.eval_tasks: task file not found: .*missing.yaml"):
        _tasks(str(tmp_path / "missing.yaml"))
    with pytest.raises(UsageError, match="^train.eval_tasks: task ppl:.*nothing.jsonl"):
        _tasks(f"ppl:{tmp_path / 'nothing.jsonl'}")
    with pytest.raises(UsageError, match="task demo_mc is listed twice"):
        _tasks("demo_mc", "demo_mc")


def test_limit_and_fewshot_reach_the_prepared_task():
    t = _tasks("demo_mc", limit=3, fewshot=2).tasks[0]
    assert len(t.prep.docs) == 3 and t.prep.contexts[0].count("\n") == 2  # two few-shot examples


def test_check_refuses_a_prompt_longer_than_the_model(tmp_path, tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.models.gpt import gpt_config_from_preset

    tok = load_tokenizer(tokenizer_dir)
    arch = lambda n: gpt_config_from_preset("gpt2-tiny", tok.vocab_size, n_layer=1, d_model=32, max_seq_len=n)  # noqa
    long_doc = {"context": " ".join(["the module returns a list of values"] * 12), "choices": ["a", "b"], "label": 0}
    tasks = _tasks(str(_write_task(tmp_path, [MC_DOCS[0], long_doc])))
    tasks.check(tok, arch(256), seq_len=64, bos=False, batch_size=4)  # fits
    with pytest.raises(UsageError, match=r"^train.eval_tasks: task tiny_mc: sample 1: context \+ continuation is "
                                         r"\d+ tokens, more than the model's context of 32"):
        tasks.check(tok, arch(32), seq_len=32, bos=False, batch_size=4)


class Engine:
    """What TaskEval calls on a DeepSpeed engine: the module, eval/train, and the autocast setting."""

    def __init__(self, module, autocast: torch.dtype | None = None):
        self.module, self.autocast = module, autocast

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()

    def torch_autocast_enabled(self):
        return self.autocast is not None

    def torch_autocast_dtype(self):
        return self.autocast


def _sum_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start, one plain causal forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    return math.fsum(logits[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_evaluation_of_the_live_module_matches_plain_forwards(tmp_path, tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.models.gpt import GPT, gpt_config_from_preset

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(gpt_config_from_preset("gpt2-tiny", tok.vocab_size, n_layer=2, d_model=64, max_seq_len=64,
                                       dropout=0.1))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in PPL_DOCS))
    tasks = _tasks(str(_write_task(tmp_path, MC_DOCS)), f"ppl:{docs}")
    tasks.check(tok, model.config, seq_len=64, bos=False, batch_size=2)
    model.train()
    seen = []
    model.wte.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_autocast_enabled("cpu"))))
    out = tasks.evaluate(Engine(model), zero_stage=0)
    assert model.training and seen and not any(training or autocast for training, autocast in seen)
    assert tasks._scorers[next(iter(tasks._scorers))].model is model  # the module itself, no copy

    model.eval()
    # multiple choice: argmax of the choices' summed log-probabilities, and per UTF-8 byte
    acc = acc_norm = 0
    for d in MC_DOCS:
        ctx = tok.encode(d["context"])
        lls = [_sum_logprob(model, ctx + tok.encode(d["context"] + " " + c)[len(ctx):], len(ctx)) for c in d["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == d["label"]
        norm = [ll / len(c.encode()) for ll, c in zip(lls, d["choices"])]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == d["label"]
    assert out["eval/tiny_mc/acc"] == acc / len(MC_DOCS)
    assert out["eval/tiny_mc/acc_norm"] == acc_norm / len(MC_DOCS)
    # ppl (document mode): each document after EOS (this tokenizer's prefix when it has no BOS), one window
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    nll, n = 0.0, 0
    for text in PPL_DOCS:
        ids = [prefix, *tok.encode(text)]
        nll -= _sum_logprob(model, ids, 1)
        n += len(ids) - 1
    name = f"eval/ppl:{docs}"
    assert out[f"{name}/nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    assert out[f"{name}/perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in PPL_DOCS)
    assert out[f"{name}/bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert not any(k.endswith("_stderr") or k.endswith("/truncated") for k in out)

    # the engine's torch autocast, when its DeepSpeed config enables one, is applied as its forward would
    seen.clear()
    tasks.evaluate(Engine(model, autocast=torch.bfloat16), zero_stage=0)
    assert seen and all(autocast for _, autocast in seen)
