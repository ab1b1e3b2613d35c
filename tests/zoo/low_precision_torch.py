"""Low-precision torch kernels with hand-written backwards, their references, and mutants.

Each kernel computes in float32 from inputs and parameters in its precision (bfloat16 or
float16) and stores its results in that precision, as fused GPU kernels do; its backward is
a ``torch.autograd.Function`` written by hand. Its reference is the same math in plain torch
ops, which autograd differentiates. ``bug`` plants a mistake (see `MUTANTS`).

`case(name, dtype, seed, bug)` gives the kernel, the reference and the inputs of one check;
`MUTANTS` maps ``(kernel, bug)`` to the blocks whose check must fail (``"reference"``: the
reference is wrong, and the report must say so).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Bug = str | None


# --------------------------------------------------------------------------- attention
class _Attention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d)) v``, float32 inside; the backward recomputes the softmax."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bug: Bug
    ) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        p = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
        o = (p @ v.float()).to(q.dtype)
        ctx.save_for_backward(q, k, v, o)
        ctx.bug = bug
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o = ctx.saved_tensors
        bug = ctx.bug
        scale = q.shape[-1] ** -0.5
        qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
        p = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)  # recomputed
        dv = p.transpose(-1, -2) @ dof
        dp = dof @ vf.transpose(-1, -2)
        delta = (dof * o.float()).sum(-1, keepdim=True)
        ds = p * dp if bug == "dropped_term" else p * (dp - delta)
        dq = ds @ kf if bug == "no_scale" else ds @ kf * scale
        dk = ds.transpose(-1, -2) @ qf * scale
        if bug == "sign":
            dk = -dk
        if bug == "scale_10%":
            dv = dv * 1.1
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def attention_kernel(bug: Bug = None) -> Callable[..., torch.Tensor]:
    def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Attention.apply(q, k, v, bug)
        return out

    return fused_attention


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


# --------------------------------------------------------------------------- layer norm
class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, bug: Bug
    ) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt(((xf - mean) ** 2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.bug = bug
        return ((xf - mean) * rstd * w.float() + b.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, mean, rstd = ctx.saved_tensors
        bug = ctx.bug
        xhat = (x.float() - mean) * rstd
        dyf = dy.float()
        dxhat = dyf * w.float()
        if bug == "constant_stats":  # mean and variance treated as constants
            dx = rstd * dxhat
        else:
            dx = rstd * (
                dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True)
            )
        terms = dyf * xhat
        if bug == "bf16_accumulation":  # a running sum kept in the storage precision
            dw = torch.zeros(terms.shape[-1], dtype=x.dtype)
            for row in terms.to(x.dtype):
                dw = dw + row
        else:
            dw = terms.sum(0)
        db = dyf.sum(0)
        return dx.to(x.dtype), dw.to(w.dtype), db.to(w.dtype), None, None


class FusedLayerNorm(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype, seed: int, bug: Bug = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1000 + seed)
        self.weight = nn.Parameter((1.0 + 0.3 * torch.randn(d, generator=g)).to(dtype))
        self.bias = nn.Parameter((0.3 * torch.randn(d, generator=g)).to(dtype))
        self.eps = 1e-5
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _LayerNorm.apply(x, self.weight, self.bias, self.eps, self.bug)
        return out


class LayerNormReference(nn.Module):
    """Plain ops; ``wrong=True`` detaches the statistics (a wrong reference: its gradient is
    not its forward's)."""

    def __init__(self, d: int, wrong: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = 1e-5
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        if self.wrong:
            mean, var = mean.detach(), var.detach()
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


# --------------------------------------------------------------------------- bias + GELU
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _BiasGelu(torch.autograd.Function):
    """``gelu(x + b)`` (the erf form)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b: torch.Tensor, bug: Bug) -> torch.Tensor:
        z = x.float() + b.float()
        ctx.save_for_backward(x, b)
        ctx.bug = bug
        return (0.5 * z * (1.0 + torch.erf(z * _SQRT_HALF))).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, b = ctx.saved_tensors
        bug = ctx.bug
        z = x.float() + b.float()
        cdf = 0.5 * (1.0 + torch.erf(z * _SQRT_HALF))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        slope = cdf if bug == "dropped_term" else cdf + z * pdf
        dz = dy.float() * slope
        db = dz.sum(0)
        if bug == "scale_10%":
            db = db * 1.1
        return dz.to(x.dtype), db.to(b.dtype), None


class FusedBiasGelu(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype, seed: int, bug: Bug = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2000 + seed)
        self.bias = nn.Parameter((0.5 * torch.randn(d, generator=g)).to(dtype))
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _BiasGelu.apply(x, self.bias, self.bug)
        return out


class BiasGeluReference(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x + self.bias)


# --------------------------------------------------------------------------- linear + CE
class _LinearCrossEntropy(torch.autograd.Function):
    """``mean_n cross_entropy(h_n W^T, label_n)`` without storing the logits."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, bug: Bug
    ) -> torch.Tensor:
        logits = h.float() @ w.float().T
        picked = logits.gather(1, labels[:, None])[:, 0]
        loss = (torch.logsumexp(logits, dim=1) - picked).mean()
        ctx.save_for_backward(h, w, labels)
        ctx.bug = bug
        return loss.to(h.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w, labels = ctx.saved_tensors
        bug = ctx.bug
        hf, wf = h.float(), w.float()
        p = torch.softmax(hf @ wf.T, dim=1)
        rows = torch.arange(h.shape[0])
        if bug == "sign":
            p[rows, labels] += 1.0
        elif bug != "dropped_term":  # dropped: the one-hot term
            p[rows, labels] -= 1.0
        p = p * (g.float() / h.shape[0])
        return (p @ wf).to(h.dtype), (p.T @ hf).to(w.dtype), None, None


class FusedLinearCrossEntropy(nn.Module):
    def __init__(
        self, d: int, classes: int, dtype: torch.dtype, seed: int, bug: Bug = None
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3000 + seed)
        self.weight = nn.Parameter((torch.randn(classes, d, generator=g) / math.sqrt(d)).to(dtype))
        self.bug = bug

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _LinearCrossEntropy.apply(h, self.weight, labels, self.bug)
        return out


class LinearCrossEntropyReference(nn.Module):
    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, d))

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(h @ self.weight.T, labels)


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    kernel: Any
    reference: Any
    x: Any


KERNELS = ("attention", "layer_norm", "bias_gelu", "linear_cross_entropy")

#: (kernel, bug) -> the blocks that must fail ("reference": the reference's fault).
MUTANTS: dict[tuple[str, str], frozenset[str] | str] = {
    ("attention", "dropped_term"): frozenset({"input[0]", "input[1]"}),
    ("attention", "sign"): frozenset({"input[1]"}),
    ("attention", "no_scale"): frozenset({"input[0]"}),
    ("attention", "scale_10%"): frozenset({"input[2]"}),
    ("layer_norm", "constant_stats"): frozenset({"input"}),
    ("layer_norm", "bf16_accumulation"): frozenset({"weight"}),
    ("layer_norm", "wrong_reference"): "reference",
    ("bias_gelu", "dropped_term"): frozenset({"bias", "input"}),
    ("bias_gelu", "scale_10%"): frozenset({"bias"}),
    ("linear_cross_entropy", "sign"): frozenset({"weight", "input[0]"}),
    ("linear_cross_entropy", "dropped_term"): frozenset({"weight", "input[0]"}),
}


def case(name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, bug: Bug = None) -> Case:
    """The kernel ``name`` (with ``bug`` planted), its reference and its inputs (attention's in
    ``dtype``, the others' float32: `gradcheck.check_kernel` quantizes them to the precision
    of the kernel's parameters)."""
    g = torch.Generator().manual_seed(seed)
    if name == "attention":
        q, k, v = (torch.randn(1, 2, 8, 16, generator=g).to(dtype) for _ in range(3))
        return Case(attention_kernel(bug), attention_reference, (q, k, v))
    if name == "layer_norm":
        d, n = 8, 1024  # a long reduction over rows: bf16 accumulation shows
        x = 2.0 + torch.randn(n, d, generator=g)
        wrong = bug == "wrong_reference"
        kernel = FusedLayerNorm(d, dtype, seed, None if wrong else bug)
        return Case(kernel, LayerNormReference(d, wrong=wrong), x)
    if name == "bias_gelu":
        d = 16
        return Case(
            FusedBiasGelu(d, dtype, seed, bug),
            BiasGeluReference(d),
            torch.randn(32, d, generator=g),
        )
    if name == "linear_cross_entropy":
        d, classes, n = 16, 10, 32
        h = torch.randn(n, d, generator=g)
        labels = torch.randint(0, classes, (n,), generator=g)
        kernel = FusedLinearCrossEntropy(d, classes, dtype, seed, bug)
        return Case(kernel, LinearCrossEntropyReference(d, classes), (h, labels))
    raise KeyError(name)
