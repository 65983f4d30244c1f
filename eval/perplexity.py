"""`ppl:SOURCE`: perplexity of a text source, each document scored on its own (default) or as one stream.

The documents of SOURCE (`builtin:validation`, .txt / .jsonl(.gz/.zst) / parquet files or globs,
`hf:NAME[:CONFIG]:SPLIT`) are tokenized as in training. Two modes (`--ppl-mode`):

- document (default), lm-evaluation-harness's `loglikelihood_rolling` (its `wikitext` task):
  every document alone, after one prefix token, BOS, or EOS when the tokenizer has no BOS
  (whatever `--bos` says: the harness's rule, so the numbers of an exported model equal the
  harness's own; the results name the prefix). No token of another document is ever context.
  Scored in windows of `context` tokens advancing by `stride` (engine.rolling_windows); with
  stride = context (the default) these are the harness's disjoint windows, the last one with
  full context, and with context = the model's (the default for a Hugging Face directory) the
  harness's numbers exactly. Every token of every document is scored once; no EOS is appended.
- stream: the documents, each followed by EOS (and preceded by BOS when `--bos`, default as the
  model was trained, `data.bos`), concatenated into one stream and scored in the same windows:
  a document's first tokens have the previous documents as context, as in packed training.

In both modes a smaller stride gives each token at least context - stride tokens of context
(except at the start of a document / the stream); stride = context is the fastest.

Reported: tokens scored, mean negative log-likelihood per token (nats) and per-token
perplexity, and, so models with different tokenizers can be compared, bits per byte and byte
perplexity (total NLL over the UTF-8 bytes of the documents' text) and word perplexity (exp of
total NLL over whitespace-separated words), the harness's `bits_per_byte`, `byte_perplexity`
and `word_perplexity`.
"""

from __future__ import annotations

import math

from eval.engine import Scorer, rolling_rows
from eval.metrics import count_words
from llmstack.errors import UsageError

MODES = ("document", "stream")


def load_texts(source: str) -> list[str]:
    from data_pipeline.sources import iter_texts

    try:
        return list(iter_texts(source))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"task ppl:{source}: {e}") from None


def prefix_token(tok, what: str) -> int:
    """The token before every document: BOS, else EOS (lm-evaluation-harness's HFLM
    `prefix_token_id`); a UsageError when the tokenizer has neither."""
    if tok.bos_id is not None:
        return tok.bos_id
    if tok.eos_id is not None:
        return tok.eos_id
    raise UsageError(f"task {what}: the tokenizer at {tok.path} has neither a BOS nor an EOS token, so no "
                     "document can be scored from its first token (give one with --tokenizer)")


def rolling_loglikelihoods(scorer: Scorer, texts: list[str], context: int | None = None, stride: int | None = None,
                           desc: str = "") -> tuple[list[float], list[int]]:
    """(log-likelihood, tokens scored) of each text scored alone: after one prefix token (BOS, or
    EOS when the tokenizer has none), in windows of `context` tokens (default the model's)
    advancing by `stride` (default `context`: disjoint windows, the last with full context).
    With the defaults, lm-evaluation-harness's `loglikelihood_rolling`."""
    tok = scorer.tokenizer
    context = context or scorer.max_len
    prefix = prefix_token(tok, desc or "ppl")
    docs = tok.encode_batch(texts)
    rows = []
    for i, ids in enumerate(docs):
        rows += rolling_rows([prefix, *ids], context, stride or context, i)
    res = scorer.score_rows(rows, desc=desc)
    per_doc: list[list[float]] = [[] for _ in docs]
    for (i, _), (lp, _) in sorted(res.items()):
        per_doc[i].append(lp)
    return [math.fsum(v) for v in per_doc], [len(v) for v in per_doc]


def text_metrics(loglikelihood: float, texts: list[str]) -> dict:
    """The harness's tokenizer-independent metrics of a total log-likelihood over texts: word
    perplexity, byte perplexity and bits per byte (weighted by words / bytes over all texts)."""
    words = sum(count_words(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nll = -loglikelihood
    return {"word_perplexity": math.exp(nll / max(words, 1)), "byte_perplexity": math.exp(nll / max(n_bytes, 1)),
            "bits_per_byte": nll / max(n_bytes, 1) / math.log(2)}


def _stream_nll(scorer: Scorer, texts: list[str], context: int, stride: int, bos: bool, desc: str) -> tuple[float, int]:
    tok = scorer.tokenizer
    if tok.eos_id is None:
        raise UsageError(f"task {desc}: --ppl-mode stream ends every document with EOS, and the tokenizer at "
                         f"{tok.path} has none; use --ppl-mode document")
    stream: list[int] = []
    for ids in tok.encode_batch(texts):
        stream += ([tok.bos_id] if bos else []) + ids + [tok.eos_id]
    res = scorer.score_rows(rolling_rows(stream, context, stride, 0), desc=desc)
    return -math.fsum(lp for lp, _ in res.values()), len(res)


def perplexity(scorer: Scorer, source: str, context: int, stride: int, bos: bool, mode: str = "document") -> dict:
    """Metrics of the whole source (see the module docstring); `bos` applies in stream mode only."""
    if mode not in MODES:
        raise UsageError(f"--ppl-mode must be one of {', '.join(MODES)}, got {mode!r}")
    if context > scorer.max_len:
        raise UsageError(f"task ppl:{source}: --context {context} exceeds the model's context of {scorer.max_len}")
    texts = load_texts(source)
    desc = f"ppl:{source}"
    if mode == "document":
        tok = scorer.tokenizer
        lls, counts = rolling_loglikelihoods(scorer, texts, context, stride, desc)
        nll, n = -math.fsum(lls), sum(counts)
        how = {"prefix": "bos" if tok.bos_id is not None else "eos"}  # before every document, whatever --bos
    else:
        nll, n = _stream_nll(scorer, texts, context, stride, bos, desc)
        how = {"bos": bos}
    if n == 0:
        raise UsageError(f"task ppl:{source}: no text to score")
    return {"mode": mode, **how, "tokens_scored": n, "documents": len(texts),
            "bytes": sum(len(t.encode("utf-8")) for t in texts), "words": sum(count_words(t) for t in texts),
            "context": context, "stride": stride, "nll_per_token": nll / n, "perplexity": math.exp(nll / n),
            **text_metrics(-nll, texts)}
