"""Parity with the references: lm-evaluation-harness (`--model hf`) on the exported model and the
same local task, and a direct perplexity computation with `transformers`."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from eval.engine import rolling_windows
from eval.evaluator import evaluate

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHOTS = 2


@pytest.fixture(scope="module")
def harness_hf(eval_model):
    """The harness's own HF backend on the exported model: results and per-sample log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={eval_model['hf']},dtype=float32",
                                  tasks=["local_mc", "local_roll", "local_lastword"], num_fewshot=SHOTS, batch_size=4,
                                  device="cpu", log_samples=True,
                                  task_manager=TaskManager(include_path=str(eval_model["task_dir"])))
    lls = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in out["samples"]["local_mc"]}
    return out["results"]["local_mc"], lls, out["results"]["local_roll"], out["results"]["local_lastword"]


def test_multiple_choice_matches_harness(eval_model, harness_hf):
    """acc and acc_norm equal the harness's; every per-choice log-likelihood within 1e-4 (exported
    HF directory and the native checkpoint alike)."""
    ref, ref_lls, _, _ = harness_hf
    for model in (eval_model["hf"], eval_model["checkpoint"]):
        res = evaluate(str(model), [str(eval_model["task"])], num_fewshot=SHOTS, bos=False, truncate="left",
                       dtype="fp32", log_samples=True, progress=False)["tasks"]["local_mc"]
        assert res["n_samples"] == len(ref_lls) == 24
        assert res["acc"] == ref["acc,none"] and res["acc_norm"] == ref["acc_norm,none"]
        assert res["acc_stderr"] == pytest.approx(ref["acc_stderr,none"], rel=1e-9)
        assert res["truncated"] > 0  # the 64-token context forces left truncation, as in the harness
        for s in res["samples"]:
            assert s["loglikelihoods"] == pytest.approx(ref_lls[s["doc_id"]], abs=1e-4), s["doc_id"]


def test_harness_adapter_runs_harness_tasks_on_our_checkpoint(eval_model, harness_hf):
    """The `llmstack` harness model on the native checkpoint gives the harness's own HF numbers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import eval.harness  # noqa: F401 (registers the model)

    out = lm_eval.simple_evaluate(model="llmstack", model_args=f"checkpoint={eval_model['checkpoint']},dtype=fp32",
                                  tasks=["local_mc", "local_roll"], num_fewshot=SHOTS, batch_size=4, log_samples=True,
                                  task_manager=TaskManager(include_path=str(eval_model["task_dir"])))
    ref, ref_lls, ref_roll, _ = harness_hf
    got = out["results"]["local_mc"]
    assert got["acc,none"] == ref["acc,none"] and got["acc_norm,none"] == ref["acc_norm,none"]
    for s in out["samples"]["local_mc"]:
        assert [r[0][0] for r in s["resps"]] == pytest.approx(ref_lls[s["doc_id"]], abs=1e-4)
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):  # loglikelihood_rolling
        assert out["results"]["local_roll"][f"{m},none"] == pytest.approx(ref_roll[f"{m},none"], rel=1e-5)


def test_rolling_and_target_loglikelihood_tasks_match_harness(eval_model, harness_hf):
    """loglikelihood_rolling (each document alone, windows of the model's context) and a LAMBADA-style
    loglikelihood task (acc: greedy decoding gives the last word; perplexity) as the harness."""
    ref_roll, ref_last = harness_hf[2], harness_hf[3]
    res = evaluate(str(eval_model["checkpoint"]), [str(eval_model["rolling_task"]), str(eval_model["lastword_task"])],
                   num_fewshot=SHOTS, truncate="left", dtype="fp32", progress=False)["tasks"]
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert res["local_roll"][m] == pytest.approx(ref_roll[f"{m},none"], rel=1e-5), m
    assert res["local_lastword"]["acc"] == ref_last["acc,none"]
    assert res["local_lastword"]["perplexity"] == pytest.approx(ref_last["perplexity,none"], rel=1e-5)


def _docs(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_perplexity_equals_transformers(eval_model, tmp_path):
    """ppl: in stream mode on the exported model equals transformers' loss over the same tokens: one window when
    the text fits, and overlapping rolling windows (context 24, stride 7) over a longer text."""
    import transformers as tf

    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(eval_model["hf"])
    hf = tf.AutoModelForCausalLM.from_pretrained(eval_model["hf"], dtype=torch.float32).eval()

    short = ["Return the sum.", "Open a file."]
    stream = [t for s in short for t in tok.encode(s) + [tok.eos_id]]
    assert len(stream) <= 64
    res = evaluate(str(eval_model["hf"]), [f"ppl:{_docs(tmp_path, short)}"], context=64, dtype="fp32", progress=False,
                   ppl_mode="stream")
    got = next(iter(res["tasks"].values()))
    with torch.no_grad():
        ids = torch.tensor([stream])
        ref = torch.nn.functional.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:]).item()
    assert got["tokens_scored"] == len(stream) - 1
    assert got["nll_per_token"] == pytest.approx(ref, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    n_bytes = sum(len(s.encode()) for s in short)
    assert got["bits_per_byte"] == pytest.approx(ref * (len(stream) - 1) / math.log(2) / n_bytes, rel=1e-5)

    from data_pipeline.sources import builtin_texts

    long_doc = next(t for t in builtin_texts("validation") if len(tok.encode(t)) > 300)[:500]  # ~130 tokens
    ids = tok.encode(long_doc) + [tok.eos_id]
    res = evaluate(str(eval_model["hf"]), [f"ppl:{_docs(tmp_path, [long_doc])}"], context=24, stride=7, dtype="fp32",
                   progress=False, ppl_mode="stream")
    got = next(iter(res["tasks"].values()))
    nll, n = 0.0, 0
    with torch.no_grad():
        for start, end, scored in rolling_windows(len(ids), 24, 7):
            x = torch.tensor([ids[start:end + 1]])
            logp = hf(x[:, :-1]).logits[0].log_softmax(-1)
            tgt = x[0, 1:]
            nll -= logp[-scored:].gather(1, tgt[-scored:, None]).sum().item()
            n += scored
    assert got["tokens_scored"] == n == len(ids) - 1
    assert got["nll_per_token"] == pytest.approx(nll / n, abs=1e-5)
