"""The quickstart, exactly as a user runs it: tokenizer -> pretrain -> SFT -> RM -> PPO -> DPO -> eval.

The pretraining runs its full 300 steps (the tiny GPT must learn the builtin corpus); the later
stages run with their steps scaled down (`--scale`), which checks the wiring through checkpoints,
the report and the plots; each stage's own quality is tested in its own test file.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import BIN, child_env, run_cmd

pytestmark = pytest.mark.slow

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


def test_quickstart_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "qs"
    proc = run_cmd([str(BIN / "llmstack"), "quickstart", "--out", str(out), "--scale", "0.1"], cwd=tmp_path,
                   env=child_env(OMP_NUM_THREADS=2), timeout=1500)
    report = json.loads((out / "report.json").read_text())
    pre = report["stages"]["pretrain"]
    print(f"quickstart: val loss {pre['final_val_loss']:.3f} nats, unigram entropy "
          f"{pre['val_unigram_entropy']:.3f} nats; seconds per stage {report['seconds']}")
    # "well below": at least 0.5 nats (a 1.6x lower perplexity) under the context-free optimum
    assert pre["final_val_loss"] < pre["val_unigram_entropy"] - 0.5
    assert "step 300/300" in proc.stdout  # progress lines (no TTY under test)
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(metrics[0])
    assert any("val_loss" in m for m in metrics)

    # every later stage ran from the previous one's checkpoint and logged its curves
    sft = report["stages"]["sft"]
    assert sft["val_loss_after"] < sft["val_loss_before"]  # even a few steps teach the answer format
    assert report["stages"]["rm"]["steps"] >= 2 and report["stages"]["dpo"]["steps"] >= 2
    assert report["stages"]["ppo"]["steps"] >= 2 and report["stages"]["grpo"]["steps"] >= 2
    for name in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert (out / name / "metrics.jsonl").stat().st_size > 0, name
    for name in ("pretrain", "sft", "dpo", "grpo"):
        assert (out / name / "checkpoints" / "latest").exists(), name
    assert (out / "ppo" / "checkpoints" / "actor" / "latest").exists()

    # eval scored all four models on both tasks
    evals = report["stages"]["eval"]
    assert set(evals) == {"pretrain", "sft", "ppo", "dpo"}
    for name, res in evals.items():
        ppl = res["tasks"]["ppl:builtin:validation"]
        assert 1 < ppl["perplexity"] < 4096, (name, ppl)  # below the uniform guess over the vocabulary
        assert 0 <= res["tasks"]["demo_mc"]["acc"] <= 1

    text = (out / "report.md").read_text()
    for name in (*STAGES, "eval"):
        assert f"| {name} |" in text, name
    for name in STAGES:
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in text

    # the output ends saying where the report and the plots are (paths relative to where it ran)
    *_, plots_line, last = proc.stdout.rstrip("\n").splitlines()
    assert last == "report: qs/report.md"
    assert plots_line == "plots: " + ", ".join(f"qs/plots/{n}.png" for n in sorted(STAGES))
    # the evaluation (child processes) shows per-model progress on stderr
    for i, name in enumerate(("pretrain", "sft", "ppo", "dpo"), start=1):
        line = rf"^eval {i}/4: {name} .* in [0-9.]+ s, [0-9.]+ s/model, eta [0-9]+s$"
        assert re.search(line, proc.stderr, re.M), name
    # chance level next to each multiple-choice score (demo_mc: 4 choices)
    assert "| eval | sft: demo_mc acc / acc_norm (chance level) |" in text and "(0.250) |" in text
    # DPO before training: the policy is the reference, every pair ties: 0.5, not 0
    dpo = report["stages"]["dpo"]
    assert dpo["val_accuracy_before"] == 0.5 and dpo["val_ties_before"] == 1.0
    assert "| dpo | held-out tied pairs before -> after | 100.0% -> " in text
    # held-out pretraining text gets less likely after SFT: said, with the reason
    ppl = {name: evals[name]["tasks"]["ppl:builtin:validation"]["perplexity"] for name in evals}
    assert ppl["sft"] > ppl["pretrain"]
    assert "rises after SFT" in text and "another distribution" in text


def test_pretrain_only_stops_after_pretraining(tmp_path):
    out = tmp_path / "qs"
    proc = run_cmd([str(BIN / "llmstack"), "quickstart", "--out", str(out), "--steps", "20", "--pretrain-only"],
                   cwd=tmp_path, env=child_env(OMP_NUM_THREADS=2), timeout=600)
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"pretrain"}
    assert (out / "pretrain" / "checkpoints" / "latest").exists()
    assert not any((out / name).exists() for name in ("sft", "rm", "ppo", "dpo", "eval"))
    text = (out / "report.md").read_text()
    assert "| pretrain |" in text and "| sft |" not in text
    assert (out / "plots" / "pretrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.rstrip("\n").splitlines()[-2:] == ["plots: qs/plots/pretrain.png", "report: qs/report.md"]
