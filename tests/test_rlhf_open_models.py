"""RM, DPO and PPO start from imported open models with their own tokenizers and chat templates
(a Qwen2-style model with ChatML, a Llama-3-style one with its header template): prompts are
rendered by the model's template (equal to transformers' apply_chat_template with the generation
prompt), responses stop at the tokenizer's end-of-turn EOS, and each stage trains a few steps."""

from __future__ import annotations

import json

import pytest

from data_pipeline import formats
from tests.conftest import REPO, llmstack_cmd, losses, run_cmd
from tests.data_pipeline.test_chat_templates import CHATML_MARKED, QWEN_SPECIALS, hf_dir, qwen2_dir
from tests.models.test_export_fidelity import LLAMA3_SPECIALS, LLAMA3_TEMPLATE, llama_dir

PROMPTS = [f"Question {i}: what packs my box?" for i in range(12)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{name: (imported checkpoint dir, our tokenizer, transformers' tokenizer)}."""
    from llmstack.cli import main

    d = tmp_path_factory.mktemp("open")
    out = {}
    ours, hf = hf_dir(d / "qwen-tok", QWEN_SPECIALS, CHATML_MARKED, eos_token="<|im_end|>",
                      pad_token="<|endoftext|>")
    qwen2_dir(d / "qwen2", hf)
    ours_l, hf_l = hf_dir(d / "llama-tok", LLAMA3_SPECIALS, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                          eos_token="<|eot_id|>")
    model, _ = llama_dir(d / "llama3", hf_l, config=dict(bos_token_id=hf_l.bos_token_id,
                                                         eos_token_id=hf_l.eos_token_id))
    model.save_pretrained(str(d / "llama3"))
    for name, tok, hft in (("qwen2", ours, hf), ("llama3", ours_l, hf_l)):
        assert main(["import", str(d / name), "--out", str(d / f"{name}-imported")]) == 0
        out[name] = (d / f"{name}-imported", tok, hft)
    data = d / "data"
    data.mkdir()
    (data / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": "With five dozen jugs.", "rejected": "No."}) + "\n" for p in PROMPTS))
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out["data"] = data
    return out


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_prompts_and_stops_follow_the_model_template(imported, name):
    from llmstack.stages.policy import chat_stops

    _, tok, hf = imported[name]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert formats.encode_prompt(tok, messages) == list(want)
    stops, pad = chat_stops(tok)
    assert stops == (hf.eos_token_id,) and pad != hf.eos_token_id


def _run(imported, tmp_path, stage: str, config: str, *overrides):
    args = [stage, str(REPO / config), "tokenizer.path=", f"run.dir={tmp_path / stage}", "train.max_steps=3",
            "train.log_every=1", "train.save_every=0", "train.progress=false", *overrides]
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    steps = losses(tmp_path / stage)
    assert sorted(steps)[-1] == 3, steps
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_rm_dpo_ppo_start_from_the_imported_model(imported, name, tmp_path):
    init, _, _ = imported[name]
    data = imported["data"]
    prefs = f"[{{path: '{data / 'prefs.jsonl'}'}}]"
    common = ["data.seq_len=96", "train.eval_every=0"]
    _run(imported, tmp_path, "rm", "configs/rm/demo.yaml", f"model.init={init}", f"data.sources={prefs}",
         f"data.val_sources={prefs}", "data.val_pairs=4", "train.micro_batch=4", *common)
    _run(imported, tmp_path, "dpo", "configs/dpo/demo.yaml", f"model.init={init}", f"data.sources={prefs}",
         f"data.val_sources={prefs}", "data.val_pairs=4", "train.micro_batch=4", *common)
    _run(imported, tmp_path, "ppo", "configs/ppo/demo.yaml", f"actor.init={init}",
         f"reward.init={tmp_path / 'rm' / 'checkpoints' / 'latest'}",
         f"data.sources=[{{path: '{data / 'prompts.jsonl'}'}}]", "rollout.batch=4", "rollout.max_new_tokens=8", "data.max_prompt_len=100",
         "train.micro_batch=4")

