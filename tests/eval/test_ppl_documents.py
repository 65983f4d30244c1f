"""`ppl:SOURCE` scores each document on its own by default, as lm-evaluation-harness's
`loglikelihood_rolling` (its wikitext task); `--ppl-mode stream` keeps one concatenated stream.

References: `transformers`' GPT2LMHeadModel on the exported model, windowed by the harness's own
`get_rolling_token_windows`, and the harness's evaluator with its HF backend on a local task."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from eval.evaluator import evaluate

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHORT = ["Open a file.", "Café naïve — déjà vu, 3 × 4 = 12."]  # short, and multi-byte UTF-8


@pytest.fixture(scope="module")
def docs(eval_model, tmp_path_factory):
    """(source spec, texts in source order, jsonl of the same texts): two .txt files and a .jsonl of
    documents from one sentence to several windows of the 64-token context."""
    from data_pipeline.sources import builtin_texts, iter_texts

    d = tmp_path_factory.mktemp("ppl-docs")
    val = [t for _, t in zip(range(4), builtin_texts("validation"))]
    long_txt, mid, longer = val[0][:1200], val[1][:260], val[2][:700]
    (d / "a_long.txt").write_text(long_txt)
    (d / "b_docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [SHORT[0], mid, longer]))
    (d / "c_short.txt").write_text(SHORT[1])
    texts = [long_txt, SHORT[0], mid, longer, SHORT[1]]
    spec = f"{d}/*"
    assert list(iter_texts(spec)) == texts  # the order the source yields them (sorted files)
    jsonl = tmp_path_factory.mktemp("ppl-task") / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return spec, texts, jsonl


@pytest.fixture(scope="module")
def hf_ref(eval_model):
    """transformers' model and tokenizer of the exported directory."""
    import transformers as tf

    model = tf.GPT2LMHeadModel.from_pretrained(eval_model["hf"], dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(eval_model["hf"])
    return model, tok


def cli_ppl(model, spec, tmp_path, *extra) -> dict:
    """`llmstack-eval --model MODEL --tasks ppl:SPEC EXTRA`: the ppl task's results."""
    from eval.cli import main

    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    assert main(["--model", str(model), "--tasks", f"ppl:{spec}", "--dtype", "fp32", "--device", "cpu",
                 "--no-progress", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())["tasks"][f"ppl:{spec}"]


@torch.no_grad()
def nll_of_windows(model, windows) -> tuple[float, int]:
    """(total NLL, tokens) of the harness's (input tokens, predicted tokens) windows: the last
    len(predicted) logits of each window's input predict its predicted tokens."""
    nll, n = 0.0, 0
    for inp, pred in windows:
        logp = model(torch.tensor([inp])).logits[0, -len(pred):].double().log_softmax(-1)
        nll -= logp.gather(1, torch.tensor(pred)[:, None]).sum().item()
        n += len(pred)
    return nll, n


def per_document_reference(model, tok, texts, context, stride) -> tuple[float, int]:
    """Each document alone after BOS (EOS without one), in the harness's rolling windows:
    context_len = context - stride + 1 tokens carried over (1: disjoint windows)."""
    from lm_eval.utils import get_rolling_token_windows

    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        a, b = nll_of_windows(model, get_rolling_token_windows(ids, prefix, context, context - stride + 1))
        nll, n = nll + a, n + b
    return nll, n


@pytest.mark.parametrize("context,stride", [(None, None), (24, 7)])
def test_document_ppl_equals_transformers_per_document(eval_model, docs, hf_ref, tmp_path, context, stride):
    """Default: every document after the BOS prefix, disjoint windows of the model's 64 tokens (the
    last with full context); with --context 24 --stride 7 overlapping windows per document. Total
    NLL over total tokens equals transformers' to 1e-5 (relative)."""
    spec, texts, _ = docs
    model, tok = hf_ref
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(lengths) > 2 * 64 and min(lengths) < 24 and sorted(lengths) != lengths  # several windows, unsorted
    extra = ["--context", str(context), "--stride", str(stride)] if context else []
    got = cli_ppl(eval_model["hf"], spec, tmp_path, *extra)
    T = context or model.config.n_positions
    nll, n = per_document_reference(model, tok, texts, T, stride or T)
    assert got["mode"] == "document" and got["prefix"] == "bos" and (got["context"], got["stride"]) == (T, stride or T)
    assert got["tokens_scored"] == n == sum(lengths) and got["documents"] == len(texts)
    assert got["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert got["bytes"] == n_bytes > sum(len(t) for t in texts)  # the multi-byte characters count as bytes
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_document_ppl_text_metrics_equal_harness_wikitext_metrics(eval_model, docs, tmp_path):
    """word_perplexity, byte_perplexity and bits_per_byte equal lm-evaluation-harness's own (its HF
    backend on the exported directory, a local loglikelihood_rolling task over the same documents,
    the harness's aggregation)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.eval.helpers import ROLLING_TASK

    spec, texts, jsonl = docs
    (jsonl.parent / "local_roll.yaml").write_text(ROLLING_TASK.format(test=jsonl))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={eval_model['hf']},dtype=float32",
                                  tasks=["local_roll"], batch_size=4, device="cpu",
                                  task_manager=TaskManager(include_path=str(jsonl.parent)))
    ref = out["results"]["local_roll"]
    got = cli_ppl(eval_model["hf"], spec, tmp_path)
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[m] == pytest.approx(ref[f"{m},none"], rel=1e-4), m


def test_stream_mode_keeps_cross_document_context(eval_model, docs, hf_ref, tmp_path):
    """--ppl-mode stream: the documents, each followed by EOS (no BOS: off for a Hugging Face
    directory), as one stream in disjoint 64-token windows, as before; a different number."""
    from lm_eval.utils import get_rolling_token_windows

    spec, texts, _ = docs
    model, tok = hf_ref
    stream = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    nll, n = nll_of_windows(model, get_rolling_token_windows(stream[1:], stream[0], 64, 1))
    got = cli_ppl(eval_model["hf"], spec, tmp_path, "--ppl-mode", "stream")
    assert got["mode"] == "stream" and got["bos"] is False
    assert got["tokens_scored"] == n == len(stream) - 1
    assert got["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    doc = cli_ppl(eval_model["hf"], spec, tmp_path)
    assert abs(doc["perplexity"] / got["perplexity"] - 1) > 1e-3, (doc["perplexity"], got["perplexity"])


def test_default_scores_each_document_independently(eval_model, docs, tmp_path):
    """By default (evaluate() and the CLI alike) a document's log-likelihood does not depend on
    the other documents: the total NLL of a source is the sum of its documents' NLLs scored
    alone. Also on the native checkpoint (windows of its training length, 32 tokens), and --bos
    does not change it (the prefix is the BOS token either way)."""
    _, texts, _ = docs

    def total_nll(path, **kw):
        res = evaluate(str(eval_model["checkpoint"]), [f"ppl:{path}"], dtype="fp32", device="cpu", progress=False, **kw)
        r = res["tasks"][f"ppl:{path}"]
        assert r["mode"] == "document" and r["prefix"] == "bos" and r["context"] == 32
        return r["nll_per_token"] * r["tokens_scored"], r

    alone = 0.0
    for i, t in enumerate(texts[:3]):
        one = tmp_path / f"doc{i}.jsonl"
        one.write_text(json.dumps({"text": t}) + "\n")
        alone += total_nll(one)[0]
    together = tmp_path / "together.jsonl"
    together.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    nll, res = total_nll(together)
    assert nll == pytest.approx(alone, rel=1e-9)
    _, with_bos = total_nll(together, bos=True)
    assert with_bos == res
