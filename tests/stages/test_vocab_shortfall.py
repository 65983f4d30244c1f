"""A configured tokenizer.vocab_size the corpus cannot supply (e.g. 50,304 on a small corpus):
pretraining warns once on stderr naming both sizes, why and what to do, records the shortfall in
the tokenizer's metadata, and builds the model on the tokenizer's real (padded) vocabulary."""

from __future__ import annotations

import random

from data_pipeline.tokenizer import load_tokenizer
from llmstack.train.weights import read_weights
from tests.conftest import BIN, REPO, TINY, child_env, run_cmd


def test_pretrain_on_a_short_vocabulary_warns_and_embeds_the_real_one(tmp_path):
    rnd = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rnd.choice(words) for _ in range(60)) for _ in range(40)))
    tok_dir, run_dir = tmp_path / "tok", tmp_path / "run"
    proc = run_cmd([str(BIN / "llmstack"), "pretrain",
                    str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, "zero.stage=0", "train.max_steps=1",
                    "train.micro_batch=2", "train.eval_batches=1", "train.save_every=1", f"run.dir={run_dir}",
                    f"tokenizer.path={tok_dir}", "tokenizer.vocab_size=50304",
                    f"data.sources=[{{path: '{corpus}'}}]", f"data.val_sources=[{{path: '{corpus}'}}]"],
                   cwd=tmp_path, env=child_env())
    tok = load_tokenizer(tok_dir)
    trained = tok.meta["trained_vocab_size"]
    assert trained < 50304 and tok.meta["vocab_shortfall"] == {"requested": 50304, "trained": trained}

    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: tokenizer.vocab_size")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    line = warnings[0]
    assert "tokenizer.vocab_size is 50,304" in line and f"learned only {trained:,} tokens" in line
    assert "ran out of merges" in line and "larger corpus" in line
    assert f"set tokenizer.vocab_size to {trained:,} or less" in line
    assert "VocabShortfallWarning" not in proc.stderr  # said once, as the command's own line

    # the model embeds the tokenizer's padded vocabulary, not the configured 50,304
    _, meta, state = read_weights(run_dir / "checkpoints" / "latest")
    assert tok.vocab_size % 64 == 0 and tok.vocab_size < 50304
    assert meta.model["vocab_size"] == tok.vocab_size
    assert state["wte.weight"].shape[0] == tok.vocab_size
