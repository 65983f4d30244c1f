"""The quickstart, exactly as a user runs it: a tiny GPT learns the builtin corpus."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BIN, child_env, run_cmd

pytestmark = pytest.mark.slow


def test_quickstart_beats_unigram_entropy(tmp_path):
    out = tmp_path / "qs"
    proc = run_cmd([str(BIN / "llmstack"), "quickstart", "--out", str(out)], cwd=tmp_path,
                   env=child_env(OMP_NUM_THREADS=2), timeout=900)
    report = json.loads((out / "report.json").read_text())
    print(f"quickstart: val loss {report['final_val_loss']:.3f} nats, unigram entropy "
          f"{report['val_unigram_entropy']:.3f} nats, {report['seconds']} s")
    # "well below": at least 0.5 nats (a 1.6x lower perplexity) under the context-free optimum
    assert report["final_val_loss"] < report["val_unigram_entropy"] - 0.5
    assert (out / "report.md").is_file()
    assert "step 300/300" in proc.stdout  # progress lines (no TTY under test)
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(metrics[0])
    assert any("val_loss" in m for m in metrics)
