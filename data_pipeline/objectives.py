"""Pretraining objectives: how a packed token sequence becomes model inputs and targets.

- causal LM: inputs are tokens[:-1], targets tokens[1:] (GPT)
- masked LM (BERT, Devlin et al. 2019): 15% of the positions are chosen, never a special token;
  of those 80% become the mask token, 10% a random regular token, 10% stay unchanged; only
  chosen positions carry a label. We choose exactly round(15% of the length) positions per
  sequence (at least one) rather than flipping a coin per token: no sequence is ever without a
  target, and every sequence of a length has the same number of targets, so a micro-batch's mean
  loss does not depend on which sequences share it (as with causal LM), which keeps multi-process
  runs equal to single-process ones whatever the data layer's dealing.
- span corruption (T5, Raffel et al. 2020, section 3.1.4): noise density 15%, mean span length 3;
  each noise span is replaced in the input by one sentinel, and the target lists every sentinel
  followed by the tokens it replaced, both ending with EOS. The number of noise tokens and spans
  depends only on the length, as in T5's `random_spans_noise_mask`, so every sequence of a batch
  gives the same input and target lengths (`span_corruption_lengths`).

Every random choice takes an explicit numpy Generator: the caller seeds one per sequence, which
makes batches reproducible, resumable, and the same whatever the number of processes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE = -100  # label of positions that carry no loss (torch's cross-entropy ignore_index)


def causal_lm_shift(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of a (..., T+1) token array: tokens[..., :-1] predict tokens[..., 1:]."""
    return tokens[..., :-1], tokens[..., 1:]


# ---------------------------------------------------------------------------------------------
# Masked LM
# ---------------------------------------------------------------------------------------------


def mlm_mask(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    random_range: tuple[int, int],
    special_ids: Sequence[int] = (),
    mask_prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one sequence (T,) under BERT masking.

    round(mask_prob * T) positions (at least 1, at most the non-special ones) are chosen; positions
    holding a special id never are. Random replacements are drawn uniformly from
    [random_range[0], random_range[1]) (the regular vocabulary). labels is IGNORE except at chosen
    positions, where it is the original token.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    candidates = np.flatnonzero(~np.isin(tokens, np.asarray(special_ids, dtype=np.int64)))
    inputs, labels = tokens.copy(), np.full_like(tokens, IGNORE)
    if len(candidates) == 0:
        return inputs, labels
    n = min(len(candidates), max(1, int(round(mask_prob * len(tokens)))))
    chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    labels[chosen] = tokens[chosen]
    u = rng.random(n)
    to_mask = chosen[u < mask_frac]
    to_random = chosen[(u >= mask_frac) & (u < mask_frac + random_frac)]
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.integers(random_range[0], random_range[1], size=len(to_random))
    return inputs, labels


def mlm_batch(rows: np.ndarray, rngs: Sequence[np.random.Generator], **kw) -> tuple[np.ndarray, np.ndarray]:
    """mlm_mask applied to each row of (B, T) with its own generator; (inputs, labels) (B, T)."""
    out = [mlm_mask(r, g, **kw) for r, g in zip(rows, rngs)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


# ---------------------------------------------------------------------------------------------
# T5 span corruption
# ---------------------------------------------------------------------------------------------


def _noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens (T5's rounding)."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(1, int(round(num_noise / mean_span)))
    return num_noise, min(num_spans, num_noise, length - num_noise)


def span_corruption_lengths(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int, int]:
    """(input length, target length, number of spans) of span_corruption on `length` tokens."""
    num_noise, num_spans = _noise_counts(length, noise_density, mean_span)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1, num_spans


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (all >= 1, summing to n_items) of a uniformly random split into n_segments parts."""
    cuts = np.sort(rng.choice(n_items - 1, size=n_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_span: float = 3.0) -> np.ndarray:
    """Boolean (length,) mask of noise tokens: alternating non-noise / noise spans, starting with
    non-noise, with random span lengths and fixed totals (T5's `random_spans_noise_mask`)."""
    num_noise, num_spans = _noise_counts(length, noise_density, mean_span)
    noise_lens = _random_segmentation(num_noise, num_spans, rng)
    keep_lens = _random_segmentation(length - num_noise, num_spans, rng)
    spans = np.stack([keep_lens, noise_lens], axis=1).reshape(-1)  # keep, noise, keep, noise, ...
    is_noise = np.tile([False, True], num_spans)
    return np.repeat(is_noise, spans)


def span_corruption(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target) of one sequence.

    input:  the tokens with the k-th noise span replaced by sentinel_ids[k], then EOS
    target: sentinel_ids[0] span_0 sentinel_ids[1] span_1 ..., then EOS
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    noise = random_spans_noise_mask(len(tokens), rng, noise_density, mean_span)
    start_pos = np.flatnonzero(noise & ~np.concatenate([[False], noise[:-1]]))  # first token of each span
    if len(start_pos) > len(sentinel_ids):
        raise ValueError(f"span corruption of {len(tokens)} tokens makes {len(start_pos)} spans, "
                         f"but only {len(sentinel_ids)} sentinel tokens exist")
    sentinels = np.asarray(sentinel_ids[: len(start_pos)], dtype=np.int64)
    # input: the kept tokens, with sentinel k inserted where span k was (after the kept tokens before it)
    kept_before = np.cumsum(~noise)[start_pos]
    inputs = np.insert(tokens[~noise], kept_before, sentinels)
    # target: the noise tokens, with sentinel k inserted before span k
    noise_before = np.cumsum(noise)[start_pos] - 1
    targets = np.insert(tokens[noise], noise_before, sentinels)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def span_corruption_batch(rows: np.ndarray, rngs: Sequence[np.random.Generator], **kw) -> tuple[np.ndarray, np.ndarray]:
    """span_corruption of each row of (B, T); (inputs (B, Li), targets (B, Lt)) with fixed lengths."""
    out = [span_corruption(r, g, **kw) for r, g in zip(rows, rngs)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def fill_sentinels(inputs: Sequence[int], targets: Sequence[int], *, sentinel_ids: Sequence[int], eos_id: int) -> list[int]:
    """The original sequence back from a span-corrupted (input, target) pair: each sentinel of
    the input is replaced by the tokens that follow the same sentinel in the target (the final
    EOS of both is dropped; EOS tokens of the data itself are kept)."""
    inputs, targets = [int(t) for t in inputs], [int(t) for t in targets]
    inputs = inputs[:-1] if inputs and inputs[-1] == eos_id else inputs
    targets = targets[:-1] if targets and targets[-1] == eos_id else targets
    sentinel_index = {s: k for k, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets:
        if t in sentinel_index:
            current = spans.setdefault(sentinel_index[t], [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs:
        out += spans.get(sentinel_index[t], []) if t in sentinel_index else [t]
    return out


# ---------------------------------------------------------------------------------------------
# SFT: causal shift per conversation, over-long conversations, packing and padding
# ---------------------------------------------------------------------------------------------
#
# A conversation's (ids, labels) from formats.encode_chat are aligned (labels[i] is ids[i] or
# IGNORE). Shifted per conversation, never across a packing boundary: inputs ids[:-1] predict
# targets labels[1:], so a conversation of n tokens takes n - 1 positions of a row.


def sft_fit(ids: Sequence[int], labels: Sequence[int], max_len: int, *, overlong: str = "truncate",
            side: str = "right") -> tuple[np.ndarray, np.ndarray] | None:
    """(inputs, targets) of one conversation shifted for causal LM, at most max_len positions.

    A conversation longer than max_len + 1 tokens is cut from `side` ("right": the end, "left":
    the beginning) when overlong="truncate", or None when overlong="drop". None too when no
    supervised target is left (the cut removed every response token). Callers count both.
    """
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if len(ids) > max_len + 1:
        if overlong == "drop":
            return None
        if overlong != "truncate" or side not in ("left", "right"):
            raise ValueError(f"overlong must be truncate|drop and side left|right, got {overlong!r}, {side!r}")
        keep = slice(0, max_len + 1) if side == "right" else slice(len(ids) - max_len - 1, len(ids))
        ids, labels = ids[keep], labels[keep]
    inputs, targets = ids[:-1], labels[1:]
    if not (targets != IGNORE).any():
        return None
    return inputs, targets


def pack_greedy(lengths: Sequence[int], capacity: int, window: int = 32) -> list[list[int]]:
    """Indices of items grouped into rows of at most `capacity` positions.

    First fit over the `window` most recently opened rows, items taken in the given order: rows
    come out nearly full (plain next-fit leaves a row as soon as one item does not fit) while the
    result stays a deterministic function of the order, and the scan stays O(window) per item.
    """
    rows: list[list[int]] = []
    free: list[int] = []  # free positions of each row
    first_open = 0
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has {n} positions, more than the row capacity {capacity}")
        first_open = max(first_open, len(rows) - window)
        for r in range(first_open, len(rows)):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def sft_collate(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], *, pad_id: int,
                length: int | None = None, packed: bool = True) -> dict[str, np.ndarray]:
    """A micro-batch from rows, each a list of (inputs, targets) conversations laid end to end.

    Returns input_ids, labels (B, T) padded on the right with pad_id / IGNORE to `length`
    (default: the longest row). With `packed`, also position_ids (B, T), restarting at 0 for
    every conversation, and segment_ids (B, T): the conversation index of each position (-1 for
    padding), from which the model attends causally within one conversation, so packed
    conversations never attend to each other (pad positions attend to the pad run they sit in).
    Without it (one conversation per row, right padding) causal attention alone already keeps
    real tokens away from the pads after them.
    """
    T = length or max(sum(len(x) for x, _ in row) for row in rows)
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    seg = np.full((B, T), -1, dtype=np.int64)  # conversation index per position; -1 = padding
    for b, row in enumerate(rows):
        t = 0
        for k, (x, y) in enumerate(row):
            n = len(x)
            if t + n > T:
                raise ValueError(f"row {b} needs more than {T} positions")
            input_ids[b, t:t + n], labels[b, t:t + n] = x, y
            position_ids[b, t:t + n] = np.arange(n)
            seg[b, t:t + n] = k
            t += n
        position_ids[b, t:] = np.arange(T - t)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        out["position_ids"] = position_ids
        out["segment_ids"] = seg
    return out
