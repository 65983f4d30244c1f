"""Pretraining objectives: statistics of MLM masking, span corruption lengths and reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.objectives import (
    IGNORE,
    causal_lm_shift,
    fill_sentinels,
    mlm_batch,
    mlm_mask,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_batch,
    span_corruption_lengths,
)

SPECIAL = [0, 1, 2, 3, 4]  # pad, bos, eos, unk, mask
MASK = 4
SENTINELS = list(range(10, 42))


def test_causal_shift():
    t = np.arange(10)[None]
    x, y = causal_lm_shift(t)
    assert (x == t[:, :-1]).all() and (y == t[:, 1:]).all()


def test_mlm_statistics_15_percent_80_10_10():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 1000, size=(400, 128))
    tokens[:, ::16] = 2  # EOS separators: never chosen
    chosen = masked = randomized = kept = 0
    for row in tokens:
        inp, lab = mlm_mask(row, rng, mask_id=MASK, random_range=(50, 1000), special_ids=SPECIAL)
        sel = lab != IGNORE
        assert (lab[sel] == row[sel]).all() and (inp[~sel] == row[~sel]).all()
        assert not sel[row == 2].any()
        chosen += sel.sum()
        masked += (inp[sel] == MASK).sum()
        randomized += ((inp[sel] != MASK) & (inp[sel] != row[sel])).sum()
        kept += (inp[sel] == row[sel]).sum()
        assert (inp[sel][inp[sel] != MASK] >= 50).all()  # random replacements are regular tokens
    assert chosen == 400 * round(0.15 * 128)  # 15% of every sequence, exactly
    # kept includes random draws that hit the original token (1 in 950)
    assert abs(masked / chosen - 0.8) < 0.02 and abs(randomized / chosen - 0.1) < 0.015
    assert abs(kept / chosen - 0.1) < 0.015


def test_mlm_every_row_gets_a_target_and_is_reproducible():
    rows = np.full((3, 8), 7)
    rows[2] = 2  # all special: nothing to predict, nothing changed
    out1 = mlm_batch(rows, [np.random.default_rng(i) for i in range(3)], mask_id=MASK, random_range=(5, 9),
                     special_ids=SPECIAL)
    out2 = mlm_batch(rows, [np.random.default_rng(i) for i in range(3)], mask_id=MASK, random_range=(5, 9),
                     special_ids=SPECIAL)
    assert (out1[0] == out2[0]).all() and (out1[1] == out2[1]).all()
    assert ((out1[1][:2] != IGNORE).sum(1) >= 1).all() and (out1[1][2] == IGNORE).all()


@pytest.mark.parametrize("length", [8, 31, 32, 100, 256, 512])
def test_span_corruption_reconstructs_and_has_fixed_lengths(length):
    rng = np.random.default_rng(length)
    enc_len, dec_len, spans = span_corruption_lengths(length)
    for _ in range(20):
        tokens = rng.integers(50, 1000, size=length)
        tokens[rng.integers(0, length, 3)] = 2  # the data's own EOS tokens survive the round trip
        inp, tgt = span_corruption(tokens, rng, sentinel_ids=SENTINELS, eos_id=2)
        assert (len(inp), len(tgt)) == (enc_len, dec_len)
        assert inp[-1] == 2 and tgt[-1] == 2 and tgt[0] == SENTINELS[0]
        assert np.isin(inp, SENTINELS).sum() == spans == np.isin(tgt, SENTINELS).sum()
        assert fill_sentinels(inp, tgt, sentinel_ids=SENTINELS, eos_id=2) == tokens.tolist()


def test_noise_mask_statistics():
    rng = np.random.default_rng(0)
    masks = np.stack([random_spans_noise_mask(256, rng) for _ in range(2000)])
    assert (masks.sum(1) == round(256 * 0.15)).all()  # exactly 15% noise per sequence
    starts = masks & ~np.concatenate([np.zeros((2000, 1), bool), masks[:, :-1]], axis=1)
    assert (starts.sum(1) == round(38 / 3)).all()  # 13 spans of 38 noise tokens: mean span length ~3
    assert abs(masks.sum() / starts.sum() - 3.0) < 0.1
    lengths = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], masks[0].astype(int), [0]]))))[::2]
    assert lengths.sum() == 38 and lengths.min() >= 1 and len(set(lengths.tolist())) > 1  # random span lengths
    assert not masks[:, 0].any() and masks[:, -1].all()  # T5 alternates from a non-noise to a noise span
    middle = masks.mean(0)[16:-16]
    assert 0.11 < middle.min() and middle.max() < 0.19  # noise spread evenly over the positions


def test_span_corruption_batch_and_too_few_sentinels():
    rows = np.random.default_rng(0).integers(50, 1000, size=(4, 64))
    inp, tgt = span_corruption_batch(rows, [np.random.default_rng(i) for i in range(4)], sentinel_ids=SENTINELS,
                                     eos_id=2)
    assert inp.shape == (4, span_corruption_lengths(64)[0]) and tgt.shape == (4, span_corruption_lengths(64)[1])
    with pytest.raises(ValueError, match="only 1 sentinel"):
        span_corruption(rows[0], np.random.default_rng(0), sentinel_ids=[10], eos_id=2)
