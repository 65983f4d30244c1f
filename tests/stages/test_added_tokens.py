"""Fine-tuning an open model whose tokenizer has no pad token (Llama 3 style: BOS / EOS only).

- the run gets an extended copy of the tokenizer in run.dir/tokenizer: a new <|pad|> (never an
  EOS), tokenizer.add_tokens as special tokens, the ids of every text unchanged, the chat template
  kept; transformers loads it; the same inputs give the same copy; a copy needs no second one;
- the starting weights grow to the new size rounded up to a multiple of 64: new rows are the mean
  of the old ones, the old rows are unchanged; weights of another tokenizer are still refused;
- `llmstack sft` (ZeRO-0, stopped and resumed; ZeRO-3 bf16) trains with it and records it, and
  `llmstack export` carries it: AutoTokenizer / AutoModelForCausalLM load the export,
  tokenizer.pad_token_id == config.pad_token_id == generation_config.pad_token_id, not an EOS,
  vocab_size a multiple of 64, logits on the original ids equal ours and (lr 1e-9) the original
  model's;
- a tokenizer that has a pad token is used as it is (no copy, same hash).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from data_pipeline.tokenizer import extend_tokenizer, extends, load_tokenizer
from llmstack.config import TokenizerConfig
from tests.conftest import REPO, llmstack_cmd, losses, run_cmd
from tests.data_pipeline.test_chat_templates import CHATML, QWEN_SPECIALS, hf_dir, qwen2_dir
from tests.models.test_export_fidelity import LLAMA3_SPECIALS, LLAMA3_TEMPLATE, llama_dir

TEXTS = ["Pack my box with five dozen liquor jugs.", "héllo ✓ 日本 <|eot_id|>", "  spaces\n\ttabs "]
CONVS = [[{"role": "user", "content": f"Question {i}: what packs my box?" + " really" * (i % 4)},
          {"role": "assistant", "content": f"Answer {i}: five dozen jugs."}] for i in range(8)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF dir of a tiny untied Llama 3 style model with a BOS / EOS tokenizer, the model, chat data)."""
    d = tmp_path_factory.mktemp("added")
    _, hf = hf_dir(d / "tok", LLAMA3_SPECIALS, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    eos = [hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    model, _ = llama_dir(d / "hf", hf, config=dict(bos_token_id=hf.bos_token_id, eos_token_id=eos))
    model.save_pretrained(str(d / "hf"))
    assert hf.pad_token_id is None and model.config.vocab_size == len(hf) == 300
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return d / "hf", model, data


def test_extended_copy_keeps_ids_and_names_its_pad(llama, tmp_path):
    base = load_tokenizer(llama[0])
    ext = extend_tokenizer(base, tmp_path / "tok", add_tokens=["<|tool|>", "<|eot_id|>"], avoid_ids=[1, 5])
    assert base.pad_id is None and ext.pad_id == 300 and ext.pad_id not in (base.eos_id, 1)
    assert ext.added["tokens"] == {"<|pad|>": 300, "<|tool|>": 301}  # <|eot_id|> is there already
    assert ext.vocab_size == 302 and ext.hash.startswith(base.hash + "+") and extends(ext.hash, base.hash)
    assert not extends(base.hash, base.hash) and not extends(ext.hash, "0" * 16)
    for text in TEXTS:
        assert ext.encode(text) == base.encode(text)
    assert ext.encode("a<|tool|>b")[1] == 301 and 300 in ext.encode("a<|pad|>")  # as special tokens are
    hf = tf.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (hf.pad_token, hf.pad_token_id, hf.eos_token_id) == ("<|pad|>", 300, base.eos_id)
    assert hf.chat_template == LLAMA3_TEMPLATE and hf.convert_tokens_to_ids("<|tool|>") == 301
    assert hf.decode([*base.encode("hi"), 300, 301], skip_special_tokens=True) == "hi"
    # deterministic, and a copy needs no second one
    again = extend_tokenizer(base, tmp_path / "tok2", add_tokens=["<|tool|>", "<|eot_id|>"])
    assert again.hash == ext.hash
    assert extend_tokenizer(ext, tmp_path / "tok3", add_tokens=["<|tool|>"]) is ext
    assert not (tmp_path / "tok3").exists()
    # a <|pad|> already in the vocabulary is declared the pad, unless it is an EOS
    named = extend_tokenizer(base, tmp_path / "tok4", add_pad=False, add_tokens=["<|pad|>"])
    assert named.pad_id is None and named.token_to_id("<|pad|>") == 300
    assert extend_tokenizer(named, tmp_path / "tok5").pad_id == 300
    with pytest.raises(ValueError, match="EOS"):
        extend_tokenizer(named, tmp_path / "tok6", avoid_ids=[300])


def test_weights_grow_with_mean_rows_and_keep_the_old_ones(llama, tmp_path):
    from llmstack.stages import common
    from llmstack.train import weights

    init = weights.read_weights(llama[0])
    base = load_tokenizer(llama[0])
    ext = extend_tokenizer(base, tmp_path / "tok")
    arch = common.finetune_arch(None, init, ext.vocab_size, 64, False, tokenizer_hash=ext.hash)
    assert arch.vocab_size == 320 and not arch.tie_embeddings
    _, info, state = common.fit_vocab(init, arch.vocab_size, ext.hash)
    assert info.vocab_size == 320 and info.tokenizer_hash == ext.hash
    for key in ("wte.weight", "lm_head.weight"):
        old, new = init[2][key], state[key]
        assert new.shape == (320, old.shape[1])
        assert torch.equal(new[:300], old)  # the original rows, bit for bit
        assert torch.allclose(new[300:], old.mean(0).expand(20, -1))
    # a model of that size takes them; weights of another tokenizer are still refused
    model = common.build_model(arch, {}, 0, 0, init=init, tokenizer_hash=ext.hash)
    assert torch.equal(model.wte.weight[:300], init[2]["wte.weight"])
    other = init[1].replace(tokenizer_hash="0" * 16)
    assert common.fit_vocab((init[0], other, init[2]), 320, ext.hash)[2] is init[2]
    with pytest.raises(Exception, match="tokenizer mismatch"):
        common.load_weights(model, (init[0], other, init[2]), 0, ext.hash)
    with pytest.raises(Exception, match="vocabulary of 300, the tokenizer 302"):
        common.finetune_arch(None, init, 302, 64, False, tokenizer_hash="f" * 16)


def test_a_tokenizer_with_a_pad_is_used_as_it_is(tmp_path):
    from llmstack.stages import common
    from llmstack.train import weights

    ours, hf = hf_dir(tmp_path / "tok", QWEN_SPECIALS, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen2_dir(tmp_path / "qwen2", hf)
    init = weights.read_weights(tmp_path / "qwen2")
    got = common.finetune_tokenizer(TokenizerConfig(path=""), init, tmp_path / "run")
    assert got.hash == ours.hash and got.pad_id == hf.pad_token_id and not got.added
    assert not (tmp_path / "run").exists()
    # add_pad=false keeps a pad-less tokenizer as it is too
    _, llama_tok = hf_dir(tmp_path / "ltok", LLAMA3_SPECIALS, LLAMA3_TEMPLATE, eos_token="<|eot_id|>")
    cfg = TokenizerConfig(path=str(tmp_path / "ltok"), add_pad=False)
    assert common.finetune_tokenizer(cfg, None, tmp_path / "run").pad_id is None
    assert not (tmp_path / "run").exists()


def _sft(llama, run_dir, *overrides, nprocs=1, launcher="python"):
    src, _, data = llama
    args = ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), f"model.init={src}", "tokenizer.path=",
            f"data.sources=[{{path: '{data}'}}]", f"data.val_sources=[{{path: '{data}'}}]", "data.seq_len=64",
            "data.shuffle=false", "sft.packing=false", "train.micro_batch=4", "train.max_steps=3", "train.lr=1e-9",
            "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0", "train.save_every=1",
            "train.progress=false", f"run.dir={run_dir}", "dist.timeout_s=120", *overrides]
    return run_cmd(llmstack_cmd(args, nprocs, launcher), cwd=run_dir.parent, timeout=600)


def _check_export(llama, run_dir, tmp_path, dtype=torch.float32):
    """The export of the run's last checkpoint against ours and the original model, whose weights
    the run held in `dtype` (trained with lr 1e-9: the same up to rounding)."""
    from llmstack.cli import main
    from llmstack.train.weights import load_for_inference

    src, original, _ = llama
    out = tmp_path / "export"
    assert main(["export", str(run_dir / "checkpoints" / "latest"), "--out", str(out)]) == 0
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    model = tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    gen = tf.GenerationConfig.from_pretrained(str(out))
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == model.config.pad_token_id == gen.pad_token_id == 300
    assert tok.pad_token_id not in eos and sorted(eos) == sorted(original.config.eos_token_id)
    assert model.config.vocab_size == 320 and model.config.vocab_size >= len(tok) == 301
    ids = torch.tensor([load_tokenizer(src).encode(t) for t in ["Pack my box with five dozen"]])
    ours, _, _ = load_for_inference(run_dir / "checkpoints" / "latest")
    with torch.no_grad():
        theirs, mine, first = model(ids).logits, ours(ids), original(ids).logits
    assert theirs.shape[-1] == 320
    assert torch.allclose(theirs, mine, atol=1e-4)
    if dtype == torch.float32:
        assert torch.allclose(theirs[..., :300], first, atol=1e-4)
    # the original rows unchanged by the resize, the new ones their mean
    for grown, old in ((model.get_input_embeddings(), original.get_input_embeddings()),
                       (model.get_output_embeddings(), original.get_output_embeddings())):
        old = old.weight.to(dtype).float()
        assert torch.allclose(grown.weight[:300], old, atol=1e-6, rtol=0)
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the mean rounded
        assert torch.allclose(grown.weight[300:], old.mean(0).expand(20, -1), atol=tol)
    return model


@pytest.mark.slow
def test_sft_adds_a_pad_resumes_and_exports_it(llama, tmp_path):
    run_dir = tmp_path / "run"
    first = _sft(llama, run_dir, "zero.stage=0", "train.stop_at=2")
    assert "added <|pad|> (id 300, the pad)" in first.stdout + first.stderr
    meta = json.loads((run_dir / "checkpoints" / "step_2" / "meta.json").read_text())
    tok = load_tokenizer(run_dir / "tokenizer")
    assert meta["tokenizer_path"] == str(run_dir / "tokenizer") and meta["tokenizer_hash"] == tok.hash
    assert meta["model"]["vocab_size"] == 320 and tok.pad_id == 300 and tok.vocab_size == 301
    assert extends(tok.hash, load_tokenizer(llama[0]).hash)
    assert json.loads((run_dir / "run.json").read_text())["tokenizer_hash"] == tok.hash
    second = _sft(llama, run_dir, "zero.stage=0")  # resumes from step 2 with the same tokenizer
    assert "resum" in (second.stdout + second.stderr).lower() and sorted(losses(run_dir)) == [1, 2, 3]
    assert load_tokenizer(run_dir / "tokenizer").hash == tok.hash
    _check_export(llama, run_dir, tmp_path)


@pytest.mark.slow
def test_sft_zero3_bf16_grows_the_partitioned_embedding(llama, tmp_path):
    run_dir = tmp_path / "run"
    _sft(llama, run_dir, "zero.stage=3", "precision=bf16", "train.max_steps=2", launcher="deepspeed")
    assert json.loads((run_dir / "checkpoints" / "step_2" / "meta.json").read_text())["zero_stage"] == 3
    _check_export(llama, run_dir, tmp_path, torch.bfloat16)


@pytest.mark.slow
def test_dpo_with_added_tokens_resumes_with_its_reference(llama, tmp_path):
    """DPO builds its frozen reference from model.init again when it resumes: the weights of the
    base tokenizer grow to the run's (load_weights) and the run goes on with the same tokenizer."""
    src, _, _ = llama
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": c[0]["content"], "chosen": c[1]["content"], "rejected": "No."})
                             + "\n" for c in CONVS))
    run_dir = tmp_path / "dpo"
    args = ["dpo", str(REPO / "configs/dpo/demo.yaml"), f"model.init={src}", "tokenizer.path=",
            "tokenizer.add_tokens=['<|tool|>']", f"data.sources=[{{path: '{prefs}'}}]",
            f"data.val_sources=[{{path: '{prefs}'}}]", "data.val_pairs=4", "data.seq_len=128", "train.micro_batch=4",
            "train.max_steps=2", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
            "train.save_every=1", "train.progress=false", f"run.dir={run_dir}"]
    run_cmd(llmstack_cmd([*args, "train.stop_at=1"], 1, "python"), cwd=tmp_path)
    tok = load_tokenizer(run_dir / "tokenizer")
    assert tok.added["tokens"] == {"<|pad|>": 300, "<|tool|>": 301} and tok.pad_id == 300
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path)
    assert "initialised weights from" in proc.stdout + proc.stderr  # the reference, from model.init
    assert sorted(losses(run_dir)) == [1, 2]
    meta = json.loads((run_dir / "checkpoints" / "step_2" / "meta.json").read_text())
    assert meta["tokenizer_hash"] == tok.hash and meta["model"]["vocab_size"] == 320
