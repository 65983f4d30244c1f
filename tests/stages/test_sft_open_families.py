"""`llmstack sft` (LoRA) on the open decoder families users bring, each with its own tokenizer and
chat template: Llama 3 (Llama 3 Instruct's template, BOS <|begin_of_text|>, an EOS list with
<|eot_id|>), Gemma 2 and Gemma 3 (<start_of_turn> / <end_of_turn>, the assistant as "model"; a
model family of its own, models/gemma.py), Phi-3 (<|user|> ... <|end|> <|assistant|>) and Qwen2
(ChatML).

Each case builds a tiny Hugging Face directory (a byte-level BPE tokenizer trained in process with
the family's special tokens, the family's real-style template without {% generation %} markers,
a random model from the published config cut down), imports it, and fine-tunes it 5 steps with
LoRA on q/k/v/o/up/gate/down (zero.stage=0, one process). Then:

- the supervised tokens equal those transformers' `return_assistant_tokens_mask` marks under the
  same template with {% generation %} markers added (SFT found them by rendering prefixes): the
  run's count, and the labels of multi-turn conversations;
- the training loss goes down;
- `llmstack export` of the final checkpoint (the adapters merged) loads in transformers'
  AutoModelForCausalLM (the family's own class) and AutoTokenizer; its logits equal ours (the
  checkpoint as `llmstack generate` loads it) within 1e-4 in fp32, and differ from the model before
  fine-tuning;
- the exported tokenizer renders conversations exactly as the original one.

Gemma also resumes: 3 steps, then on to 5, gives the losses of the uninterrupted run. RM and DPO
refuse a Gemma model.init (GPT-only), and so does SFT with train.eval_tasks, each with exit 2.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf

from data_pipeline import formats
from data_pipeline.objectives import IGNORE
from data_pipeline.tokenizer import load_tokenizer

from tests.data_pipeline.test_chat_templates import CHATML, CHATML_MARKED, LLAMA3_MARKED, QWEN_SPECIALS
from tests.models.test_export_fidelity import LLAMA3_SPECIALS, LLAMA3_TEMPLATE, bpe_tokenizer
from tests.models.test_hf_gemma import GEMMA_2_2B, GEMMA_3_1B
from tests.models.test_hf_gemma import write_published as write_gemma
from tests.models.test_hf_open_models import LLAMA_3_2, PHI_3_MINI, QWEN_2_5
from tests.models.hf_parity import logit_diff, write_published

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# google/gemma-2-2b-it's template: no system role, roles alternate, the assistant is "model"
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA_MARKED = GEMMA_TEMPLATE.replace(
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}",
    "{% if role == 'model' %}{{ '<start_of_turn>model\n' }}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}"
    "{% else %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}")
# google/gemma-3-1b-it's template, text content only: a system message joins the first user turn
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
GEMMA3_MARKED = GEMMA3_TEMPLATE.replace(
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}",
    "{%- if role == 'model' -%}{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endgeneration %}{%- else -%}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endif -%}")
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's ids 0-3
# microsoft/Phi-3-mini-4k-instruct's template (the user turn opens the assistant's)
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}")
PHI3_MARKED = PHI3_TEMPLATE.replace("{{message['content'] + '<|end|>' + '\n'}}",
                                    "{% generation %}{{message['content'] + '<|end|>' + '\n'}}{% endgeneration %}")
PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

# name -> the family's tokens, templates, config.json (cut down, published keys), the special ids
# config.json names (token strings; eos a list where the model has several), the exported class
CASES = {
    "llama3": dict(specials=LLAMA3_SPECIALS, template=LLAMA3_TEMPLATE, marked=LLAMA3_MARKED,
                   tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), config=LLAMA_3_2,
                   ids=dict(bos="<|begin_of_text|>", eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
                   model_type="llama", family="gpt", layers=2),
    "gemma2": dict(specials=GEMMA_SPECIALS, template=GEMMA_TEMPLATE, marked=GEMMA_MARKED,
                   tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
                   config=GEMMA_2_2B, ids=dict(bos="<bos>", eos=["<eos>", "<end_of_turn>"], pad="<pad>"),
                   model_type="gemma2", family="gemma", layers=2),
    "gemma3": dict(specials=GEMMA_SPECIALS, template=GEMMA3_TEMPLATE, marked=GEMMA3_MARKED,
                   tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
                   config=GEMMA_3_1B, ids=dict(bos="<bos>", eos=["<eos>", "<end_of_turn>"], pad="<pad>"),
                   model_type="gemma3_text", family="gemma", layers=6),
    "phi3": dict(specials=PHI3_SPECIALS, template=PHI3_TEMPLATE, marked=PHI3_MARKED,
                 tokens=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
                 config=PHI_3_MINI, ids=dict(bos="<s>", eos=["<|endoftext|>", "<|end|>"], pad="<|endoftext|>"),
                 model_type="phi3", family="gpt", layers=2),
    "chatml": dict(specials=QWEN_SPECIALS, template=CHATML, marked=CHATML_MARKED,
                   tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), config=QWEN_2_5,
                   ids=dict(bos=None, eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>"),
                   model_type="qwen2", family="gpt", layers=2),
}
CONVS = [[{"role": "user", "content": f"Question {i}: pack my box?"},
          {"role": "assistant", "content": f"Answer {i}: with five dozen liquor jugs."}] for i in range(8)]
CHECK = [[{"role": "user", "content": "How vexingly quick daft zebras jump!"},
          {"role": "assistant", "content": " Sphinx of black quartz, judge my vow. "},
          {"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "jumps"}],
         CONVS[3]]
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target=[q,k,v,o,up,gate,down]"]


def hf_tokenizer(path, case: dict, template: str):
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(case["specials"]), **case["tokens"])
    tok.chat_template = template
    tok.save_pretrained(str(path))
    return tf.AutoTokenizer.from_pretrained(str(path))


def model_dir(path, case: dict, tok):
    """The family's tiny model over `tok`'s vocabulary with `tok` saved beside it; returns
    transformers' model of it (fp32, eager attention)."""
    ids = {k: ([tok.convert_tokens_to_ids(t) for t in v] if isinstance(v, list) else
               (tok.convert_tokens_to_ids(v) if v is not None else None)) for k, v in case["ids"].items()}
    config = dict(case["config"], vocab_size=len(tok), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  pad_token_id=ids.get("pad"))
    (write_gemma if case["family"] == "gemma" else write_published)(path, config)
    tok.save_pretrained(str(path))
    return tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def sft_args(model_init, data, run_dir, *extra):
    from tests.conftest import REPO

    return ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), f"model.init={model_init}", "tokenizer.path=",
            f"data.sources=[{{path: '{data}'}}]", f"data.val_sources=[{{path: '{data}'}}]", "data.seq_len=128",
            "data.shuffle=false", "sft.packing=false", "train.micro_batch=4", "train.max_steps=5", "train.lr=1e-2",
            "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
            "train.progress=false", "zero.stage=0", f"run.dir={run_dir}", *LORA, *extra]


def run_sft(args, tmp_path) -> tuple[str, dict]:
    from tests.conftest import llmstack_cmd, run_cmd

    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    return out, json.loads(out[out.rindex("done: ") + 6:].splitlines()[0])


def left_padded(rows: list[list[int]], pad: int):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    return ids, mask


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def trained(request, tmp_path_factory):
    """One family fine-tuned: its directories, the original transformers model and tokenizers,
    the run's output and summary."""
    from llmstack.cli import main

    name, case = request.param, CASES[request.param]
    d = tmp_path_factory.mktemp(name)
    marked = hf_tokenizer(d / "marked", case, case["marked"])
    plain = hf_tokenizer(d / "plain", case, case["template"])
    original = model_dir(d / "hf", case, plain)
    assert main(["import", str(d / "hf"), "--out", str(d / "imported")]) == 0
    assert json.loads((d / "imported" / "llmstack_model.json").read_text())["model_family"] == case["family"]
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    out, done = run_sft(sft_args(d / "imported", data, d / "run"), d)
    return dict(name=name, case=case, dir=d, data=data, marked=marked, plain=plain, original=original, out=out,
                done=done)


@pytest.mark.slow
def test_sft_supervises_what_transformers_assistant_masks_mark(trained):
    from tests.conftest import losses

    out, done, marked, plain = trained["out"], trained["done"], trained["marked"], trained["plain"]
    assert "chat template: the tokenizer's own" in out and "rendered prefixes" in out  # the real-style template
    layers = 4 * trained["case"]["layers"]  # per block: q/k/v (the fused qkv), o, up/gate (the fused fc), down
    assert f"LoRA r=4 alpha=8.0 on {layers} layers" in out
    assert done["steps"] == 5 and done["lora"] and done["train_conversations"] == 8 and done["dropped"] == 0
    counts = []
    for conv in CONVS:
        ref = marked.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(ref["input_ids"]) == plain.apply_chat_template(conv, tokenize=True, return_dict=False)
        counts.append(sum(ref["assistant_masks"]))
    assert min(counts) > 0
    # the labels themselves, multi-turn conversations included: exactly the marked template's assistant tokens
    ours = load_tokenizer(trained["dir"] / "imported")
    for conv in CONVS + CHECK:
        ref = marked.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        want = [i if m else IGNORE for i, m in zip(ref["input_ids"], ref["assistant_masks"])]
        assert formats.encode_chat(ours, conv) == (list(ref["input_ids"]), want)
    assert done["supervised_tokens"] == 2 * sum(counts) + sum(counts[:4])  # 5 steps x 4 rows: 2.5 epochs, in order
    steps = losses(trained["dir"] / "run")
    assert sorted(steps) == [1, 2, 3, 4, 5] and steps[5] < steps[1]


@pytest.mark.slow
def test_merged_export_loads_in_transformers_with_our_logits_and_template(trained):
    from llmstack.cli import main
    from llmstack.train import weights

    d, case, plain = trained["dir"], trained["case"], trained["plain"]
    meta = json.loads((d / "run" / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["model_family"] == case["family"] and len(meta["lora"]["modules"]) == 4 * case["layers"]
    ckpt = d / "run" / "checkpoints" / "latest"
    assert main(["export", str(ckpt), "--out", str(d / "export")]) == 0
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(d / "export"), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    tok = tf.AutoTokenizer.from_pretrained(str(d / "export"))
    assert theirs.config.model_type == case["model_type"]
    ours, _, info = weights.load_for_inference(str(ckpt))
    assert info.model_family == case["family"]
    rows = [plain.apply_chat_template(c, tokenize=True, return_dict=False) for c in CHECK]
    ids, mask = left_padded(rows, pad=0)
    diff = logit_diff(ours, theirs, ids, mask)
    assert diff < 1e-4, f"{trained['name']}: max |logit diff| {diff:.2e}"
    with torch.no_grad():  # the adapters were trained and merged: the export is not the model it started from
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        before = trained["original"](input_ids=ids, attention_mask=mask, position_ids=pos).logits
        after = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits[..., :before.shape[-1]]
    assert (after - before)[mask.bool()].abs().max() > 1e-3
    for conv in CHECK:
        assert tok.apply_chat_template(conv, tokenize=False) == plain.apply_chat_template(conv, tokenize=False)
        prompt = conv[:-1]
        assert (tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                == plain.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["gemma2"], indirect=True)  # (gpt SFT resumes: tests/distributed/test_sft_runs.py)
def test_gemma_sft_resumes_where_it_stopped(trained):
    """Stopped after 3 steps (train.stop_at: saved, the schedule still spans 5), then the same
    command resumed on to 5: the losses of steps 4 and 5 are the uninterrupted run's (the same
    adapters, optimizer state and data position)."""
    from tests.conftest import losses

    d = trained["dir"]
    args = sft_args(d / "imported", trained["data"], d / "resumed")
    out, done = run_sft([*args, "train.stop_at=3"], d)
    assert done["steps"] == 3 and (d / "resumed" / "checkpoints" / "step_3").is_dir()
    out, done = run_sft(args, d)
    assert "resum" in out.lower() and done["steps"] == 5
    whole, resumed = losses(d / "run"), losses(d / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert [resumed[s] for s in (4, 5)] == [whole[s] for s in (4, 5)]


def test_sft_config_refuses_bert_and_t5_naming_what_it_trains():
    from llmstack.config import SCHEMAS, load_config
    from llmstack.errors import ConfigError

    for family in ("bert", "t5"):
        with pytest.raises(ConfigError, match=f"model.family={family}: SFT trains decoder-only gpt models, or the "
                                              "gemma model a model.init holds"):
            load_config(SCHEMAS["sft"], None, [f"model.family={family}"])


GPT_ONLY = "holds a gemma model; this stage trains gpt models (`llmstack sft` also fine-tunes gemma models)"


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["gemma2"], indirect=True)
@pytest.mark.parametrize("stage,config,extra,needle", [
    ("rm", "configs/rm/demo.yaml", [], GPT_ONLY), ("dpo", "configs/dpo/demo.yaml", [], GPT_ONLY),
    ("sft", "configs/sft/lora.yaml", ["train.eval_tasks=[demo_mc]"],
     "train.eval_tasks scores gpt models, this run trains a gemma model")])
def test_what_gemma_does_not_train_with_exits_2(trained, stage, config, extra, needle, tmp_path):
    """Reward model and DPO training stay GPT-only, and so do SFT's in-training task evaluations:
    a Gemma model.init there exits 2 with one line."""
    from tests.conftest import REPO, llmstack_cmd, run_cmd

    args = [stage, str(REPO / config), f"model.init={trained['dir'] / 'imported'}", "tokenizer.path=",
            f"run.dir={tmp_path / 'run'}", "zero.stage=0", *extra]
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
