"""Each family's pretraining objective as a transform of the packed micro-batches.

GPT reads the batches as they come (inputs and next-token labels). BERT and T5 take the
`input_ids` (B, T) of each micro-batch and rebuild it with data_pipeline/objectives.py: MLM
masking (labels only at chosen positions) or span corruption (sentinel-filled encoder input,
decoder target). All three then share one loss: `model(input_ids, labels=labels)`.

The random choices for a sequence use a generator seeded by (seed, stream, optimizer step, a
hash of the sequence's tokens). Neither the rank nor the micro-batch index enters: whichever
process and accumulation slot the data layer deals a sequence to, it is corrupted the same way.
So a resumed run draws the same masks as an uninterrupted one, and a two-process run the same
as a one-process run with twice the accumulation; the step makes a sequence seen again in a
later epoch get fresh masks (RoBERTa's dynamic masking).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import numpy as np
import torch

from data_pipeline import objectives
from llmstack.errors import UsageError

TRAIN_STREAM, VAL_STREAM = 0, 1

Transform = Callable[[dict, list[np.random.Generator]], dict]


def special_ids(tokenizer) -> list[int]:
    """Ids of every special token the tokenizer defines (never masked, never a random replacement)."""
    ids = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.mask_id,
           *tokenizer.role_ids.values(), *tokenizer.sentinel_ids]
    return sorted({i for i in ids if i is not None})


def make_transform(family: str, tokenizer, seq_len: int) -> Transform | None:
    """The batch transform of a family (None for GPT), checking the tokenizer can serve it."""
    if family == "gpt":
        return None
    if family == "bert":
        if tokenizer.mask_id is None:
            raise UsageError(f"masked LM needs a mask token; tokenizer {tokenizer.path} has none")
        specials = special_ids(tokenizer)
        hi = int(tokenizer.meta.get("trained_vocab_size") or tokenizer.vocab_size)  # reserved ids excluded
        kw = dict(mask_id=tokenizer.mask_id, random_range=(max(specials) + 1, hi), special_ids=specials)

        def mlm(batch: dict, rngs) -> dict:
            inputs, labels = objectives.mlm_batch(batch["input_ids"].numpy(), rngs, **kw)
            return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

        return mlm
    if family == "t5":
        _, _, spans = objectives.span_corruption_lengths(seq_len)
        if len(tokenizer.sentinel_ids) < spans or tokenizer.eos_id is None:
            raise UsageError(f"T5 span corruption of data.seq_len={seq_len} tokens makes {spans} noise spans, each "
                             f"needing a sentinel token; tokenizer {tokenizer.path} has {len(tokenizer.sentinel_ids)} "
                             f"(train one with tokenizer.num_sentinels >= {spans})")
        kw = dict(sentinel_ids=tokenizer.sentinel_ids, eos_id=tokenizer.eos_id)

        def span_corruption(batch: dict, rngs) -> dict:
            inputs, targets = objectives.span_corruption_batch(batch["input_ids"].numpy(), rngs, **kw)
            return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}

        return span_corruption
    raise UsageError(f"no pretraining objective for model family {family!r}")


def row_generators(seed: int, stream: int, step: int, rows: torch.Tensor) -> list[np.random.Generator]:
    """One generator per row of (B, T) token ids, seeded by (seed, stream, step, content hash)."""
    out = []
    for row in rows.numpy():
        digest = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
        out.append(np.random.default_rng([seed, stream, step, digest]))
    return out


class ObjectiveBatches:
    """Wraps a micro-batch iterator, applying `transform` with per-row seeded generators.

    It counts the micro-batches it hands out (from `start_step * accum`), which gives each one's
    optimizer step; other attributes (the loader, state_dict, ...) pass through to the wrapped
    iterator, whose position is what checkpoints record.
    """

    def __init__(self, batches: Iterator[dict], transform: Transform, *, seed: int, accum: int, start_step: int = 0):
        self.batches, self.transform = batches, transform
        self.seed, self.accum = seed, accum
        self.consumed = start_step * accum

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        step = self.consumed // self.accum
        self.consumed += 1
        return self.transform(batch, row_generators(self.seed, TRAIN_STREAM, step, batch["input_ids"]))

    def __getattr__(self, name):  # loader, state_dict, ... of the wrapped iterator
        return getattr(self.__dict__["batches"], name)


def wrap_train(batches, transform: Transform | None, *, seed: int, accum: int, start_step: int):
    """The training micro-batches of a family: as they are for GPT, transformed for BERT / T5."""
    if transform is None:
        return batches
    return ObjectiveBatches(batches, transform, seed=seed, accum=accum, start_step=start_step)


def transform_val(val_batches: list[dict], transform: Transform | None, *, seed: int) -> list[dict]:
    """Validation micro-batches with fixed masks, so every evaluation of a run scores the same inputs."""
    if transform is None:
        return val_batches
    return [transform(b, row_generators(seed, VAL_STREAM, 0, b["input_ids"])) for b in val_batches]

