"""SFT in one process: chat template and loss masks against transformers, bad records, truncation,
packing without cross-talk, loss normalisation under accumulation, LoRA injection and merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import formats
from data_pipeline.errors import BadRecord, DataError, ErrorLog
from data_pipeline.objectives import IGNORE, pack_greedy, sft_collate, sft_fit
from data_pipeline.tokenizer import load_tokenizer
from llmstack import models
from llmstack.models.lora import apply_lora, merge_lora_state
from data_pipeline.chat_batches import SFTBatches, load_conversations
from llmstack.stages import sft
from llmstack.train.trainer import MicroBatches
from tests.conftest import StandInEngine, StandInTrainer

CONVERSATIONS = [
    [{"role": "user", "content": "What does `json.dumps` do?"},
     {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}],
    [{"role": "system", "content": "Answer briefly.\n"}, {"role": "user", "content": "  leading spaces"},
     {"role": "assistant", "content": "ok\n\n"}, {"role": "user", "content": "héllo ✓ 日本"},
     {"role": "assistant", "content": " second answer, with a trailing space "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "no reply"}],
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_ids_and_loss_mask_match_transformers_chat_template(tok, hf_tok, conv):
    ids, labels = formats.encode_chat(tok, conv)
    out = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    # supervised exactly where transformers marks assistant tokens (content, <|end|>, final EOS)
    assert [lab != IGNORE for lab in labels] == [bool(m) for m in out["assistant_masks"]]
    assert all(lab == i for lab, i in zip(labels, ids) if lab != IGNORE)
    # BOS and EOS exactly once; every template token and every system/user token is -100
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    role_ids = {tok.role_ids[r] for r in ("system", "user", "assistant")}
    assert all(lab == IGNORE for i, lab in zip(ids, labels) if i in role_ids or i == tok.bos_id)
    ends_with_assistant = conv[-1]["role"] == "assistant"
    assert (labels[-1] == tok.eos_id) == ends_with_assistant  # EOS is learned after a final reply
    # the supervised text is the assistant contents, each followed by <|end|>
    spans = [ids[i] for i, lab in enumerate(labels) if lab != IGNORE and ids[i] not in (tok.eos_id,)]
    want = "".join(m["content"] + "<|end|>" for m in conv if m["role"] == "assistant")
    assert tok.decode(spans) == want
    prompt = formats.encode_prompt(tok, conv[:-1])
    hp = hf_tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt == hp["input_ids"] and prompt[-1] == tok.role_ids["assistant"]


def test_train_on_last_supervises_only_the_last_reply(tok):
    conv = CONVERSATIONS[1]
    _, all_labels = formats.encode_chat(tok, conv, train_on="all")
    ids, last = formats.encode_chat(tok, conv, train_on="last")
    sup = [i for i, lab in zip(ids, last) if lab != IGNORE]
    assert tok.decode(sup) == conv[-1]["content"] + "<|end|><|eos|>"
    assert sum(lab != IGNORE for lab in all_labels) > len(sup)


def test_padding_is_never_eos_and_carries_no_label(tok):
    assert tok.pad_id != tok.eos_id
    ex = [sft_fit(*formats.encode_chat(tok, c), 200) for c in CONVERSATIONS[:2]]
    batch = sft_collate([[ex[0]], [ex[1]]], pad_id=tok.pad_id, packed=False)
    short = len(ex[0][0])
    assert (batch["input_ids"][0, short:] == tok.pad_id).all() and (batch["labels"][0, short:] == IGNORE).all()
    assert (batch["labels"] == tok.eos_id).sum() == 2  # each conversation's EOS is a target


def test_parse_records_and_bad_input(tok, tmp_path):
    assert formats.parse_chat_record({"prompt": "p", "response": "r", "system": "s"}, "x")[0]["role"] == "system"
    bad = {
        "no_assistant": {"messages": [{"role": "user", "content": "hi"}]},
        "unknown_role": {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "empty_response": {"prompt": "hi", "response": "  "},
        "missing_field": {"prompt": "hi"},
    }
    for kind, rec in bad.items():
        with pytest.raises(BadRecord) as e:
            formats.parse_chat_record(rec, "f.jsonl:3")
        assert e.value.kind == kind and "f.jsonl:3" in e.value.detail
    path = tmp_path / "chat.jsonl"
    good = {"prompt": "What?", "response": "That."}
    lines = [json.dumps(good), json.dumps(bad["unknown_role"]), "{not json", json.dumps(bad["no_assistant"]),
             json.dumps(bad["empty_response"]), json.dumps({"messages": CONVERSATIONS[0]})]
    path.write_text("\n".join(lines) + "\n")
    errors = ErrorLog()
    got = list(formats.iter_chat_records(str(path), on_error="skip", errors=errors))
    assert len(got) == 2
    assert errors.counts()[str(path)] == {"unknown_role": 1, "malformed_json": 1, "no_assistant": 1, "empty_response": 1}
    with pytest.raises(DataError, match=r"chat.jsonl:2: messages\[0\].role is 'bot'"):
        list(formats.iter_chat_records(str(path), on_error="fail"))
    # the data layer turns them into counts (skip) or a DataError naming file and line (fail, exit 2)
    ex, stats = load_conversations([str(path)], tok, seq_len=64, train_on="all", overlong="truncate",
                                   side="right", on_error="skip")
    assert len(ex) == 2 and stats["skipped_records"] == 4
    with pytest.raises(DataError, match="chat.jsonl:2"):
        load_conversations([str(path)], tok, seq_len=64, train_on="all", overlong="truncate", side="right",
                           on_error="fail")


def test_tokenizer_without_role_tokens_is_refused(tok):
    class NoRoles:
        path, bos_id, eos_id, role_ids = "gpt2-like", 1, 2, {"system": None, "user": None}

    with pytest.raises(ValueError, match="lacks the chat tokens system, user, assistant, end"):
        formats.encode_chat(NoRoles(), CONVERSATIONS[0])


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tok, tmp_path):
    ids, labels = formats.encode_chat(tok, CONVERSATIONS[1])
    n = len(ids)
    x, y = sft_fit(ids, labels, n - 1)  # fits exactly: n tokens -> n-1 positions
    assert len(x) == n - 1 and list(y) == labels[1:]
    m = n - 6
    x, y = sft_fit(ids, labels, m, side="right")  # loses the end of the last reply and its EOS
    assert list(x) == ids[:m] and list(y) == labels[1:m + 1]
    x, y = sft_fit(ids, labels, 10, side="left")  # keeps the end
    assert list(x) == ids[-11:-1] and list(y) == labels[-10:]
    assert sft_fit(ids, labels, m, overlong="drop") is None
    assert sft_fit(ids, labels, 4, side="right") is None  # nothing supervised left in the first 5 tokens
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS[:2]) + "\n")
    limit = len(formats.encode_chat(tok, CONVERSATIONS[0])[0])  # the first fits, the second does not
    for overlong, key in (("truncate", "truncated"), ("drop", "dropped_overlong")):
        ex, stats = load_conversations([str(path)], tok, seq_len=limit, train_on="all", overlong=overlong,
                                       side="right", on_error="skip")
        assert stats[key] == 1 and len(ex) == (2 if overlong == "truncate" else 1)


def tiny_gpt(vocab: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    arch = models.build_config("gpt", kw.pop("preset", "gpt2-tiny"), vocab, n_layer=2, n_head=4, d_model=64,
                               max_seq_len=128, **kw)
    model = models.build_model("gpt", arch)
    model.init_weights()
    return model.eval()


def examples(tok, n: int, seed: int = 0):
    """Conversations with uneven prompt and response lengths."""
    rng = np.random.default_rng(seed)
    words = "the of a json file returns string object value list path".split()
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(words, rng.integers(1, 8)))
        a = " ".join(rng.choice(words, rng.integers(1, 25)))
        out.append(sft_fit(*formats.encode_chat(tok, [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]), 120))
    return out


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_packed_conversation_logits_equal_its_logits_alone(tok, preset):
    model = tiny_gpt(tok.vocab_size, preset=preset)
    ex = examples(tok, 6)
    rows = pack_greedy([len(x) for x, _ in ex], 120)
    assert max(len(r) for r in rows) >= 3  # several conversations share a row
    batch = {k: torch.from_numpy(v) for k, v in sft_collate([[ex[i] for i in r] for r in rows], pad_id=tok.pad_id).items()}
    with torch.no_grad():
        assert "attn_mask" not in batch and batch["segment_ids"].shape == batch["input_ids"].shape
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                x = torch.from_numpy(ex[i][0])[None]
                alone = model(x)[0]
                torch.testing.assert_close(packed[b, t:t + len(x[0])], alone, rtol=0, atol=1e-5)
                t += x.shape[1]


@pytest.mark.parametrize("packed", [True, False])
def test_accumulation_equals_one_big_batch(tok, packed):
    """micro 1 x accum 8 and micro 8 x accum 1 give the same loss and gradients (and the same as
    the token mean over the whole batch), with uneven response lengths: the trainer's step
    (MicroBatches with SFT's summed loss and supervised-token count). DeepSpeed divides each
    micro-batch's loss by accum; so does the stand-in trainer."""
    ex = examples(tok, 8, seed=1)
    assert len({int((y != IGNORE).sum()) for _, y in ex}) > 3  # uneven supervised lengths

    def grads(micro: int, accum: int):
        model = tiny_gpt(tok.vocab_size, seed=3).train()
        data = SFTBatches(ex, seq_len=120, packed=packed, micro=micro, accum=accum, world=1, rank=0, seed=5,
                          pad_id=tok.pad_id)
        step = MicroBatches(StandInEngine(model), data, sft.summed_loss, accum, count=sft.supervised)
        total = float(step(StandInTrainer(accum), 0).loss)
        return total, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, g_a = grads(8, 1)
    loss_b, g_b = grads(1, 8)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=1e-5, atol=1e-7)
    # and it is the token mean over all supervised targets of the batch
    model = tiny_gpt(tok.vocab_size, seed=3)
    with torch.no_grad():
        tot = sum(float(sft.summed_loss(StandInEngine(model), {k: torch.from_numpy(v) for k, v in
                                                         sft_collate([[e]], pad_id=tok.pad_id).items()})) for e in ex)
    assert loss_a == pytest.approx(tot / sum(int((y != IGNORE).sum()) for _, y in ex), rel=1e-5)


def test_global_order_is_the_same_for_any_world_size(tok):
    ex = examples(tok, 40, seed=2)
    one = SFTBatches(ex, seq_len=120, packed=True, micro=2, accum=4, world=1, rank=0, seed=1, pad_id=0)
    for step in (0, 3, 9):  # step 9 wraps into the second epoch
        rows = one.step_rows(step)
        two = [SFTBatches(ex, seq_len=120, packed=True, micro=2, accum=2, world=2, rank=r, seed=1, pad_id=0)
               for r in range(2)]
        got = sorted(int(x) for b in two for mb in b.micro_batches(step) for x in mb["input_ids"].flatten()
                     if x != 0)
        want = sorted(int(x) for mb in one.micro_batches(step) for x in mb["input_ids"].flatten() if x != 0)
        assert got == want and len(rows) == 8
    assert one.epoch_rows(0) != one.epoch_rows(1)  # reshuffled each epoch


def test_lora_trains_only_adapters_and_merges_exactly(tok):
    model = tiny_gpt(tok.vocab_size)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q", "v", "o", "down"])
    assert names and all(n.endswith(("attn.qkv", "attn.proj", "mlp.proj")) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = {k: torch.from_numpy(v) for k, v in sft_collate([examples(tok, 2)], pad_id=tok.pad_id).items()}
    for _ in range(3):
        opt.zero_grad()
        sft.summed_loss(StandInEngine(model), batch).backward()
        opt.step()
    state = model.state_dict()
    merged = merge_lora_state(state, 8 / 4)
    assert set(merged) == set(base)
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all(k.rsplit(".", 1)[0] in names for k in changed)  # only adapted layers moved
    for k in base:  # base weights themselves never moved
        layer, leaf = k.rsplit(".", 1)
        src = f"{layer}.base_layer.{leaf}" if layer in names else k
        torch.testing.assert_close(state[src], base[k], rtol=0, atol=0)
    plain = tiny_gpt(tok.vocab_size)
    plain.load_state_dict(merged)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(batch["input_ids"]), model(batch["input_ids"]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_lora(tiny_gpt(tok.vocab_size), r=2, alpha=2, dropout=0.0, targets=["nope"])


def test_demo_pairs_are_split_by_module():
    from data_pipeline.builtin import builtin_sft_pairs, split_of

    train = list(builtin_sft_pairs("train"))
    val = list(builtin_sft_pairs("validation"))
    assert len(train) > 1000 and len(val) > 50
    assert {p["module"] for p in train}.isdisjoint({p["module"] for p in val})
    assert all(split_of(p["module"]) == "validation" for p in val)
    dumps = [p for p in train + val if p["prompt"] == "What does `json.dumps` do?"]
    assert dumps and dumps[0]["response"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert sum(1 for _ in formats.iter_chat_records("builtin-sft:validation")) == len(val)


def test_hf_datasets_sources(tmp_path):
    from datasets import Dataset

    rows = [{"messages": CONVERSATIONS[0]}, {"messages": CONVERSATIONS[2]}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    got = [m for _, m in formats.iter_chat_records(str(tmp_path / "disk"))]
    assert got == [CONVERSATIONS[0], CONVERSATIONS[2]]
    (tmp_path / "js").mkdir()
    lines = [{"messages": CONVERSATIONS[0]}, {"prompt": "p", "response": "r"}, {"prompt": "p", "response": ""}]
    (tmp_path / "js" / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    errors = ErrorLog()
    got = [m for _, m in formats.iter_chat_records(f"hf:{tmp_path / 'js'}:train", errors=errors)]
    assert got[0] == CONVERSATIONS[0] and got[1][1] == {"role": "assistant", "content": "r"}
    assert errors.total == 1 and "(example 2): field 'response' is empty" in errors.report()[0]
