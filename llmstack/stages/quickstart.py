"""`llmstack quickstart`: the tiny end-to-end demo on the builtin corpus, on CPU.

Trains a byte-level BPE tokenizer and a tiny gpt2-style model on the docstrings and comments of
the running Python's standard library, then compares the held-out validation loss with the
unigram entropy of the held-out corpus (the loss of the best predictor that ignores context).
Starts fresh every time; writes OUT/report.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmstack.config import PretrainConfig
from llmstack.dist import env
from llmstack.stages import common, pretrain


def quickstart_config(out: Path, steps: int) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "run": {"name": "quickstart-pretrain", "dir": str(out / "pretrain")},
        "tokenizer": {"path": str(out / "tokenizer"), "kind": "bpe", "vocab_size": 4096, "num_sentinels": 0},
        "model": {"preset": "gpt2-tiny"},
        "data": {"seq_len": 128},
        "train": {"max_steps": steps, "micro_batch": 16, "lr": 2e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "log_every": 10, "eval_every": 100, "eval_batches": 8,
                  "save_every": 0, "keep_last": 1, "resume": "none"},
    })


def run(out: str = "runs/quickstart", steps: int = 300) -> dict:
    out_dir = Path(out)
    cfg = quickstart_config(out_dir, steps)
    if env.is_main():
        shutil.rmtree(cfg.run.path, ignore_errors=True)
    summary = pretrain.run(cfg)

    tokenizer = common.ensure_tokenizer(cfg.tokenizer, cfg.data.sources)
    from data_pipeline.stream import entropy_of_counts, token_counts

    counts = token_counts(common.source_texts(cfg.data.val_sources), tokenizer)  # each document + its EOS
    h, val_tokens = entropy_of_counts(counts), int(counts.sum())
    report = {**summary, "val_unigram_entropy": h, "val_tokens": val_tokens}
    if env.is_main():
        lines = [
            "# llmstack quickstart",
            "",
            f"Tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens (hash {tokenizer.hash}) at `{cfg.tokenizer.path}`.",
            f"Model: gpt2-tiny, {steps} steps, run directory `{cfg.run.path}`.",
            "",
            "| metric | value |",
            "|---|---|",
            f"| final train loss (nats/token) | {summary['final_loss']:.4f} |",
            f"| final validation loss (nats/token) | {summary['final_val_loss']:.4f} |",
            f"| unigram entropy of the validation corpus (nats/token) | {h:.4f} |",
            f"| validation tokens | {val_tokens} |",
            f"| tokens trained | {summary['tokens']} |",
            f"| wall time (s) | {summary['seconds']} |",
            "",
        ]
        (out_dir / "report.md").write_text("\n".join(lines))
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        print("\n".join(lines))
    return report
