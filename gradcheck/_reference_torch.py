"""The reference MLP as a ``torch.nn.Module`` (same weights, float64): ``MLP.to_torch()``.

Imported only when a user asks for it, so ``import gradcheck`` never loads torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .reference import MLP

__all__ = ["ReferenceMLP", "mlp_to_torch"]


def _sigmoid(z: torch.Tensor) -> torch.Tensor:
    # the reference's formula, so both agree to rounding
    return 0.5 * (1.0 + torch.tanh(0.5 * z))


Mask = Callable[[str, int], "np.ndarray | None"]


class _PlantedLinear(torch.autograd.Function):
    """``a @ w.T + b`` whose backward multiplies the parameter gradients by the planted masks."""

    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, layer: int, mask: Mask
    ) -> torch.Tensor:
        ctx.save_for_backward(a, w)
        ctx.layer, ctx.mask = layer, mask
        return a @ w.T + b

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        a, w = ctx.saved_tensors
        grads = {f"W{ctx.layer}": g.T @ a, f"b{ctx.layer}": g.sum(dim=0)}
        for name, value in grads.items():
            factor = ctx.mask(name, g.shape[0])
            if factor is not None:
                grads[name] = value * torch.from_numpy(factor).to(value)
        return g @ w, grads[f"W{ctx.layer}"], grads[f"b{ctx.layer}"], None, None


class _WrongDerivative(torch.autograd.Function):
    """An activation whose backward uses f(z) where f'(z) belongs (the reference's planted bug)."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.f = f
        return f(z)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        (z,) = ctx.saved_tensors
        return g * ctx.f(z), None


class ReferenceMLP(nn.Module):
    """``layers.{l}`` are ``nn.Linear`` layers (``weight`` = the reference's ``W{l}``,
    ``bias`` = ``b{l}``); the hidden activation follows every layer but the last, then
    ``nn.Dropout(p)`` (torch's own RNG: masks differ from the NumPy model's); the output
    activation follows the last layer."""

    def __init__(
        self,
        sizes: list[int],
        *,
        activation: str = "tanh",
        output: str = "linear",
        dropout: float = 0.0,
        l1: float = 0.0,
        l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.output = output
        self.l1 = l1
        self.l2 = l2
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out, dtype=torch.float64) for n_in, n_out in pairwise(sizes)
        )
        self.dropout = nn.Dropout(dropout)
        self.bug: str | None = None
        self.mask: Mask | None = None  # set with the bug, from MLP.gradient_mask

    def linears(self) -> list[nn.Linear]:
        """The layers, typed."""
        return [layer for layer in self.layers if isinstance(layer, nn.Linear)]

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "sigmoid":
            return _sigmoid(z)
        if self.activation == "tanh":
            return torch.tanh(z)
        if self.activation == "relu":
            return torch.relu(z)
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x
        last = len(self.layers) - 1
        for index, layer in enumerate(self.linears()):
            if self.mask is not None:
                z = _PlantedLinear.apply(a, layer.weight, layer.bias, index, self.mask)
            else:
                z = layer(a)
            if index < last:
                if self.bug == "wrong_activation_derivative" and index == 0:
                    h = _WrongDerivative.apply(z, self._hidden)
                else:
                    h = self._hidden(z)
                a = self.dropout(h)
            elif self.output == "sigmoid":
                a = _sigmoid(z)
            elif self.output == "softmax":
                a = torch.softmax(z, dim=1)
            else:
                a = z
        return a

    def regularization(self) -> torch.Tensor:
        """``l1 * sum|W| + l2/2 * sum W**2`` over the weights, as ``MLP.regularization``."""
        linears = self.linears()
        total = torch.zeros((), dtype=torch.float64, device=linears[0].weight.device)
        for layer in linears:
            w = layer.weight
            total = total + self.l1 * w.abs().sum() + 0.5 * self.l2 * (w * w).sum()
        return total


def mlp_to_torch(mlp: MLP) -> ReferenceMLP:
    """A `ReferenceMLP` holding float64 copies of ``mlp``'s weights.

    A planted bug (``mlp.bug``, see `MLP.with_bug`) is exported too, in custom
    ``autograd.Function`` backwards that make the same mistake as the reference.
    """
    module = ReferenceMLP(
        list(mlp.sizes),
        activation=mlp.activation,
        output=mlp.output,
        dropout=mlp.dropout,
        l1=mlp.l1,
        l2=mlp.l2,
    )
    with torch.no_grad():
        for index, layer in enumerate(module.linears()):
            layer.weight.copy_(torch.from_numpy(mlp.params[f"W{index}"].copy()))
            layer.bias.copy_(torch.from_numpy(mlp.params[f"b{index}"].copy()))
    if mlp.bug is not None:
        module.bug = mlp.bug
        module.mask = copy.deepcopy(mlp).gradient_mask
    return module
