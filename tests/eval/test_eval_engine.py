"""The scoring engine and the task pipeline: rolling windows, shared-context rows, batch-size
invariance, generation, offline builtin tasks, and bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from eval.engine import Scorer, mc_rows, rolling_rows, rolling_windows
from eval.evaluator import evaluate, load_model
from llmstack.errors import UsageError
from tests.conftest import REPO, run_cmd


@pytest.mark.parametrize("n,ctx,stride", [(2, 8, 8), (9, 8, 8), (100, 16, 16), (100, 16, 5), (101, 16, 1), (17, 16, 3)])
def test_rolling_windows_score_every_token_once(n, ctx, stride):
    tokens = list(range(1000, 1000 + n))
    rows = rolling_rows(tokens, ctx, stride, "doc")
    scored = [k[1] for r in rows for _, _, k in r.targets]
    assert sorted(scored) == list(range(1, n))  # every token after the first, once
    for r in rows:
        assert len(r.ids) <= ctx
        for p, target, (_, t) in r.targets:
            assert target == tokens[t] and r.ids[p] == tokens[t - 1]  # the position before predicts it
    for i, (start, end, k) in enumerate(rolling_windows(n, ctx, stride)):
        if i:  # after the first window every scored token has >= ctx - stride tokens of context
            assert end - k + 1 - start >= ctx - stride + 1 or start == 0


def test_shared_context_rows_equal_separate_scoring(eval_model):
    """Choices packed into one row behind their common context score as if each ran alone."""
    model, tok, _ = load_model(str(eval_model["hf"]), dtype="fp32")
    scorer = Scorer(model, tok, batch_size=4, progress=False)
    pairs = [("The function returns", c) for c in (" a list.", " None", " the sum of the items.", " x")]
    pairs += [("Open the file", " and read it."), ("Open the file", " for writing.")]
    reqs = scorer.encode_pairs(pairs, bos=False)
    rows = mc_rows(reqs, scorer.max_len)
    assert len(rows) == 2 and sum(len(r.targets) for r in rows) == sum(len(c) for _, c in reqs)
    together = scorer.loglikelihood(reqs)
    alone = [scorer.loglikelihood([r])[0] for r in reqs]
    for (a, ga), (b, gb) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def _gen_task(tmp_path):
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in
                            [("def add(a, b):", "return a + b"), ("Return the", "Value"), ("The list of", "items")]))
    spec = tmp_path / "gen.yaml"
    spec.write_text(f"task: gen\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                    "test_split: test\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n"
                    "generation_kwargs: {until: [\"lo\", \".\"], max_gen_toks: 12}\n"
                    "metric_list: [{metric: exact_match, ignore_case: true}, {metric: f1}]\n")
    return spec


def test_batch_size_invariance(eval_model, tmp_path):
    """Identical metrics and per-sample log-likelihoods at batch sizes 1, 8 and 32 (multiple choice
    with few-shot prompts, overlapping-window perplexity, generation)."""
    docs = tmp_path / "docs.jsonl"
    from data_pipeline.sources import builtin_texts

    docs.write_text("".join(json.dumps({"text": t[:900]}) + "\n" for _, t in zip(range(3), builtin_texts("validation"))))
    tasks = [str(eval_model["task"]), f"ppl:{docs}", str(_gen_task(tmp_path))]
    runs = {bs: evaluate(str(eval_model["hf"]), tasks, num_fewshot=2, batch_size=bs, truncate="left", context=32,
                         stride=12, limit=16, dtype="fp32", log_samples=True, progress=False)["tasks"]
            for bs in (1, 8, 32)}
    assert runs[1]["local_mc"]["n_samples"] == 16 and runs[1][f"ppl:{docs}"]["tokens_scored"] > 500
    assert runs[1] == runs[8] == runs[32]  # exact equality, not approximate


def _random_model(eval_model, out):
    """The eval_model architecture with random weights (large init: varied greedy text), as a
    consolidated directory plus its Hugging Face export."""
    from safetensors.torch import save_file

    from llmstack import models
    from llmstack.stages.export import export
    from llmstack.train.weights import read_weights

    _, info, _ = read_weights(eval_model["hf"])
    torch.manual_seed(0)
    cfg = models.config_from_dict("gpt", dict(info.model, init_std=0.5))
    model = models.build_model("gpt", cfg)
    model.init_weights()
    out.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    keep = ("model_family", "tokenizer_hash", "tokenizer_path", "config")
    (out / "llmstack_model.json").write_text(json.dumps({**{k: getattr(info, k) for k in keep}, "model": info.model}))
    export(str(out), str(out.parent / "random-hf"))
    return out.parent / "random-hf"


def test_generation_matches_transformers_greedy(eval_model, tmp_path):
    """generate_until: greedy text equals transformers' greedy generate on the exported model, cut at
    the first stop string; exact match computed on it."""
    import transformers as tf

    hf_dir = _random_model(eval_model, tmp_path / "random")
    res = evaluate(str(hf_dir), [str(_gen_task(tmp_path))], dtype="fp32", log_samples=True,
                   progress=False)["tasks"]["gen"]
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    ems, cut = [], 0
    for s in res["samples"]:
        ids = hf_tok(s["prompt"], return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        full = hf_tok.decode(out).split("<|eos|>")[0]
        text = full.split("lo")[0].split(".")[0]
        cut += text != full
        assert s["generation"] == text
        ems.append(float(text.lower() == s["gold"][0].lower()))
    assert len({s["generation"] for s in res["samples"]}) > 1 and all(s["generation"] for s in res["samples"])
    assert cut > 0  # a stop string ended at least one answer early
    assert res["exact_match"] == sum(ems) / len(ems)


def test_builtin_offline_tasks(eval_model):
    """demo_mc (builtin corpus) and the in-context smoke tasks run offline; prompts as documented."""
    from eval.taskspec import builtin_task_files, load_spec, prepare

    assert {"demo_mc", "icl_sentiment", "icl_topic", "icl_topic_gen", "hellaswag", "arc_easy", "arc_challenge",
            "piqa", "lambada_openai", "winogrande", "boolq"} <= set(builtin_task_files())
    for name in builtin_task_files():
        load_spec(name)  # every shipped spec validates
    spec, f = load_spec("icl_sentiment")
    prep = prepare(spec, f.parent, 3, 1234)
    assert prep.contexts[0].count(" -> ") == 3 and prep.contexts[0].endswith("I love apples ->")
    assert "I love apples" not in prep.contexts[0][:-len("I love apples ->")]  # never its own example
    res = evaluate(str(eval_model["hf"]), ["demo_mc", "icl_topic"], num_fewshot=0, progress=False)["tasks"]
    assert res["demo_mc"]["n_samples"] == 200 and 0 <= res["demo_mc"]["acc"] <= 1
    assert res["icl_topic"]["n_samples"] == 24


def _task(tmp_path, body: str, rows: list | None = None) -> str:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows or [])))
    spec = tmp_path / "t.yaml"
    spec.write_text(f"task: broken\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                    f"test_split: test\n{body}")
    return str(spec)


MC = "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: label\ndoc_to_choice: ['yes', 'no']\n"


@pytest.mark.parametrize("case,body,rows,expect", [
    ("unknown field", MC + "doc_to_txt: q\n", [{"q": "x", "label": 0}], ["task broken", "unknown field 'doc_to_txt'"]),
    ("missing target", MC, [{"q": "x", "label": 0}, {"q": "y"}], ["task broken", "sample 1", "doc_to_target"]),
    ("empty dataset", MC, [], ["task broken", "no samples"]),
    ("bad metric", MC + "metric_list: [{metric: bleu}]\n", [{"q": "x", "label": 0}], ["task broken", "bleu"]),
    ("gold out of range", MC, [{"q": "x", "label": 5}], ["task broken", "sample 0", "doc_to_target"]),
    ("too long", MC, [{"q": "word " * 200, "label": 0}], ["task broken: sample 0", "--truncate left"]),
])
def test_bad_input_names_task_and_field(eval_model, tmp_path, case, body, rows, expect):
    with pytest.raises(UsageError) as e:
        evaluate(str(eval_model["hf"]), [_task(tmp_path, body, rows)], progress=False)
    for part in expect:
        assert part in str(e.value), (case, str(e.value))


def test_cli_bad_input_exits_2_and_writes_results(eval_model, tmp_path):
    bad = run_cmd([sys.executable, "-m", "eval", "--model", str(eval_model["hf"]), "--tasks",
                   _task(tmp_path, MC + "doc_to_txt: q\n", [{"q": "x", "label": 0}])], cwd=REPO, check=False)
    assert bad.returncode == 2 and "doc_to_txt" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "r.json"
    ok = run_cmd([sys.executable, "-m", "eval", "--model", str(eval_model["hf"]), "--tasks", "icl_sentiment",
                  "--num-fewshot", "2", "--output", str(out), "--log-samples"], cwd=tmp_path)
    res = json.loads(out.read_text())
    assert "icl_sentiment" in ok.stdout and "acc_norm" in ok.stdout  # the table
    assert res["model_hash"] and res["tokenizer_hash"] and res["config"]["bos"] is False
    task = res["tasks"]["icl_sentiment"]
    assert task["num_fewshot"] == 2 and task["fewshot_seed"] == 1234 and len(task["samples"]) == 24
    assert len(task["samples"][0]["loglikelihoods"]) == 2


def _docs(tmp_path, n=3, chars=900):
    from data_pipeline.sources import builtin_texts

    docs = tmp_path / "docs.jsonl"
    texts = [t[:chars] for _, t in zip(range(n), builtin_texts("validation"))]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return docs


def test_bf16_eval_is_close_to_fp32_and_recorded(eval_model, tmp_path, capsys):
    """`llmstack-eval --dtype bf16`: perplexity within 1% (relative) of fp32, multiple-choice
    log-likelihoods within 0.1 nats; the results JSON records dtype and device. Default on a
    machine without a GPU: cpu and fp32, numbers as before."""
    from eval.cli import main

    docs = _docs(tmp_path)
    tasks = [f"ppl:{docs}", str(eval_model["task"])]
    out = tmp_path / "bf16.json"
    assert main(["--model", str(eval_model["checkpoint"]), "--tasks", ",".join(tasks), "--num-fewshot", "2",
                 "--truncate", "left", "--dtype", "bf16", "--device", "cpu", "--log-samples", "--no-progress",
                 "--output", str(out)]) == 0
    b16 = json.loads(out.read_text())
    fp32 = evaluate(str(eval_model["checkpoint"]), tasks, num_fewshot=2, truncate="left", dtype="fp32", device="cpu",
                    log_samples=True, progress=False)
    assert (b16["config"]["dtype"], b16["config"]["device"]) == ("bf16", "cpu")
    assert (fp32["config"]["dtype"], fp32["config"]["device"]) == ("fp32", "cpu")
    assert b16["model_hash"] == fp32["model_hash"]  # the stored weights, whatever dtype they ran in
    p16, p32 = b16["tasks"][f"ppl:{docs}"]["perplexity"], fp32["tasks"][f"ppl:{docs}"]["perplexity"]
    assert p16 != p32 and abs(p16 / p32 - 1) < 0.01, (p16, p32)
    for s16, s32 in zip(b16["tasks"]["local_mc"]["samples"], fp32["tasks"]["local_mc"]["samples"]):
        assert s16["loglikelihoods"] == pytest.approx(s32["loglikelihoods"], abs=0.1)
    if not torch.cuda.is_available():  # auto = cpu + fp32: exactly the fp32 numbers
        auto = evaluate(str(eval_model["checkpoint"]), tasks, num_fewshot=2, truncate="left", log_samples=True,
                        progress=False)
        assert (auto["config"]["dtype"], auto["config"]["device"]) == ("fp32", "cpu")
        assert auto["tasks"] == fp32["tasks"]


def test_cli_device_and_dtype_errors_exit_2(eval_model, capsys):
    from eval.cli import main

    cases = [(["--device", "cpu", "--dtype", "fp16"], "error: --dtype fp16 needs a CUDA device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "error: --device cuda: no CUDA device is available"))
    for extra, needle in cases:
        assert main(["--model", str(eval_model["hf"]), "--tasks", "demo_mc", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(needle) and err.count("\n") == 1, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eval_matches_cpu(eval_model, tmp_path):
    """On a GPU: fp32 perplexity equals the CPU's to 1e-4 (relative), bf16 (the default there) to 1%."""
    docs = _docs(tmp_path)
    task = f"ppl:{docs}"
    run = lambda **kw: evaluate(str(eval_model["checkpoint"]), [task], progress=False, **kw)  # noqa: E731
    cpu = run(device="cpu", dtype="fp32")
    gpu32, auto = run(device="cuda", dtype="fp32"), run()
    assert (auto["config"]["device"], auto["config"]["dtype"]) == ("cuda:0", "bf16")
    want = cpu["tasks"][task]["perplexity"]
    assert gpu32["tasks"][task]["perplexity"] == pytest.approx(want, rel=1e-4)
    assert auto["tasks"][task]["perplexity"] == pytest.approx(want, rel=1e-2)
