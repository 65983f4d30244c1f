"""`ppl:SOURCE`: rolling-window perplexity of a text source.

The documents of SOURCE (`builtin:validation`, .txt / .jsonl(.gz/.zst) / parquet files or globs,
`hf:NAME[:CONFIG]:SPLIT`) are tokenized as in training, each followed by EOS (and preceded by
BOS when the model was trained so), and concatenated into one stream. The stream is scored in
windows of `context` tokens that advance by `stride` tokens (engine.rolling_windows): every
token after the first is scored exactly once, with at least context - stride tokens of context
(except in the first window). stride = context gives disjoint windows, the fastest; a smaller
stride gives each token more context.

Reported: tokens scored, mean negative log-likelihood per token (nats), per-token perplexity,
bits per byte (total NLL in bits over the UTF-8 bytes of the documents' text) and word
perplexity (exp of total NLL over whitespace-separated words), so models with different
tokenizers can be compared on the last two.
"""

from __future__ import annotations

import math

from eval.engine import Scorer, rolling_rows
from eval.metrics import count_words
from llmstack.errors import UsageError


def load_texts(source: str) -> list[str]:
    from data_pipeline.sources import iter_texts

    try:
        return list(iter_texts(source))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"task ppl:{source}: {e}") from None


def perplexity(scorer: Scorer, source: str, context: int, stride: int, bos: bool) -> dict:
    """Metrics of the whole source (see the module docstring)."""
    if context > scorer.max_len:
        raise UsageError(f"task ppl:{source}: --context {context} exceeds the model's context of {scorer.max_len}")
    texts = load_texts(source)
    tok = scorer.tokenizer
    stream: list[int] = []
    for ids in tok.encode_batch(texts):
        stream += ([tok.bos_id] if bos else []) + ids + [tok.eos_id]
    if len(stream) < 2:
        raise UsageError(f"task ppl:{source}: no text to score")
    res = scorer.score_rows(rolling_rows(stream, context, stride, 0), desc=f"ppl:{source}")
    nll = -math.fsum(lp for lp, _ in res.values())
    n = len(res)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(count_words(t) for t in texts)
    return {"tokens_scored": n, "documents": len(texts), "bytes": n_bytes, "words": words,
            "context": context, "stride": stride, "nll_per_token": nll / n, "perplexity": math.exp(nll / n),
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "word_perplexity": math.exp(nll / max(words, 1))}
