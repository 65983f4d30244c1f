"""Preference pairs (reward model, DPO) and prompts (PPO): records -> encoded, batched in a
seeded global order.

`rank_indices` deals items to ranks from an endless stream of seeded epochs, so any world size
with the same global batch sees the same global steps and a resumed run (started at its step)
sees exactly what the uninterrupted run would have. Nothing is truncated: a pair or prompt longer
than its limit is skipped and counted as too_long (on_error=fail: a DataError naming it).
"""

from __future__ import annotations

from typing import Iterator

import torch

from data_pipeline.errors import DataError, ErrorLog
from data_pipeline.formats import (encode_preference, encode_prompt, iter_preference_records, iter_prompt_records,
                                   iter_task_records)


class TooLong(DataError):
    """A pair or prompt over its length limit with on_error=fail (its message names the record)."""


def _fitting(sources, read, encode, length, on_error: str, errors: ErrorLog, *, limit: int, limit_key: str,
             noun: str, unit: str, what: str):
    """(record, encoded) of every usable record of the sources, in order; one whose `length` exceeds
    `limit` is skipped and counted as too_long (on_error=fail: TooLong naming it, `limit_key` the
    config key of the limit). Missing and unreadable sources become DataErrors naming `what`."""
    try:
        for src in sources:
            for i, (where, record) in enumerate(read(src.path, on_error=on_error, errors=errors)):
                enc = encode(record)
                if (n := length(enc)) > limit:
                    msg = f"{noun} of {n} tokens exceeds {limit_key}={limit}"
                    if on_error == "fail":
                        raise TooLong(f"{where}: {msg}")
                    errors.add(src.path, unit, i, "too_long", msg)
                    continue
                yield record, enc
    except TooLong:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{what} not found: {e}") from None
    except (DataError, ValueError) as e:
        raise DataError(f"{what}: {e}") from None


def load_pairs(sources, tokenizer, seq_len: int, on_error: str, limit: int | None = None) -> tuple[list[dict], ErrorLog]:
    """Encoded pairs of all sources, in order (at most `limit`), and the skipped records.

    A pair whose longer conversation exceeds seq_len tokens is skipped and counted as too_long
    (with on_error=fail: an error naming it); nothing is truncated.
    """
    errors, pairs = ErrorLog(), []
    for _, enc in _fitting(sources, iter_preference_records, lambda r: encode_preference(tokenizer, *r),
                           lambda e: max(len(e["chosen_ids"]), len(e["rejected_ids"])), on_error, errors,
                           limit=seq_len, limit_key="data.seq_len", noun="pair", unit="pair", what="preference data"):
        pairs.append(enc)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs, errors


def collate(pairs: list[dict], pad_id: int, indices: list[int] | None = None) -> dict[str, torch.Tensor]:
    """m pairs -> ids (2m, T) right-padded (chosen rows first), valid (2m, T), label_mask (2m, T)
    marking the answer tokens, weight (m,) (0 for filler pairs), index (m,)."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    label_mask = torch.zeros((len(seqs), T))
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.as_tensor(s)
        valid[i, :len(s)] = True
        label_mask[i, :len(s)] = (torch.as_tensor(lab) != -100).float()
    idx = torch.as_tensor(indices if indices is not None else list(range(len(pairs))), dtype=torch.long)
    return {"ids": ids, "valid": valid, "label_mask": label_mask, "weight": (idx >= 0).float(), "index": idx.clamp(min=0)}


def rank_indices(n: int, per_rank: int, world: int, rank: int, seed: int, k: int) -> list[int]:
    """Item indices of global step k for this rank, from an endless stream of seeded epochs:
    epoch e visits the n items in a permutation seeded by (seed, e); step k covers stream
    positions [k*per_rank*world, (k+1)*per_rank*world) and rank r takes its r-th slice. Any
    world size with the same global batch sees the same global steps, so a resumed run (start at
    its step) sees exactly what the uninterrupted run would have."""
    first = k * per_rank * world + rank * per_rank
    out = []
    for pos in range(first, first + per_rank):
        epoch, j = divmod(pos, n)
        out.append(int(_permutation(n, seed, epoch)[j]))
    return out


def pair_batches(pairs: list[dict], *, micro: int, world: int, rank: int, seed: int, pad_id: int,
                 start: int = 0) -> Iterator[dict]:
    """This rank's collated micro-batches, forever, from micro-step `start` (see rank_indices)."""
    if len(pairs) < micro * world:
        raise DataError(f"{len(pairs)} training pairs are fewer than one micro-batch on every process "
                         f"({micro} x {world})")
    k = start
    while True:
        idx = rank_indices(len(pairs), micro, world, rank, seed, k)
        yield collate([pairs[i] for i in idx], pad_id, idx)
        k += 1


_PERM: dict = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM:
        _PERM.clear()  # one epoch's permutation is kept: the stream moves forward
        _PERM[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return _PERM[key]


def mean_tokens(pairs: list[dict]) -> float:
    return sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs) / max(1, len(pairs))


def load_prompts(sources, tokenizer, max_len: int, on_error: str) -> tuple[list[list[int]], list[str], ErrorLog]:
    """(prompt ids under the chat template, last user message texts, skipped records).

    A prompt longer than max_len tokens is skipped and counted as too_long (fail: an error)."""
    errors, ids, texts = ErrorLog(), [], []
    for messages, p in _fitting(sources, iter_prompt_records, lambda m: encode_prompt(tokenizer, m), len, on_error,
                                errors, limit=max_len, limit_key="data.max_prompt_len", noun="prompt", unit="record",
                                what="prompt data"):
        ids.append(p)
        texts.append(next(m["content"] for m in reversed(messages) if m["role"] != "assistant"))
    return ids, texts, errors


def load_tasks(sources, tokenizer, max_len: int, on_error: str,
               reference_field: str = "answer") -> tuple[list[list[int]], list[str], list, ErrorLog]:
    """As `load_prompts`, plus each record's reference (its `reference_field`, None when absent):
    (prompt ids, last user message texts, references, skipped records)."""
    def read(spec, **kw):
        for where, messages, reference in iter_task_records(spec, reference_field=reference_field, **kw):
            yield where, (messages, reference)

    errors, ids, texts, refs = ErrorLog(), [], [], []
    for (messages, reference), p in _fitting(sources, read, lambda r: encode_prompt(tokenizer, r[0]), len, on_error,
                                             errors, limit=max_len, limit_key="data.max_prompt_len", noun="prompt",
                                             unit="record", what="task data"):
        ids.append(p)
        texts.append(next(m["content"] for m in reversed(messages) if m["role"] != "assistant"))
        refs.append(reference)
    return ids, texts, refs, errors
