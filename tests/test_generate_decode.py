"""The decoding loop's device-side design (llmstack/generate.py): the shape-static GPT step that a
CUDA graph captures gives the eager step's tokens, is one graph with no host dependence (checked
on CPU by capturing it with torch.compile, fullgraph and no dynamic shapes, and replaying it at
every step), and the host reads the device only every `stop_check_every` steps.
"""

from __future__ import annotations

import pytest
import torch

from llmstack import generate as G
from llmstack import models
from llmstack.generate import generate

V = 96
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [20, 21, 22, 23, 24, 25], [30]]
ARCHS = {
    "gpt2": ("gpt2-tiny", dict(n_layer=2, n_head=4, d_model=32, max_seq_len=64)),
    "llama": ("llama-tiny", dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)),
}


def tiny(preset: str, **kw):
    """A tiny GPT with large random perturbations (varied greedy continuations), in eval mode."""
    cfg = models.build_config("gpt", preset, V, **kw)
    torch.manual_seed(0)
    m = models.build_model("gpt", cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request):
    preset, kw = ARCHS[request.param]
    return tiny(preset, **kw)


def free_tokens(m, prompts, n):
    return generate(m, prompts, max_new_tokens=n)


@pytest.mark.parametrize("prompts", [PROMPTS, [PROMPTS[2]] * 3], ids=["padded", "unpadded"])
def test_static_step_gives_the_eager_tokens(model, prompts):
    """Greedy, sampled (seeded, top-k, repetition penalty, with log-probs) and with a stop token:
    the static step and the eager one decode the same tokens (and log-probs to float rounding)."""
    assert generate(model, prompts, max_new_tokens=20, step="static") == free_tokens(model, prompts, 20)
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=20, repetition_penalty=1.3, with_logprobs=True)
    eager = generate(model, prompts, generator=torch.Generator().manual_seed(1), step="eager", **kw)
    static = generate(model, prompts, generator=torch.Generator().manual_seed(1), step="static", **kw)
    assert static[0] == eager[0]
    for a, b in zip(static[1], eager[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    stop = free_tokens(model, prompts, 12)[0][4]
    got = generate(model, prompts, max_new_tokens=12, stop_ids=[stop], step="static")
    assert got == generate(model, prompts, max_new_tokens=12, stop_ids=[stop])
    assert got[0][-1] == stop and len(got[0]) <= 5


def test_static_step_is_one_graph_replayed(model, monkeypatch):
    """What a CUDA graph needs, checked on CPU: the step traced once (fullgraph: no host sync or
    data-dependent Python; dynamic=False: nothing the host passes changes between steps, or it
    would be traced again) and that one trace replayed at every step gives the eager tokens."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them as traced
    step = G._StaticStep._forward

    def traced(self, advance=True):
        assert advance  # (only the CUDA graph's warm-up calls it without advancing)
        if not hasattr(self, "_traced"):
            self._traced = torch.compile(lambda: step(self), backend=counter, fullgraph=True, dynamic=False)
        return self._traced()

    monkeypatch.setattr(G._StaticStep, "_forward", traced)
    torch._dynamo.reset()
    got = generate(model, PROMPTS, max_new_tokens=12, step="static")
    monkeypatch.undo()
    assert counter.frame_count == 1  # eleven steps, one graph
    assert got == free_tokens(model, PROMPTS, 12)


def _count_host_reads(monkeypatch) -> list[int]:
    """Counts the calls that read a tensor's value on the host (bool(t), t.item(), t.tolist(), int/float(t))."""
    calls = [0]
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):
            calls[0] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("step", ["eager", "static"])
def test_host_reads_the_device_only_every_k_steps(model, monkeypatch, step):
    """With a stop token that never comes, 16 more tokens cost 16 / k more host reads: the stop
    check every k steps, and nothing else per token. The tokens do not depend on k."""
    free = free_tokens(model, PROMPTS, 33)
    stop = next(t for t in range(3, V) if all(t not in r for r in free))
    reads = {}
    for k in (1, 8):
        for n in (17, 33):
            calls = _count_host_reads(monkeypatch)
            out = generate(model, PROMPTS, max_new_tokens=n, stop_ids=[stop], stop_check_every=k, step=step)
            monkeypatch.undo()
            assert out == [r[:n] for r in free]
            reads[k, n] = calls[0]
    assert {k: reads[k, 33] - reads[k, 17] for k in (1, 8)} == {1: 16, 8: 2}


def test_stop_check_every_does_not_change_tokens(model):
    free = free_tokens(model, PROMPTS, 16)
    stops = [free[0][2], free[2][6]]  # rows end at different steps, others run on
    want = generate(model, PROMPTS, max_new_tokens=16, stop_ids=stops, stop_check_every=1)
    assert any(len(r) < 16 for r in want)
    for k in (2, 5, 8, 100):
        assert generate(model, PROMPTS, max_new_tokens=16, stop_ids=stops, stop_check_every=k) == want


def test_step_choice_and_errors():
    m = tiny("gpt2-tiny", n_layer=1, n_head=4, d_model=32, max_seq_len=64)
    cpu = torch.device("cpu")
    assert G._step_kind(m, "auto", cpu, True) == "eager"  # CPU: eager unless asked
    assert G._step_kind(m, "auto", torch.device("cuda"), True) == "cuda_graph"  # (the choice only; runs nothing)
    assert G._step_kind(m, "auto", torch.device("cuda"), False) == "eager"
    with pytest.raises(ValueError, match="step=cuda_graph needs the model on a CUDA device"):
        generate(m, PROMPTS, max_new_tokens=2, step="cuda_graph")
    with pytest.raises(ValueError, match="expected auto, eager, static, cuda_graph"):
        generate(m, PROMPTS, max_new_tokens=2, step="graph")
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(m, PROMPTS, max_new_tokens=2, step="static", use_cache=False)
    with pytest.raises(ValueError, match="stop_check_every must be >= 1"):
        generate(m, PROMPTS, max_new_tokens=2, stop_check_every=0)
    alibi = tiny("gpt2-tiny", n_layer=1, n_head=4, d_model=32, max_seq_len=64, pos="alibi")
    with pytest.raises(ValueError, match="full attention without ALiBi"):
        generate(alibi, PROMPTS, max_new_tokens=2, step="static")
    assert G._step_kind(alibi, "auto", torch.device("cuda"), True) == "eager"
    t5 = models.build_model("t5", models.build_config("t5", "t5-tiny", V, n_layer=1, n_head=2, d_model=16, d_ff=32))
    with pytest.raises(ValueError, match="for GPT models"):
        generate(t5.eval(), PROMPTS, max_new_tokens=2, step="static")
    m.train()
    with pytest.raises(ValueError, match="training mode"):
        generate(m, PROMPTS, max_new_tokens=2, step="static")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_gives_the_eager_tokens(model, dtype):
    """On a GPU: the captured and replayed step decodes what the eager step does (greedy, padded,
    with a stop token; sampling with the same seed), and the default there is the graph."""
    import copy

    from llmstack.generate import place_model, sampling_generator

    cuda = torch.device("cuda", 0)
    m = place_model(copy.deepcopy(model), cuda, dtype)
    assert G._step_kind(m, "auto", cuda, True) == "cuda_graph"
    eager = generate(m, PROMPTS, max_new_tokens=20, step="eager")
    assert generate(m, PROMPTS, max_new_tokens=20, step="cuda_graph") == eager
    stop = eager[0][4]
    assert generate(m, PROMPTS, max_new_tokens=20, stop_ids=[stop]) == \
        generate(m, PROMPTS, max_new_tokens=20, stop_ids=[stop], step="eager")
    run = lambda step: generate(m, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.9,  # noqa: E731
                                generator=sampling_generator(cuda, 5), step=step)
    assert run("cuda_graph") == run("eager")
    if dtype == torch.float32:
        assert eager == free_tokens(model, PROMPTS, 20)  # the CPU's tokens
