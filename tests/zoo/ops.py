"""The few operations whose spelling differs between NumPy, PyTorch and JAX.

Every layer of the zoo is written once (``kernels.py``) against an ``Ops`` object:
``ops.xp`` is the array namespace (``numpy``, ``torch`` or ``jax.numpy``; all three
accept ``axis=``/``keepdims=``), and the methods below cover what is spelled
differently (padding, scatter, random numbers). Backward passes stay hand-written
in each framework's own arrays: a torch ``autograd.Function`` runs torch ops, a
``jax.custom_vjp`` runs ``jax.numpy`` ops, so the adapters see native code.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyOps:
    xp = np
    name = "numpy"

    def __init__(self, rng: np.random.Generator | None = None) -> None:
        self.rng = rng

    def asarray(self, a: Any) -> Any:
        return np.asarray(a)

    def like(self, a: Any, ref: Any) -> Any:
        return np.asarray(a, dtype=ref.dtype)

    def pad_last(self, x: Any, pads: tuple[int, ...]) -> Any:
        """Zero-pad the last ``len(pads)`` axes by ``pads[i]`` on both sides."""
        width = [(0, 0)] * (x.ndim - len(pads)) + [(p, p) for p in pads]
        return np.pad(x, width)

    def add_slice(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        out = target.copy()
        out[index] += value
        return out

    def set_slice(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        out = target.copy()
        out[index] = value
        return out

    def scatter_add(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        out = target.copy()
        np.add.at(out, index, value)
        return out

    def scatter_set(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        out = target.copy()
        out[index] = value
        return out

    def argmax(self, x: Any, axis: int) -> Any:
        return np.argmax(x, axis=axis)

    def take_along(self, x: Any, idx: Any, axis: int) -> Any:
        return np.take_along_axis(x, idx, axis=axis)

    def rand(self, shape: tuple[int, ...], ref: Any, stream: int = 0) -> Any:
        assert self.rng is not None, "this layer needs a random generator"
        return self.rng.random(shape).astype(ref.dtype)


class TorchOps:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.xp = torch
        self._torch = torch

    def asarray(self, a: Any) -> Any:
        return self._torch.as_tensor(np.asarray(a))

    def like(self, a: Any, ref: Any) -> Any:
        return self._torch.as_tensor(np.asarray(a), dtype=ref.dtype, device=ref.device)

    def pad_last(self, x: Any, pads: tuple[int, ...]) -> Any:
        width: list[int] = []
        for p in reversed(pads):
            width += [p, p]
        return self._torch.nn.functional.pad(x, width)

    def add_slice(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        out = target.clone()
        out[index] += value
        return out

    def set_slice(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        out = target.clone()
        out[index] = value
        return out

    def scatter_add(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        return target.index_put(tuple(self._torch.as_tensor(i) for i in index), value, True)

    def scatter_set(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        return target.index_put(tuple(self._torch.as_tensor(i) for i in index), value, False)

    def argmax(self, x: Any, axis: int) -> Any:
        return self._torch.argmax(x, dim=axis)

    def take_along(self, x: Any, idx: Any, axis: int) -> Any:
        return self._torch.take_along_dim(x, idx, dim=axis)

    def rand(self, shape: tuple[int, ...], ref: Any, stream: int = 0) -> Any:
        return self._torch.rand(shape, dtype=ref.dtype, device=ref.device)


class JaxOps:
    name = "jax"

    def __init__(self, seed: int = 0) -> None:
        import jax
        import jax.numpy as jnp

        self.xp = jnp
        self._jax = jax
        self.seed = seed

    def asarray(self, a: Any) -> Any:
        return self.xp.asarray(np.asarray(a))

    def like(self, a: Any, ref: Any) -> Any:
        return self.xp.asarray(np.asarray(a), dtype=ref.dtype)

    def pad_last(self, x: Any, pads: tuple[int, ...]) -> Any:
        width = [(0, 0)] * (x.ndim - len(pads)) + [(p, p) for p in pads]
        return self.xp.pad(x, width)

    def add_slice(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        return target.at[index].add(value)

    def set_slice(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        return target.at[index].set(value)

    def scatter_add(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        return target.at[index].add(value)

    def scatter_set(self, target: Any, index: tuple[Any, ...], value: Any) -> Any:
        return target.at[index].set(value)

    def argmax(self, x: Any, axis: int) -> Any:
        return self.xp.argmax(x, axis=axis)

    def take_along(self, x: Any, idx: Any, axis: int) -> Any:
        return self.xp.take_along_axis(x, idx, axis=axis)

    def rand(self, shape: tuple[int, ...], ref: Any, stream: int = 0) -> Any:
        key = self._jax.random.fold_in(self._jax.random.PRNGKey(self.seed), stream)
        return self._jax.random.uniform(key, shape, dtype=ref.dtype)
