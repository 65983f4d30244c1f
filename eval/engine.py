"""Scoring engine: log-likelihoods of continuations, rolling windows, greedy generation.

Every request becomes positions in a *row*, the unit the model runs on:
- a multiple-choice group (one context, several continuations) is one row: the context once,
  then each continuation's tokens (all but its last), each attending to the context and to its
  own earlier tokens only (a block mask), with positions restarting at len(context). The
  context is computed once for all choices, and a one-token continuation costs nothing beyond
  the context: its log-probability is read at the context's last position. Not for a model
  whose attention depends on where a token sits in the row (a sliding window, Mistral's or
  Gemma's local layers; ALiBi): a continuation's tokens sit further along the row than their
  positions, so there each continuation gets a row of its own (context + continuation).
- a rolling-perplexity window is a plain causal row whose last `n` positions are scored.

Batch-size invariance is by construction, not by luck: a row's values never depend on the other
rows of its batch. Rows are padded to their own length rounded up to a multiple of 16 (never to
the batch's longest row), only rows of equal padded length share a batch, and the LM head runs
on the scored positions padded to a multiple of 16 rows. Every matmul then has the same inner
shape whatever the batch size, and rows of a multiple-of-16 GEMM are computed independently of
their neighbours (CPU BLAS takes other code paths for a handful of rows, which round
differently). Results are identical at any batch size and on any number of ranks (each rank
takes a slice of the rows; results are gathered by request id).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch

from llmstack.distributed import env
from llmstack.errors import UsageError

BUCKET = 16  # row lengths and LM-head rows are padded to multiples of this (see the module docstring)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class Row:
    """One model input: ids, positions, segment ids (0 = shared prefix, k > 0 = k-th branch),
    and the scored targets as (position in the row, target id, key of the result)."""

    ids: list[int]
    pos: list[int]
    seg: list[int]
    targets: list[tuple[int, int, tuple]] = field(default_factory=list)


def mc_rows(requests: list[tuple[list[int], list[int]]], max_len: int, share: bool = True) -> list[Row]:
    """Rows for (context, continuation) token requests; result keys are (request index, token j).

    Requests with the same context share a row (as many continuations as fit in max_len); with
    share=False each request has a row of its own.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx) if share else (i, tuple(ctx)), []).append(i)
    rows = []
    for members in groups.values():
        ctx, row = requests[members[0]][0], None
        for i in members:
            cont = requests[i][1]
            extra = len(cont) - 1  # tokens this continuation adds to the row
            if row is None or len(row.ids) + extra > max_len:
                row = Row(list(ctx), list(range(len(ctx))), [0] * len(ctx))
                rows.append(row)
            seg = len(set(row.seg))  # the next branch id
            prev = len(ctx) - 1  # the position whose logits predict the next token
            for j, tok in enumerate(cont):
                row.targets.append((prev, tok, (i, j)))
                if j < len(cont) - 1:
                    row.ids.append(tok)
                    row.pos.append(len(ctx) + j)
                    row.seg.append(seg)
                    prev = len(row.ids) - 1
    return rows


def rolling_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, n_scored) over a token stream of n_tokens: the window's inputs are
    tokens[start:end], it predicts tokens[start+1:end+1] and scores the last n_scored of them.

    Every token after the first is scored exactly once; each window after the first has at
    least context - stride tokens of context, the last one a full window where possible.
    """
    if not 1 <= stride <= context:
        raise UsageError(f"stride must be between 1 and the context ({context}), got {stride}")
    if n_tokens < 2:
        return []
    end = min(context, n_tokens - 1)
    out = [(0, end, end)]
    while end < n_tokens - 1:
        new_end = min(end + stride, n_tokens - 1)
        out.append((max(0, new_end - context), new_end, new_end - end))
        end = new_end
    return out


def rolling_rows(tokens: list[int], context: int, stride: int, key) -> list[Row]:
    """Rows scoring every token of `tokens` after the first; result keys are (key, token index)."""
    rows = []
    for start, end, n in rolling_windows(len(tokens), context, stride):
        ids = tokens[start:end]
        L = len(ids)
        targets = [(p, tokens[start + p + 1], (key, start + p + 1)) for p in range(L - n, L)]
        rows.append(Row(ids, list(range(L)), [0] * L, targets))
    return rows


class Scorer:
    """A decoder-only model and its tokenizer, scoring rows in batches (see the module docstring)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, device=None, progress: bool = True,
                 distributed: bool = True):
        self.model, self.tokenizer = model, tokenizer
        # data-parallel over the launcher's ranks, or this process alone (e.g. inside the harness)
        self.rank, self.world = (env.rank(), env.world_size()) if distributed else (0, 1)
        self.batch_size = batch_size
        self.device = device or next(model.parameters()).device  # inputs go where the model is
        self.max_len = model.config.max_seq_len
        # continuations may share their context's row only where attention is the same at any
        # row index (see the module docstring): not with a sliding window or ALiBi
        c = model.config
        self.share_context = getattr(c, "attn_pattern", "full") == "full" and getattr(c, "pos", None) != "alibi"
        self.progress = progress
        self.tokens_scored = 0  # positions run through the model (padding excluded), for throughput
        self.seconds = 0.0

    # -- tokenization ---------------------------------------------------------------------
    def encode_pairs(self, pairs: list[tuple[str, str]], bos: bool) -> list[tuple[list[int], list[int]]]:
        """(context ids, continuation ids) per (context, continuation) text pair.

        The harness's rule, so token boundaries match it: trailing spaces of the context move to
        the continuation; the continuation's ids are those of context+continuation after the
        context's own ids. An empty context is BOS (EOS if the tokenizer has no BOS).
        """
        tok = self.tokenizer
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        fixed = []
        for ctx, cont in pairs:
            n = len(ctx) - len(ctx.rstrip())
            fixed.append((ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont))
        ctx_ids = tok.encode_batch([c for c, _ in fixed])
        whole = tok.encode_batch([c + k for c, k in fixed])
        out = []
        for (ctx, cont), c_ids, w_ids in zip(fixed, ctx_ids, whole):
            if ctx == "":
                c_ids, k_ids = [prefix], tok.encode(cont)
            else:
                k_ids = w_ids[len(c_ids):]
                if bos:
                    c_ids = [tok.bos_id, *c_ids]
            out.append((c_ids, k_ids))
        return out

    def fit(self, requests, where: list[str], truncate: str) -> tuple[list, int]:
        """Requests that fit the context window; too long ones are an error naming the sample,
        or, with truncate="left", lose context tokens from the left (counted, returned)."""
        out, truncated = [], 0
        for (ctx, cont), w in zip(requests, where):
            if not cont:
                raise UsageError(f"{w}: the continuation is empty (nothing to score)")
            over = len(ctx) + len(cont) - 1 - self.max_len
            if over > 0:
                if truncate != "left" or len(cont) > self.max_len:
                    raise UsageError(f"{w}: context + continuation is {len(ctx) + len(cont)} tokens, more than the "
                                     f"model's context of {self.max_len} + 1 (use --truncate left to drop "
                                     f"context tokens from the left)")
                ctx, truncated = ctx[over:], truncated + 1
            out.append((ctx, cont))
        return out, truncated

    # -- scoring --------------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether greedy decoding produces it) per request."""
        per_token = self.score_rows(mc_rows(requests, self.max_len, self.share_context), desc)
        out = []
        for i, (_, cont) in enumerate(requests):
            lps = [per_token[(i, j)] for j in range(len(cont))]
            out.append((math.fsum(lp for lp, _ in lps), all(g for _, g in lps)))
        return out

    @torch.inference_mode()
    def score_rows(self, rows: list[Row], desc: str = "") -> dict:
        """{result key: (log-prob, is argmax)} for every target of every row, over all ranks."""
        # longest first (memory errors show at once), then by content: the order, the batches and
        # each rank's slice depend only on the rows themselves
        order = sorted(range(len(rows)), key=lambda i: (-self._bucket(len(rows[i].ids)), rows[i].ids))
        mine = order[self.rank::self.world]
        batches, cur = [], []
        for i in mine:
            L = self._bucket(len(rows[i].ids))
            if cur and (len(cur) == self.batch_size or self._bucket(len(rows[cur[0]].ids)) != L):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        results: dict = {}
        bar = self._bar(sum(len(rows[i].ids) for i in mine), desc)
        t0 = time.perf_counter()
        for b in batches:
            results.update(self._run_batch([rows[i] for i in b]))
            n = sum(len(rows[i].ids) for i in b)
            self.tokens_scored += n
            if bar is not None:
                bar.update(n)
        self.seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        results = self._merge_ranks(results)
        return results

    def _merge_ranks(self, results: dict) -> dict:
        """Every rank's share of {index: result}, merged (each rank scored different indices)."""
        if self.world == 1:
            return results
        merged = {}
        for part in env.all_gather_object(results):
            merged.update(part)
        return merged

    def _bucket(self, n: int) -> int:
        """The padded length of a row of n tokens (a multiple of BUCKET, within the context)."""
        return min(_round_up(n, BUCKET), max(self.max_len, n))

    def _run_batch(self, rows: list[Row]) -> dict:
        B, T = len(rows), self._bucket(max(len(r.ids) for r in rows))  # the same for every row of the batch
        pad = self.tokenizer.pad_id or 0
        ids = torch.full((B, T), pad, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
        for b, r in enumerate(rows):
            n = len(r.ids)
            ids[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(r.ids), torch.tensor(r.pos), torch.tensor(r.seg)
        # query q may attend key k: k <= q, k real, and k in the shared prefix or in q's own branch
        sk, sq = seg[:, None, :], seg[:, :, None]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = causal & (sk >= 0) & ((sk == 0) | (sk == sq))
        mask |= torch.eye(T, dtype=torch.bool)  # padding queries see themselves (no empty softmax row)
        dev = self.device
        h = self.model.hidden_states(ids.to(dev), pos.to(dev), mask[:, None].to(dev))  # (B, T, C)
        where = [(b, p) for b, r in enumerate(rows) for p, _, _ in r.targets]
        n = len(where)
        sel = torch.zeros(_round_up(n, BUCKET), h.shape[-1], dtype=h.dtype, device=dev)  # (N', C), see docstring
        idx_b = torch.tensor([b for b, _ in where], device=dev)
        idx_p = torch.tensor([p for _, p in where], device=dev)
        sel[:n] = h[idx_b, idx_p]
        logits = self.model.lm_head(sel)[:n].float()  # (N, V)
        logp = logits.log_softmax(-1)
        tgt = torch.tensor([t for r in rows for _, t, _ in r.targets], device=dev)
        lp = logp.gather(1, tgt[:, None])[:, 0].double().cpu().tolist()
        greedy = (logits.argmax(-1) == tgt).cpu().tolist()
        keys = [k for r in rows for _, _, k in r.targets]
        return {k: (a, g) for k, a, g in zip(keys, lp, greedy)}

    def _bar(self, total: int, desc: str):
        if not self.progress or self.rank != 0 or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc or "scoring", unit="tok", unit_scale=True, file=sys.stderr,
                    dynamic_ncols=True, leave=False)

    # -- generation -----------------------------------------------------------------------
    def stop_ids(self, until: list[str]) -> list[int]:
        """Token ids whose text contains a stop string: decoding can stop at them (the text is cut
        at the stop string anyway, so stopping there changes nothing)."""
        cache = self.__dict__.setdefault("_token_texts", None)
        if cache is None:
            V = self.tokenizer.vocab_size
            cache = self._token_texts = [self.tokenizer.decode([i]) for i in range(V)]
        ids = {i for i, t in enumerate(cache) if any(s and s in t for s in until)}
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return sorted(ids)

    def generate_until(self, prompts: list[list[int]], until: list[list[str]], max_new: list[int],
                       where: list[str], desc: str = "", with_limit: bool = False):
        """Greedy continuation text of each prompt, up to EOS, decoded without special tokens and cut
        at its first stop string, as the harness's HF backend (a chat model's end-of-turn token ends
        no answer text).

        A prompt gets at most min(max_new, context - its length) new tokens whatever batch it is
        in: rows share a batch only with rows of the same stop strings and when the batch's longest
        prompt leaves room for every row's tokens. with_limit: returns (texts, hit), hit[i] true
        when prompt i used all its tokens without reaching EOS or a stop string (the answer may be
        cut short)."""
        from llmstack.generate import generate

        for p, w in zip(prompts, where):
            if len(p) >= self.max_len:
                raise UsageError(f"{w}: the prompt is {len(p)} tokens, the model's context is {self.max_len}")
        budget = [min(n, self.max_len - len(p)) for n, p in zip(max_new, prompts)]
        order = sorted(range(len(prompts)), key=lambda i: (until[i], -len(prompts[i]), prompts[i]))
        mine = order[self.rank::self.world]
        batches, cur = [], []
        for i in mine:
            grown = cur + [i]
            if cur and (len(cur) == self.batch_size or until[i] != until[cur[0]] or
                        max(len(prompts[j]) for j in grown) + max(budget[j] for j in grown) > self.max_len):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        results = {}
        stop_sets = {}
        bar = self._bar(len(mine), desc)
        t0 = time.perf_counter()
        for b in batches:
            key = tuple(until[b[0]])
            if key not in stop_sets:
                stop_sets[key] = set(self.stop_ids(until[b[0]]))
            outs = generate(self.model, [prompts[i] for i in b], max_new_tokens=max(budget[i] for i in b),
                            temperature=0.0, stop_ids=stop_sets[key], pad_id=self.tokenizer.pad_id or 0)
            for i, o in zip(b, outs):
                self.tokens_scored += len(o)
                results[i] = answer_text(self.tokenizer, o, budget[i], stop_sets[key], until[i])
            if bar is not None:
                bar.update(len(b))
        self.seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        results = self._merge_ranks(results)
        texts = [results[i][0] for i in range(len(prompts))]
        return (texts, [results[i][1] for i in range(len(prompts))]) if with_limit else texts


def answer_text(tokenizer, out: list[int], budget: int, stop_ids: set[int], until: list[str]) -> tuple[str, bool]:
    """(answer text, hit the limit) of a greedy continuation `out` of at most `budget` tokens:
    up to EOS, decoded without special tokens, cut at the first stop string; hit the limit when
    all `budget` tokens were used without reaching EOS or a stop string."""
    out = out[:budget]
    ended = bool(out) and out[-1] in stop_ids  # decoding stopped at EOS or a token holding a stop string
    eos = tokenizer.eos_id
    if eos is not None and eos in out:  # the end of the text ends the answer
        out = out[:out.index(eos)]
    text = tokenizer.backend.decode(out, skip_special_tokens=True)
    for stop in until:
        if stop and stop in text:
            text, ended = text.split(stop)[0], True
    return text, not ended and len(out) == budget
