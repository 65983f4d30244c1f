"""Packed documents and padding as segment ids (B, T): equal to the dense (B, 1, T, T) mask
reference, and no such tensor in any training path.

The dense reference is the model's `attn_mask` input (kept for tests, eval's shared-prefix rows
and decoding's key-padding mask); every training path now passes `segment_ids`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.objectives import sft_collate
from llmstack.models.gpt import GPT, gpt_config_from_preset
from llmstack.models.heads import PolicyLM, ScalarHeadModel
from llmstack.models.layers import SegmentPlan, alibi_slopes, causal_padding_mask, segments_from_valid
from llmstack.rlhf import rollout

V = 97
T = 48  # distinct from every other dimension below, so a (.., T, T) tensor is recognisable


def dense_mask(seg: torch.Tensor) -> torch.Tensor:
    """The reference: (B, 1, T, T) causal and same-segment."""
    n = seg.shape[1]
    return ((seg[:, :, None] == seg[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril())[:, None]


def doc_positions(seg: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros_like(seg)
    for b in range(seg.shape[0]):
        seen: dict[int, int] = {}
        for t, s in enumerate(seg[b].tolist()):
            pos[b, t] = seen.get(s, 0)
            seen[s] = pos[b, t].item() + 1
    return pos


def packed_segments(B: int, seed: int) -> torch.Tensor:
    """Rows of several documents (lengths 1..20) ending in a run of padding (-1)."""
    rng = np.random.default_rng(seed)
    seg = np.full((B, T), -1)
    for b in range(B):
        t, d = 0, 0
        while t < T - 6:
            n = int(rng.integers(1, 21))
            seg[b, t:t + n] = d
            t, d = t + n, d + 1
        seg[b, T - 3:] = -1
    return torch.from_numpy(seg)


def model(cls=GPT, preset="gpt2-tiny", **kw):
    torch.manual_seed(0)
    m = cls(gpt_config_from_preset(preset, V, n_layer=2, d_model=32, n_head=4, max_seq_len=64, **kw))
    m.init_weights()
    return m


ARCHS = {
    "gpt2": dict(),
    "llama-gqa": dict(preset="llama-tiny", n_kv_head=2),
    "sliding": dict(attn_pattern="sliding", attn_window=5),
    "strided": dict(attn_pattern="strided", attn_block=4),
    "alibi": dict(pos="alibi"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_pretraining_equals_dense_reference(arch, dtype):
    """Logits, loss and gradients with segment ids equal the dense-mask reference (fp32 1e-5)."""
    m = model(**ARCHS[arch]).to(dtype)
    seg = packed_segments(3, seed=1)
    pos = doc_positions(seg)
    ids = torch.randint(0, V, seg.shape, generator=torch.Generator().manual_seed(2))
    labels = ids.masked_fill(seg < 0, -100)
    real = seg >= 0
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    with torch.no_grad():
        ref = m(ids, position_ids=pos, attn_mask=dense_mask(seg))
        out = m(ids, position_ids=pos, segment_ids=seg)
    torch.testing.assert_close(out[real].float(), ref[real].float(), **tol)
    grads = []
    for kw in (dict(attn_mask=dense_mask(seg)), dict(segment_ids=seg)):
        m.zero_grad()
        loss = m(ids, labels=labels, position_ids=pos, **kw)
        loss.backward()
        grads.append((loss.detach().float(), [p.grad.float().clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_sft_packing_equals_dense_reference():
    rng = np.random.default_rng(0)
    convs = [(rng.integers(0, V, n), rng.integers(0, V, n)) for n in (7, 12, 3, 20, 9, 5)]
    batch = {k: torch.from_numpy(v) for k, v in sft_collate([convs[:3], convs[3:]], pad_id=0, length=T).items()}
    assert "attn_mask" not in batch and batch["segment_ids"].shape == (2, T)
    m = model(preset="llama-tiny", n_kv_head=2)
    ids, labels, pos, seg = batch["input_ids"], batch["labels"], batch["position_ids"], batch["segment_ids"]
    ref = m(ids, labels=labels, position_ids=pos, attn_mask=dense_mask(seg))
    out = m(ids, labels=labels, position_ids=pos, segment_ids=seg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def left_padded_batch(seed=0):
    """Prompts left-padded to P, responses right-padded after their stop (PPO/RM/eval rows)."""
    g = torch.Generator().manual_seed(seed)
    B, P = 4, 20
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, (lp, lr) in enumerate([(20, 28), (5, 10), (12, 28), (1, 3)]):
        valid[b, P - lp:P + lr] = True
    return torch.randint(0, V, (B, T), generator=g), valid, P


def test_left_padded_rlhf_and_eval_equal_dense_reference():
    ids, valid, P = left_padded_batch()
    pos, seg = rollout.model_inputs(valid)
    assert seg is not None and seg.shape == ids.shape
    ref_mask = causal_padding_mask(valid)
    policy = model(PolicyLM, preset="llama-tiny", n_kv_head=2)
    lp, _ = rollout.response_logprobs(policy, ids, valid, P)
    h_ref = policy.hidden_states(ids, pos, ref_mask)
    h = policy.hidden_states(ids, pos, segment_ids=seg)
    torch.testing.assert_close(h[valid], h_ref[valid], rtol=0, atol=1e-5)
    # the log-probs the stages use, against logits from the dense reference
    logits = policy.lm_head(h_ref[:, P - 1:-1]).float()
    lp_dense = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
    resp = valid[:, P:]
    torch.testing.assert_close(lp[resp], lp_dense[resp], rtol=0, atol=1e-5)
    # critic values and reward-model scores (ScalarHeadModel)
    scalar = model(ScalarHeadModel, preset="llama-tiny", n_kv_head=2)
    ref_vals = scalar.head(scalar.backbone.hidden_states(ids, pos, ref_mask)).squeeze(-1).float()
    torch.testing.assert_close(rollout.response_values(scalar, ids, valid, P)[resp], ref_vals[:, P - 1:-1][resp],
                               rtol=0, atol=1e-5)
    last = valid.long().cumsum(-1).argmax(-1)
    torch.testing.assert_close(rollout.scores(scalar, ids, valid), ref_vals[torch.arange(4), last], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_mask_equals_gathering():
    """The CUDA path's block mask (FlexAttention, run eagerly here without gradients) attends
    exactly as the gathering path: documents, padding, sliding window, ALiBi, GQA."""
    g = torch.Generator().manual_seed(0)
    seg = packed_segments(2, seed=3)
    q = torch.randn(2, 4, T, 16, generator=g)
    k, v = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
    for kw in (dict(), dict(pattern="sliding", window=6), dict(alibi=alibi_slopes(4))):
        gathered = SegmentPlan(seg, use_flex=False, **kw).attend(q, k, v)
        with torch.no_grad():
            flex = SegmentPlan(seg, use_flex=True, **kw).attend(q, k, v)
        torch.testing.assert_close(flex, gathered, rtol=0, atol=1e-5)


def test_single_document_rows_take_the_causal_kernel():
    """One segment per row (or none): no plan, SDPA's causal kernel; segments_from_valid of a
    right-padded-only batch is still one plan (padding is its own segment)."""
    from llmstack.models.layers import plan_segments

    assert plan_segments(torch.zeros(2, T, dtype=torch.long)) is None
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, 40:] = False
    assert isinstance(plan_segments(segments_from_valid(valid)), SegmentPlan)


class SquareWatch(TorchDispatchMode):
    """Records every op whose output has two trailing dimensions equal to T: a (.., T, T) mask,
    bias or score tensor."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (T, T):
                self.hits.append(f"{func}: {tuple(t.shape)} {t.dtype}")
        return out


def test_no_dense_mask_in_training_paths():
    """Packed pretraining (the stream loader's batch), SFT packing and left-padded RLHF rows,
    forward and backward: no (.., T, T) tensor is ever made. The dense reference, under the same
    watch, is caught (the watch can fail)."""
    seg = packed_segments(3, seed=5)
    pos = doc_positions(seg)
    ids = torch.randint(0, V, seg.shape)
    m = model(preset="llama-tiny", n_kv_head=2)
    policy = model(PolicyLM, preset="llama-tiny", n_kv_head=2)
    scalar = model(ScalarHeadModel)
    lp_ids, valid, P = left_padded_batch()
    with SquareWatch() as watch:
        m(ids, labels=ids, position_ids=pos, segment_ids=seg).backward()
        lp, _ = rollout.response_logprobs(policy, lp_ids, valid, P)
        (lp.sum() + rollout.response_values(scalar, lp_ids, valid, P).sum()
         + rollout.scores(scalar, lp_ids, valid).sum()).backward()
    assert watch.hits == []
    with SquareWatch() as watch:
        m(ids, labels=ids, position_ids=pos, attn_mask=dense_mask(seg)).backward()
    assert watch.hits, "the watch must see the dense reference's mask"
