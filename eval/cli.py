"""`llmstack-eval`: evaluate a checkpoint.

Task available now: `ppl:SOURCE`, token-level perplexity of the model on a text source
(`builtin:validation`, a .txt / .jsonl file or a glob), documents joined with EOS and scored in
consecutive windows of the model's context, so every token after the first is scored exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from llmstack.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmstack-eval", description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="checkpoint (step_N, checkpoints/latest, run dir) or consolidated dir")
    p.add_argument("--tasks", required=True, help="comma-separated: ppl:SOURCE")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded with the checkpoint)")
    p.add_argument("--seq-len", type=int, help="window length (default: the training sequence length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", help="write results JSON here")
    return p


@torch.no_grad()
def perplexity(model, tokenizer, source: str, seq_len: int, batch_size: int) -> dict:
    from data_pipeline.sources import iter_texts
    from data_pipeline.stream import PackedSequences, tokenize_documents

    try:
        tokens = tokenize_documents(iter_texts(source), tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"task ppl:{source}: {e}") from None
    seqs = PackedSequences(tokens, seq_len)
    if len(seqs) == 0 and len(tokens) < 2:
        raise UsageError(f"task ppl:{source}: no text to score")
    nll, count = 0.0, 0
    rows = [seqs[i] for i in range(len(seqs))]
    tail = tokens[len(seqs) * seq_len :] if len(seqs) else tokens
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(np.stack(rows[start : start + batch_size]))
        logits = model(batch[:, :-1])
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    if len(tail) >= 2:  # the remainder is scored too: no token skipped
        t = torch.as_tensor(tail.astype("int64"))[None]
        nll += torch.nn.functional.cross_entropy(model(t[:, :-1])[0].float(), t[0, 1:], reduction="sum").item()
        count += len(tail) - 1
    return {"tokens_scored": count, "nll_per_token": nll / count, "perplexity": math.exp(nll / count)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from llmstack.train.checkpoint import load_for_inference

        model, tokenizer, info = load_for_inference(args.model, args.tokenizer)
        trained_len = (info.get("config") or {}).get("data", {}).get("seq_len")
        seq_len = args.seq_len or trained_len or model.config.max_seq_len
        results = {"model": str(args.model), "tokenizer_hash": tokenizer.hash, "step": info.get("step"), "tasks": {}}
        for task in filter(None, args.tasks.split(",")):
            kind, _, source = task.partition(":")
            if kind != "ppl" or not source:
                raise UsageError(f"unknown task {task!r} (available: ppl:SOURCE)")
            results["tasks"][task] = perplexity(model, tokenizer, source, seq_len, args.batch_size)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
