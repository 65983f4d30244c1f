"""DPO's pure pieces. Accuracy counts ties as ties: a pair whose chosen and rejected implicit
rewards are equal is neither a win nor a loss (0.5). Before training the policy is the reference,
every margin is 0, so held-out accuracy before training is 0.5 with every pair tied, not 0. The
reference log-probs pass (seconds to minutes before the first step) shows its progress."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.pairs import load_pairs
from data_pipeline.tokenizer import load_tokenizer
from llmstack.models.gpt import gpt_config_from_preset
from llmstack.models.heads import PolicyLM
from llmstack.stages.dpo import Progress, dpo_stats, pair_logps, preference_accuracy, reference_table
from llmstack.train.evaluate import evaluate_pairs


def test_preference_accuracy_wins_losses_and_ties():
    margin = torch.tensor([0.3, -0.2, 0.0, 0.0, 1e-9])
    accuracy, tie = preference_accuracy(margin)
    assert accuracy.tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]
    assert tie.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    accuracy, tie = preference_accuracy(margin, torch.full_like(margin, 1e-6))  # within rounding: a tie
    assert accuracy.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert tie.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_policy_equal_to_reference_ties_every_pair():
    ref = (torch.tensor([-120.5, -80.25, -40.0]), torch.tensor([-118.0, -95.5, -41.0]))
    loss, st = dpo_stats(ref, ref, beta=0.1, label_smoothing=0.0)
    assert st["margin"].tolist() == [0.0, 0.0, 0.0]
    assert st["accuracy"].tolist() == [0.5, 0.5, 0.5] and st["ties"].tolist() == [1.0, 1.0, 1.0]
    assert loss.tolist() == pytest.approx([math.log(2)] * 3)
    # float32 rounding of the same log-probs is still a tie; a real preference is not
    noisy = (ref[0] * (1 + 1e-7), ref[1])
    assert dpo_stats(noisy, ref, 0.1, 0.0)[1]["ties"].tolist() == [1.0, 1.0, 1.0]
    moved = (ref[0] + torch.tensor([0.5, -0.5, 0.0]), ref[1])
    _, st = dpo_stats(moved, ref, 0.1, 0.0)
    assert st["accuracy"].tolist() == [1.0, 0.0, 0.5] and st["ties"].tolist() == [0.0, 0.0, 1.0]


def test_accuracy_before_training_is_one_half_all_tied(tokenizer_dir):
    # As the DPO stage validates before its first step: the reference table precomputed in one
    # batching, the policy (the same weights) scored in another.
    tok = load_tokenizer(tokenizer_dir)
    pairs, _ = load_pairs([SimpleNamespace(path="builtin-prefs:validation")], tok, 128, "skip", limit=24)
    assert len(pairs) == 24
    torch.manual_seed(0)
    model = PolicyLM(gpt_config_from_preset("gpt2-tiny", tok.vocab_size, n_layer=2, d_model=64, n_head=4,
                                            max_seq_len=128)).eval()
    progress = Progress("reference log-probs", len(pairs), "pair")
    table = reference_table(model, pairs, micro=5, pad_id=tok.pad_id, progress=progress)
    assert progress.done == len(pairs)

    def pair_stats(eng, batch):
        row = table[batch["index"]]
        _, st = dpo_stats(pair_logps(eng, batch), (row[:, 0], row[:, 1]), 0.1, 0.0)
        return st

    with torch.no_grad():
        val = evaluate_pairs(model, pairs, 8, tok.pad_id, pair_stats)
    assert val["margin"] == pytest.approx(0.0, abs=1e-5)  # float32 rounding: the batches differ
    assert val["ties"] == 1.0
    assert val["accuracy"] == 0.5


def test_progress_lines_give_counts_rate_and_eta(capsys):
    progress = Progress("reference log-probs", 100, "pair", every=0.0)  # no terminal: plain lines on stderr
    progress.update(40)
    progress.update(80)  # past the total: counted up to it; the phase's own summary line follows it
    progress.close()
    captured = capsys.readouterr()
    assert progress.done == 100 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"reference log-probs: 40/100 pairs, [0-9.]+ pairs/s, eta [0-9]+s", lines[0]), lines
