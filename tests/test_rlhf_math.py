"""RLHF math against hand-computed values; rollout log-probs against fresh unpadded forwards.

Each expected value is worked out from the written formula in the comment above it, on tensors
small enough to do by hand, so a sign error, an off-by-one or a padding leak shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmstack.models.gpt import GPT, GPTConfig
from llmstack.models.heads import PolicyLM, ScalarHeadModel, last_token_index
from llmstack.rlhf import advantages as adv
from llmstack.rlhf import losses, rollout


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=0)


def test_gae_by_hand():
    # delta_j = r_j + gamma V_{j+1} - V_j (V after the last token = 0); A_j = delta_j + gamma lam A_{j+1}
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after 2 tokens
    a, ret = adv.gae(rewards, values, mask, g, lam)
    # row 0: A2 = 2 - 0.1 = 1.9; A1 = (0 + .9*.1 - .2) + .72*1.9 = 1.258; A0 = (1 + .9*.2 - .5) + .72*1.258
    a00 = (1 + g * 0.2 - 0.5) + g * lam * ((0 + g * 0.1 - 0.2) + g * lam * 1.9)
    # row 1 (the padded 7.0 / 9.0 must not leak): A1 = 1 - 0.4 = 0.6; A0 = (0.5 + .9*.4 - .3) + .72*.6
    a10 = (0.5 + g * 0.4 - 0.3) + g * lam * 0.6
    close(a, [[a00, 1.258, 1.9], [a10, 0.6, 0.0]])
    close(a00, 1.58576)
    # returns = A + V on real tokens
    close(ret, [[a00 + 0.5, 1.258 + 0.2, 2.0], [a10 + 0.3, 1.0, 0.0]])


def test_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # mean 2, unbiased var ((1-2)^2 + 0 + (3-2)^2) / (3-1) = 1 -> (x - 2) / 1; padding -> 0
    close(adv.whiten(x, mask), [-1.0, 0.0, 1.0, 0.0], tol=1e-6)
    close(adv.whiten(x, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0], tol=1e-6)


def test_kl_penalty_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    score = torch.tensor([3.0])
    # k1: KL_j = lp - ref = [0.5, -1.0, (pad)]; r_j = -0.1 KL_j, + score on the last real token (j = 1)
    rewards, kl = adv.penalized_rewards(score, lp, ref, mask, kl_coef=0.1, kind="k1")
    close(kl, [[0.5, -1.0, 0.0]])
    close(rewards, [[-0.05, 0.1 + 3.0, 0.0]])
    # k3: (exp(ref - lp) - 1) - (ref - lp)
    _, kl3 = adv.penalized_rewards(score, lp, ref, mask, kl_coef=0.1, kind="k3")
    close(kl3, [[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]])


def test_adaptive_kl_by_hand():
    # e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    ctl = adv.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    close(ctl.update(9.0, 256), 0.2 * (1 + 0.2 * 256 / 10000))  # error 0.5 clipped to 0.2
    v = ctl.value
    close(ctl.update(5.4, 100), v * (1 + (5.4 / 6 - 1) * 100 / 10000))  # error -0.1
    fixed = adv.AdaptiveKLController(0.2, target=None)
    assert fixed.update(100.0, 1000) == 0.2


def test_running_moments_and_score_normalisation():
    m = adv.RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([4.0, 5.0]))
    close(m.mean, 3.0)
    close(m.var, 2.0)  # population variance of 1..5
    close(adv.normalize_scores(torch.tensor([3.0 + 2 * math.sqrt(2)]), m, clip=None), [2.0])
    close(adv.normalize_scores(torch.tensor([100.0, -1.0]), None, clip=5.0), [5.0, -1.0])


def test_policy_loss_by_hand():
    lp = torch.tensor([[-1.0, -0.5, 3.0]])
    old = torch.tensor([[-1.2, -0.4, 0.0]])
    a = torch.tensor([[2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = losses.policy_loss(lp, old, a, mask, clip_eps=0.1)
    # token 0: ratio e^0.2 = 1.2214; -A*ratio = -2.4428, -A*clip = -2*1.1 = -2.2 -> max -2.2 (clipped)
    # token 1: ratio e^-0.1 = 0.9048 (inside [0.9, 1.1]) -> -A*ratio = +0.9048 both ways
    close(loss, (-2.2 + math.exp(-0.1)) / 2)
    close(stats["clipfrac"], 0.5)
    close(stats["approx_kl"], 0.5 * (0.2**2 + 0.1**2) / 2)
    # gradient flows through the unclipped token only: d/dlp1 of (A1 ratio)*(-1)/2 = 0.5 e^-0.1
    lp.requires_grad_(True)
    losses.policy_loss(lp, old, a, mask, clip_eps=0.1)[0].backward()
    close(lp.grad, [[0.0, 0.5 * math.exp(-0.1), 0.0]])


def test_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.5, 0.2, 0.0]])
    ret = torch.tensor([[2.0, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = losses.value_loss(v, old, ret, mask, clip_eps=0.2)
    # token 0: V_clip = 0.5 + 0.2 = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69
    # token 1: V_clip = 0.2 - 0.2 = 0.0 = V; (0-0.1)^2 = 0.01 -> 0.01
    close(loss, 0.5 * (1.69 + 0.01) / 2)
    close(stats["value_clipfrac"], 0.5)


def test_entropy_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    h = losses.entropy_from_logits(torch.tensor([[0.0, math.log(3.0)]]))
    close(h, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_pairwise_and_dpo_losses_by_hand():
    # Bradley-Terry: mean(log(1 + exp(-(rc - rr - m))))
    bt = losses.pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), margin=0.5)
    close(bt, (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2)
    # DPO: z = beta ((pi_c - ref_c) - (pi_r - ref_r)) = 0.1 ((-10 + 11) - (-12 + 11)) = 0.2
    args = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    loss, stats = losses.dpo_loss(*args, beta=0.1)
    close(loss, math.log1p(math.exp(-0.2)))
    close(stats["reward_margin"], 0.2)
    close(stats["chosen_reward"], 0.1)
    close(stats["rejected_reward"], -0.1)
    # label smoothing s: (1 - s) (-log sig(z)) + s (-log sig(-z))
    ls, _ = losses.dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    close(ls, 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))


# ---------------------------------------------------------------------------------------------
# Rollout log-probs / values / scores against fresh, unpadded, one-row forwards
# ---------------------------------------------------------------------------------------------

ARCHS = {"gpt2": dict(pos="learned", norm="layernorm", mlp="gelu"),
         "llama": dict(pos="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rollout_logprobs_match_fresh_forward(arch):
    from llmstack.generate import generate

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64, **ARCHS[arch])
    model = PolicyLM(cfg)
    model.init_weights()
    model.eval()
    critic = ScalarHeadModel(cfg)
    critic.init_weights()
    critic.eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    stop = 3  # a frequent-enough token so some rows stop early
    for seed in range(1, 50):  # the first seeded batch in which some row stops early: uneven lengths
        gen = torch.Generator().manual_seed(seed)
        responses = generate(model, prompts, max_new_tokens=12, temperature=1.5, stop_ids=[stop], pad_id=0,
                             generator=gen)
        if len({len(r) for r in responses}) > 1:
            break
    assert len({len(r) for r in responses}) > 1 and any(r[-1] == stop for r in responses)
    batch = rollout.pack(prompts, responses, pad_id=0)
    P = batch["prompt_len"]
    with torch.no_grad():
        lp, ent = rollout.response_logprobs(model, batch["ids"], batch["valid"], P, with_entropy=True)
        lp_t, _ = rollout.response_logprobs(model, batch["ids"], batch["valid"], P, temperature=1.5)
        vals = rollout.response_values(critic, batch["ids"], batch["valid"], P)
        score = rollout.scores(critic, batch["ids"], batch["valid"])
    mask = batch["response_mask"]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert mask[i].sum() == len(r)
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logits = GPT.forward(model, seq)[0].float()  # plain GPT logits (T, V), no padding anywhere
            v = critic(seq)[0]
        # response token j sits at column len(p) + j and is predicted by column len(p) - 1 + j
        idx = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        ref = torch.log_softmax(logits[idx], -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        ref_t = torch.log_softmax(logits[idx] / 1.5, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        ref_ent = losses.entropy_from_logits(logits[idx])
        torch.testing.assert_close(lp[i, :len(r)], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp_t[i, :len(r)], ref_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent[i, :len(r)], ref_ent, atol=1e-5, rtol=0)
        torch.testing.assert_close(vals[i, :len(r)], v[idx], atol=1e-5, rtol=0)
        torch.testing.assert_close(score[i], v[-1], atol=1e-5, rtol=0)


def test_sequence_logprobs_right_padded():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    model = PolicyLM(cfg)
    model.init_weights()
    rows = [[4, 5, 6, 7, 8], [9, 10, 11]]
    labels_from = [3, 1]  # response starts at this column
    ids = torch.zeros(2, 5, dtype=torch.long)
    lab = torch.zeros(2, 5)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, labels_from[i]:len(r)] = 1
    with torch.no_grad():
        got = rollout.sequence_logprobs(model, ids, lab)
        for i, r in enumerate(rows):
            logp = torch.log_softmax(GPT.forward(model, torch.tensor([r]))[0], -1)
            want = sum(logp[t - 1, r[t]] for t in range(labels_from[i], len(r)))
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def test_last_token_index_any_padding():
    valid = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert last_token_index(valid).tolist() == [3, 4, 0]


def test_unreduced_losses_average_to_the_reduced_ones():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(5, generator=g) for _ in range(4))
    close(losses.pairwise_loss(a, b, 0.3, reduce=False).mean(), losses.pairwise_loss(a, b, 0.3))
    per, st = losses.dpo_loss(a, b, c, d, 0.2, 0.1, reduce=False)
    mean, st_mean = losses.dpo_loss(a, b, c, d, 0.2, 0.1)
    assert per.shape == (5,)
    close(per.mean(), mean)
    for k in st:
        close(st[k].mean(), st_mean[k])
