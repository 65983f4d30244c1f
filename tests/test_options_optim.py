"""Optimizer and schedule options: Adafactor against transformers' implementation, LAMB against its
defining formula, both over ZeRO-style partitions (pieces of parameters split across simulated
ranks) against whole parameters, the inverse-sqrt schedule, and the refused combinations."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn as nn

from llmstack.errors import UsageError
from llmstack.train import optim
from llmstack.train.optim import lr_at


def test_inverse_sqrt_schedule():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=100, schedule="inverse_sqrt", min_lr_ratio=0.0)
    assert [lr_at(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in (4, 15, 99, 1000):
        assert lr_at(s, **kw) == pytest.approx(math.sqrt(4 / (s + 1)))
    assert lr_at(0, **{**kw, "warmup_steps": 0}) == 1.0


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))


def train(model: nn.Module, opt, steps: int = 5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adafactor_matches_transformers(wd):
    from transformers.optimization import Adafactor as HFAdafactor

    a, b = small_model(), small_model()
    ours = optim.Adafactor(a.parameters(), lr=1e-2, weight_decay=wd)
    theirs = HFAdafactor(b.parameters(), lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=wd)
    for p, q in zip(train(a, ours), train(b, theirs)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert set(ours.state[a[0].weight]) == {"step", "row.0", "col.0"}  # factored: O(R + C) state for a matrix


def lamb_reference(params, grads, state, t, lr, b1, b2, eps, wd):
    """LAMB by the paper (You et al. 2019, algorithm 2), one parameter at a time, in fp64."""
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        r = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * p
        wn, rn = p.norm(), r.norm()
        ratio = wn / rn if wn > 0 and rn > 0 else 1.0
        p -= lr * ratio * r


def test_lamb_matches_its_formula():
    model = small_model()
    ref = [p.detach().double().clone() for p in model.parameters()]
    opt = optim.LAMB(model.parameters(), lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    state = {}
    for t in range(1, 6):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = [p.grad.double() for p in model.parameters()]
        opt.step()
        lamb_reference(ref, grads, state, t, 0.05, 0.9, 0.99, 1e-6, 0.01)
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7)


class Ranks:
    """In-process stand-in for a process group: all_reduce sums a tensor over `n` threads."""

    def __init__(self, n: int):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n

    def all_reduce(self, rank: int, t: torch.Tensor) -> None:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()
        t.copy_(total)


def partitioned_run(make_opt, world: int, pad: int, steps: int = 4) -> list[torch.Tensor]:
    """Train with every parameter flattened into one buffer (with `pad` zeros between parameters, as
    ZeRO's alignment does) split into `world` contiguous partitions, one optimizer per rank."""
    model = small_model()
    params = list(model.parameters())
    offsets, n = [], 0
    for p in params:
        offsets.append(n)
        n += p.numel() + pad
    n += (-n) % world
    size = n // world
    flat = torch.zeros(n)
    for p, o in zip(params, offsets):
        flat[o: o + p.numel()] = p.detach().view(-1)
    parts = [flat[r * size:(r + 1) * size].clone().requires_grad_() for r in range(world)]
    ranks = Ranks(world)
    opts = []
    for r, part in enumerate(parts):
        opt = make_opt([part])
        lo, hi = r * size, (r + 1) * size
        pieces = []
        for i, (p, o) in enumerate(zip(params, offsets)):
            a, b = max(o, lo), min(o + p.numel(), hi)
            if a < b:
                pieces.append(optim.Piece(i, a - lo, a - o, b - a))
        opt.set_layout(optim.Layout([tuple(p.shape) for p in params], {id(part): pieces},
                                    lambda t, r=r: ranks.all_reduce(r, t)))
        opts.append(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        model.zero_grad()
        model(x).square().mean().backward()
        gflat = torch.zeros(n)
        for p, o in zip(params, offsets):
            gflat[o: o + p.numel()] = p.grad.view(-1)
        for r, part in enumerate(parts):
            part.grad = gflat[r * size:(r + 1) * size].clone()
        threads = [threading.Thread(target=o.step) for o in opts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        whole = torch.cat([p.detach() for p in parts])
        with torch.no_grad():
            for p, o in zip(params, offsets):
                p.copy_(whole[o: o + p.numel()].view_as(p))
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", ["lamb", "adafactor"])
@pytest.mark.parametrize("world,pad", [(2, 1), (3, 2)])  # parameters straddle partitions in both
def test_partitioned_optimizer_equals_whole_parameters(name, world, pad):
    def make(params):
        return optim.build_optimizer(name, [{"params": params, "weight_decay": 0.05}], lr=0.02, betas=(0.9, 0.99),
                                     eps=1e-8)

    model = small_model()
    whole = make(list(model.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 6, generator=g)
        whole.zero_grad()
        model(x).square().mean().backward()
        whole.step()
    ref = [p.detach() for p in model.parameters()]
    for p, q in zip(partitioned_run(make, world, pad), ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                      ("sgd", torch.optim.SGD), ("lamb", optim.LAMB), ("adafactor", optim.Adafactor)])
def test_build_optimizer_by_name(name, cls):
    groups = [{"params": list(small_model().parameters()), "weight_decay": 0.1}]
    opt = optim.build_optimizer(name, groups, lr=0.01, betas=(0.9, 0.95), eps=1e-8, momentum=0.8)
    assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 0.1
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("name,ds_config,words", [
    ("lamb", {"zero_optimization": {"stage": 3}}, "train.optimizer=lamb does not run under zero.stage=3"),
    ("adafactor", {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "precision=bf16"),
    ("sgd", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
             "optimizer": {"type": "AdamW", "params": {}}}, "train.optimizer=sgd cannot be combined with zero.offload"),
])
def test_refused_combinations_name_the_option(name, ds_config, words):
    from llmstack.distributed.deepspeed import create_engine

    with pytest.raises(UsageError, match=words.replace(".", r"\.")):
        create_engine(small_model(), [{"params": list(small_model().parameters())}], ds_config, lr=1e-3,
                      betas=(0.9, 0.95), eps=1e-8, optimizer=name)
