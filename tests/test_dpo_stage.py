"""DPO on the demo preference pairs (tiny GPT from scratch, frozen reference = its start).

Held-out pairs: before training the implicit reward margin beta((pi_c - ref_c) - (pi_r - ref_r))
is exactly 0 (policy = reference); after a few dozen steps it must be clearly positive and most
held-out pairs must be ranked correctly.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, llmstack_cmd, run_cmd

DPO_TINY = ["model.init=null", "model.preset=gpt2-tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4",
            "model.max_seq_len=96", "data.seq_len=96", "train.lr=3e-3", "train.micro_batch=32", "train.max_steps=60",
            "train.eval_every=30", "train.log_every=10", "train.progress=false", "train.resume=none",
            "dist.timeout_s=120"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    run_dir = tmp / "dpo"
    # online reference: the frozen copy scores each micro-batch (no pass over all 4k training pairs first)
    args = ["dpo", str(REPO / "configs/dpo/demo.yaml"), *DPO_TINY, f"tokenizer.path={tokenizer_dir}",
            f"run.dir={run_dir}", "dpo.reference=online"]
    proc = run_cmd(llmstack_cmd(args, 1, "python"), cwd=tmp, timeout=600)
    summary = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("done: "))
    return summary, run_dir


def test_dpo_raises_heldout_margin_and_accuracy(dpo_run):
    s, run_dir = dpo_run
    print(f"\nDPO held-out: margin {s['val_margin_before']:.3f} -> {s['val_margin']:.3f}, "
          f"accuracy {s['val_accuracy_before']:.3f} -> {s['val_accuracy']:.3f} ({s['val_pairs']} pairs)")
    assert s["val_margin_before"] == pytest.approx(0.0, abs=1e-5)
    assert s["val_margin"] > 0.5
    assert s["val_accuracy"] >= 0.75
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "accuracy" in r]
    assert train[-1]["margin"] > train[0]["margin"]
    assert {"val_accuracy", "val_margin", "val_loss"} <= set(rows[-1])


def test_dpo_checkpoint_is_a_plain_gpt(dpo_run):
    from llmstack.train.weights import load_for_inference

    _, run_dir = dpo_run
    model, _, info = load_for_inference(run_dir / "checkpoints/latest")
    assert type(model).__name__ == "GPT" and info.head is None
