"""KV-cache decoding: token-for-token equal to transformers' generate on the exported model.

For GPT (gpt2 and llama styles) and T5, greedy decoding of a batch of prompts of different
lengths (left padding) must give exactly the tokens of `transformers` generate(do_sample=False)
on the same weights exported with llmstack.models.hf, with and without our KV cache, and with
stop tokens and a repetition penalty. Sampling filters are checked against transformers' warpers.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from llmstack import models
from llmstack.generate import apply_repetition_penalty, generate, sample, top_k_filter, top_p_filter
from llmstack.models import hf

V = 96
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [20, 21, 22, 23, 24, 25], [30]]
ARCHS = {
    "gpt2": ("gpt", "gpt2-tiny", dict(n_layer=2, n_head=4, d_model=32, max_seq_len=64)),
    "llama": ("gpt", "llama-tiny", dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)),
    # (transformers 5's T5 cache is sized by the encoder's layer count: equal stacks here)
    "t5": ("t5", "t5-tiny", dict(n_layer=2, n_head=4, d_model=32, d_ff=48)),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, tmp_path_factory):
    """(ours, theirs, family): a perturbed tiny model and its export loaded in transformers."""
    family, preset, kw = ARCHS[request.param]
    cfg = models.build_config(family, preset, V, **kw)
    torch.manual_seed(0)
    ours = models.build_model(family, cfg)
    ours.init_weights()
    with torch.no_grad():  # large perturbations: varied, non-repetitive greedy continuations
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours.eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(family, cfg, dict(ours.state_dict()), d, pad_id=0, bos_id=1, eos_id=2)
    auto = tf.AutoModelForSeq2SeqLM if family == "t5" else tf.AutoModelForCausalLM
    return ours, auto.from_pretrained(d).eval(), family


def hf_generate(theirs, family, prompts, max_new_tokens, stop=None, **kw):
    """transformers' greedy generate on left-padded prompts; the new tokens of each row, cut
    after the stop token as ours are."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=stop, pad_token_id=0, **kw)
    new = out[:, L:] if family == "gpt" else out[:, 1:]  # T5 output starts with the decoder start token
    rows = []
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == stop), len(row)) if stop is not None else len(row)
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_greedy_equals_transformers_generate(pair, use_cache):
    ours, theirs, family = pair
    got = generate(ours, PROMPTS, max_new_tokens=16, use_cache=use_cache)
    want = hf_generate(theirs, family, PROMPTS, 16)
    assert got == want
    assert len({tuple(r) for r in got}) == len(got), "continuations should differ (a meaningful check)"


def test_stop_token_ends_rows_early(pair):
    ours, theirs, family = pair
    free = generate(ours, PROMPTS, max_new_tokens=12)
    stop = free[0][3]  # a token the first row emits: it must end that row there
    got = generate(ours, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    assert got[0] == free[0][:4]
    assert all(len(r) <= 12 and (r[-1] == stop or len(r) == 12) for r in got)
    assert got == hf_generate(theirs, family, PROMPTS, 12, stop=stop)
    assert got == generate(ours, PROMPTS, max_new_tokens=12, stop_ids=[stop], use_cache=False)


def test_repetition_penalty_equals_transformers(pair):
    ours, theirs, family = pair
    prompts = [PROMPTS[0]]  # unpadded: transformers also penalises pad ids present in a padded context
    got = generate(ours, prompts, max_new_tokens=16, repetition_penalty=1.8)
    assert got == hf_generate(theirs, family, prompts, 16, repetition_penalty=1.8)
    assert got != generate(ours, prompts, max_new_tokens=16)


def test_padded_batch_equals_each_prompt_alone(pair):
    ours, _, _ = pair
    batch = generate(ours, PROMPTS, max_new_tokens=10)
    assert batch == [generate(ours, [p], max_new_tokens=10)[0] for p in PROMPTS]


def test_sampling_is_seeded_and_respects_top_k(pair):
    ours, _, _ = pair
    run = lambda seed, **kw: generate(ours, PROMPTS, max_new_tokens=8, temperature=1.0,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed), **kw)
    assert run(1) == run(1) and run(1) != run(2)
    greedy = generate(ours, PROMPTS, max_new_tokens=8)
    assert run(3, top_k=1) == greedy  # top-1 sampling is greedy
    assert run(4, top_p=1e-6) == greedy  # so is a vanishing nucleus


def test_sample_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    n = 200_000
    draws = sample(probs.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens, the last one included, never drawn
    # 4.5 standard errors of a binomial proportion: fails for a biased sampler, not by chance
    assert torch.all((freq - probs.double()).abs() <= 4.5 * (probs.double() * (1 - probs.double()) / n).sqrt())
    # unnormalised rows and one-hot rows
    assert sample(torch.tensor([[0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])).tolist() == [2, 0]


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 7), generator=g)
    for k in (1, 5, 49):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        ours, theirs = top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(ours.isinf(), theirs.isinf()), p
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_bad_arguments():
    cfg = models.build_config("gpt", "gpt2-tiny", V, n_layer=1, d_model=32, max_seq_len=16)
    m = models.build_model("gpt", cfg).eval()
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        generate(m, [[1] * 10], max_new_tokens=7)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[]], max_new_tokens=2)
    bert = models.build_model("bert", models.build_config("bert", "bert-tiny", V, n_layer=1, d_model=32))
    with pytest.raises(TypeError, match="GPT and T5"):
        generate(bert, [[1]], max_new_tokens=2)
