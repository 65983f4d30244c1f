"""Group-relative policy-gradient math (rlhf/group.py) against hand-computed values.

Each expected value is worked out in the comment above it from the formula written there, on
groups small enough to do by hand; independent loop references cover random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmstack.rlhf import group as grp


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=0)


# Two prompts, G = 4: group 0 has two right and two wrong answers, group 1 is all the same.
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_grpo_by_hand():
    # group 0: mean 0.5, centred [.5, -.5, -.5, .5]; unbiased var = 4 * .25 / (4 - 1) = 1/3,
    # std = 1/sqrt(3) = 0.57735 -> A = .5 * sqrt(3) = 0.866025 (eps 1e-6 is negligible at 1e-5)
    # group 1: centred [0, 0, 0, 0], std 0 -> A = 0 / eps = 0
    a = math.sqrt(3) / 2
    close(grp.group_advantages(R, 4, "grpo"), [a, -a, -a, a, 0, 0, 0, 0], tol=1e-5)
    close(a, 0.866025, tol=1e-6)
    # uneven group [3, 0, 0, 0]: mean .75, centred [2.25, -.75, -.75, -.75],
    # var = (5.0625 + 3 * .5625) / 3 = 2.25, std 1.5 -> [1.5, -.5, -.5, -.5]
    close(grp.group_advantages(torch.tensor([3.0, 0.0, 0.0, 0.0]), 4, "grpo"), [1.5, -0.5, -0.5, -0.5], tol=1e-5)


def test_grpo_matches_a_loop_with_bessel_std():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(15, generator=g, dtype=torch.float64)
    expected = torch.cat([(x - x.mean()) / (x.std(unbiased=True) + 1e-6) for x in r.split(5)])
    close(grp.group_advantages(r, 5, "grpo"), expected, tol=1e-12)


def test_grpo_group_of_one_is_zero_not_nan():
    # a single completion has no spread: centred 0, std taken as 0 -> 0 / eps = 0
    close(grp.group_advantages(torch.tensor([3.0, -1.0]), 1, "grpo"), [0.0, 0.0])


def test_dr_grpo_by_hand():
    # A = r - mean(group): group 0 mean .5 -> [.5, -.5, -.5, .5]; group 1 -> 0
    close(grp.group_advantages(R, 4, "dr_grpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # no std scaling: [3, 0, 0, 0] -> mean .75 -> [2.25, -.75, -.75, -.75]
    close(grp.group_advantages(torch.tensor([3.0, 0.0, 0.0, 0.0]), 4, "dr_grpo"), [2.25, -0.75, -0.75, -0.75])


def test_rloo_by_hand():
    # A_i = r_i - mean of the other three: r_0 = 1, others (0 + 0 + 1) / 3 = 1/3 -> 2/3;
    # r_1 = 0, others (1 + 0 + 1) / 3 = 2/3 -> -2/3; equals G/(G-1) (r - mean) = 4/3 * .5
    t = 2 / 3
    close(grp.group_advantages(R, 4, "rloo"), [t, -t, -t, t, 0, 0, 0, 0])
    g = torch.Generator().manual_seed(1)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    loo = torch.stack([r[i] - torch.cat([r[(i // 3) * 3:i], r[i + 1:(i // 3 + 1) * 3]]).mean() for i in range(12)])
    close(grp.group_advantages(r, 3, "rloo"), loo, tol=1e-12)


def test_reinforce_pp_normalises_over_the_whole_batch():
    # centred over groups: [.5, -.5, -.5, .5, 0, 0, 0, 0] (batch mean 0); sum of squares 1,
    # unbiased batch var = 1 / (8 - 1), std = 1/sqrt(7) -> A = .5 * sqrt(7) = 1.322876
    a = math.sqrt(7) / 2
    close(grp.group_advantages(R, 4, "reinforce_pp"), [a, -a, -a, a, 0, 0, 0, 0], tol=1e-5)
    close(a, 1.322876, tol=1e-6)
    # groups [1, 0, 0, 1] and [3, 0, 0, 0]: centred [.5, -.5, -.5, .5] and [2.25, -.75, -.75, -.75];
    # sum of squares 1 + 6.75 = 7.75, std = sqrt(7.75 / 7) = 1.052209: one scale for both groups
    # (grpo would scale group 0 by 1/0.57735 and group 1 by 1/1.5)
    s = math.sqrt(7.75 / 7)
    close(s, 1.052209, tol=1e-6)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0])
    close(grp.group_advantages(r, 4, "reinforce_pp"), [x / s for x in (.5, -.5, -.5, .5, 2.25, -.75, -.75, -.75)],
          tol=1e-5)


def test_advantage_dtype():
    assert grp.group_advantages(R.double(), 4, "grpo").dtype == torch.float64
    assert grp.group_advantages(R.bfloat16(), 4, "grpo").dtype == torch.float32


def test_advantage_errors():
    with pytest.raises(ValueError, match="unknown algo"):
        grp.group_advantages(R, 4, "ppo")
    with pytest.raises(ValueError, match="multiple of group_size"):
        grp.group_advantages(R[:7], 4, "grpo")
    with pytest.raises(ValueError, match="multiple of group_size"):
        grp.group_advantages(R, 0, "grpo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        grp.group_advantages(R, 1, "rloo")
    with pytest.raises(ValueError, match="1-D"):
        grp.group_advantages(R.view(2, 4), 4, "grpo")
    with pytest.raises(ValueError, match="multiple of group_size"):
        grp.equal_groups(R[:6], 4)


def test_equal_groups_and_keep_rows():
    # group 0 = [1, 0, 0, 1] differs, group 1 = [2, 2, 2, 2] is all equal (no signal: drop it)
    eq = grp.equal_groups(R, 4)
    assert eq.dtype == torch.bool and eq.tolist() == [False, True]
    assert grp.keep_rows(~eq, 4).tolist() == [True] * 4 + [False] * 4
    # rows kept by the mask are exactly the rows of the groups with a non-zero advantage
    assert R[grp.keep_rows(~eq, 4)].tolist() == [1.0, 0.0, 0.0, 1.0]
    # near-equal float rewards: unequal by default, equal within atol
    r = torch.tensor([0.5, 0.5 + 1e-9, 1.0, 0.0], dtype=torch.float64)
    assert grp.equal_groups(r, 2).tolist() == [False, False]
    assert grp.equal_groups(r, 2, atol=1e-6).tolist() == [True, False]
    # every group of one is "equal"
    assert grp.equal_groups(torch.tensor([1.0, 2.0]), 1).tolist() == [True, True]


def test_k3_kl_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -0.7]])
    ref = torch.tensor([[-1.5, -1.0, -0.7]])
    # k3 = exp(ref - lp) - (ref - lp) - 1:
    # ref - lp = -.5 -> exp(-.5) + .5 - 1 = .606531 - .5 = 0.106531
    # ref - lp = 1   -> e - 1 - 1 = 0.718282;  equal log-probs -> 0
    close(grp.k3_kl(lp, ref), [[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    close(grp.k3_kl(lp, ref), [[0.106531, 0.718282, 0.0]], tol=1e-6)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    assert (grp.k3_kl(a, b) >= 0).all()


def test_k3_kl_is_unbiased():
    # sampling x ~ p: E_p[q/p - log(q/p) - 1] = sum q - 1 + sum p log(p/q) = KL(p || q), taken exactly
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = (p * (p / q).log()).sum()
    close((p * grp.k3_kl(p.log(), q.log())).sum(), expected, tol=1e-12)


def test_clipped_objective_asymmetric_clip():
    # clip_low .2, clip_high .28: ratio kept in [0.8, 1.28]; L = -min(ratio A, clip(ratio) A)
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.25]])
    A = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    old = torch.full_like(ratio, -2.0)
    lp = (old + ratio.log()).requires_grad_()
    loss, clipped = grp.clipped_objective(lp, old, A, 0.2, 0.28)
    # ratio 1.5, A = +1: -min(1.5, 1.28) = -1.28, clipped (no incentive to push further up)
    # ratio 1.5, A = -1: -min(-1.5, -1.28) = 1.5, not clipped (the bad token is still pushed down)
    # ratio 0.5, A = -1: -min(-.5, -.8) = .8, clipped
    # ratio 0.5, A = +1: -min(.5, .8) = -.5, not clipped
    # ratio 1.25, A = +1: inside [.8, 1.28] -> -1.25, not clipped (a symmetric .2 clip would give -1.2)
    close(loss, [[-1.28, 1.5, 0.8, -0.5, -1.25]], tol=1e-6)
    assert clipped.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]
    # gradient: 0 where clipped; dL/dlogp = -A ratio elsewhere
    loss.sum().backward()
    close(lp.grad, [[0.0, 1.5, 0.0, -0.5, -1.25]], tol=1e-6)
    # the symmetric clip of PPO is the special case clip_low = clip_high
    sym, _ = grp.clipped_objective(lp.detach(), old, A, 0.2, 0.2)
    close(sym[0, 4], -1.2, tol=1e-6)


# per-token values (3 rows, T = 4) on an uneven mask: 4, 2 and 1 tokens; padding holds 100s that must not leak
X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0], [7.0, 100.0, 100.0, 100.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregate_by_hand():
    # row token sums 10, 11, 7 (28 in all, over 7 tokens); row token means 2.5, 5.5, 7
    # GRPO: mean over rows of row means = (2.5 + 5.5 + 7) / 3 = 5
    close(grp.aggregate(X, M, "seq_mean_token_mean"), 5.0)
    # DAPO: token sum / tokens = 28 / 7 = 4
    close(grp.aggregate(X, M, "token_mean"), 4.0)
    # Dr. GRPO: token sum / (rows * max_len) = 28 / (3 * 4) = 2.333333; with a budget of 8: 28 / 24
    close(grp.aggregate(X, M, "seq_mean_token_sum_norm", max_len=4), 28 / 12)
    close(grp.aggregate(X, M, "seq_mean_token_sum_norm", max_len=8), 28 / 24)


def test_aggregate_weights_tokens_as_the_papers_do():
    # d aggregate / d x_it: GRPO 1 / (rows * |o_i|), DAPO 1 / tokens, Dr. GRPO 1 / (rows * max_len)
    x = X.clone().requires_grad_()
    for mode, expected in (("seq_mean_token_mean", [1 / 12, 1 / 6, 1 / 3]), ("token_mean", [1 / 7] * 3),
                           ("seq_mean_token_sum_norm", [1 / 24] * 3)):
        x.grad = None
        grp.aggregate(x, M, mode, max_len=8).backward()
        close(x.grad, M * torch.tensor(expected)[:, None])


@pytest.mark.parametrize("mode", grp.AGG_MODES)
def test_aggregate_parts_sum_to_the_whole(mode):
    # hand example: rows {0} and {1, 2}, totals rows 3, tokens 7
    whole = grp.aggregate(X, M, mode, max_len=4)
    parts = [grp.aggregate(X[i], M[i], mode, max_len=4, total_rows=3, total_tokens=7) for i in ([0], [1, 2])]
    close(sum(parts), whole)
    if mode == "token_mean":  # 10 / 7 + 18 / 7
        close(parts[0], 10 / 7)
    if mode == "seq_mean_token_mean":  # 2.5 / 3 + (5.5 + 7) / 3
        close(parts[0], 2.5 / 3)
    # random batch, uneven split into 3 parts, totals as tensors; the gradients add up as well
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1, 2, 3])
    m = (torch.arange(6)[None, :] < lengths[:, None]).double()
    whole = grp.aggregate(x, m, mode, max_len=6)
    (g_whole,) = torch.autograd.grad(whole, x)
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 10)):
        total = total + grp.aggregate(x[rows], m[rows], mode, max_len=6, total_rows=torch.tensor(10),
                                      total_tokens=m.sum())
    (g_parts,) = torch.autograd.grad(total, x)
    close(total, whole, tol=1e-12)
    close(g_parts, g_whole, tol=1e-12)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown aggregation"):
        grp.aggregate(X, M, "sum")
    with pytest.raises(ValueError, match="max_len"):
        grp.aggregate(X, M, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="both total_rows and total_tokens"):
        grp.aggregate(X, M, "token_mean", total_tokens=7)


def test_default_aggregation_per_algorithm():
    assert set(grp.DEFAULT_AGG) == set(grp.ALGOS)
    assert set(grp.DEFAULT_AGG.values()) <= set(grp.AGG_MODES)
    assert grp.DEFAULT_AGG["grpo"] == "seq_mean_token_mean"
    assert grp.DEFAULT_AGG["dr_grpo"] == "seq_mean_token_sum_norm"
