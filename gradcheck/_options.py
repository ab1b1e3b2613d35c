"""Options of a check and the per-precision defaults, in one visible table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from numbers import Integral
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np

from ._errors import InvalidOptionError

Mode = Literal["auto", "full", "fast"]
Wrt = Literal["all", "params", "inputs"]

MODES: tuple[str, ...] = get_args(Mode)
WRTS: tuple[str, ...] = get_args(Wrt)


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
TOLERANCES: Mapping[str, Tolerance] = MappingProxyType({
    "float64": Tolerance(rtol=1e-6, atol=1e-8, step=2e-5, eps=2.0**-52),
    "float32": Tolerance(rtol=1e-3, atol=1e-4, step=5e-3, eps=2.0**-23, noise=64.0),
})


@dataclass(frozen=True)
class CheckOptions:
    """Everything that decides a check's verdict; shown in the report's header."""

    mode: Mode = "auto"
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    max_evals: int | None = None
    max_refine: int = 200
    probes: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidOptionError(f"mode must be one of {MODES}; got {self.mode!r}")
        if isinstance(self.seed, (bool, np.bool_)) or not isinstance(self.seed, Integral):
            raise InvalidOptionError(f"seed must be an int; got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # np.int64(3) is the int 3
        if not 0 <= self.seed < 2**64:
            raise InvalidOptionError(f"seed must be an int in [0, 2**64); got {self.seed!r}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidOptionError(f"{name} must be a number >= 0; got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidOptionError(f"{name} must be a finite number >= 0; got {value!r}")
        if self.max_evals is not None and (
            isinstance(self.max_evals, bool)
            or not isinstance(self.max_evals, int)
            or self.max_evals < 1
        ):
            raise InvalidOptionError(
                f"max_evals must be a positive int or None; got {self.max_evals!r}"
            )
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
                f"cannot check a model evaluated in {precision}: cast it to float32 or float64"
            ) from None
        overrides = {k: v for k, v in (("rtol", self.rtol), ("atol", self.atol)) if v is not None}
        return replace(base, **overrides) if overrides else base


def check_wrt(wrt: str) -> Wrt:
    if wrt not in WRTS:
        raise InvalidOptionError(f"wrt must be one of {WRTS}; got {wrt!r}")
    return wrt  # type: ignore[return-value]
