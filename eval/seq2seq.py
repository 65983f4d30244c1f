"""Encoder-decoder (T5) scoring, as lm-evaluation-harness's HFLM "seq2seq" backend scores.

- log-likelihood of (context, continuation): the context is the encoder input; the continuation
  is the decoder's labels, teacher-forced: the decoder reads the start token (the model's pad id,
  T5's decoder start) and then the continuation's tokens but the last. Tokens as the harness's
  seq2seq path: trailing spaces of the context move to the continuation, then the two texts are
  encoded separately (no merge rule as for causal models): the context with the tokenizer's own
  special tokens (its post-processor: a Hugging Face T5 tokenizer appends </s>, an llmstack
  tokenizer adds nothing), the continuation without any. A context that already starts with the
  prefix token's text gets no special tokens. An empty context is the prefix token alone: BOS,
  else EOS (when the continuation starts with that token, its first token becomes the context).
- generate_until: greedy from the start token, at most max_gen_toks new tokens, stopping at EOS;
  the prompt gets the tokenizer's special tokens (as the harness encodes it), the text is decoded
  without special tokens (as the harness decodes it) and cut at the first stop string. (The
  harness asks transformers for max_length = padded prompt length + max_gen_toks decoder tokens,
  more than max_gen_toks new tokens for an encoder-decoder; here max_gen_toks is the limit.)
- no rolling log-likelihood (`loglikelihood_rolling`, `ppl:`): the harness's seq2seq rolling
  feeds the encoder a single token and scores each window with the decoder alone, a stopgap
  (marked TODO there) that measures neither T5 objective. A loglikelihood task (context ->
  target, metric perplexity) scores text under T5 instead.

Too long inputs: a context beyond the model's context (max_seq_len) is an error naming the
sample, or with --truncate left loses tokens from the left (the harness truncates silently);
a continuation beyond it is an error.

Batching (see engine.py's module docstring for why this makes results independent of batch
size and rank count): requests with the same context tokens form a group; the encoder runs once
per group, the decoder once per continuation against its group's encoder output. A group's
encoder input is padded to a multiple of 16, its decoder inputs to the multiple of 16 above its
longest continuation, only groups of equal padded lengths share a batch, and the LM head runs on
the scored positions padded to a multiple of 16 rows (outside inference mode, where
layers.Linear's few-row path would round differently for small batches). Generation batches
prompts with the same stop strings, left-padded (llmstack.generate): with another batch size a
near-tie can decode differently.
"""

from __future__ import annotations

import math
import time

import torch

from eval.engine import BUCKET, Scorer, _round_up, answer_text
from llmstack.errors import UsageError


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) that the tokenizer's post-processor puts around a text's tokens
    (Hugging Face `add_special_tokens=True`): ([], [eos]) for a T5 tokenizer, ([], []) for llmstack's."""
    backend = tokenizer.backend
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


class Seq2SeqScorer(Scorer):
    """A T5 and its tokenizer: log-likelihoods and greedy generations (module docstring).

    The same interface as engine.Scorer (encode_pairs, fit, loglikelihood, generate_until), so the
    evaluator's task functions run on either."""

    description = ("encoder-decoder, as lm-evaluation-harness's seq2seq backend: context -> encoder input "
                   "(with the tokenizer's special tokens), continuation -> decoder labels after the decoder "
                   "start token")

    def __init__(self, model, tokenizer, **kw):
        super().__init__(model, tokenizer, **kw)
        self.start_id = model.config.pad_id
        self.wrap = special_wrap(tokenizer)
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    # -- tokenization ---------------------------------------------------------------------
    def _context_ids(self, texts: list[str]) -> list[list[int]]:
        """Encoder ids of non-empty contexts: with the tokenizer's special tokens, unless the text
        already starts with the prefix token (the harness's tok_encode)."""
        backend = self.tokenizer.backend
        prefix_text = self.tokenizer.decode([self.prefix_id]) if self.prefix_id is not None else None
        plain = [bool(prefix_text) and t.startswith(prefix_text) for t in texts]
        out: list[list[int] | None] = [None] * len(texts)
        for flag in (False, True):
            idx = [i for i, p in enumerate(plain) if p == flag]
            if idx:
                encs = backend.encode_batch([texts[i] for i in idx], add_special_tokens=not flag)
                for i, e in zip(idx, encs):
                    out[i] = e.ids
        return out

    def encode_pairs(self, pairs: list[tuple[str, str]], bos: bool = False) -> list[tuple[list[int], list[int]]]:
        """(encoder ids, continuation ids) per (context, continuation) text pair (module docstring)."""
        if bos:
            raise UsageError("--bos applies to decoder-only models; a T5 encoder input gets the tokenizer's "
                             "special tokens")
        out: list = [None] * len(pairs)
        empty = [i for i, (ctx, _) in enumerate(pairs) if ctx == ""]
        if empty:
            if self.prefix_id is None:
                raise UsageError(f"an empty context is scored after BOS or EOS, and the tokenizer at "
                                 f"{self.tokenizer.path} has neither")
            for i, k in zip(empty, self.tokenizer.encode_batch([pairs[i][1] for i in empty])):
                out[i] = ([self.prefix_id], k) if k[:1] != [self.prefix_id] else (k[:1], k[1:])
        rest = [i for i, (ctx, _) in enumerate(pairs) if ctx != ""]
        fixed = []
        for i in rest:
            ctx, cont = pairs[i]
            n = len(ctx) - len(ctx.rstrip())
            fixed.append((ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont))
        ctx_ids = self._context_ids([c for c, _ in fixed])
        for i, c_ids, k_ids in zip(rest, ctx_ids, self.tokenizer.encode_batch([k for _, k in fixed])):
            out[i] = (c_ids, k_ids)
        return out

    def fit(self, requests, where: list[str], truncate: str) -> tuple[list, int]:
        """Requests that fit: a context beyond the model's context is an error naming the sample,
        or with truncate="left" loses tokens from the left (counted, returned)."""
        out, truncated = [], 0
        for (ctx, cont), w in zip(requests, where):
            if not cont:
                raise UsageError(f"{w}: the continuation is empty (nothing to score)")
            if not ctx:
                raise UsageError(f"{w}: the context is empty after tokenization (nothing for the encoder)")
            if len(cont) > self.max_len:
                raise UsageError(f"{w}: the continuation is {len(cont)} tokens, more than the model's context of "
                                 f"{self.max_len}")
            if len(ctx) > self.max_len:
                if truncate != "left":
                    raise UsageError(f"{w}: the context is {len(ctx)} tokens, more than the model's context of "
                                     f"{self.max_len} (use --truncate left to drop context tokens from the left)")
                ctx, truncated = ctx[-self.max_len:], truncated + 1
            out.append((ctx, cont))
        return out, truncated

    # -- scoring --------------------------------------------------------------------------
    def _lengths(self, ctx, conts) -> tuple[int, int]:
        return self._bucket(len(ctx)), self._bucket(max(len(k) for k in conts))

    @torch.no_grad()  # not inference mode (module docstring)
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether greedy decoding produces it) per request."""
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        units = [(list(ctx), members) for ctx, members in groups.items()]
        shape = [self._lengths(ctx, [requests[i][1] for i in m]) for ctx, m in units]
        # longest first, then by content: batches and each rank's share depend on the requests only
        order = sorted(range(len(units)), key=lambda u: (-shape[u][0], -shape[u][1], units[u][0],
                                                         [requests[i][1] for i in units[u][1]]))
        mine = order[self.rank::self.world]
        batches, cur = [], []
        for u in mine:
            if cur and (len(cur) == self.batch_size or shape[cur[0]] != shape[u]):
                batches.append(cur)
                cur = []
            cur.append(u)
        if cur:
            batches.append(cur)
        results: dict = {}
        bar = self._bar(sum(len(units[u][1]) for u in mine), desc)
        t0 = time.perf_counter()
        for b in batches:
            results.update(self._run_groups([units[u] for u in b], requests, *shape[b[0]]))
            if bar is not None:
                bar.update(sum(len(units[u][1]) for u in b))
        self.seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        results = self._merge_ranks(results)
        return [results[i] for i in range(len(requests))]

    def _run_groups(self, units, requests, S: int, T: int) -> dict:
        """{request index: (log-likelihood, greedy)} for the groups of one batch (S, T: padded
        encoder and decoder lengths)."""
        m, dev = self.model, self.device
        pad = self.tokenizer.pad_id or 0
        G = len(units)
        enc = torch.full((G, S), pad, dtype=torch.long)
        enc_mask = torch.zeros((G, S), dtype=torch.long)
        for g, (ctx, _) in enumerate(units):
            enc[g, :len(ctx)], enc_mask[g, :len(ctx)] = torch.tensor(ctx), 1
        enc, enc_mask = enc.to(dev), enc_mask.to(dev)
        memory = m.encode(enc, enc_mask)  # (G, S, C)
        rows = [(g, i) for g, (_, members) in enumerate(units) for i in members]
        dec = torch.full((len(rows), T), self.start_id, dtype=torch.long)  # [start] + cont[:-1], then padding
        for r, (_, i) in enumerate(rows):
            cont = requests[i][1]
            dec[r, 1:len(cont)] = torch.tensor(cont[:-1], dtype=torch.long)
        owner = torch.tensor([g for g, _ in rows], device=dev)
        # the decoder is causal: padding after a continuation changes none of its positions
        h = m.head_input(m.decode(dec.to(dev), memory[owner], enc_mask[owner]))  # (N, T, C)
        where = [(r, p) for r, (_, i) in enumerate(rows) for p in range(len(requests[i][1]))]
        n = len(where)
        sel = torch.zeros(_round_up(n, BUCKET), h.shape[-1], dtype=h.dtype, device=dev)  # (N', C)
        sel[:n] = h[torch.tensor([r for r, _ in where], device=dev), torch.tensor([p for _, p in where], device=dev)]
        logits = m.lm_head(sel)[:n].float()  # (n, V)
        tgt = torch.tensor([t for _, i in rows for t in requests[i][1]], device=dev)
        lp = logits.log_softmax(-1).gather(1, tgt[:, None])[:, 0].double().cpu().tolist()
        greedy = (logits.argmax(-1) == tgt).cpu().tolist()
        out, k = {}, 0
        for _, i in rows:
            L = len(requests[i][1])
            out[i] = (math.fsum(lp[k:k + L]), all(greedy[k:k + L]))
            k += L
        self.tokens_scored += sum(len(c) for c, _ in units) + sum(len(requests[i][1]) for _, i in rows)
        return out

    # -- generation -----------------------------------------------------------------------
    def _special_ids(self) -> set[int]:
        return {i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special}

    def stop_ids(self, until: list[str]) -> list[int]:
        """Token ids decoding may stop at: EOS, and the non-special tokens whose text contains a
        stop string (special tokens are dropped from the text, so they never end it)."""
        special = self._special_ids()
        ids = [i for i in super().stop_ids(until) if i not in special]
        if self.tokenizer.eos_id is not None:
            ids.append(self.tokenizer.eos_id)
        return sorted(set(ids))

    def generate_until(self, prompts: list[list[int]], until: list[list[str]], max_new: list[int],
                       where: list[str], desc: str = "", with_limit: bool = False):
        """Greedy continuation text of each prompt (token ids without special tokens; the
        tokenizer's are added here), up to EOS, decoded without special tokens and cut at its first
        stop string. Rows share a batch only with rows of the same stop strings. with_limit: returns
        (texts, hit), hit[i] true when prompt i used all its max_new tokens without reaching EOS or
        a stop string (the answer may be cut short)."""
        from llmstack.generate import generate

        before, after = self.wrap
        room = self.max_len - len(before) - len(after)
        for p, w in zip(prompts, where):
            if not p and not before and not after:
                raise UsageError(f"{w}: the prompt is empty (nothing for the encoder)")
            if len(p) > room:
                raise UsageError(f"{w}: the prompt is {len(p)} tokens (+{len(before) + len(after)} special), more "
                                 f"than the model's context of {self.max_len} (use --truncate left)")
        prompts = [[*before, *p, *after] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (until[i], -len(prompts[i]), prompts[i]))
        mine = order[self.rank::self.world]
        batches, cur = [], []
        for i in mine:
            if cur and (len(cur) == self.batch_size or until[i] != until[cur[0]]):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        results = {}
        bar = self._bar(len(mine), desc)
        t0 = time.perf_counter()
        for b in batches:
            stops = set(self.stop_ids(until[b[0]]))
            outs = generate(self.model, [prompts[i] for i in b], max_new_tokens=max(max_new[i] for i in b),
                            temperature=0.0, stop_ids=stops, pad_id=self.start_id)
            for i, o in zip(b, outs):
                self.tokens_scored += len(prompts[i]) + len(o)
                results[i] = answer_text(self.tokenizer, o, max_new[i], stops, until[i])
            if bar is not None:
                bar.update(len(b))
        self.seconds += time.perf_counter() - t0
        if bar is not None:
            bar.close()
        results = self._merge_ranks(results)
        texts = [results[i][0] for i in range(len(prompts))]
        return (texts, [results[i][1] for i in range(len(prompts))]) if with_limit else texts


def check_task(task: str, kind: str) -> None:
    """A UsageError naming the alternative for what T5 has no scoring for (kind: a task's
    output_type, or "ppl")."""
    if kind in ("loglikelihood_rolling", "ppl"):
        raise UsageError(f"task {task}: rolling log-likelihood (ppl: and loglikelihood_rolling) is not defined for "
                         "T5 (encoder-decoder) models in llmstack-eval (lm-evaluation-harness's seq2seq rolling is a "
                         "stopgap that feeds the encoder one token); score text with a loglikelihood task (context "
                         "-> target, metric perplexity) instead")
