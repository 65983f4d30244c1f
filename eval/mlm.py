"""Masked-LM (BERT) scoring: pseudo-log-likelihood and pseudo-perplexity of `ppl:SOURCE`.

Salazar et al. 2020, "Masked Language Model Scoring": each token of a text is replaced in turn by
the mask token and scored by the MLM head, log P(token | every other token); the
pseudo-log-likelihood (PLL) is the sum over tokens, the pseudo-perplexity exp(-PLL / tokens).
It is not a perplexity in the causal sense (the scores of a text's tokens are not a chain-rule
factorisation), so it compares masked-LM checkpoints with each other, not with GPT numbers.

How a source is scored:
- each document alone (not concatenated): its tokens as the tokenizer encodes them, no BOS/EOS.
- every window is wrapped as [CLS] tokens [SEP]: the tokenizer's cls and sep tokens when its
  Hugging Face files declare them (a BERT tokenizer's [CLS]/[SEP]), else llmstack's BOS and EOS.
  The two wrapping tokens are never masked or scored; the mask token is the tokenizer's (an
  llmstack tokenizer's <|mask|>, a BERT tokenizer's [MASK]).
- a document longer than a window (`context` tokens with the two wrappers, default the model's
  context, capped by the training sequence length) is split into windows of context - 2 tokens
  that advance by `stride` tokens (default: context - 2, disjoint windows; the last window ends at
  the document's end and is full where the document is long enough). Every token is scored
  exactly once, in the window where it is farthest from a window edge that cuts the document
  (the earlier window on ties), so a smaller stride gives tokens more context on both sides at
  the same cost: one forward pass of a window per token, whatever the stride.

Reported: tokens_scored, documents, windows, pll_per_token (mean log-probability, nats),
pseudo_perplexity, pseudo_bits_per_byte (-PLL in bits over the UTF-8 bytes of the documents) and
word_pseudo_perplexity (exp(-PLL / whitespace-separated words)).

Batching: one row per scored token (its window with that token masked), rows run through
engine.Scorer's batching, so results do not depend on the batch size or the number of ranks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from eval.engine import BUCKET, Row, Scorer, _round_up
from eval.metrics import count_words
from eval.perplexity import load_texts
from llmstack.errors import UsageError

METHOD = ("pseudo-log-likelihood (Salazar et al. 2020): each token masked in turn and scored by the MLM head; "
          "each document alone, in windows wrapped as [CLS] ... [SEP] (wrappers not scored); a token is scored "
          "in the window where it is farthest from a cut edge")


def _declared(tokenizer, name: str) -> str | None:
    """A special token string (`cls_token`, ...) declared by the tokenizer directory's Hugging Face files."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        f = Path(tokenizer.path) / file
        if not f.is_file():
            continue
        try:
            value = json.loads(f.read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def special_tokens(tokenizer, where) -> tuple[int, int, int]:
    """(mask, cls, sep) ids (module docstring); a UsageError naming what the tokenizer lacks."""

    def find(name: str, fallback: int | None) -> int | None:
        token = _declared(tokenizer, f"{name}_token")
        i = tokenizer.token_to_id(token) if token else None
        return i if i is not None else fallback

    mask = find("mask", tokenizer.mask_id)
    cls, sep = find("cls", tokenizer.bos_id), find("sep", tokenizer.eos_id)
    missing = [n for n, i in (("mask token", mask), ("[CLS] (or BOS) token", cls), ("[SEP] (or EOS) token", sep))
               if i is None]
    if missing:
        raise UsageError(f"{where}: pseudo-log-likelihood scoring masks each token in turn and wraps each window in "
                         f"[CLS] ... [SEP], and the tokenizer at {tokenizer.path} has no {' and no '.join(missing)}")
    return mask, cls, sep


def windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) windows of up to `size` tokens over n tokens, advancing by `stride`; the last
    one ends at n and is full where n allows."""
    if not 1 <= stride <= size:
        raise UsageError(f"--stride must be between 1 and the window's {size} tokens, got {stride}")
    out = []
    start = 0
    while start + size < n:
        out.append((start, start + size))
        start += stride
    out.append((max(0, n - size), n))
    return out


def assign(n: int, wins: list[tuple[int, int]]) -> list[int]:
    """The window each of n tokens is scored in: the one where it is farthest from an edge that
    cuts the document (the document's own start and end are not cuts), the earliest on ties."""
    best = [(-1, 0)] * n  # (margin, window)
    for w, (a, b) in enumerate(wins):
        for i in range(a, b):
            margin = min(i - a if a > 0 else n, b - 1 - i if b < n else n)
            if margin > best[i][0]:
                best[i] = (margin, w)
    return [w for _, w in best]


class MlmScorer(Scorer):
    """A BERT and its tokenizer, scoring masked rows (one row per scored token) in batches."""

    description = METHOD

    def __init__(self, model, tokenizer, **kw):
        super().__init__(model, tokenizer, **kw)
        self.mask_id, self.cls_id, self.sep_id = special_tokens(tokenizer, "masked-LM scoring")

    def doc_rows(self, tokens: list[int], size: int, stride: int, key) -> tuple[list[Row], int]:
        """(rows scoring every token of one document, number of windows); result keys (key, i)."""
        if not tokens:
            return [], 0
        wins = windows(len(tokens), size, stride)
        rows = []
        for i, w in enumerate(assign(len(tokens), wins)):
            a, b = wins[w]
            ids = [self.cls_id, *tokens[a:b], self.sep_id]
            p = i - a + 1
            ids[p] = self.mask_id
            rows.append(Row(ids, list(range(len(ids))), [0] * len(ids), [(p, tokens[i], (key, i))]))
        return rows, len(wins)

    def _run_batch(self, rows: list[Row]) -> dict:
        # outside inference mode: there layers.Linear takes a few-row path for small inputs, which
        # rounds differently from the path larger batches take (results would depend on the batch)
        with torch.inference_mode(False), torch.no_grad():
            return self._forward(rows)

    def _forward(self, rows: list[Row]) -> dict:
        B, T = len(rows), self._bucket(max(len(r.ids) for r in rows))  # the same for every row of the batch
        pad = self.tokenizer.pad_id or 0
        ids = torch.full((B, T), pad, dtype=torch.long)
        keep = torch.zeros((B, T), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r.ids)], keep[b, :len(r.ids)] = torch.tensor(r.ids), 1
        dev = self.device
        h = self.model.hidden_states(ids.to(dev), keep.to(dev))  # (B, T, C)
        where = [(b, p) for b, r in enumerate(rows) for p, _, _ in r.targets]
        n = len(where)
        sel = torch.zeros(_round_up(n, BUCKET), h.shape[-1], dtype=h.dtype, device=dev)  # (N', C), engine.py
        sel[:n] = h[torch.tensor([b for b, _ in where], device=dev), torch.tensor([p for _, p in where], device=dev)]
        logits = self.model.mlm_logits(sel)[:n].float()  # (N, V)
        tgt = torch.tensor([t for r in rows for _, t, _ in r.targets], device=dev)
        lp = logits.log_softmax(-1).gather(1, tgt[:, None])[:, 0].double().cpu().tolist()
        greedy = (logits.argmax(-1) == tgt).cpu().tolist()
        keys = [k for r in rows for _, _, k in r.targets]
        return {k: (a, g) for k, a, g in zip(keys, lp, greedy)}


def pseudo_perplexity(scorer: MlmScorer, source: str, context: int | None, stride: int | None,
                      trained_len: int | None = None) -> dict:
    """Pseudo-log-likelihood metrics of a text source (module docstring). context: window length
    with [CLS] and [SEP] (default the model's context, capped by trained_len); stride: window
    advance in tokens (default context - 2)."""
    size = context or min(trained_len or scorer.max_len, scorer.max_len)
    if size > scorer.max_len:
        raise UsageError(f"task ppl:{source}: --context {size} exceeds the model's context of {scorer.max_len}")
    if size < 3:
        raise UsageError(f"task ppl:{source}: --context {size} leaves no token between [CLS] and [SEP]")
    step = stride or size - 2
    texts = load_texts(source)
    rows, n_windows = [], 0
    for d, ids in enumerate(scorer.tokenizer.encode_batch(texts)):
        r, w = scorer.doc_rows(ids, size - 2, step, d)
        rows += r
        n_windows += w
    if not rows:
        raise UsageError(f"task ppl:{source}: no text to score")
    res = scorer.score_rows(rows, desc=f"ppl:{source}")
    pll = math.fsum(lp for lp, _ in res.values())
    n = len(res)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(count_words(t) for t in texts)
    tok = scorer.tokenizer
    return {"tokens_scored": n, "documents": len(texts), "bytes": n_bytes, "words": words,
            "context": size, "stride": step, "pll_per_token": pll / n, "pseudo_perplexity": math.exp(-pll / n),
            "pseudo_bits_per_byte": -pll / math.log(2) / max(n_bytes, 1),
            "word_pseudo_perplexity": math.exp(-pll / max(words, 1)),
            "method": {"scoring": METHOD, "windows": n_windows, "pll": pll,
                       "wrap": [tok.id_to_token(scorer.cls_id), tok.id_to_token(scorer.sep_id)],
                       "mask": tok.id_to_token(scorer.mask_id)}}


def check_task(task: str, kind: str) -> None:
    """A UsageError for every kind of task but ppl: (kind: a task's output_type, or "ppl")."""
    if kind != "ppl":
        raise UsageError(f"task {task}: {kind} needs a decoder-only or encoder-decoder model; a BERT (masked LM) "
                         f"is scored by pseudo-log-likelihood with ppl:SOURCE only (multiple-choice scoring by "
                         f"pseudo-log-likelihood is not supported)")
