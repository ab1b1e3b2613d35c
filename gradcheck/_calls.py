"""How an input ``x`` reaches a model: the one rule every adapter follows.

- ``None``: no argument, unless the call requires a positional one, which then receives
  ``None`` (a solver's ``apply_fn(params, _)``).
- A tuple or a list (not a NamedTuple): spread over the call's positional parameters when the
  call *requires* two or more of them or takes ``*args`` (``forward(Q, K, V)``,
  ``affine_forward(x, w, b)``, an ``autograd.Function``'s ``apply``), or has no required one
  and several optional ones; a tuple of one item is always spread (``x=(d,)``). Otherwise the
  container is the one argument (``forward(inputs)``, numpy-ml's ``forward(X,
  retain_derived=True)``, ``apply_fn(params, x)`` with ``x = (data, key)``).
- A dict: keyword arguments when every key names a parameter of the call, or the call takes
  ``**kwargs`` (``forward(input_ids, attention_mask)``); otherwise the one argument
  (``forward(batch)``). A dict also fills optional parameters, which a tuple does not:
  ``x={"x": x, "mask": mask}`` for ``forward(x, mask=None)``.
- Anything else: the one argument.

A call whose signature cannot be read (a builtin) gets a tuple spread and a dict as keywords.
Only the parameters after the first ``skip`` count (JAX's ``apply_fn(params, x)``: ``skip=1``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

Style = Literal["none", "one", "args", "kwargs"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _parameters(fn: Callable[..., Any], skip: int) -> list[inspect.Parameter] | None:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    return parameters[skip:] if skip else parameters


def is_sequence(x: Any) -> bool:
    """A tuple or list that the rule may spread (a NamedTuple is one value)."""
    return isinstance(x, (tuple, list)) and not hasattr(x, "_fields")


def call_style(fn: Callable[..., Any], x: Any, *, skip: int = 0) -> Style:
    """How ``fn`` receives ``x`` (see the module docstring)."""
    if x is None:
        parameters = _parameters(fn, skip)
        needs = parameters is not None and any(
            p.kind in _POSITIONAL and p.default is p.empty for p in parameters
        )
        return "one" if needs else "none"
    if is_sequence(x):
        if len(x) == 1:
            return "args"
        parameters = _parameters(fn, skip)
        if parameters is None or any(p.kind is p.VAR_POSITIONAL for p in parameters):
            return "args"
        positional = [p for p in parameters if p.kind in _POSITIONAL]
        required = [p for p in positional if p.default is p.empty]
        if len(required) >= 2 or (not required and len(positional) >= 2):
            return "args"
        return "one"
    if isinstance(x, Mapping):
        parameters = _parameters(fn, skip)
        if parameters is None or any(p.kind is p.VAR_KEYWORD for p in parameters):
            return "kwargs"
        names = {p.name for p in parameters if p.kind is not p.POSITIONAL_ONLY}
        return "kwargs" if x and all(key in names for key in x) else "one"
    return "one"


def call(fn: Callable[..., Any], style: Style, x: Any, *leading: Any) -> Any:
    """``fn(*leading, ...)`` with ``x`` passed as ``style`` says."""
    if style == "none":
        return fn(*leading)
    if style == "args":
        return fn(*leading, *x)
    if style == "kwargs":
        return fn(*leading, **x)
    return fn(*leading, x)


def input_hint(fn: Callable[..., Any], x: Any, *, skip: int = 0) -> str:
    """A clause for an error the model raised on its input, where the rule passed ``x`` as the
    one argument and the user may have meant otherwise (a tuple for ``forward(x, mask=None)``,
    a dict with a misspelt key); empty otherwise."""
    parameters = _parameters(fn, skip)
    if parameters is None or call_style(fn, x, skip=skip) != "one":
        return ""
    positional = [p for p in parameters if p.kind in _POSITIONAL]
    if is_sequence(x) and len(positional) > 1:
        first, rest = positional[0].name, ", ".join(f"`{p.name}`" for p in positional[1:])
        return (
            f" (x, a {type(x).__name__} of {len(x)}, went to the call as its one argument "
            f"`{first}`: a tuple fills required parameters only; to fill {rest} too, pass a "
            f"dict keyed by parameter name, x={{'{first}': ..., ...}})"
        )
    if isinstance(x, Mapping):
        names = {p.name for p in parameters if p.kind is not p.POSITIONAL_ONLY}
        unknown = [k for k in x if k not in names]
        if unknown and len(unknown) < len(x):
            return (
                f" (x, a dict, went to the call as its one argument: its keys "
                f"{', '.join(repr(k) for k in unknown)} name no parameter of the call)"
            )
    return ""
