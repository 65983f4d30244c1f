"""Chat-model evaluation as lm-evaluation-harness does it (--apply-chat-template,
--fewshot-as-multiturn, --system-instruction), compared with the harness's own HF backend on the
same tasks, and the count of generations that ran out of max_gen_toks."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from eval.evaluator import evaluate
from tests.conftest import REPO, run_cmd
from tests.eval.helpers import MC_TASK

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHOTS, LIMIT = 2, 8

# ChatML, as many instruction-tuned models ship it; its markers are plain text to this tokenizer
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

GEN_TASK = """\
task: local_chatgen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    train: {train}
test_split: test
fewshot_split: train
output_type: generate_until
description: "Complete the sentence."
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[label]}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _with_template(src, dst, template: str | None):
    """A copy of the HF directory `src` whose tokenizer has `template` (None: no chat template)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def chat(eval_model, tmp_path_factory):
    """Task files (the shared multiple-choice task and a generate_until task on the same data), and
    a model with random weights (varied greedy answers; the trained tiny model answers a chat
    prompt with newlines only): its directory, its export (llmstack's template) and a copy of the
    export with a ChatML template in tokenizer_config.json."""
    from tests.eval.test_eval_engine import _random_model

    tmp = tmp_path_factory.mktemp("chat")
    hf = _random_model(eval_model, tmp / "random")
    data = eval_model["task_dir"]
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(MC_TASK.format(test=data / "test.jsonl", train=data / "train.jsonl"))
    (tasks / "local_chatgen.yaml").write_text(GEN_TASK.format(test=data / "test.jsonl", train=data / "train.jsonl",
                                                              until='["\\n", "."]', max_gen_toks=8))
    return {"tasks": tasks, "hf": hf, "checkpoint": tmp / "random",
            "chatml": _with_template(hf, tmp / "chatml", CHATML)}


@pytest.fixture(scope="module")
def manager(chat):
    """The harness's task index, with our two task files."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(chat["tasks"]))


@pytest.fixture(scope="module")
def harness(manager):
    """run(hf_dir, multiturn, system_instruction): the harness's HF backend on both tasks with its
    chat template applied; its per-sample requests and responses and its metrics."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    models = {}

    def run(hf_dir, multiturn: bool, system_instruction: str | None):
        if hf_dir not in models:
            models[hf_dir] = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=1, device="cpu")
        out = lm_eval.simple_evaluate(model=models[hf_dir], tasks=["local_mc", "local_chatgen"], num_fewshot=SHOTS,
                                      limit=LIMIT, log_samples=True, apply_chat_template=True,
                                      fewshot_as_multiturn=multiturn, system_instruction=system_instruction,
                                      task_manager=manager)
        return out["samples"], out["results"]

    return run


def _ours(model, chat, multiturn, system_instruction):
    return evaluate(str(model), [str(chat["tasks"] / "local_mc.yaml"), str(chat["tasks"] / "local_chatgen.yaml")],
                    num_fewshot=SHOTS, limit=LIMIT, truncate="left", dtype="fp32", log_samples=True, progress=False,
                    apply_chat_template=True, fewshot_as_multiturn=multiturn, system_instruction=system_instruction)


def test_system_instruction_without_chat_template_matches_harness(chat, manager):
    """Without a chat template the system instruction starts the plain-text prompt, joined to the
    task's description by the few-shot delimiter: the harness's contexts, built by its own request
    construction."""
    from lm_eval.tasks import get_task_dict

    from eval.taskspec import load_spec, prepare

    tasks = get_task_dict(["local_mc", "local_chatgen"], manager)
    for name, task in tasks.items():
        task.set_config(key="num_fewshot", value=SHOTS)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=LIMIT, system_instruction="Answer briefly.")
        spec, file = load_spec(str(chat["tasks"] / f"{name}.yaml"))
        ours = prepare(spec, file.parent, SHOTS, 1234, LIMIT, system_instruction="Answer briefly.").contexts
        theirs = {}
        for inst in task.instances:
            theirs.setdefault(inst.doc_id, set()).add(inst.arguments[0])
        assert [theirs[i] for i in range(LIMIT)] == [{c} for c in ours], name
        start = "\nComplete the sentence." if name == "local_chatgen" else "Q: "  # no description: joined directly
        assert ours[0].startswith("Answer briefly." + start)


@pytest.mark.parametrize("template,multiturn,system", [
    ("llmstack", True, "Answer briefly."),
    ("llmstack", False, None),
    ("chatml", True, None),
    ("chatml", False, "Answer briefly."),
])
def test_chat_prompts_and_scores_match_harness(chat, harness, template, multiturn, system):
    """With a chat template, every context (few-shot examples as turns or in one user message, the
    system instruction and the task description as the system turn) is the harness's own; per-choice
    log-likelihoods within 1e-4, acc / acc_norm and the greedy generations and exact_match equal."""
    hf_dir = chat["hf"] if template == "llmstack" else chat["chatml"]
    ref_samples, ref = harness(hf_dir, multiturn, system)
    # our exported tokenizer carries llmstack's template; the tokenizer directory a checkpoint records too
    models = [hf_dir, chat["checkpoint"]] if template == "llmstack" else [hf_dir]
    for model in models:
        res = _ours(model, chat, multiturn, system)
        assert res["tasks"]["local_mc"]["truncated"] > 0  # 64 tokens of context: truncated as the harness does
        cfg = res["config"]
        assert (cfg["apply_chat_template"], cfg["fewshot_as_multiturn"], cfg["system_instruction"]) == \
            (True, multiturn, system)
        mc, gen = res["tasks"]["local_mc"], res["tasks"]["local_chatgen"]
        assert mc["n_samples"] == gen["n_samples"] == LIMIT
        by_doc = {s["doc_id"]: s for s in ref_samples["local_mc"]}
        for s in mc["samples"]:
            r = by_doc[s["doc_id"]]
            assert {a[0] for a in r["arguments"]} == {s["context"]}, s["doc_id"]
            # a continuation follows the assistant header directly: no target delimiter
            assert [a[1] for a in r["arguments"]] == s["choices"]
            assert s["loglikelihoods"] == pytest.approx([x[0][0] for x in r["resps"]], abs=1e-4), s["doc_id"]
        assert mc["acc"] == ref["local_mc"]["acc,none"] and mc["acc_norm"] == ref["local_mc"]["acc_norm,none"]
        by_doc = {s["doc_id"]: s for s in ref_samples["local_chatgen"]}
        for s in gen["samples"]:
            r = by_doc[s["doc_id"]]
            assert r["arguments"][0][0] == s["prompt"], s["doc_id"]
            assert r["filtered_resps"][0] == s["generation"], s["doc_id"]
        assert gen["exact_match"] == ref["local_chatgen"]["exact_match,none"]
        assert len({s["generation"] for s in gen["samples"]}) > 1  # the answers say something
        first = mc["samples"][0]["context"]
        if multiturn:  # what distinguishes the two layouts, in the rendered text
            assert first.count("<|assistant|>" if template == "llmstack" else "<|im_start|>assistant") == SHOTS + 1
        else:
            assert first.count("<|assistant|>" if template == "llmstack" else "<|im_start|>assistant") == 1
        if system:
            assert system in first and "Complete the sentence." in gen["samples"][0]["prompt"]


def test_chat_template_flags_on_the_command_line(eval_model, chat, tmp_path, capsys):
    """`llmstack-eval --apply-chat-template` (multi-turn few-shot by default, as the harness;
    `fewshot_as_multiturn: false`, here from --config, for one user message) records its settings;
    bad combinations and a tokenizer without a template exit 2 with one line naming the problem."""
    from eval.cli import main

    base = ["--model", str(chat["chatml"]), "--tasks", str(chat["tasks"] / "local_mc.yaml"), "--num-fewshot", "2",
            "--limit", "2", "--truncate", "left", "--no-progress", "--log-samples"]
    out = tmp_path / "r.json"
    run_cmd([sys.executable, "-m", "eval", *base, "--apply-chat-template", "--system-instruction", "Be brief.",
             "--output", str(out)], cwd=REPO)
    res = json.loads(out.read_text())
    assert res["config"]["apply_chat_template"] is True and res["config"]["fewshot_as_multiturn"] is True
    assert res["config"]["system_instruction"] == "Be brief." and len(res["config"]["chat_template_sha256"]) == 16
    ctx = res["tasks"]["local_mc"]["samples"][0]["context"]
    assert ctx.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert ctx.count("<|im_start|>user") == SHOTS + 1 and ctx.endswith("<|im_start|>assistant\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("apply_chat_template: true\nfewshot_as_multiturn: false\n")
    assert main([*base, "--config", str(cfg), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["apply_chat_template"] is True and res["config"]["fewshot_as_multiturn"] is False
    assert res["tasks"]["local_mc"]["samples"][0]["context"].count("<|im_start|>user") == 1

    bare = _with_template(eval_model["hf"], tmp_path / "bare", None)
    capsys.readouterr()
    for args, needle in [
        (["--model", str(bare), *base[2:], "--apply-chat-template"], f"the tokenizer of {bare}"),
        ([*base, "--fewshot-as-multiturn"], "--fewshot-as-multiturn needs --apply-chat-template"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def _stopped(text: str, token_ids: list[int], eos: int, until: list[str]) -> bool:
    return eos in token_ids or any(s in text for s in until)


def test_generations_that_hit_max_gen_toks_are_counted(eval_model, chat, tmp_path, capsys):
    """hit_max_gen_toks counts the answers that used all max_gen_toks tokens without a stop string
    or EOS (transformers' greedy continuation of each prompt decides which), with a warning naming
    the task; with a budget large enough for every answer to end (here: at a space) none, and no
    warning."""
    import transformers as tf

    data = eval_model["task_dir"]
    hf = tf.AutoModelForCausalLM.from_pretrained(chat["hf"], dtype=torch.float32).eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(chat["hf"])
    until, counts = [" "], {}
    for k in (1, 40):
        spec = tmp_path / f"gen{k}.yaml"
        spec.write_text(GEN_TASK.format(test=data / "test.jsonl", train=data / "train.jsonl", until=json.dumps(until),
                                        max_gen_toks=k)
                        .replace("task: local_chatgen", f"task: gen{k}"))
        res = evaluate(str(chat["hf"]), [str(spec)], num_fewshot=0, limit=12, dtype="fp32", log_samples=True,
                       progress=False)["tasks"][f"gen{k}"]
        err = capsys.readouterr().err
        expect = 0
        for s in res["samples"]:
            ids = hf_tok(s["prompt"], return_tensors="pt").input_ids
            assert ids.shape[1] + k <= 64  # the budget is max_gen_toks, not the context
            new = hf.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
            text = hf_tok.decode(new, skip_special_tokens=True)
            hit = len(new) == k and not _stopped(text, new, hf_tok.eos_token_id, until)
            assert s["hit_max_gen_toks"] == hit, s
            expect += hit
        assert res["hit_max_gen_toks"] == expect
        counts[k] = expect
        if expect:
            assert f"warning: task gen{k}: {expect} of 12 generations reached max_gen_toks={k}; " \
                   "answers may be truncated" in err, err
        else:
            assert "max_gen_toks" not in err
    assert counts[1] >= 6 and counts[40] < counts[1], counts


def test_template_bos_is_not_doubled(chat):
    """A model trained with BOS (--bos) whose chat template begins with BOS gets no second one: the
    same log-likelihoods as without --bos; a plain prompt does get it (and scores differently)."""
    task = [str(chat["tasks"] / "local_mc.yaml")]
    run = lambda **kw: evaluate(str(chat["checkpoint"]), task, num_fewshot=0, limit=4, dtype="fp32",  # noqa: E731
                                log_samples=True, progress=False, **kw)["tasks"]["local_mc"]
    with_bos, without = run(bos=True, apply_chat_template=True), run(bos=False, apply_chat_template=True)
    assert with_bos["truncated"] == 0 and with_bos["samples"][0]["context"].startswith("<|bos|><|user|>")
    assert with_bos["bos"] is False and with_bos["samples"] == without["samples"]
    plain_bos, plain = run(bos=True), run(bos=False)
    assert plain_bos["bos"] is True
    assert plain_bos["samples"][0]["loglikelihoods"] != plain["samples"][0]["loglikelihoods"]
