"""A check's options as the core takes them, and the per-precision defaults, in one visible table.

The options themselves (names, defaults, allowed values, messages) are defined once, in
``_gradcheck_options``, for every front end: this module, the pytest plugin and the CLI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

from _gradcheck_options import BY_NAME, OPTIONS, Option, OptionValueError

from .errors import InvalidOptionError

# The option values as types, for the signatures (tests/test_core.py checks them against
# `_gradcheck_options.OPTIONS`, where the options are defined).
Mode = Literal["auto", "full", "fast"]
Wrt = Literal["all", "params", "inputs"]

MODES: tuple[str, ...] = BY_NAME["mode"].choices
WRTS: tuple[str, ...] = BY_NAME["wrt"].choices


@dataclass(frozen=True)
class Tolerance:
    """Defaults for one evaluation precision.

    An entry passes when
    ``|analytic - numeric| <= atol * scale + rtol * |numeric| + safety * error``,
    where ``scale`` is the largest numerical gradient of the entry's block (so a
    block of tiny gradients is judged on its own scale) and ``error`` is the
    estimated error of the numerical derivative.

    Attributes:
        rtol: relative tolerance.
        atol: absolute tolerance, as a fraction of the block's gradient scale.
        step: the central-difference step, relative to the entry's magnitude
            (absolute for entries smaller than 1).
        eps: unit round-off of the precision the model is evaluated in.
        noise: assumed relative noise of one loss evaluation, in units of ``eps``.
        safety: how many estimated errors an entry may be off before it fails.
    """

    rtol: float
    atol: float
    step: float
    eps: float
    noise: float = 16.0
    safety: float = 4.0


#: The defaults, keyed by the precision the model is evaluated in. Never scaled by array size.
#: Read-only: a check's ``rtol``/``atol`` override them for that check alone.
TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance(rtol=1e-6, atol=1e-8, step=2e-5, eps=2.0**-52),
        "float32": Tolerance(rtol=1e-3, atol=1e-4, step=5e-3, eps=2.0**-23, noise=64.0),
    }
)


@dataclass(frozen=True)
class CheckOptions:
    """Everything that decides a check's verdict; shown in the report's header."""

    mode: Mode = "auto"
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    max_evals: int | None = None
    nondet_tol: float | None = None
    order: int = 1
    forward: bool = False
    batched: bool = False
    max_refine: int = 200
    probes: int = 1

    def __post_init__(self) -> None:
        for option in OPTIONS:  # the public options: validated as every front end validates them
            if hasattr(self, option.name):
                object.__setattr__(self, option.name, _valid(option, getattr(self, option.name)))
        if not isinstance(self.max_refine, int) or self.max_refine < 0:
            raise InvalidOptionError(f"max_refine must be an int >= 0; got {self.max_refine!r}")
        if not isinstance(self.probes, int) or self.probes < 1:
            raise InvalidOptionError(f"probes must be an int >= 1; got {self.probes!r}")

    def tolerance(self, precision: str) -> Tolerance:
        """The table's row for ``precision``, with this check's ``rtol``/``atol`` overrides."""
        try:
            base = TOLERANCES[precision]
        except KeyError:
            raise InvalidOptionError(
                f"cannot check a model evaluated in {precision} against finite differences: "
                "cast it to float32 or float64, or check it against a reference "
                "implementation with gradcheck.check_kernel(model, reference, x) "
                "(see docs/low-precision.md)"
            ) from None
        overrides = {k: v for k, v in (("rtol", self.rtol), ("atol", self.atol)) if v is not None}
        return replace(base, **overrides) if overrides else base


def _valid(option: Option, value: Any) -> Any:
    """``option.validate(value)``, raising our `InvalidOptionError`."""
    try:
        return option.validate(value)
    except OptionValueError as exc:
        raise InvalidOptionError(str(exc)) from None


def check_wrt(wrt: str | Sequence[str]) -> str | tuple[str, ...]:
    """``wrt`` validated: a category, a block name or pattern, or a tuple of these (an
    `InvalidOptionError` names what is allowed)."""
    return _valid(BY_NAME["wrt"], wrt)
