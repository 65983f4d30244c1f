"""Export fidelity for models users bring: special ids, generation config, chat template, and
EOS lists / missing EOS at decode and eval time.

A Llama-3-Instruct-style model is built locally: a byte-level BPE tokenizer trained in process with
Llama 3's special tokens and chat template (BOS <|begin_of_text|>, EOS <|eot_id|>), a 2-layer
LlamaForCausalLM whose config.json names one EOS and whose generation_config.json names the three
of Llama 3 Instruct ([<|end_of_text|>, <|eom_id|>, <|eot_id|>]). Its LM head is set so that greedy
decoding emits <|eom_id|> (an EOS of the generation config only, not the tokenizer's) after a few
tokens. `llmstack import` -> `llmstack export`:

- config.json carries bos / eos (the list) / pad; generation_config.json the same eos list;
- `transformers` `generate` on the export stops at the same token as `llmstack generate`;
- the tokenizer keeps its chat template: `apply_chat_template` renders the same ids.

`llmstack-eval ppl:` on a Hugging Face directory whose tokenizer has no EOS: each document after
BOS, equal to lm-evaluation-harness's HF backend; with neither BOS nor EOS, exit 2 naming why.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs.",
         "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.",
         "A tiny model, a tiny tokenizer, and a few sentences to train them on."] * 20
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>"]
# Llama 3 Instruct's template (without the tool-calling and date blocks)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def bpe_tokenizer(specials: list[str], vocab_size: int = 300):
    """A byte-level BPE `tokenizers.Tokenizer` trained on TEXTS, `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def llama_dir(path, tokenizer, *, config: dict, generation: dict | None = None, seed: int = 0):
    """A Hugging Face directory: the tokenizer, a random 2-layer untied Llama over its vocabulary."""
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.5, **config)
    model = tf.LlamaForCausalLM(cfg).eval()
    return model, cfg


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(source HF dir, imported dir, export dir, the stop token, the prompt's ids)."""
    from llmstack.cli import main

    d = tmp_path_factory.mktemp("llama3")
    src = d / "hf"
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(LLAMA3_SPECIALS), bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    bos, end, eom, eot = (tok.convert_tokens_to_ids(t) for t in
                          ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    model, cfg = llama_dir(src, tok, config=dict(bos_token_id=bos, eos_token_id=eot))
    prompt = tok("Pack my box", add_special_tokens=False)["input_ids"]
    # greedy decoding without stops; then <|eom_id|> gets the LM-head row of the 4th new token
    # scaled up, so that it wins there (and, checked below, nowhere earlier)
    with torch.no_grad():
        free = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        k = next(i for i in range(2, 8) if free[i] not in free[:i])
        w = model.lm_head.weight
        w[eom] = w[free[k]] * 1.5
    model.save_pretrained(str(src))
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [end, eom, eot], "do_sample": False}))
    assert json.loads((src / "config.json").read_text())["eos_token_id"] == eot  # one EOS in config.json
    imported, exported = d / "imported", d / "export"
    assert main(["import", str(src), "--out", str(imported)]) == 0
    assert main(["export", str(imported), "--out", str(exported)]) == 0
    return dict(src=src, imported=imported, exported=exported, ids=dict(bos=bos, end=end, eom=eom, eot=eot),
                prompt=prompt, free=free, k=k)


def test_config_and_generation_config_carry_special_ids(llama3):
    """config.json: bos, eos (the list of config + generation config) and pad as the model has them;
    generation_config.json: the same eos list, so transformers' generate stops on each."""
    ids = llama3["ids"]
    eos = [ids["eot"], ids["end"], ids["eom"]]
    config = json.loads((llama3["exported"] / "config.json").read_text())
    assert config["bos_token_id"] == ids["bos"] and sorted(config["eos_token_id"]) == sorted(eos)
    assert config.get("pad_token_id") is None  # the tokenizer has no pad: none is invented
    gen = json.loads((llama3["exported"] / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(eos) and gen["bos_token_id"] == ids["bos"]
    assert tf.GenerationConfig.from_pretrained(llama3["exported"]).eos_token_id == config["eos_token_id"]


def test_special_ids_of_a_checkpoint_trained_from_the_import(llama3):
    """A checkpoint fine-tuned from the imported directory records no special ids of its own; its
    tokenizer is the imported directory's, whose record gives the EOS list back to the export."""
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.stages.export import special_ids
    from llmstack.train.meta import CheckpointMeta

    ids = llama3["ids"]
    tok = load_tokenizer(llama3["imported"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["bos"], ids["eot"], None)  # the tokenizer's own
    got = special_ids(tok, CheckpointMeta(tokenizer_path=str(llama3["imported"])))
    assert got == {"pad": None, "bos": ids["bos"], "eos": [ids["eot"], ids["end"], ids["eom"]]}


def test_transformers_generate_on_export_stops_where_llmstack_generate_does(llama3, capsys):
    """Greedy: both stop at <|eom_id|>, an EOS of the generation config only (before the fix,
    `llmstack generate` crashed on the list), after the same tokens."""
    from llmstack.stages.generation import run

    ids, prompt, k = llama3["ids"], llama3["prompt"], llama3["k"]
    model = tf.AutoModelForCausalLM.from_pretrained(llama3["exported"], dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(llama3["exported"])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=16, pad_token_id=0)[0, len(prompt):].tolist()
    assert out == llama3["free"][:k] + [ids["eom"]]  # stopped by the generation config's list
    text_prompt = tok.decode(prompt)
    [ours] = run(str(llama3["imported"]), [text_prompt], max_new_tokens=16, temperature=0.0, device="cpu",
                 dtype="fp32")
    assert ours == tok.decode(out[:-1])
    assert tok(ours, add_special_tokens=False)["input_ids"] == out[:-1]
    [again] = run(str(llama3["exported"]), [text_prompt], max_new_tokens=16, temperature=0.0, device="cpu",
                  dtype="fp32")  # the exported directory itself, read as a Hugging Face directory
    assert again == ours


def test_chat_template_survives_import_and_export(llama3):
    src = tf.AutoTokenizer.from_pretrained(llama3["src"])
    out = tf.AutoTokenizer.from_pretrained(llama3["exported"])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pack my box"}]
    assert out.chat_template == LLAMA3_TEMPLATE
    want = src.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    got = out.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == want and got[0] == llama3["ids"]["bos"]


def test_native_export_writes_generation_config(tmp_path):
    """An llmstack tokenizer's model: one EOS id, the same in config.json and
    generation_config.json, with its pad and bos."""
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from llmstack import models
    from llmstack.models import hf
    from llmstack.models.gpt import GPTConfig
    from llmstack.stages.export import special_ids
    from llmstack.train.meta import CheckpointMeta

    train_tokenizer(TEXTS, tmp_path / "tok", kind="bpe", vocab_size=320, num_sentinels=0)
    tok = load_tokenizer(tmp_path / "tok")
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=32)
    model = models.build_model("gpt", cfg)
    model.init_weights()
    ids = special_ids(tok, CheckpointMeta())
    assert ids == {"pad": tok.pad_id, "bos": tok.bos_id, "eos": [tok.eos_id]}
    hf.save_pretrained("gpt", cfg, model.state_dict(), tmp_path / "hf", pad_id=ids["pad"], bos_id=ids["bos"],
                       eos_id=ids["eos"][0])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = tf.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (tok.eos_id, tok.pad_id,
                                                                                         tok.bos_id)


@pytest.fixture(scope="module")
def no_eos_dirs(tmp_path_factory):
    """Two HF Llama directories: a tokenizer with BOS and no EOS; one with neither; and a jsonl."""
    d = tmp_path_factory.mktemp("no-eos")
    bos_only = tf.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(["<s>"]), bos_token="<s>")
    assert bos_only.eos_token_id is None and bos_only.bos_token_id == 0
    model, _ = llama_dir(d / "bos_only", bos_only, config=dict(bos_token_id=0, eos_token_id=None))
    model.save_pretrained(str(d / "bos_only"))
    bare = tf.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer([]))
    assert bare.eos_token_id is None and bare.bos_token_id is None
    model, _ = llama_dir(d / "bare", bare, config=dict(bos_token_id=None, eos_token_id=None), seed=1)
    model.save_pretrained(str(d / "bare"))
    docs = d / "task" / "docs.jsonl"
    docs.parent.mkdir()
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    return d, docs


def test_ppl_without_eos_equals_harness(no_eos_dirs, tmp_path):
    """Each document after BOS (lm-eval's prefix_token_id), equal to the harness's HF backend."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval.cli import main
    from tests.eval.helpers import ROLLING_TASK

    d, docs = no_eos_dirs
    (docs.parent / "local_roll.yaml").write_text(ROLLING_TASK.format(test=docs))
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={d / 'bos_only'},dtype=float32",
                                  tasks=["local_roll"], batch_size=4, device="cpu",
                                  task_manager=TaskManager(include_path=str(docs.parent)))["results"]["local_roll"]
    out = tmp_path / "r.json"
    assert main(["--model", str(d / "bos_only"), "--tasks", f"ppl:{docs}", "--dtype", "fp32", "--device", "cpu",
                 "--no-progress", "--output", str(out)]) == 0
    got = json.loads(out.read_text())["tasks"][f"ppl:{docs}"]
    assert got["prefix"] == "bos"
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[m] == pytest.approx(ref[f"{m},none"], rel=1e-4), m


def test_ppl_without_bos_or_eos_exits_2(no_eos_dirs, tmp_path, capsys):
    from eval.cli import main

    d, docs = no_eos_dirs
    rc = main(["--model", str(d / "bare"), "--tasks", f"ppl:{docs}", "--dtype", "fp32", "--device", "cpu",
               "--no-progress", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither a BOS nor an EOS" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
