"""`llmstack sft` for real: the command a user types, DeepSpeed engines, one and two processes.

Fine-tuning on the demo pairs (uneven response lengths, padded rows; ZeRO-1) with micro-batch 8 x
accumulation 1 (stopped after 2 steps and resumed), micro-batch 1 x accumulation 8, and two
processes (ZeRO-3) x micro-batch 1 x accumulation 4 gives the same per-step losses and gradient
norms: the loss is the token mean over the whole global batch. A LoRA run (ZeRO-2) from that checkpoint
changes only the adapted layers, and its merged export loads in transformers with the logits of
our unmerged model; it answers --chat prompts.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, llmstack_cmd, losses, run_cmd

pytestmark = pytest.mark.slow

COMMON = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64",
          "data.seq_len=64", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
          "train.progress=false", "dist.timeout_s=120", "train.max_steps=4", "train.save_every=0", "sft.eval_max=32",
          "sft.packing=false", "model.init=null", "zero.stage=1"]
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target=[q,o]", "zero.stage=2", "train.micro_batch=4",
        "train.max_steps=3", "train.lr=1e-2"]


class Runs:
    def __init__(self, tmp, tok):
        self.tmp, self.tok, self.done = tmp, tok, {}

    def sft(self, name, *overrides, nprocs=1, check=True):
        run_dir = self.tmp / name
        args = ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), *COMMON, f"run.dir={run_dir}",
                f"tokenizer.path={self.tok}", *overrides]
        proc = run_cmd(llmstack_cmd(args, nprocs, "deepspeed" if nprocs > 1 else "python"), cwd=self.tmp,
                       timeout=600, check=check)
        return proc, run_dir

    def get(self, name, *overrides, nprocs=1):
        if name not in self.done:
            self.done[name] = self.sft(name, *overrides, nprocs=nprocs)[1]
        return self.done[name]

    def big(self):  # micro 8 x accum 1, interrupted after step 2 and resumed
        if "big" not in self.done:
            self.sft("big", "train.micro_batch=8", "train.grad_accum=1", "train.stop_at=2")
        return self.get("big", "train.micro_batch=8", "train.grad_accum=1")

    def accum(self):
        return self.get("accum", "train.micro_batch=1", "train.grad_accum=8")

    def two(self):
        return self.get("two", "train.micro_batch=1", "train.grad_accum=4", "zero.stage=3", nprocs=2)

    def lora(self):
        return self.get("lora", *LORA, f"model.init={self.big()}/checkpoints/latest", "tokenizer.path=")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    return Runs(tmp_path_factory.mktemp("sft"), tokenizer_dir)


def test_accumulation_ranks_and_resume_give_the_same_steps(runs):
    big, acc, two = losses(runs.big()), losses(runs.accum()), losses(runs.two())
    assert sorted(big) == sorted(acc) == sorted(two) == [1, 2, 3, 4]
    for s in big:
        # steps 3-4 of `big` ran after a resume from its step-2 checkpoint
        assert big[s] == pytest.approx(acc[s], rel=1e-5), (s, big, acc)
        assert two[s] == pytest.approx(acc[s], rel=1e-5), (s, two, acc)
    gn = {k: losses(r, "grad_norm") for k, r in (("big", runs.big()), ("acc", runs.accum()), ("two", runs.two()))}
    for s in big:
        assert gn["big"][s] == pytest.approx(gn["acc"][s], rel=1e-4) and gn["two"][s] == pytest.approx(gn["acc"][s], rel=1e-4)
    assert big[4] < big[1]


def test_metrics_report_supervised_tokens_and_validation(runs):
    lines = [json.loads(x) for x in (runs.accum() / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if "val_loss" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 4  # before fine-tuning, and at the end
    steps = [r for r in lines if "loss" in r]
    assert all(0 < r["sup_tokens_per_s"] < r["tokens_per_s"] for r in steps)
    assert steps[-1]["sup_tokens"] < steps[-1]["tokens"]
    assert steps[-1]["tokens"] == losses(runs.two(), "tokens")[4]  # same global batches


def test_lora_changes_only_adapted_layers_and_exports_merged(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmstack import models
    from llmstack.distributed import deepspeed as ds
    from llmstack.models.lora import apply_lora
    from llmstack.stages.export import export
    from llmstack.train import weights

    lora_dir = runs.lora()
    _, _, base = weights.read_weights(runs.big())
    src, meta, merged = weights.read_weights(lora_dir)
    assert meta.lora["modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.attn.proj",
                                       "blocks.1.attn.proj"]
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed == sorted(f"{m}.weight" for m in meta.lora["modules"])

    # our unmerged model (adapters live) against the merged Hugging Face export
    raw = {**torch.load(src / "mp_rank_00_model_states.pt", weights_only=True)["module"],
           **ds.consolidated_state_dict(src)}
    arch = models.config_from_dict("gpt", dict(meta.model, activation_checkpointing=False))
    ours = models.build_model("gpt", arch)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=["q", "o"])
    assert not [k for k in ours.load_state_dict(raw, strict=False).missing_keys if k != "lm_head.weight"]
    hf = AutoModelForCausalLM.from_pretrained(str(export(str(lora_dir), str(tmp_path / "hf")))).eval()
    x = torch.randint(0, arch.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x), rtol=0, atol=1e-5)


def test_chat_generation_and_its_template_in_the_export(runs, tmp_path):
    from transformers import AutoTokenizer

    from data_pipeline import formats
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.errors import UsageError
    from llmstack.stages import generation
    from llmstack.stages.export import export

    texts = generation.run(str(runs.lora()), [], chat=["What does `json.dumps` do?"], temperature=0,
                           max_new_tokens=8, system="Answer briefly.")
    assert len(texts) == 1 and "<|end|>" not in texts[0]
    with pytest.raises(UsageError, match="--prompt or --chat"):
        generation.run(str(runs.lora()), ["x"], chat=["y"])
    out = export(str(runs.big()), str(tmp_path / "hf"))
    msgs = [{"role": "user", "content": "What does `os.sep` do?"}, {"role": "assistant", "content": "A separator."}]
    assert AutoTokenizer.from_pretrained(str(out)).apply_chat_template(msgs, tokenize=True, return_dict=True)[
        "input_ids"] == formats.encode_chat(load_tokenizer(out), msgs)[0]


def test_bad_input_exits_2_with_a_clear_message(runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps({"prompt": "q", "response": ""}) + "\n")
    proc, _ = runs.sft("bad", f"data.sources=[{{path: {bad}}}]", "data.on_error=fail", check=False)
    assert proc.returncode == 2 and "bad.jsonl:2: field 'response' is empty" in proc.stderr, proc.stderr[-2000:]
    proc, _ = runs.sft("z3", "lora.enabled=true", "zero.stage=3", check=False)
    assert proc.returncode == 2 and "zero.stage=3 is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr
