"""SFT data: chat records -> encoded conversations -> the global row order -> micro-batches.

Design choices (`llmstack sft` trains on these):
- conversations are read and encoded once per process (formats.py: chat template, labels on
  assistant turns only) and kept in memory; bad records are skipped and counted or stop the run
  (on_error), over-long ones are truncated or dropped and counted (overlong).
- the global order is a function of (seed, epoch) alone: each epoch is shuffled, then packed
  (several conversations per row, positions restarting and attention confined to each
  conversation) or kept one conversation per row (padded to the longest in the micro-batch).
  Global step s takes rows [s*G, (s+1)*G) (G = micro x accum x world), and rank r's j-th
  micro-batch of the step is the slice (j*world + r)*micro, so every world size sees the same
  global batches and resuming needs only the step number.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline import formats
from data_pipeline.errors import DataError, ErrorLog
from data_pipeline.objectives import IGNORE, pack_greedy, sft_collate, sft_fit


class _Unencodable(DataError):
    """A conversation the chat template cannot encode, its record named."""


def load_conversations(specs: list[str], tokenizer, *, seq_len: int, train_on: str, overlong: str, side: str,
                       on_error: str, limit: int | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """(examples, stats): every usable conversation of the sources as shifted (inputs, targets)
    of at most seq_len positions, in source order; stats count what was skipped, cut or dropped."""
    errors = ErrorLog()
    stats = {"records": 0, "truncated": 0, "dropped_overlong": 0, "dropped_unsupervised": 0}
    examples = []
    for spec in specs:
        try:
            for where, messages in formats.iter_chat_records(spec, on_error=on_error, errors=errors):
                stats["records"] += 1
                try:
                    ids, labels = formats.encode_chat(tokenizer, messages, train_on=train_on)
                except ValueError as e:  # e.g. a model's own chat template refusing this conversation
                    raise _Unencodable(f"{where}: {e}") from None
                over = len(ids) > seq_len + 1
                fitted = sft_fit(ids, labels, seq_len, overlong=overlong, side=side)
                if fitted is None:  # dropped as over-long, or no response token survived the cut
                    stats["dropped_overlong" if over and overlong == "drop" else "dropped_unsupervised"] += 1
                    continue
                stats["truncated"] += over
                examples.append(fitted)
                if limit and len(examples) >= limit:
                    break
        except FileNotFoundError as e:
            raise DataError(f"data source not found: {e}") from None
        except _Unencodable as e:  # names its record (file and position) already
            raise DataError(str(e)) from None
        except (DataError, ValueError) as e:
            raise DataError(f"{spec}: {e}") from None
    stats["skipped_records"] = errors.total
    stats["skipped_by_kind"] = {k: n for counts in errors.counts().values() for k, n in counts.items()}
    stats["skipped_report"] = errors.report()
    stats["conversations"] = len(examples)
    stats["tokens"] = int(sum(len(x) for x, _ in examples))
    stats["supervised_tokens"] = int(sum(int((y != IGNORE).sum()) for _, y in examples))
    return examples, stats


class SFTBatches:
    """The global row order over epochs and this rank's micro-batches, step by step (see the
    module docstring). Iterating yields micro-batch dicts from `start_step` on; `step_counts(s)`
    gives (tokens, supervised tokens, positions) of global step s."""

    def __init__(self, examples, *, seq_len: int, packed: bool, micro: int, accum: int, world: int, rank: int,
                 seed: int, pad_id: int, shuffle: bool = True, start_step: int = 0):
        if not examples:
            raise DataError("no usable training conversations (see the skipped-record report above)")
        self.examples, self.seq_len, self.packed = examples, seq_len, packed
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.seed, self.pad_id, self.shuffle = seed, pad_id, shuffle
        self.rows_per_step = micro * accum * world
        self.step = start_step
        self._epochs: dict[int, list[list[int]]] = {}
        self._lens: dict[int, int] = {}
        self._lengths = [len(x) for x, _ in examples]
        self._sup = [int((y != IGNORE).sum()) for _, y in examples]

    def epoch_rows(self, e: int) -> list[list[int]]:
        """Rows (lists of example indices) of epoch e: shuffled with (seed, e), then packed."""
        if e not in self._epochs:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            if self.packed:
                rows = [[int(order[i]) for i in row] for row in pack_greedy([self._lengths[i] for i in order], self.seq_len)]
            else:
                rows = [[int(i)] for i in order]
            if len(self._epochs) > 2:  # keep a few epochs: steps move forward
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = rows
        return self._epochs[e]

    def epoch_len(self, e: int) -> int:
        if e not in self._lens:
            self._lens[e] = len(self.epoch_rows(e))
        return self._lens[e]

    def step_rows(self, step: int) -> list[list[int]]:
        """The G rows of global step `step` (spanning an epoch boundary where needed)."""
        start, out, e = step * self.rows_per_step, [], 0
        while start >= self.epoch_len(e):  # find the epoch of row `start`
            start -= self.epoch_len(e)
            e += 1
        while len(out) < self.rows_per_step:
            rows = self.epoch_rows(e)
            out += rows[start:start + self.rows_per_step - len(out)]
            start, e = 0, e + 1
        return out

    def step_counts(self, step: int) -> tuple[int, int]:
        """(tokens, supervised tokens) of global step `step`, all ranks together."""
        rows = self.step_rows(step)
        return (sum(self._lengths[i] for r in rows for i in r), sum(self._sup[i] for r in rows for i in r))

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's `accum` micro-batches of global step `step` (tensors)."""
        rows = self.step_rows(step)
        out = []
        for j in range(self.accum):
            a = (j * self.world + self.rank) * self.micro
            mine = [[self.examples[i] for i in r] for r in rows[a:a + self.micro]]
            out.append({k: torch.from_numpy(v) for k, v in sft_collate(mine, pad_id=self.pad_id, packed=self.packed).items()})
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not hasattr(self, "_pending") or not self._pending:
            self._pending = self.micro_batches(self.step)
            self.step += 1
        return self._pending.pop(0)


def validation_batches(examples, *, micro: int, packed: bool, seq_len: int, pad_id: int) -> list[dict]:
    """All validation conversations in order, as micro-batches (packed or padded like training)."""
    if packed:
        rows = [[examples[i] for i in row] for row in pack_greedy([len(x) for x, _ in examples], seq_len)]
    else:
        rows = [[ex] for ex in examples]
    return [{k: torch.from_numpy(v) for k, v in sft_collate(rows[a:a + micro], pad_id=pad_id, packed=packed).items()}
            for a in range(0, len(rows), micro)]
