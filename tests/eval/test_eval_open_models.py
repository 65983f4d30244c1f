"""`llmstack-eval` and `llmstack generate --chat` on a Hugging Face directory of each open-model
family llmstack imports natively: Llama 3.2, Qwen2.5, Qwen3, Mistral, Phi-3, Pythia (GPT-NeoX),
Gemma 2 and Gemma 3, each from its published config (cut down as in tests/models/) with random
weights and a byte-level BPE tokenizer trained in process, carrying the family's special tokens,
BOS / EOS / PAD and a chat template in the family's style (Llama 3, ChatML, Mistral [INST], Phi-3,
Gemma turns).

- perplexity (`ppl:`, document mode) equals lm-evaluation-harness's HF backend on a local
  loglikelihood_rolling task over the same documents (word / byte perplexity, bits per byte), and a
  multiple-choice task's per-choice log-likelihoods, acc and acc_norm equal the harness's;
- `generate --chat`: the prompt is the tokenizer's own template rendered by transformers'
  `apply_chat_template(add_generation_prompt=True)`, the reply equals transformers' greedy
  `generate` on those ids (stopping on the same ids: the template's end-of-turn and every EOS),
  and a reply that reaches the end-of-turn token stops there.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf

from tests.eval.helpers import MC_TASK, ROLLING_TASK
from tests.models import hf_parity, test_hf_gemma, test_hf_open_models as om
from tests.models.test_export_fidelity import LLAMA3_TEMPLATE

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["<pad>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
           "{% endif %}{% endfor %}")
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>' + "
        "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
         "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")

# family style: (bos, eos, pad, template, the token that ends an assistant turn)
STYLES = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3_TEMPLATE, "<|eot_id|>"),
    "chatml": (None, "<|endoftext|>", "<|endoftext|>", CHATML, "<|im_end|>"),
    "mistral": ("<s>", "</s>", None, MISTRAL, "</s>"),
    "phi3": ("<s>", "<|endoftext|>", "<pad>", PHI3, "<|end|>"),
    "gemma": ("<bos>", "<eos>", "<pad>", GEMMA, "<end_of_turn>"),
}
# (id, published config, chat style, HF dir writer)
CASES = [
    ("llama-3.2", om.LLAMA_3_2, "llama3", hf_parity.write_published),
    ("qwen2.5", om.QWEN_2_5, "chatml", hf_parity.write_published),
    ("qwen3", om.QWEN_3, "chatml", hf_parity.write_published),
    ("mistral-7b", om.MISTRAL_7B, "mistral", hf_parity.write_published),
    ("phi-3-mini", om.PHI_3_MINI, "phi3", hf_parity.write_published),
    ("pythia", om.PYTHIA, "chatml", hf_parity.write_published),
    ("gemma-2", test_hf_gemma.GEMMA_2_2B, "gemma", test_hf_gemma.write_published),
    ("gemma-3", test_hf_gemma.GEMMA_3_1B, "gemma", test_hf_gemma.write_published),
]
DOCS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
        "Sphinx of black quartz, judge my vow.", "A tiny model, a tiny tokenizer."]
# short enough for the smallest context here (Qwen2.5's 64 tokens) with this small vocabulary
MC_DOCS = [("The quick brown fox", ["jumps.", "sleeps.", "quartz"], 0), ("Pack my box with", ["five jugs", "a dog"], 0),
           ("Sphinx of black", ["quartz", "fox", "vow"], 0), ("Judge my", ["vow.", "box!"], 0),
           ("A tiny model,", ["a tiny tokenizer", "a lazy dog"], 1), ("How vexingly", ["quick", "daft"], 1),
           ("The lazy", ["dog.", "zebras", "jugs"], 0), ("Five dozen", ["liquor jugs", "brown foxes"], 1)]
CHATS = ["How vexingly quick?", "Judge my box."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def base_tokenizer():
    from tests.models.test_export_fidelity import bpe_tokenizer

    return bpe_tokenizer(SPECIALS, vocab_size=320)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A local multiple-choice task and a loglikelihood_rolling task over DOCS (and DOCS as a jsonl source)."""
    d = tmp_path_factory.mktemp("open-tasks")
    for split, docs in (("test", MC_DOCS), ("train", MC_DOCS[:2])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(dict(zip(("context", "choices", "label"), x))) + "\n"
                                                  for x in docs))
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (d / "local_mc.yaml").write_text(MC_TASK.format(test=d / "test.jsonl", train=d / "train.jsonl"))
    (d / "local_roll.yaml").write_text(ROLLING_TASK.format(test=d / "docs.jsonl"))
    return d


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def family(request, base_tokenizer, tmp_path_factory):
    """An HF directory: the family's published config over the tokenizer's vocabulary and special
    ids, random weights, the tokenizer with the family's template. Also the end-of-turn id."""
    name, config, style, write = request.param
    bos, eos, pad, template, end = STYLES[style]
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=base_tokenizer, bos_token=bos, eos_token=eos, pad_token=pad)
    tok.chat_template = template
    ids = {k: tok.convert_tokens_to_ids(v) if v else None for k, v in dict(bos=bos, eos=eos, pad=pad, end=end).items()}
    cfg = dict(config, vocab_size=len(tok), bos_token_id=ids["bos"], pad_token_id=ids["pad"],
               eos_token_id=[ids["eos"], ids["end"]] if isinstance(config.get("eos_token_id"), list) else ids["eos"])
    d = tmp_path_factory.mktemp(name) / "hf"
    theirs = write(d, cfg)
    tok.save_pretrained(str(d))
    return dict(name=name, dir=d, theirs=theirs, tok=tf.AutoTokenizer.from_pretrained(d), end=ids["end"],
                eos=cfg["eos_token_id"])


def test_eval_ppl_and_multiple_choice_equal_harness(family, tasks):
    """ppl: (document mode) and a multiple-choice task through `llmstack-eval` on the HF directory
    equal lm-evaluation-harness's HF backend on the same directory."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.cli import main

    out = tasks / f"{family['name']}.json"
    assert main(["--model", str(family["dir"]), "--tasks", f"ppl:{tasks / 'docs.jsonl'},{tasks / 'local_mc.yaml'}",
                 "--dtype", "fp32", "--device", "cpu", "--no-progress", "--log-samples", "--output", str(out)]) == 0
    ours = json.loads(out.read_text())["tasks"]
    ppl, mc = ours[f"ppl:{tasks / 'docs.jsonl'}"], ours["local_mc"]
    assert ppl["mode"] == "document" and ppl["documents"] == len(DOCS)

    theirs = HFLM(pretrained=str(family["dir"]), dtype="float32", batch_size=4, device="cpu")
    ref = lm_eval.simple_evaluate(model=theirs, tasks=["local_mc", "local_roll"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ppl[m] == pytest.approx(ref["results"]["local_roll"][f"{m},none"], rel=1e-4), m
    by_doc = {s["doc_id"]: s for s in ref["samples"]["local_mc"]}
    assert len(mc["samples"]) == len(by_doc) == 8
    for s in mc["samples"]:
        r = by_doc[s["doc_id"]]
        assert s["loglikelihoods"] == pytest.approx([x[0][0] for x in r["resps"]], abs=1e-4), s["doc_id"]
    assert mc["acc"] == ref["results"]["local_mc"]["acc,none"]
    assert mc["acc_norm"] == ref["results"]["local_mc"]["acc_norm,none"]


def _hf_reply(family, prompt: list[int], stops: list[int]) -> str:
    x = torch.tensor([prompt])
    out = family["theirs"].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=stops, pad_token_id=stops[0])
    new = out[0, len(prompt):].tolist()
    new = new[:-1] if new and new[-1] in stops else new
    return family["tok"].decode(new, skip_special_tokens=False)


def test_generate_chat_uses_the_template_and_equals_transformers(family):
    """`llmstack generate --chat`: the prompt ids are transformers' apply_chat_template of the
    user turn with the generation prompt; the reply equals transformers' greedy generate on those
    ids stopping at the template's end-of-turn and EOS ids. With the end-of-turn token's LM-head
    row made to win at the third new token, both stop there."""
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.stages.generation import chat_prompts, run

    hf_tok, d = family["tok"], family["dir"]
    convs = [[{"role": "user", "content": c}] for c in CHATS]
    ids, stops = chat_prompts(load_tokenizer(d), convs)
    want = [list(hf_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
            for m in convs]
    assert ids == want
    assert stops == [family["end"]]  # the token the template closes a reply with, found from the template
    eos = family["eos"] if isinstance(family["eos"], list) else [family["eos"]]
    all_stops = list(dict.fromkeys([*stops, *eos]))

    got = run(str(d), [], chat=CHATS, max_new_tokens=NEW_TOKENS, temperature=0.0, device="cpu", dtype="fp32")
    assert got == [_hf_reply(family, p, all_stops) for p in want]
    assert all(got)  # replies that say something


def test_generate_chat_stops_at_the_templates_end_of_turn(family, tmp_path):
    """A copy of the model whose end-of-turn token's LM-head row is made to win a few tokens into
    the reply (1.5 x the row of the token greedy decoding picks there): the reply ends at that
    token, as transformers' generate with the same stop ids, before the token limit."""
    import shutil

    from llmstack.stages.generation import run

    d = tmp_path / "hf"
    shutil.copytree(family["dir"], d)
    model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = list(family["tok"].apply_chat_template([{"role": "user", "content": CHATS[0]}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
    eos = family["eos"] if isinstance(family["eos"], list) else [family["eos"]]
    stops = list(dict.fromkeys([family["end"], *eos]))

    def greedy(**kw):
        return model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              **kw)[0, len(prompt):].tolist()

    with torch.no_grad():
        free = greedy(eos_token_id=None)
        w = model.get_output_embeddings().weight
        row = w[family["end"]].clone()
        # a tied head also changes the token's input embedding (in the prompt of ChatML or Gemma
        # turns), which may change the earlier replies: try the next new token until one stops there
        for k in (i for i in range(2, NEW_TOKENS) if free[i] not in free[:i]):
            w[family["end"]] = w[free[k]] * 1.5
            out = greedy(eos_token_id=stops)
            if out[-1] == family["end"] and len(out) < NEW_TOKENS:
                break
            w[family["end"]] = row
    assert out[-1] == family["end"] and len(out) < NEW_TOKENS  # transformers stopped at the end of the turn
    config = (d / "config.json").read_text()
    model.save_pretrained(d)
    (d / "config.json").write_text(config)  # the published spelling, as written
    got = run(str(d), [], chat=CHATS[:1], max_new_tokens=NEW_TOKENS, temperature=0.0, device="cpu", dtype="fp32")
    assert got == [family["tok"].decode(out[:-1], skip_special_tokens=False)]


def test_llmstack_tokenizers_keep_their_own_chat_format(tmp_path):
    """A tokenizer trained by llmstack renders with llmstack's chat format (formats.encode_prompt,
    which its saved HF template reproduces) and a reply stops at <|end|>; a family template is not
    used for it."""
    from data_pipeline import formats
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from llmstack.stages.generation import chat_prompts, end_of_turn_ids
    from tests.models.test_export_fidelity import TEXTS

    train_tokenizer(TEXTS, tmp_path / "tok", kind="bpe", vocab_size=320, num_sentinels=0)
    tok = load_tokenizer(tmp_path / "tok")
    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": c}] for c in CHATS]
    ids, stops = chat_prompts(tok, convs)
    assert ids == [formats.encode_prompt(tok, m) for m in convs]
    hf = tf.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert ids == [list(hf.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
                   for m in convs]
    assert stops == [tok.token_to_id("<|end|>")] == end_of_turn_ids(hf)
