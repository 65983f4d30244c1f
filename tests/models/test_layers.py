"""The fused, chunked LM-head cross-entropy equals the plain F.cross_entropy path; the decoding
paths of layers.Linear equal nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmstack.models import layers


@pytest.mark.parametrize("n_rows,chunk_elems", [(37, 1 << 22), (300, 64 * 50)])  # one chunk; many uneven chunks
def test_linear_cross_entropy_matches_plain_path(monkeypatch, n_rows, chunk_elems):
    monkeypatch.setitem(layers._CE_CHUNK_ELEMS, "cpu", chunk_elems)
    torch.manual_seed(0)
    C, V = 16, 50
    x = torch.randn(n_rows, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    labels = torch.randint(0, V, (n_rows,))
    labels[::7] = -100  # ignored positions carry no loss and no gradient
    fused = layers.linear_cross_entropy(x, w, labels)
    (fused * 3.0).backward()  # a non-unit upstream gradient, as loss scaling / accumulation give
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    plain = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    (plain * 3.0).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(gx[::7] == 0)


def test_linear_cross_entropy_no_grad_and_all_ignored():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    with torch.no_grad():
        out = layers.linear_cross_entropy(x, w, torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(out, F.cross_entropy(x @ w.t(), torch.tensor([1, 2, 3, 4])))
    assert torch.isnan(layers.linear_cross_entropy(x, w, torch.full((4,), -100)))


def test_linear_decoding_paths_equal_nn_linear():
    """layers.Linear's few-row and transposed-weight paths compute nn.Linear's product."""
    torch.manual_seed(0)
    for bias in (True, False):
        wide = layers.Linear(32, 96, bias=bias)  # out >= 2 x in: eligible for the transposed copy
        for rows in (1, 3, 16, 100):
            x = torch.randn(rows, 1, 32)
            ref = F.linear(x, wide.weight, wide.bias)
            with torch.inference_mode(), layers.decoding_layout():
                torch.testing.assert_close(wide(x), ref, rtol=1e-5, atol=1e-6)
                assert (wide in layers._TRANSPOSED) == (rows == 1)
            assert layers._TRANSPOSED is None  # copies dropped with the context
    # outside inference mode nn.Linear itself runs (training numerics untouched)
    x = torch.randn(4, 32, requires_grad=True)
    assert torch.equal(wide(x), F.linear(x, wide.weight, wide.bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fused_loss_gradients_at_fp16_loss_scale(dtype):
    """A half-precision model under DeepSpeed's fp16 loss scaling (2^16): the fused loss's one-step
    gradients equal the unfused loss's within half-precision tolerance, with nothing overflowing
    and no more entries flushed to zero. Both are compared with an fp64 reference of the same math
    on the same (half-precision) inputs."""
    torch.manual_seed(0)
    N, C, V, scale = 2048, 64, 1000, 2.0 ** 16
    x0 = (torch.randn(N, C) * 0.5).to(dtype)
    w0 = (torch.randn(V, C) * 0.05).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100

    def grads(fn):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        (fn(x, w) * scale).backward()
        return x.grad, w.grad

    fused = grads(lambda x, w: layers.linear_cross_entropy(x, w, labels))
    plain = grads(lambda x, w: F.cross_entropy((x @ w.t()).float(), labels, ignore_index=-100))
    ref = grads(lambda x, w: F.cross_entropy(x.double() @ w.double().t(), labels, ignore_index=-100))
    eps = torch.finfo(dtype).eps
    for g, gp, gr in zip(fused, plain, ref):
        assert g.dtype == dtype and torch.isfinite(g).all()
        rel = ((g.double() - gr).abs().max() / gr.abs().max()).item()
        rel_plain = ((gp.double() - gr).abs().max() / gr.abs().max()).item()
        assert rel <= max(4 * eps, 2 * rel_plain), (rel, rel_plain)
        flushed = ((g == 0) & (gr != 0)).sum().item()
        flushed_plain = ((gp == 0) & (gp.double() != gr) & (gr != 0)).sum().item()
        assert flushed <= flushed_plain + gr.numel() * 1e-4, (flushed, flushed_plain)
