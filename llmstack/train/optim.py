"""Optimizers, parameter groups and learning-rate schedules (pure functions of the step).

Optimizers: AdamW (decoupled weight decay), Adam (L2 weight decay in the gradient), SGD with
momentum (all three from torch), and two written here: Adafactor (Shazeer & Stern 2018) and LAMB
(You et al. 2019). Both need whole parameters, not elements: Adafactor factors the second moment
of a matrix into row and column statistics, LAMB scales each layer's update by a trust ratio of
norms. Under ZeRO 1/2 DeepSpeed hands the optimizer one flat slice of all parameters per rank, so
these two work on a `Layout`: which pieces of which model parameters each optimizer tensor holds,
plus a sum over ranks for the statistics a parameter's pieces on other ranks contribute to.
Without ZeRO the layout is the trivial one (each tensor is one whole parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lamb")
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decoupled weight decay on matmul weights only.

    Norm gains, biases and embeddings are not decayed (decaying them only shrinks scales and
    rare-token rows; GPT-3 / LLaMA practice). Shapes are read from `ds_shape` when ZeRO-3 has
    already partitioned the parameter (its local tensor is then 1-D and says nothing).
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if id(p) in no_decay_ids or ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to
    min_lr, inverse square root (Vaswani et al. 2017: lr * sqrt(warmup / (step + 1)), continuous at
    the end of warmup, no floor), or constant."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "inverse_sqrt":
        return lr * math.sqrt(max(warmup_steps, 1) / (step + 1))
    min_lr = lr * min_lr_ratio
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r} (allowed: {', '.join(SCHEDULES)})")


# ---------------------------------------------------------------------------------------------
# Layouts: which parameter elements an optimizer tensor holds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of flattened model parameter `index` are elements
    [offset, offset + numel) of an optimizer tensor."""

    index: int
    offset: int
    start: int
    numel: int


@dataclass
class Layout:
    shapes: list[tuple[int, ...]]  # every model parameter the optimizer covers, on any rank
    pieces: dict[int, list[Piece]]  # id(optimizer tensor) -> its pieces
    all_reduce: Callable[[torch.Tensor], None]  # in-place sum over the ranks sharing the parameters


def whole_layout(groups: list[dict]) -> Layout:
    """The trivial layout: each optimizer tensor is one whole parameter; nothing to reduce."""
    shapes, pieces = [], {}
    for g in groups:
        for p in g["params"]:
            pieces[id(p)] = [Piece(len(shapes), 0, 0, p.numel())]
            shapes.append(tuple(p.shape))
    return Layout(shapes, pieces, lambda t: None)


class _LayoutOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that need per-parameter statistics; see the module docstring."""

    layout: Layout | None = None

    def set_layout(self, layout: Layout) -> None:
        self.layout = layout

    def _pieces(self) -> Layout:
        if self.layout is None:
            self.layout = whole_layout(self.param_groups)
        return self.layout


class LAMB(_LayoutOptimizer):
    """LAMB (You et al. 2019, algorithm 2): Adam's bias-corrected direction plus decoupled weight
    decay, r = m_hat / (sqrt(v_hat) + eps) + wd * w, applied as w -= lr * phi(||w||) / ||r|| * r per
    parameter (layer), phi the identity; the ratio is 1 where either norm is 0."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        layout = self._pieces()
        dev = self.param_groups[0]["params"][0].device
        norms = torch.zeros(len(layout.shapes), 2, dtype=torch.float64, device=dev)  # ||w||^2, ||r||^2 per parameter
        updates = []
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = st["exp_avg"] / (1 - b1 ** t)
                v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
                r = m_hat / (v_hat.sqrt() + g["eps"])
                if g["weight_decay"]:
                    r.add_(p, alpha=g["weight_decay"])
                pf, rf = p.view(-1), r.view(-1)
                for pc in layout.pieces[id(p)]:
                    sl = slice(pc.offset, pc.offset + pc.numel)
                    norms[pc.index, 0] += pf[sl].double().square().sum()
                    norms[pc.index, 1] += rf[sl].double().square().sum()
                updates.append((p, r, g["lr"]))
        layout.all_reduce(norms)
        w_norm, r_norm = norms[:, 0].sqrt(), norms[:, 1].sqrt()
        trust = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm.clamp(min=1e-30), torch.ones_like(w_norm))
        trust = trust.tolist()  # one host copy, not one per parameter
        for p, r, lr in updates:
            pf, rf = p.view(-1), r.view(-1)
            for pc in layout.pieces[id(p)]:
                sl = slice(pc.offset, pc.offset + pc.numel)
                pf[sl].add_(rf[sl], alpha=-lr * trust[pc.index])
        return loss


class Adafactor(_LayoutOptimizer):
    """Adafactor (Shazeer & Stern 2018, algorithms 4 and 5) with an external learning rate.

    Per step t: beta2_t = 1 - t^-0.8. A matrix (R, C) keeps row and column means of g^2 + eps1:
    r <- beta2_t r + (1 - beta2_t) mean_cols(g^2 + eps1), c likewise over rows, and its second
    moment is estimated as V = r c^T / mean(r); a vector keeps V elementwise. The update
    u = g / sqrt(V) is clipped by its RMS, u / max(1, RMS(u) / d), and applied as
    w <- w - lr * wd * w - lr * u (no momentum, no relative step size, no parameter scaling:
    transformers' Adafactor with scale_parameter=False, relative_step=False computes the same).
    """

    def __init__(self, params, lr: float = 1e-3, eps1: float = 1e-30, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, eps1=eps1, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        layout = self._pieces()
        dev = self.param_groups[0]["params"][0].device
        # first pass: row / column sums of g^2 + eps1 for every matrix, summed over ranks
        offsets, n = {}, 0
        for i, shape in enumerate(layout.shapes):
            if len(shape) == 2:
                offsets[i] = n
                n += shape[0] + shape[1]
        sums = torch.zeros(n, dtype=torch.float32, device=dev)
        active = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                st["step"] += 1
                active.append((g, p))
                sq = p.grad.view(-1).float().square().add_(g["eps1"])
                for pc in layout.pieces[id(p)]:
                    if pc.index not in offsets:
                        continue
                    R, C = layout.shapes[pc.index]
                    o = offsets[pc.index]
                    k = torch.arange(pc.start, pc.start + pc.numel, device=dev)
                    part = sq[pc.offset: pc.offset + pc.numel]
                    sums[o: o + R].index_add_(0, k // C, part)
                    sums[o + R: o + R + C].index_add_(0, k % C, part)
        layout.all_reduce(sums)
        # second pass: the unclipped update, and per-parameter sums of u^2 for the RMS clip
        usq = torch.zeros(len(layout.shapes), dtype=torch.float64, device=dev)
        updates = []
        for g, p in active:
            st = self.state[p]
            beta2 = 1.0 - float(st["step"]) ** g["decay_rate"]
            grad = p.grad.view(-1).float()
            u = torch.empty_like(grad)
            for pc in layout.pieces[id(p)]:
                sl = slice(pc.offset, pc.offset + pc.numel)
                if pc.index in offsets:
                    R, C = layout.shapes[pc.index]
                    o = offsets[pc.index]
                    row = st.setdefault(f"row.{pc.index}", torch.zeros(R, device=dev))
                    col = st.setdefault(f"col.{pc.index}", torch.zeros(C, device=dev))
                    row.mul_(beta2).add_(sums[o: o + R] / C, alpha=1 - beta2)
                    col.mul_(beta2).add_(sums[o + R: o + R + C] / R, alpha=1 - beta2)
                    k = torch.arange(pc.start, pc.start + pc.numel, device=dev)
                    r_factor = (row / row.mean()).rsqrt()
                    u[sl] = grad[sl] * r_factor[k // C] * col.rsqrt()[k % C]
                else:  # a vector: its second moment elementwise, kept for this piece only
                    v = st.setdefault(f"v.{pc.index}", torch.zeros(pc.numel, device=dev))
                    v.mul_(beta2).add_(grad[sl].square() + g["eps1"], alpha=1 - beta2)
                    u[sl] = grad[sl] * v.rsqrt()
                usq[pc.index] += u[sl].double().square().sum()
            updates.append((g, p, u))
        layout.all_reduce(usq)
        numel = torch.tensor([math.prod(s) for s in layout.shapes], dtype=torch.float64)
        rms = (usq.cpu() / numel).sqrt().tolist()
        for g, p, u in updates:
            pf = p.view(-1)
            if g["weight_decay"]:
                pf.mul_(1 - g["lr"] * g["weight_decay"])
            for pc in layout.pieces[id(p)]:
                sl = slice(pc.offset, pc.offset + pc.numel)
                denom = max(1.0, rms[pc.index] / g["clip_threshold"])
                pf[sl].add_(u[sl].to(p.dtype), alpha=-g["lr"] / denom)
        return loss


def build_optimizer(name: str, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """A torch optimizer over param groups (each with its own weight_decay) by config name."""
    if name == "adamw":
        kw = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)
    if name == "adam":  # weight decay as L2 in the gradient (coupled), the original Adam recipe
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, eps=eps)
    if name == "adafactor":
        return Adafactor(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (allowed: {', '.join(OPTIMIZERS)})")
