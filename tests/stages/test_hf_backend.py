"""The generic backend (model.backend=hf, models/hf_backend.py): a transformers causal LM that
`llmstack import` does not map (OLMo 2: q/k RMSNorm over the whole projection, norms after the
attention and MLP) trained through its own class.

- the wrapper's logits, policy log-probs and greedy decoding equal transformers' on a left-padded
  batch; a bf16 cast keeps the rotary frequencies fp32; packed rows are refused;
- `llmstack sft` LoRA (peft on its q_proj / v_proj) with the model's own ChatML template trains on
  exactly transformers' assistant-mask tokens; the export loads in transformers with the logits of
  our checkpoint and renders the model's chat format; `generate --chat` on the checkpoint answers as
  transformers does from the export;
- a tokenizer without a pad: one is added, the vocabulary grows, the export carries it;
- full SFT under ZeRO-3 in bf16 with activation checkpointing on two processes, resumed;
- RM, DPO, PPO and GRPO start from the transformers directory;
- bad configurations exit 2 with the key named.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from tests.conftest import REPO, llmstack_cmd, losses, run_cmd
from tests.data_pipeline.test_chat_templates import CHATML_MARKED, QWEN_SPECIALS, hf_dir

CONVS = [[{"role": "user", "content": f"Question {i}: pack my box?"},
          {"role": "assistant", "content": f"Answer {i}: with five dozen liquor jugs."}] for i in range(8)]
PROMPTS = [f"Question {i}: what packs my box?" for i in range(12)]


def olmo2_dir(path, hf_tok, **extra):
    """A tiny OLMo 2 directory (random weights) with `hf_tok` as its tokenizer."""
    cfg = tf.Olmo2Config(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=hf_tok.pad_token_id, bos_token_id=None, eos_token_id=hf_tok.eos_token_id,
                         **extra)
    torch.manual_seed(0)
    model = tf.Olmo2ForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    hf_tok.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """(HF directory, transformers model, transformers tokenizer (template with generation markers))."""
    d = tmp_path_factory.mktemp("hfb")
    _, hf = hf_dir(d / "tok", QWEN_SPECIALS, CHATML_MARKED, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ref = olmo2_dir(d / "olmo2", hf)
    data = d / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    (data / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": "With five dozen jugs.", "rejected": "No."}) + "\n" for p in PROMPTS))
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return d / "olmo2", ref, hf, data


def _meta(path):
    from llmstack.train import checkpoint as ckpt

    return ckpt.read_meta(ckpt.resolve(path))


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(10, 200, (2, 24))
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[0, :6] = False  # left padding
    return ids, valid, (valid.long().cumsum(-1) - 1).clamp(min=0)


def test_olmo2_is_not_a_native_architecture(model_dir, tmp_path):
    from llmstack.cli import main

    assert main(["import", str(model_dir[0]), "--out", str(tmp_path / "x")]) == 2


def test_wrapper_equals_transformers(model_dir):
    from llmstack.generate import generate
    from llmstack.models import hf_backend as hb
    from llmstack.models.layers import segments_from_valid

    path, ref, _, _ = model_dir
    arch = hb.read_arch(path)
    assert (arch.n_layer, arch.n_head, arch.kv_heads, arch.head_dim, arch.max_seq_len) == (2, 4, 2, 16, 256)
    model = hb.HFCausalLM(arch)
    model.load_state_dict(hb.read_state(path))
    model.eval()
    ids, valid, pos = _batch()
    seg = segments_from_valid(valid)
    with torch.no_grad():
        want = ref(ids, attention_mask=valid.long(), position_ids=pos).logits
        got = model(ids, position_ids=pos, segment_ids=seg)
        assert (got - want)[valid].abs().max() < 1e-5
        # the mean cross-entropy of the targets given as labels (-100 ignored)
        labels = torch.where(valid, ids.roll(-1, 1), -100)
        labels[:, -1] = -100
        ce = torch.nn.functional.cross_entropy(want.flatten(0, 1), labels.flatten(), ignore_index=-100)
        assert torch.allclose(model(ids, labels=labels, position_ids=pos, segment_ids=seg), ce, atol=1e-5)
        # policy log-probs of the row's own tokens from column 4 on
        policy = hb.HFPolicyLM(arch)
        policy.load_state_dict(model.state_dict())
        policy.eval()
        lp, ent = policy(ids, pos, seg, start=4, with_entropy=True)
        ref_lp = torch.log_softmax(want[:, 3:-1].float(), -1)
        assert (lp - ref_lp.gather(-1, ids[:, 4:, None]).squeeze(-1))[valid[:, 4:]].abs().max() < 1e-5
        assert (ent - -(ref_lp.exp() * ref_lp).sum(-1))[valid[:, 4:]].abs().max() < 1e-4
        with pytest.raises(ValueError, match="does not pack sequences"):
            model(ids, segment_ids=torch.arange(24).repeat(2, 1) // 12)
    # greedy decoding through our sampler and the model's own cache = transformers' generate
    prompts = [ids[0, 6:].tolist(), ids[1].tolist()]
    ours = generate(model, prompts, max_new_tokens=10, pad_id=0)
    padded = torch.tensor([[0] * 6 + prompts[0], prompts[1]])
    theirs = ref.generate(padded, attention_mask=valid.long(), max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, 24:].tolist()
    assert ours == theirs
    # a bf16 cast (DeepSpeed's bf16 engine) leaves the rotary frequencies in fp32
    model.bfloat16()
    assert model.hf.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    buffers = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert buffers and all(b.dtype == torch.float32 for b in buffers)


def _sft_args(path, data, run_dir, *extra):
    return ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), f"model.init={path}", "model.backend=hf",
            "tokenizer.path=", f"data.sources=[{{path: '{data / 'chat.jsonl'}'}}]",
            f"data.val_sources=[{{path: '{data / 'chat.jsonl'}'}}]", "data.seq_len=128", "data.shuffle=false",
            "sft.packing=false", "train.micro_batch=4", "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=1",
            "train.eval_every=0", "train.save_every=0", "train.progress=false", f"run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_lora_sft_export_loads_in_transformers(model_dir, tmp_path):
    from llmstack.models import hf_backend as hb
    from llmstack.train import weights

    path, _, hf, data = model_dir
    run_dir = tmp_path / "run"
    proc = run_cmd(llmstack_cmd(_sft_args(path, data, run_dir, "train.max_steps=5", "zero.stage=0",
                                          "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target=[q,v]"),
                                1, "python"), cwd=tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert "LoRA r=4 alpha=8.0 on 4 layers" in out and "{% generation %} blocks" in out
    done = json.loads(out[out.rindex("done: ") + 6:].splitlines()[0])
    assert done["steps"] == 5 and done["lora"]
    marked = [sum(hf.apply_chat_template(c, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)["assistant_masks"]) for c in CONVS]
    assert done["supervised_tokens"] == 2 * sum(marked) + sum(marked[:4])  # 5 steps x 4 rows, in order
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5] and steps[5] < steps[1]
    assert _meta(run_dir / "checkpoints" / "latest").model_family == "hf"

    export = tmp_path / "export"
    run_cmd(llmstack_cmd(["export", str(run_dir / "checkpoints" / "latest"), "--out", str(export)], 1, "python"),
            cwd=tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert type(loaded).__name__ == "Olmo2ForCausalLM"
    _, info, state = weights.read_weights(run_dir / "checkpoints" / "latest")  # LoRA merged
    assert info.model_family == "hf"
    ours = hb.HFCausalLM(hb.HFConfig(**info.model))
    ours.load_state_dict(state)
    ours.eval()
    ids, valid, pos = _batch()
    with torch.no_grad():
        a = ours(ids, position_ids=pos, segment_ids=torch.where(valid, 0, -1))
        b = loaded(ids, attention_mask=valid.long(), position_ids=pos).logits
        base = tf.AutoModelForCausalLM.from_pretrained(str(path)).eval()(ids, attention_mask=valid.long(),
                                                                         position_ids=pos).logits
    assert (a - b)[valid].abs().max() < 1e-4
    assert (b - base)[valid].abs().max() > 1e-3  # the adapters were merged in: not the starting weights
    exported_tok = tf.AutoTokenizer.from_pretrained(str(export))
    assert exported_tok.apply_chat_template(CONVS[0], tokenize=False) == hf.apply_chat_template(CONVS[0], tokenize=False)
    # `llmstack generate --chat` on the checkpoint answers as transformers' greedy generate on the export
    proc = run_cmd(llmstack_cmd(["generate", str(run_dir / "checkpoints" / "latest"), "--chat", "Pack my box?",
                                 "--max-new-tokens", "12", "--temperature", "0"], 1, "python"), cwd=tmp_path)
    prompt = exported_tok.apply_chat_template([{"role": "user", "content": "Pack my box?"}], tokenize=True,
                                              add_generation_prompt=True, return_dict=True, return_tensors="pt")
    new = loaded.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    end = exported_tok.convert_tokens_to_ids("<|im_end|>")
    new = new[:new.index(end)] if end in new else new
    assert new  # (an answer, not an immediate end of turn)
    assert proc.stdout.split("\n", 1)[1].rstrip("\n") == exported_tok.decode(new)


@pytest.mark.slow
def test_a_pad_is_added_and_exported(tmp_path):
    """A Llama-3-style tokenizer without a pad: the run adds one (never an EOS), the embedding and
    LM head grow to a multiple of 64 rows, and the export names the pad in its tokenizer, config.json
    and generation_config.json; its logits on the original vocabulary are the starting model's."""
    from tests.data_pipeline.test_chat_templates import LLAMA3_MARKED
    from tests.models.test_export_fidelity import LLAMA3_SPECIALS

    _, hf = hf_dir(tmp_path / "tok", LLAMA3_SPECIALS, LLAMA3_MARKED, bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>")
    assert hf.pad_token_id is None
    ref = olmo2_dir(tmp_path / "olmo2", hf)
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    run_dir = tmp_path / "run"
    run_cmd(llmstack_cmd(_sft_args(tmp_path / "olmo2", data, run_dir, "train.max_steps=2", "zero.stage=0",
                                   "train.lr=1e-9"), 1, "python"), cwd=tmp_path)
    export = tmp_path / "export"
    run_cmd(llmstack_cmd(["export", str(run_dir / "checkpoints" / "latest"), "--out", str(export)], 1, "python"),
            cwd=tmp_path)
    tok = tf.AutoTokenizer.from_pretrained(str(export))
    model = tf.AutoModelForCausalLM.from_pretrained(str(export)).eval()
    gen = json.loads((export / "generation_config.json").read_text())
    assert tok.pad_token_id is not None and tok.pad_token_id == model.config.pad_token_id == gen["pad_token_id"]
    assert tok.pad_token_id != hf.eos_token_id and len(tok) == len(hf) + 1
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    ids, valid, pos = _batch()
    with torch.no_grad():
        a = model(ids, attention_mask=valid.long(), position_ids=pos).logits[..., :len(hf)]
        b = ref(ids, attention_mask=valid.long(), position_ids=pos).logits
    assert (a - b)[valid].abs().max() < 1e-4


@pytest.mark.slow
def test_full_sft_zero3_bf16_two_processes_and_resume(model_dir, tmp_path):
    path, _, _, data = model_dir
    run_dir = tmp_path / "run"
    proc = run_cmd(llmstack_cmd(_sft_args(path, data, run_dir, "train.max_steps=2", "zero.stage=3", "precision=bf16",
                                          "train.activation_checkpointing=true", "train.micro_batch=2"), 2),
                   cwd=tmp_path, timeout=900)
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2], proc.stdout[-2000:]
    assert all(v == v and 0 < v < 20 for v in steps.values())  # finite, about ln(vocab)
    meta = _meta(run_dir / "checkpoints" / "latest")
    assert (meta.model_family, meta.zero_stage, meta.world_size, meta.precision) == ("hf", 3, 2, "bf16")
    # resumed from that checkpoint (architecture from its record), one more step
    run_cmd(llmstack_cmd(_sft_args(path, data, run_dir, "train.max_steps=3", "zero.stage=3", "precision=bf16",
                                   "train.activation_checkpointing=true", "train.micro_batch=2"), 2),
            cwd=tmp_path, timeout=900)
    assert sorted(losses(run_dir)) == [1, 2, 3] and _meta(run_dir / "checkpoints" / "latest").step == 3


def _stage(tmp_path, stage: str, config: str, *overrides):
    args = [stage, str(REPO / config), "tokenizer.path=", f"run.dir={tmp_path / stage}", "train.max_steps=3",
            "train.log_every=1", "train.save_every=0", "train.progress=false", *overrides]
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path, timeout=900)
    steps = losses(tmp_path / stage)
    assert sorted(steps)[-1] == 3, steps
    return proc


@pytest.mark.slow
def test_rm_dpo_ppo_grpo_start_from_the_transformers_directory(model_dir, tmp_path):
    path, _, _, data = model_dir
    prefs = f"[{{path: '{data / 'prefs.jsonl'}'}}]"
    pairs = [f"data.sources={prefs}", f"data.val_sources={prefs}", "data.val_pairs=4", "train.micro_batch=4",
             "data.seq_len=96", "train.eval_every=0"]
    _stage(tmp_path, "rm", "configs/rm/demo.yaml", f"model.init={path}", "model.backend=hf", *pairs)
    _stage(tmp_path, "dpo", "configs/dpo/demo.yaml", f"model.init={path}", "model.backend=hf", *pairs)
    rm = tmp_path / "rm" / "checkpoints" / "latest"
    assert _meta(rm).model_family == "hf" and _meta(rm).head == "scalar"
    _stage(tmp_path, "ppo", "configs/ppo/demo.yaml", f"actor.init={path}", "actor.backend=hf",
           f"critic.init={path}", "critic.backend=hf", f"reward.init={rm}", "actor.zero.stage=3",  # decoding copy
           f"data.sources=[{{path: '{data / 'prompts.jsonl'}'}}]", "rollout.batch=4", "rollout.max_new_tokens=8",
           "data.max_prompt_len=100", "train.micro_batch=4")
    _stage(tmp_path, "grpo", "configs/grpo/demo.yaml", f"actor.init={path}", "actor.backend=hf", "rollout.prompts=2",
           "rollout.group_size=4", "rollout.max_new_tokens=6", "train.micro_batch=8", "data.max_prompt_len=100",
           "grpo.dynamic_sampling=false")


@pytest.mark.parametrize("override, message", [
    (["model.init=", "model.backend=hf"], "model.backend=hf trains a transformers model from its directory"),
    (["model.backend=hf", "model.n_layer=4"], "model.n_layer does not apply to model.backend=hf"),
    (["model.backend=hf", "sft.packing=true"], "sft.packing=true needs model.backend=native"),
])
def test_bad_hf_backend_configs_exit_2(model_dir, tmp_path, override, message):
    path, _, _, data = model_dir
    args = [a for a in _sft_args(path, data, tmp_path / "run", "train.max_steps=1") if a != "sft.packing=false"]
    args = [a for a in args if not a.startswith(tuple(o.split("=")[0] + "=" for o in override))] + override
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
