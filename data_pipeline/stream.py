"""Tokenize -> pack -> split global batches across ranks, with a resumable position.

This is the simple in-memory form: a corpus is tokenized once (cached as a .npy keyed by the
tokenizer hash and the sources), packed into fixed-length sequences, and read in a global order
that depends only on (seed, number of sequences). Every rank takes its own slice of each global
batch, so the global batches are the same whatever the world size, and the position (global
batches consumed) is all the state a resume needs.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch


def cache_dir() -> Path:
    return Path(os.environ.get("LLMSTACK_CACHE", Path.home() / ".cache" / "llmstack"))


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_documents(texts: Iterable[str], tokenizer, batch_docs: int = 256) -> np.ndarray:
    """All documents' ids, each followed by EOS, as one flat array (uint16/uint32 by vocab size)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    chunks: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for ids in tokenizer.encode_batch(batch):
            ids.append(eos)
            chunks.append(np.asarray(ids, dtype=dtype))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def cached_tokens(key_parts: list[str], tokenizer, texts: Callable[[], Iterable[str]]) -> np.ndarray:
    """tokenize_documents(texts()) cached on disk under a key of the tokenizer hash and `key_parts`.

    The cache file is written to a temp name and renamed, so concurrent ranks never read half of it.
    """
    key = hashlib.sha256("\0".join([tokenizer.hash, *key_parts]).encode()).hexdigest()[:20]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    tokens = tokenize_documents(texts(), tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return tokens


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution of `tokens`: the loss of the best
    context-free predictor, a floor any model that learned nothing beyond frequencies sits at."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class PackedSequences:
    """A flat token array cut into sequences of seq_len+1 tokens that overlap by one token.

    Sequence i covers tokens[i*T : i*T+T+1]: inputs are its first T tokens, targets its last T, so
    every token after the first is a target exactly once. The tail that does not fill a sequence
    is not used and is reported as `remainder_tokens`.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_sequences = max(0, (len(tokens) - 1) // seq_len)
        self.remainder_tokens = len(tokens) - (self.num_sequences * seq_len + 1) if self.num_sequences else len(tokens)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)


class GlobalBatches:
    """This rank's micro-batches, one global batch after another, in a seeded global order.

    Global batch g holds positions [g*G, (g+1)*G) of the order (G = micro x accum x world); each
    epoch is a fresh permutation seeded by (seed, epoch). Rank r takes the r-th contiguous slice of
    micro x accum positions and yields it as `accum` micro-batches. State: (batches, micro) consumed.
    """

    def __init__(self, seqs: PackedSequences, *, seed: int, micro_batch: int, grad_accum: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        if len(seqs) == 0:
            raise ValueError(f"corpus too small: not one sequence of {seqs.seq_len + 1} tokens")
        self.seqs, self.seed, self.shuffle = seqs, seed, shuffle
        self.micro, self.accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.batches, self.micro_index = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def _order(self, pos: int) -> int:
        n = len(self.seqs)
        epoch, i = divmod(pos, n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def epoch(self) -> float:
        return self.batches * self.global_batch / len(self.seqs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.batches * self.global_batch + self.rank * self.micro * self.accum + self.micro_index * self.micro
        rows = np.stack([self.seqs[self._order(p)] for p in range(start, start + self.micro)])
        self.micro_index += 1
        if self.micro_index == self.accum:
            self.batches, self.micro_index = self.batches + 1, 0
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "micro": self.micro_index, "seed": self.seed,
                "num_sequences": len(self.seqs), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_sequences") != len(self.seqs):
            raise ValueError(
                f"data changed since the checkpoint: it had {state.get('num_sequences')} sequences, now {len(self.seqs)}"
            )
        if state.get("global_batch") != self.global_batch:
            raise ValueError(
                f"global batch changed since the checkpoint ({state.get('global_batch')} -> {self.global_batch}); "
                "keep micro_batch x grad_accum x world the same to resume exactly"
            )
        self.batches, self.micro_index, self.seed = state["batches"], state["micro"], state["seed"]


def num_batches_per_epoch(num_sequences: int, global_batch: int) -> int:
    return math.ceil(num_sequences / global_batch)
