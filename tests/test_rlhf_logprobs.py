"""Chunked token log-probs (models/heads.py: PolicyLM.forward, token_logprobs) against the plain
(B, R, V) computation.

The plain path is `PlainPolicyLM.forward` below: full logits, fp32 log_softmax, gather. The chunked
path must give the same log-probs, entropies and gradients (of the policy loss and the entropy
bonus, with respect to every parameter) on left-padded rollout batches, with a temperature, for
any chunk size, including chunks of one row and chunks that do not divide the rows.
"""

from __future__ import annotations

import pytest
import torch

from llmstack.models.gpt import GPTConfig
from llmstack.models import heads
from llmstack.models.heads import PolicyLM, chunk_rows, token_logprobs
from llmstack.rlhf import rollout

V = 97


class PlainPolicyLM(PolicyLM):
    """The reference: every position's (B, T, V) logits, upcast, log_softmax, gather."""

    def forward(self, input_ids, position_ids=None, segment_ids=None, *, start=1, temperature=1.0, with_entropy=False):
        h = self.hidden_states(input_ids, position_ids, segment_ids=segment_ids)[:, start - 1:-1]
        logits = self.lm_head(h).float() / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, input_ids[:, start:, None]).squeeze(-1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if with_entropy else None)


def models(tie: bool):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, n_layer=2, n_head=4, d_model=32, max_seq_len=64, tie_embeddings=tie)
    plain = PlainPolicyLM(cfg)
    plain.init_weights()
    chunked = PolicyLM(cfg)
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def rollout_batch():
    # left-padded prompts of different lengths, right-padded responses of different lengths
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    responses = [[20, 21, 22, 3], [30, 31, 32, 33, 34, 35], [40]]
    return rollout.pack(prompts, responses, pad_id=0)


def loss_of(lp, ent, mask, adv):
    # a policy-gradient term and an entropy bonus: both outputs carry a gradient
    return -(lp * adv * mask).sum() / mask.sum() - 0.3 * (ent * mask).sum() / mask.sum()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elems", [V, 3 * V, 1 << 22])  # 1 row, 3 rows (uneven), all rows at once
def test_chunked_matches_plain_with_gradients(tie, temperature, chunk_elems, monkeypatch):
    monkeypatch.setitem(heads._CHUNK_ELEMS, "cpu", chunk_elems)
    plain, chunked = models(tie)
    b = rollout_batch()
    P, mask = b["prompt_len"], b["response_mask"]
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, m in (("plain", plain), ("chunked", chunked)):
        lp, ent = rollout.response_logprobs(m, b["ids"], b["valid"], P, temperature=temperature, with_entropy=True)
        loss_of(lp, ent, mask, adv).backward()
        out[name] = lp, ent, {n: p.grad.clone() for n, p in m.named_parameters()}
    (lp0, ent0, g0), (lp1, ent1, g1) = out["plain"], out["chunked"]
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=1e-6, rtol=1e-6)  # (about ln V = 4.6: fp32 sums in another order)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(float(g.abs().max()) > 0 for g in g1.values())


def test_logprobs_only_and_no_grad():
    plain, chunked = models(False)
    b = rollout_batch()
    P, mask = b["prompt_len"], b["response_mask"]
    with torch.no_grad():
        lp0, _ = plain(b["ids"], *rollout.model_inputs(b["valid"]), start=P)
        lp1, ent = chunked(b["ids"], *rollout.model_inputs(b["valid"]), start=P)
    assert ent is None and lp1.shape == mask.shape
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    # the policy loss alone (no entropy term): gradients as the plain path's
    for m in (plain, chunked):
        lp, _ = rollout.response_logprobs(m, b["ids"], b["valid"], P)
        (lp * mask).sum().backward()
    for (n, p0), (_, p1) in zip(plain.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_matches_plain_rounding():
    """In bf16 the chunked path rounds as the plain one (bf16 matmul, fp32 softmax): same values."""
    plain, chunked = models(False)
    plain, chunked = plain.bfloat16(), chunked.bfloat16()
    b = rollout_batch()
    with torch.no_grad():
        lp0, e0 = rollout.response_logprobs(plain, b["ids"], b["valid"], b["prompt_len"], with_entropy=True)
        lp1, e1 = rollout.response_logprobs(chunked, b["ids"], b["valid"], b["prompt_len"], with_entropy=True)
    assert lp1.dtype == torch.float32
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=0)


def test_weight_gradient_of_bare_function():
    """token_logprobs on its own (any leading shape): gradients of h and the weight by autograd's check."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (2, 3), generator=g)

    def f(h, w):
        lp, ent = token_logprobs(h, w, y, temperature=0.8, with_entropy=True, chunk_elems=14)  # 2-row chunks
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, w))


def test_chunk_rows_budget():
    cpu = torch.device("cpu")
    assert chunk_rows(10, 100, cpu, chunk_elems=300) == 3  # 4 chunks of at most 3 rows: 3, 3, 3, 1 -> 3
    assert chunk_rows(12, 100, cpu, chunk_elems=500) == 4  # 5 rows a chunk would leave 2: balanced to 4
    assert chunk_rows(5, 1000, cpu, chunk_elems=10) == 1  # never fewer than one row
    assert chunk_rows(7, 10, cpu, chunk_elems=10_000) == 7
