"""Torch models the torch tests share: a linear layer with a hand-written backward as a
``torch.autograd.Function`` (right or with a planted bug), and a Function with an output it
declares non-differentiable (torch must be importable)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def make_linear_function(bug: str = "none") -> type[torch.autograd.Function]:
    """``x @ w.T + b`` with a hand-written backward, right for ``bug="none"``, else with one
    planted bug: "sign_flip", "missing_bias", "scale_1.01", "one_entry" (one weight-gradient
    entry x1.01), "input_grad" (the input gradient x1.5), "bias" (bias gradient x1.0005)."""

    class LinearFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            return x @ w.T + b

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, Any, Any]:
            x, w = ctx.saved_tensors
            dx, dw = g @ w, g.T @ x
            db: torch.Tensor | None = g.sum(0)
            if bug == "sign_flip":
                dw = -dw
            elif bug == "missing_bias":
                db = None
            elif bug == "scale_1.01":
                dx, dw, db = 1.01 * dx, 1.01 * dw, 1.01 * g.sum(0)
            elif bug == "one_entry":
                dw = dw.clone()
                dw[1, 2] *= 1.01
            elif bug == "input_grad":
                dx = g @ (w * 1.5)
            elif bug == "bias":
                db = g.sum(0) * 1.0005
            return dx, dw, db

    return LinearFn


class FnLinear(nn.Module):
    """An ``nn.Module`` around `make_linear_function` (``dtype``: torch's default if None)."""

    def __init__(
        self, n_in: int, n_out: int, bug: str = "none", dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.fn = make_linear_function(bug)
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=dtype) / n_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(n_out, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x, self.weight, self.bias)


class WithStatistic(torch.autograd.Function):
    """Returns ``2x`` and a statistic it declares non-differentiable."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stat = x.sum() * 1.0
        ctx.mark_non_differentiable(stat)
        return 2 * x, stat

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, g_stat: torch.Tensor | None) -> torch.Tensor:
        return 2 * g
