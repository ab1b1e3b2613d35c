"""Zoo layers as ``torch.autograd.Function``s (hand-written backward in torch ops) in modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .kernels import Layer, Point, run_backward
from .ops import TorchOps

_OPS = TorchOps()


def make_function(layer: Layer, names: list[str], cfg: dict, bug: str | None) -> Any:
    """An ``autograd.Function`` ``(x, *params) -> out`` whose backward is ``layer``'s (with ``bug``)."""

    class ZooFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
            p = dict(zip(names, params, strict=True))
            out, cache = layer.forward(_OPS, p, x, cfg)
            ctx.save_for_backward(x, *params)
            ctx.cache = cache
            return out

        @staticmethod
        def backward(ctx: Any, dout: torch.Tensor) -> Any:
            x, *params = ctx.saved_tensors
            p = dict(zip(names, params, strict=True))
            grads, dx = run_backward(layer, _OPS, p, x, cfg, ctx.cache, dout, bug)
            if not x.is_floating_point():
                dx = None
            return (dx, *(grads[n] for n in names))

    ZooFunction.__name__ = (
        f"{layer.name}_{bug or 'correct'}".replace("%", "pct").replace("/", "_").replace(".", "_")
    )
    return ZooFunction


class TorchLayer(nn.Module):
    """``layer`` at ``point`` as a module: parameters named as the kernel's, ``bug`` planted."""

    def __init__(
        self, layer: Layer, point: Point, bug: str | None = None, dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        self.names = list(point.params)
        for name, value in point.params.items():
            self.register_parameter(name, nn.Parameter(torch.tensor(value, dtype=dtype)))
        self.fn = make_function(layer, self.names, point.cfg, bug)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x, *(getattr(self, n) for n in self.names))


def torch_input(point: Point, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = np.asarray(point.x)
    if np.issubdtype(x.dtype, np.floating):
        return torch.tensor(x, dtype=dtype)
    return torch.tensor(x)
