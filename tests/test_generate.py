"""KV-cache decoding: token-for-token equal to transformers' generate on the exported model.

For GPT (gpt2 and llama styles) and T5, greedy decoding of a batch of prompts of different
lengths (left padding) must give exactly the tokens of `transformers` generate(do_sample=False)
on the same weights exported with llmstack.models.hf, with and without our KV cache, and with
stop tokens and a repetition penalty. Sampling filters are checked against transformers' warpers.
"""

from __future__ import annotations

import copy

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
    with pytest.raises(TypeError, match="GPT, T5 and model.backend=hf models, not Bert"):
        generate(bert, [[1]], max_new_tokens=2)


# -- device, dtype, sampling generator (llmstack generate --device / --dtype) -----------------


def _bf16_copy(model):
    from llmstack.generate import place_model

    return place_model(copy.deepcopy(model), torch.device("cpu"), torch.bfloat16)


def _greedy_reference(model, family, prompt, n):
    """Greedy tokens from the model's plain forward over the whole sequence, one prompt alone:
    the reference that cached, batched decoding must reproduce (logits upcast before argmax)."""
    ids, out = torch.tensor([prompt]), []
    dec = torch.zeros(1, 1, dtype=torch.long)  # T5's decoder start (pad id 0)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(ids) if family == "gpt" else model(ids, decoder_input_ids=dec)
            tok = int(logits[0, -1].float().argmax())
            out.append(tok)
            if family == "gpt":
                ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
            else:
                dec = torch.cat([dec, torch.tensor([[tok]])], dim=1)
    return out


def test_bf16_greedy_equals_direct_bf16_reference(pair):
    """In bf16 on CPU: weights and KV cache in bf16, and batched KV-cache decoding gives the bf16
    model's own full-forward greedy tokens, token for token (GPT; for gpt2 also transformers'
    generate in bf16). T5 with these perturbed weights has bf16 logit ties (margins of one bf16
    ulp, measured), where cached and uncached products round differently: only its first token,
    whose margins are wide, is compared there."""
    ours, theirs, family = pair
    b16 = _bf16_copy(ours)
    assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
    cache = b16.new_cache(2, 8)
    assert (cache.self_attn if family == "t5" else cache).k[0].dtype == torch.bfloat16
    got = generate(b16, PROMPTS, max_new_tokens=16)
    ref = [_greedy_reference(b16, family, p, 16) for p in PROMPTS]
    assert all(len(r) == 16 for r in got)
    if family == "t5":
        assert [r[0] for r in got] == [r[0] for r in ref]
        return
    assert got == ref
    with torch.inference_mode():  # the model really computes in bf16 (its logits differ from fp32's)
        ids = torch.tensor([PROMPTS[0]])
        assert b16(ids).dtype == torch.bfloat16 and not torch.equal(b16(ids).float(), ours(ids))
    if type(theirs).__name__ == "GPT2LMHeadModel":
        assert got == hf_generate(copy.deepcopy(theirs).to(torch.bfloat16), family, PROMPTS, 16)


def test_place_model_casts_weights_and_keeps_fp32_buffers():
    """Parameters take the dtype; floating buffers (position tables) are moved but stay fp32, so a
    cast cannot round positions; non-float buffers are untouched."""
    from llmstack.generate import place_model

    m = torch.nn.Linear(4, 4)
    m.register_buffer("table", torch.linspace(0, 1000, 7))
    m.register_buffer("steps", torch.arange(3))
    place_model(m, torch.device("cpu"), torch.bfloat16)
    assert m.weight.dtype == m.bias.dtype == torch.bfloat16
    assert m.table.dtype == torch.float32 and torch.equal(m.table, torch.linspace(0, 1000, 7))
    assert m.steps.dtype == torch.long
    cfg = models.build_config("gpt", "llama-tiny", V, n_layer=1, n_head=4, d_model=32, max_seq_len=64)
    g = place_model(models.build_model("gpt", cfg).eval(), torch.device("cpu"), torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in g.buffers() if b.is_floating_point())


def test_resolve_placement(monkeypatch):
    from llmstack.errors import UsageError
    from llmstack.generate import resolve_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UsageError, match="--device cuda: no CUDA device is available"):
        resolve_placement("cuda", "auto")
    with pytest.raises(UsageError, match="--dtype fp16 needs a CUDA device"):
        resolve_placement("cpu", "fp16")
    with pytest.raises(UsageError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_placement("gpu", "auto")
    with pytest.raises(UsageError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_placement("cpu:1", "auto")
    with pytest.raises(UsageError, match="--dtype int8"):
        resolve_placement("cpu", "int8")
    # with (pretended) GPUs: auto and cuda are this process's GPU (LOCAL_RANK), in bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_placement("auto", "auto") == (torch.device("cuda", 1), torch.bfloat16)
    assert resolve_placement("cuda:0", "fp16") == (torch.device("cuda", 0), torch.float16)
    assert resolve_placement("cuda", "fp32") == (torch.device("cuda", 1), torch.float32)
    assert resolve_placement("cpu", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(UsageError, match="cuda:2 does not exist"):
        resolve_placement("cuda:2", "auto")


def test_sampling_generator_is_on_the_model_device(pair):
    """The generator is made on the given device and, on CPU, draws exactly what the former
    torch.Generator().manual_seed(seed) drew (seeded CPU results unchanged)."""
    from llmstack.generate import sampling_generator

    ours, _, _ = pair
    dev = next(ours.parameters()).device
    g = sampling_generator(dev, 7)
    assert g.device == dev and g.device.type == "cpu"
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=torch.Generator().manual_seed(7)))
    run = lambda gen: generate(ours, PROMPTS, max_new_tokens=8, temperature=1.0, generator=gen)  # noqa: E731
    assert run(sampling_generator(dev, 3)) == run(torch.Generator().manual_seed(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_matches_cpu(pair):
    """On a GPU: fp32 logits equal the CPU's within 1e-4 and greedy tokens agree; bf16 runs with
    its KV cache on the GPU; sampling needs (and gets) a CUDA generator, seeded reproducibly."""
    from llmstack.generate import place_model, sampling_generator

    ours, _, family = pair
    cuda = torch.device("cuda", 0)
    on_gpu = place_model(copy.deepcopy(ours), cuda, torch.float32)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        args = (ids,) if family == "gpt" else (ids, torch.zeros(1, 1, dtype=torch.long))
        want = ours(*args)
        got = on_gpu(*(a.to(cuda) for a in args)).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert generate(on_gpu, PROMPTS, max_new_tokens=16) == generate(ours, PROMPTS, max_new_tokens=16)
    b16 = place_model(copy.deepcopy(ours), cuda, torch.bfloat16)
    out = generate(b16, PROMPTS, max_new_tokens=8)
    assert all(len(r) == 8 for r in out)
    run = lambda seed: generate(b16, PROMPTS, max_new_tokens=8, temperature=1.0,  # noqa: E731
                                generator=sampling_generator(cuda, seed))
    assert run(1) == run(1)
    with pytest.raises(ValueError, match="sampling generator is on cpu"):
        generate(b16, PROMPTS, max_new_tokens=2, temperature=1.0, generator=torch.Generator().manual_seed(0))


def test_cli_bf16_greedy_equals_reference(eval_model, capsys):
    """`llmstack generate --dtype bf16 --temperature 0` on a trained checkpoint prints the bf16
    model's own greedy continuation (full forward, no cache), token for token."""
    from llmstack.cli import main
    from llmstack.train.weights import load_for_inference

    ckpt, prompts, n = str(eval_model["checkpoint"]), ["def ", "Return the"], 12
    args = ["generate", ckpt, "--max-new-tokens", str(n), "--temperature", "0", "--dtype", "bf16", "--device", "cpu"]
    assert main([*args, *(x for p in prompts for x in ("--prompt", p))]) == 0
    printed = capsys.readouterr().out
    printed = printed[printed.index("--- prompt:"):]  # (after the ZeRO checkpoint's consolidation log)
    model, tok, _ = load_for_inference(ckpt)
    model = model.to(torch.bfloat16)  # a plain cast: the reference
    want = ""
    for p in prompts:
        new = _greedy_reference(model, "gpt", [tok.eos_id, *tok.encode(p)], n)
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
        assert len(new) > 3  # tokens were produced
        want += f"--- prompt: {p!r}\n{p}{tok.decode(new)}\n"
    assert printed == want


def test_cli_device_and_dtype_errors_exit_2(eval_model, tmp_path):
    """--dtype fp16 on CPU is refused (it runs, slower than fp32, with no gain over bf16), and so
    is --device cuda without a GPU: exit 2, one line, no traceback."""
    import sys

    from tests.conftest import run_cmd

    ckpt = str(eval_model["checkpoint"])
    cases = [(["--device", "cpu", "--dtype", "fp16"], "error: --dtype fp16 needs a CUDA device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "error: --device cuda: no CUDA device is available"))
    for extra, needle in cases:
        proc = run_cmd([sys.executable, "-m", "llmstack", "generate", ckpt, "--prompt", "x", *extra], cwd=tmp_path,
                       check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(needle), (extra, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    help_ = run_cmd([sys.executable, "-m", "llmstack", "generate", "--help"], cwd=tmp_path).stdout
    assert "--device {auto,cpu,cuda,cuda:N}" in help_ and "--dtype {auto,fp32,bf16,fp16}" in help_
