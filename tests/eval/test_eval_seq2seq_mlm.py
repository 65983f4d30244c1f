"""llmstack-eval on T5 and BERT: T5 log-likelihoods equal lm-evaluation-harness's seq2seq backend,
T5 generations equal transformers' greedy generate, BERT pseudo-perplexity equals a direct
computation with transformers' BertForMaskedLM; what they cannot run exits 2."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from eval.evaluator import evaluate
from llmstack import models
from llmstack.models import hf
from tests.eval.helpers import LASTWORD_TASK, MC_TASK

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHOTS = 2
GEN_TASK = """\
task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: "Q: {{{{context}}}}"
doc_to_target: "{{{{choices[label]}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 10
metric_list:
  - metric: exact_match
"""


def export(family: str, cfg, tok_dir, out):
    """A tiny model with every weight perturbed off its init, written as a Hugging Face directory
    with its tokenizer (what `llmstack export` writes)."""
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.train.outputs import TOKENIZER_FILES

    torch.manual_seed(0)
    m = models.build_model(family, cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tok = load_tokenizer(tok_dir)
    hf.save_pretrained(family, cfg, {k: v.clone() for k, v in m.state_dict().items()}, out,
                       pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
    return out


def t5_style_tokenizer(src, out):
    """The test tokenizer with a post-processor that appends EOS, as a Hugging Face T5 tokenizer
    appends </s> (an llmstack tokenizer adds nothing): the harness then gives every encoder input an EOS."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(src, out)
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = "<|eos|>"
    backend.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, backend.token_to_id(eos))])
    backend.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def t5(tmp_path_factory, tokenizer_dir):
    """{hf, imported, task_dir, mc, lastword, gen}: a tiny T5 exported and imported back, and local tasks."""
    from data_pipeline.tokenizer import load_tokenizer
    from eval.demo import demo_mc
    from llmstack.stages.export import import_hf

    tmp = tmp_path_factory.mktemp("t5-eval")
    tok_dir = t5_style_tokenizer(tokenizer_dir, tmp / "tok")
    V = load_tokenizer(tok_dir).vocab_size
    cfg = models.build_config("t5", "t5-tiny", V, n_layer=2, n_decoder_layer=2, n_head=4, d_model=32, d_ff=48,
                              tie_embeddings=True, max_seq_len=128)
    out = {"hf": export("t5", cfg, tok_dir, tmp / "hf")}
    import_hf(str(out["hf"]), str(tmp / "imported"))
    out["imported"] = tmp / "imported"
    tasks = tmp / "tasks"
    tasks.mkdir()
    for split, n in (("test", 16), ("train", 8)):
        (tasks / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demo_mc(split)[:n]))
    (tasks / "local_mc.yaml").write_text(MC_TASK.format(test=tasks / "test.jsonl", train=tasks / "train.jsonl"))
    sentences = [d["context"] + " " + d["choices"][d["label"]] for d in demo_mc("test")[:12]]
    (tasks / "lastword.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences))
    (tasks / "local_lastword.yaml").write_text(LASTWORD_TASK.format(test=tasks / "lastword.jsonl"))
    (tasks / "local_gen.yaml").write_text(GEN_TASK.format(test=tasks / "test.jsonl"))
    out.update(task_dir=tasks, mc=tasks / "local_mc.yaml", lastword=tasks / "local_lastword.yaml",
               gen=tasks / "local_gen.yaml")
    return out


def test_t5_loglikelihoods_match_harness_seq2seq(t5):
    """Multiple-choice and loglikelihood tasks on a T5: per-request log-likelihoods within 1e-4 of
    lm-evaluation-harness's HFLM seq2seq backend on the same exported directory, metrics equal."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={t5['hf']},dtype=float32,backend=seq2seq",
                                  tasks=["local_mc", "local_lastword"], num_fewshot=SHOTS, batch_size=4, device="cpu",
                                  log_samples=True, task_manager=TaskManager(include_path=str(t5["task_dir"])))
    ref_mc = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in ref["samples"]["local_mc"]}
    ref_last = {s["doc_id"]: s["resps"][0][0] for s in ref["samples"]["local_lastword"]}
    res = evaluate(str(t5["hf"]), [str(t5["mc"]), str(t5["lastword"])], num_fewshot=SHOTS, batch_size=3,
                   dtype="fp32", log_samples=True, progress=False)
    assert "seq2seq" in res["config"]["scoring"]
    mc, last = res["tasks"]["local_mc"], res["tasks"]["local_lastword"]
    assert mc["n_samples"] == len(ref_mc) == 16 and last["n_samples"] == len(ref_last) == 12
    for s in mc["samples"]:
        assert s["loglikelihoods"] == pytest.approx(ref_mc[s["doc_id"]], abs=1e-4), s["doc_id"]
    assert mc["acc"] == ref["results"]["local_mc"]["acc,none"]
    assert mc["acc_norm"] == ref["results"]["local_mc"]["acc_norm,none"]
    for s in last["samples"]:
        ll, greedy = ref_last[s["doc_id"]]
        assert s["loglikelihood"] == pytest.approx(ll, abs=1e-4) and s["is_greedy"] == greedy, s["doc_id"]
    assert last["perplexity"] == pytest.approx(ref["results"]["local_lastword"]["perplexity,none"], rel=1e-5)
    assert last["acc"] == ref["results"]["local_lastword"]["acc,none"]


def test_t5_scores_do_not_depend_on_batch_size_or_directory_kind(t5):
    """Batch size 1 on the imported directory and 5 on the exported one: identical log-likelihoods."""
    a = evaluate(str(t5["imported"]), [str(t5["mc"])], num_fewshot=SHOTS, batch_size=1, dtype="fp32",
                 log_samples=True, progress=False)["tasks"]["local_mc"]
    b = evaluate(str(t5["hf"]), [str(t5["mc"])], num_fewshot=SHOTS, batch_size=5, dtype="fp32",
                 log_samples=True, progress=False)["tasks"]["local_mc"]
    assert [s["loglikelihoods"] for s in a["samples"]] == [s["loglikelihoods"] for s in b["samples"]]


def test_t5_generate_until_equals_transformers_greedy(t5):
    """generate_until: transformers' T5ForConditionalGeneration greedy generate (max_gen_toks new
    tokens), decoded without special tokens and cut at the first stop string, prompt by prompt."""
    import transformers as tf

    res = evaluate(str(t5["hf"]), [str(t5["gen"])], num_fewshot=1, limit=8, batch_size=3, dtype="fp32",
                   log_samples=True, progress=False)["tasks"]["local_gen"]
    tok = tf.AutoTokenizer.from_pretrained(t5["hf"])
    assert tok("a")["input_ids"][-1] == tok.eos_token_id  # prompts end with EOS, as a T5 tokenizer's
    ref = tf.T5ForConditionalGeneration.from_pretrained(t5["hf"], dtype=torch.float32).eval()
    assert len(res["samples"]) == 8
    for s in res["samples"]:
        ids = torch.tensor([tok(s["prompt"])["input_ids"]])
        with torch.no_grad():
            out = ref.generate(input_ids=ids, max_new_tokens=10, do_sample=False, num_beams=1)[0, 1:]
        text = tok.decode(out, skip_special_tokens=True)
        for stop in ("\n", "."):
            text = text.split(stop)[0]
        assert s["generation"] == text, s["doc_id"]
    assert any(s["generation"] for s in res["samples"])


def test_t5_refusals_exit_2(t5, tmp_path, capsys):
    """ppl: (rolling log-likelihood) and --bos on a T5: exit 2, one line naming the task and the alternative."""
    from eval.cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "Some text to score."}) + "\n")
    assert main(["--model", str(t5["hf"]), "--tasks", f"ppl:{docs}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task ppl:") and "loglikelihood task" in err and "\n" not in err
    assert main(["--model", str(t5["hf"]), "--tasks", str(t5["mc"]), "--bos", "--no-progress"]) == 2
    assert "--bos applies to decoder-only models" in capsys.readouterr().err


# -- BERT ------------------------------------------------------------------------------------

def reference_pll(model, tokens: list[int], cls: int, sep: int, mask: int, size: int, stride: int) -> list[float]:
    """Each token's log-probability with transformers' BertForMaskedLM: the windows of eval/mlm.py
    (module docstring) written out again; no padding (the masked copies of a window together)."""
    n = len(tokens)
    starts = list(range(0, max(n - size, 0), stride)) if n > size else []
    wins = [(a, a + size) for a in starts] + [(max(0, n - size), n)]
    by_window: dict[tuple, list[int]] = {}
    for i in range(n):
        def margin(w):
            a, b = w
            return min(i - a if a > 0 else n, b - 1 - i if b < n else n)
        w = max((w for w in wins if w[0] <= i < w[1]), key=margin)  # max keeps the first of equals
        by_window.setdefault(w, []).append(i)
    out = {}
    for (a, b), members in by_window.items():
        ids = torch.tensor([[cls, *tokens[a:b], sep]] * len(members))
        rows = torch.arange(len(members))
        cols = torch.tensor([i - a + 1 for i in members])
        ids[rows, cols] = mask
        with torch.no_grad():
            logp = model(input_ids=ids).logits[rows, cols].log_softmax(-1)
        for r, i in enumerate(members):
            out[i] = logp[r, tokens[i]].item()
    return [out[i] for i in range(n)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("bert-eval")
    V = load_tokenizer(tokenizer_dir).vocab_size
    cfg = models.build_config("bert", "bert-tiny", V, n_layer=2, n_head=4, d_model=32, max_seq_len=48)
    return export("bert", cfg, tokenizer_dir, tmp / "hf")


def test_mlm_windows_score_every_token_once():
    from eval.mlm import assign, windows

    wins = windows(10, 4, 4)
    assert wins == [(0, 4), (4, 8), (6, 10)]  # the last window full, ending at the document's end
    # token 6: one token of right context in (4, 8), none of left context in (6, 10)
    assert assign(10, wins) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert windows(3, 4, 2) == [(0, 3)]
    wins = windows(12, 6, 2)
    assert wins == [(0, 6), (2, 8), (4, 10), (6, 12)]
    assert assign(12, wins) == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]


def test_bert_pseudo_perplexity_equals_transformers(bert, tokenizer_dir, tmp_path):
    """ppl: on a BERT: pseudo-log-likelihood per token and pseudo-perplexity equal a direct
    computation with BertForMaskedLM (each position masked in turn in [CLS] window [SEP]), for short
    documents and one longer than the window (context 20, stride 7); independent of batch size."""
    import transformers as tf

    from data_pipeline.sources import builtin_texts
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    long_doc = next(t for t in builtin_texts("validation") if len(tok.encode(t)) > 60)[:240]
    texts = ["Return the sum.", "Open a file and read it.", long_doc]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    size, stride = 20, 7
    res = evaluate(str(bert), [f"ppl:{docs}"], context=size, stride=stride, batch_size=5, dtype="fp32",
                   progress=False)
    got = next(iter(res["tasks"].values()))
    ref_model = tf.BertForMaskedLM.from_pretrained(bert, dtype=torch.float32).eval()
    lps = []
    for t in texts:
        lps += reference_pll(ref_model, tok.encode(t), tok.bos_id, tok.eos_id, tok.mask_id, size - 2, stride)
    n = len(lps)
    assert len(tok.encode(long_doc)) > 2 * (size - 2) and got["method"]["windows"] > len(texts)
    assert got["tokens_scored"] == n and got["documents"] == 3
    assert got["method"]["wrap"] == ["<|bos|>", "<|eos|>"] and got["method"]["mask"] == "<|mask|>"
    pll = math.fsum(lps)
    assert got["pll_per_token"] == pytest.approx(pll / n, rel=1e-5)
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(-pll / n), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["pseudo_bits_per_byte"] == pytest.approx(-pll / math.log(2) / n_bytes, rel=1e-5)
    again = evaluate(str(bert), [f"ppl:{docs}"], context=size, stride=stride, batch_size=1, dtype="fp32",
                     progress=False)
    assert next(iter(again["tasks"].values()))["pll_per_token"] == got["pll_per_token"]


def _wordlevel_bert(tmp_path, specials: list[str]):
    """A BERT whose tokenizer is a Hugging Face word-level one declaring the given [X] tokens."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of to and is in it that file sum open read return".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", *specials, *words])}
    backend = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir(parents=True)
    backend.save(str(tok_dir / "tokenizer.json"))
    names = {"[CLS]": "cls_token", "[SEP]": "sep_token", "[MASK]": "mask_token"}
    PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), pad_token="[PAD]", unk_token="[UNK]",
                            **{names[s]: s for s in specials}).save_pretrained(str(tok_dir))
    cfg = models.build_config("bert", "bert-tiny", len(vocab), n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    return export("bert", cfg, tok_dir, tmp_path / "hf")


def test_bert_uses_declared_cls_sep_mask_and_refuses_without_mask(tmp_path, capsys):
    """A BERT tokenizer's [CLS]/[SEP]/[MASK] are the ones used; a tokenizer without a mask token
    (and none of llmstack's) exits 2 naming it."""
    from eval.cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "open the file and read it"}) + "\n")
    full = _wordlevel_bert(tmp_path / "full", ["[CLS]", "[SEP]", "[MASK]"])
    got = next(iter(evaluate(str(full), [f"ppl:{docs}"], dtype="fp32", progress=False)["tasks"].values()))
    assert got["method"]["wrap"] == ["[CLS]", "[SEP]"] and got["method"]["mask"] == "[MASK]"
    assert got["tokens_scored"] == 6 and got["pseudo_perplexity"] > 1
    no_mask = _wordlevel_bert(tmp_path / "nomask", ["[CLS]", "[SEP]"])
    assert main(["--model", str(no_mask), "--tasks", f"ppl:{docs}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no mask token" in err and "\n" not in err


def test_bert_refuses_task_kinds_it_cannot_score(bert, t5, capsys):
    """A multiple-choice task on a BERT: exit 2 naming ppl: as what a masked LM supports."""
    from eval.cli import main

    assert main(["--model", str(bert), "--tasks", str(t5["mc"]), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "task" in err and "ppl:SOURCE" in err and "\n" not in err
