"""Pick the adapter for a model without importing a framework the model cannot belong to."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from ._errors import MissingFrameworkError, UnsupportedModelError

# (adapter module, the framework module that must already be imported for a model to be its)
_ADAPTERS: tuple[tuple[str, str | None], ...] = (
    ("gradcheck.adapters.torch", "torch"),
    ("gradcheck.adapters.jax", "jax"),
    ("gradcheck.adapters.numpy", None),
)

SUPPORTED = (
    "a torch.nn.Module or a callable of torch tensors; "
    "a JAX (apply_fn, params) pair, an Equinox module or a Flax module with its variables; "
    "a NumPy model with `params`, `forward(x)`, `backward(dout)` and `grads`"
)


def load_adapter(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # the adapter itself exists; its framework may not
        framework = module_name.rsplit(".", 1)[-1]
        raise MissingFrameworkError(
            f"The {framework} adapter needs {framework}, which is not installed: "
            f"`pip install 'gradcheck[{framework}]'`"
        ) from exc


def select_adapter(model: Any) -> ModuleType:
    """The adapter module whose ``matches(model)`` is true.

    A framework's adapter is imported only when that framework is already in
    ``sys.modules``: a model cannot be a torch module if torch was never imported.
    """
    for module_name, framework in _ADAPTERS:
        if framework is not None and framework not in sys.modules:
            continue
        adapter = load_adapter(module_name)
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"cannot check a model of type {type(model).__module__}.{type(model).__qualname__}; "
        f"expected {SUPPORTED}"
    )
