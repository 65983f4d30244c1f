"""SFT with a model's own tokenizer and chat template (formats.encode_own_chat).

Tokenizers are built in process (a byte-level BPE with the family's special tokens) and saved as
Hugging Face directories with their Jinja template, as an imported model's tokenizer is:
- a ChatML (Qwen) template with `{% generation %}` markers: our labels are exactly the ids where
  transformers' `return_assistant_tokens_mask` is 1;
- the same template with the markers removed: the prefix-rendering path gives the same labels;
- Llama 3 Instruct's template (no markers): the prefix path equals the mask of the same template
  with markers added;
- llmstack's own tokenizers keep llmstack's template; a template that rewrites earlier turns, or
  raises on a conversation, is refused with a clear error; a tokenizer with neither is refused;
- `llmstack sft` with LoRA on an imported Qwen2-style model with its own ChatML tokenizer trains on
  exactly the tokens of transformers' assistant masks, over-long conversations dropped and counted.
"""

from __future__ import annotations

import json
import os

import pytest
import transformers as tf

from data_pipeline import formats
from data_pipeline.objectives import IGNORE
from data_pipeline.tokenizer import load_tokenizer
from tests.models.test_export_fidelity import LLAMA3_SPECIALS, LLAMA3_TEMPLATE, bpe_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's ChatML template (default system prompt, no tools), the assistant reply, its <|im_end|>
# and newline in a {% generation %} block
CHATML_MARKED = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{%- elif message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
CHATML = CHATML_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
LLAMA3_MARKED = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Pack my box?"}, {"role": "assistant", "content": "With five dozen liquor jugs."}],
    [{"role": "system", "content": "Answer briefly.\n"}, {"role": "user", "content": "  leading spaces"},
     {"role": "assistant", "content": "ok\n\n"}, {"role": "user", "content": "héllo ✓ 日本"},
     {"role": "assistant", "content": " second answer, with a trailing space "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "no reply"}],
]


def hf_dir(path, specials, template, **special_tokens):
    """A tokenizer directory as a model brings it (tokenizer.json + tokenizer_config.json with
    its chat template, no llmstack metadata); returns (our Tokenizer, the transformers one)."""
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(specials), **special_tokens)
    tok.chat_template = template
    tok.save_pretrained(str(path))
    return load_tokenizer(path), tf.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("templates")
    qwen = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    llama = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return {
        "chatml_marked": hf_dir(d / "chatml_marked", QWEN_SPECIALS, CHATML_MARKED, **qwen),
        "chatml": hf_dir(d / "chatml", QWEN_SPECIALS, CHATML, **qwen),
        "llama3_marked": hf_dir(d / "llama3_marked", LLAMA3_SPECIALS, LLAMA3_MARKED, **llama),
        "llama3": hf_dir(d / "llama3", LLAMA3_SPECIALS, LLAMA3_TEMPLATE, **llama),
    }


def reference(hf, conv) -> tuple[list[int], list[int]]:
    """transformers' ids and labels (ids where return_assistant_tokens_mask is 1, else -100)."""
    out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [i if m else IGNORE for i, m in zip(out["input_ids"], out["assistant_masks"])]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_labels_equal_transformers_assistant_masks(dirs, family, conv):
    marked_tok, marked_hf = dirs[f"{family}_marked"]
    plain_tok, plain_hf = dirs[family]
    want_ids, want_labels = reference(marked_hf, conv)
    assert any(x != IGNORE for x in want_labels)
    # the template's {% generation %} blocks
    ids, labels = formats.encode_chat(marked_tok, conv)
    assert (ids, labels) == (want_ids, want_labels)
    # the same template without markers: the spans found by rendering prefixes
    assert formats.check_chat_tokenizer(plain_tok) == {"template": "own", "eos": plain_tok.eos_id, "markers": False}
    ids, labels = formats.encode_chat(plain_tok, conv)
    assert ids == plain_hf.apply_chat_template(conv, tokenize=True, return_dict=False) == want_ids
    assert labels == want_labels
    # every supervised span ends with the family's end-of-turn token
    end = plain_tok.token_to_id("<|im_end|>" if family == "chatml" else "<|eot_id|>")
    assert sum(x == end for x in labels) == sum(m["role"] == "assistant" for m in conv)


@pytest.mark.parametrize("name", ["chatml_marked", "chatml", "llama3"])
def test_train_on_last_keeps_only_the_last_reply(dirs, name):
    tok, hf = dirs[name]
    conv = CONVERSATIONS[1]
    ids, every = formats.encode_chat(tok, conv)
    ids_last, last = formats.encode_chat(tok, conv, train_on="last")
    assert ids_last == ids
    reply = tok.encode(conv[-1]["content"].strip() if name == "llama3" else conv[-1]["content"])
    kept = [x for x in last if x != IGNORE]
    assert kept[:len(reply)] == reply and len(kept) == len(reply) + (1 if name == "llama3" else 2)  # + end (+ \n)
    assert sum(x != IGNORE for x in every) > len(kept)
    assert all(a in (b, IGNORE) for a, b in zip(last, every))


def test_llmstack_tokenizers_keep_the_llmstack_template(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)  # trained by llmstack: its HF files hold llmstack's template too
    assert formats.own_template(tok) is None
    assert formats.check_chat_tokenizer(tok)["template"] == "llmstack"
    ids, labels = formats.encode_chat(tok, CONVERSATIONS[0])
    assert ids[0] == tok.bos_id and ids[1] == tok.role_ids["user"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # drops earlier assistant replies (as reasoning templates drop earlier thinking): no prefix
    # of the conversation renders as the beginning of the whole
    rewriting = CHATML.replace("message['content'] + '<|im_end|>\n' }}{%- elif",
                               "(message['content'] if loop.last else '') + '<|im_end|>\n' }}{%- elif")
    assert rewriting != CHATML
    tok, _ = hf_dir(tmp_path / "rewriting", QWEN_SPECIALS, rewriting, eos_token="<|im_end|>")
    formats.encode_chat(tok, CONVERSATIONS[0])  # one reply: fine
    with pytest.raises(ValueError, match=r"renders assistant turn 2 differently .* \{% generation %\}"):
        formats.encode_chat(tok, CONVERSATIONS[1])


def test_a_tokenizer_without_template_or_chat_tokens_is_refused(tmp_path):
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>")
    tok.save_pretrained(str(tmp_path / "gpt2"))
    assert "chat_template" not in json.loads((tmp_path / "gpt2" / "tokenizer_config.json").read_text())
    ours = load_tokenizer(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="lacks the chat tokens .* or a Hugging Face tokenizer with a chat_template"):
        formats.check_chat_tokenizer(ours)
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        formats.encode_chat(ours, CONVERSATIONS[0])


def qwen2_dir(path, hf_tok):
    """A tiny Qwen2 (q/k/v biases, tied head) Hugging Face directory with `hf_tok` as its tokenizer."""
    import torch

    cfg = tf.Qwen2Config(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=hf_tok.eos_token_id, bos_token_id=None,
                         pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    hf_tok.save_pretrained(str(path))


@pytest.mark.slow
def test_lora_sft_on_an_imported_qwen2_with_its_own_template(dirs, tmp_path):
    """`llmstack sft` (LoRA, 5 steps) from an imported Qwen2-style model with its own ChatML
    tokenizer: it trains on exactly the tokens transformers' assistant masks mark, and an
    over-long conversation is dropped and counted as with llmstack's template."""
    from llmstack.cli import main
    from tests.conftest import REPO, llmstack_cmd, losses, run_cmd

    _, hf = dirs["chatml_marked"]
    qwen2_dir(tmp_path / "hf", hf)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    convs = [[{"role": "user", "content": f"Question {i}: pack my box?"},
              {"role": "assistant", "content": f"Answer {i}: with five dozen liquor jugs."}] for i in range(8)]
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20},
            {"role": "assistant", "content": "Too long."}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in [*convs, long]))
    run_dir = tmp_path / "run"
    args = ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), f"model.init={tmp_path / 'imported'}",
            "tokenizer.path=", f"data.sources=[{{path: '{data}'}}]", f"data.val_sources=[{{path: '{data}'}}]",
            "data.seq_len=128", "data.shuffle=false", "sft.packing=false", "sft.overlong=drop", "train.micro_batch=4",
            "train.max_steps=5", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", "train.progress=false", "zero.stage=0", f"run.dir={run_dir}",
            "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target=[q,o]"]
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert "chat template: the tokenizer's own" in out and "{% generation %} blocks" in out
    assert "dropped 1 over-long" in out
    done = json.loads(out[out.rindex("done: ") + 6:].splitlines()[0])
    assert done["steps"] == 5 and done["lora"] and done["train_conversations"] == 8 and done["dropped"] == 1
    # supervised targets: every token transformers marks as the assistant's (the first token of a
    # conversation is never one, so the causal shift loses none)
    marked = [sum(hf.apply_chat_template(c, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)["assistant_masks"]) for c in convs]
    assert min(marked) > 0
    assert done["supervised_tokens"] == 2 * sum(marked) + sum(marked[:4])  # 5 steps x 4 rows: 2.5 epochs, in order
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5] and steps[5] < steps[1]


def test_a_conversation_the_template_refuses_stops_with_its_record_named(tmp_path):
    from data_pipeline.chat_batches import load_conversations
    from data_pipeline.errors import DataError

    # Gemma 2's template refuses system messages with raise_exception
    refusing = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}" + CHATML)
    tok, _ = hf_dir(tmp_path / "refusing", QWEN_SPECIALS, refusing, eos_token="<|im_end|>")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS[:2]))
    with pytest.raises(DataError, match=r"^\S*chat.jsonl \(byte 126\): the chat template .* refuses this conversation: "
                                        "System role not supported"):
        load_conversations([str(path)], tok, seq_len=256, train_on="all", overlong="truncate", side="right",
                           on_error="skip")
