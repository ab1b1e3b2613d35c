"""The options of a gradient check, defined once for every place a user gives them.

``check_gradients``' keywords are validated here (``gradcheck._options.CheckOptions``); the
pytest plugin's ``--gradcheck-*`` options, ``gradcheck_*`` ini keys and marker keywords, and
``gradcheck check``'s flags are made from `OPTIONS` (name, default, help text, how a value is
read from text and what values are allowed). A new option is one `Option` here, plus its
keyword in ``check_gradients``' signature and docstring; ``tests/test_docs.py`` checks that the
signature, the docs' tables and the command lines agree with this table.

Standard library only, and outside the ``gradcheck`` package: the pytest plugin imports it in
every pytest session of every user, before (and without) importing NumPy.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from types import MappingProxyType
from typing import Any, Literal

Kind = Literal["choice", "blocks", "seed", "tolerance", "count", "flag", "order"]

#: Text that means "not set" (the default) for an option whose default is None.
_UNSET_TEXT = ("", "none", "default")

#: How a ``"flag"`` is written on a command line or in an ini file.
_TRUE_TEXT = ("1", "true", "yes", "on")
_FALSE_TEXT = ("0", "false", "no", "off")

#: The derivative orders a check can take (``order``).
ORDERS = (1, 2)


class OptionValueError(ValueError):
    """A value an option does not take. The message is one line: what is expected, what came."""


@dataclass(frozen=True)
class Option:
    """One option of a check.

    Attributes:
        name: the keyword of ``check_gradients`` (``max_evals``); the flags and ini keys are
            made from it (``--max-evals``, ``--gradcheck-max-evals``, ``gradcheck_max_evals``).
        default: the value when the option is not given.
        help: one line for ``--help`` texts.
        metavar: the value's name in ``--help`` (``N``, ``FLOAT``).
        kind: ``"choice"`` (one of ``choices``), ``"blocks"`` (one of ``choices``, a block
            name or pattern, or a list of these), ``"seed"`` (an int in [0, 2**64)),
            ``"tolerance"`` (a finite number >= 0, or None), ``"count"`` (an int >= 1, or None),
            ``"flag"`` (True or False; ``yes``/``no`` in text), ``"order"`` (1 or 2).
        choices: the allowed values of a ``"choice"``, the categories of ``"blocks"``.
        per_session: whether a whole test session may set it (a pytest command-line option
            and ini key). ``wrt`` depends on each model's blocks: marker and call only.
        default_help: how ``--help`` texts describe the default, where ``str(default)`` would
            not say it.
    """

    name: str
    default: Any
    help: str
    metavar: str
    kind: Kind
    choices: tuple[str, ...] = ()
    per_session: bool = True
    default_help: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag of ``gradcheck check``: ``--max-evals``."""
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as ``--help`` texts show it."""
        if self.default_help:
            return self.default_help
        return "none" if self.default is None else str(self.default)

    def validate(self, value: Any) -> Any:
        """``value`` as a Python caller passed it, normalised (``np.int64(3)`` is ``3``).

        Raises:
            OptionValueError: the value is not allowed.
        """
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise OptionValueError(f"{self.name} must be one of {allowed}; got {value!r}")
            return value
        if self.kind == "blocks":
            items = (value,) if isinstance(value, str) else value
            if (
                not isinstance(items, (list, tuple))
                or not items
                or not all(isinstance(item, str) and item.strip() for item in items)
            ):
                allowed = ", ".join(repr(c) for c in self.choices)
                raise OptionValueError(
                    f"{self.name} must be {allowed}, a block name or pattern, or a list of "
                    f"these; got {value!r}"
                )
            return value if isinstance(value, str) else tuple(items)
        if self.kind == "flag":
            numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in (
                "bool",
                "bool_",
            )
            if isinstance(value, bool) or numpy_bool:  # NumPy's bool too
                return bool(value)
            raise OptionValueError(f"{self.name} must be True or False; got {value!r}")
        if self.kind == "order":
            if isinstance(value, bool) or not isinstance(value, Integral) or value not in ORDERS:
                allowed = " or ".join(str(o) for o in ORDERS)
                raise OptionValueError(f"{self.name} must be {allowed}; got {value!r}")
            return int(value)
        if value is None and self.default is None:
            return None
        if self.kind == "tolerance":
            if isinstance(value, bool) or not isinstance(value, Real):
                raise OptionValueError(f"{self.name} must be a number >= 0; got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise OptionValueError(f"{self.name} must be a finite number >= 0; got {value!r}")
            return float(value)
        if self.kind == "count":
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise OptionValueError(f"{self.name} must be a positive int or None; got {value!r}")
            return int(value)
        # "seed": NumPy's bools are not Integral, Python's are
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise OptionValueError(f"{self.name} must be an int; got {value!r}")
        if not 0 <= int(value) < 2**64:
            raise OptionValueError(f"{self.name} must be an int in [0, 2**64); got {value!r}")
        return int(value)

    def parse(self, text: str) -> Any:
        """A value written on a command line or in an ini file, as `validate` returns it.

        Raises:
            OptionValueError: the text is not a value of this option.
        """
        stripped = str(text).strip()
        if self.kind == "choice":
            return self.validate(stripped)
        if self.kind == "blocks":  # comma-separated: "params,input"
            items = tuple(item.strip() for item in stripped.split(","))
            return self.validate(items[0] if len(items) == 1 else items)
        if self.kind == "flag":
            if stripped.lower() in _TRUE_TEXT:
                return True
            if stripped.lower() in _FALSE_TEXT:
                return False
            raise OptionValueError(f"{self.name} must be yes or no; got {text!r}")
        if self.default is None and stripped.lower() in _UNSET_TEXT:
            return None
        convert: Callable[[str], Any] = float if self.kind == "tolerance" else int
        try:
            value = convert(stripped)
        except ValueError:
            return self.validate(text)  # not a number: the message quotes what was written
        return self.validate(value)

    def argparse_type(self) -> Callable[[str], Any]:
        """`parse` as an argparse ``type=``: a bad value is argparse's usage error, quoting
        our message (pytest's command-line options go through argparse too)."""

        def convert(text: str) -> Any:
            try:
                return self.parse(text)
            except OptionValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = self.name  # argparse names the converter in some messages
        return convert


OPTIONS: tuple[Option, ...] = (
    Option(
        "mode",
        "auto",
        "check mode: auto, full (every entry) or fast (random directions)",
        "MODE",
        "choice",
        choices=("auto", "full", "fast"),
    ),
    Option("seed", 0, "seed of every random choice of a check", "INT", "seed"),
    Option(
        "rtol",
        None,
        "relative tolerance",
        "FLOAT",
        "tolerance",
        default_help="gradcheck.TOLERANCES for the model's precision",
    ),
    Option(
        "atol",
        None,
        "absolute tolerance, relative to each block's largest gradient",
        "FLOAT",
        "tolerance",
        default_help="gradcheck.TOLERANCES for the model's precision",
    ),
    Option(
        "max_evals",
        None,
        "cap on loss evaluations per check; a check that reaches it fails",
        "N",
        "count",
    ),
    Option(
        "nondet_tol",
        None,
        "how far two backward passes at the same point may differ, relative to each block's "
        "largest gradient (given: checked in every mode)",
        "FLOAT",
        "tolerance",
        default_help="checked in full mode only, within atol's floor",
    ),
    Option(
        "order",
        1,
        "1: the gradient; 2: also the second derivative (the backward differentiated)",
        "ORDER",
        "order",
    ),
    Option(
        "forward",
        False,
        "also check forward mode (JVP rules) against the same numerical derivatives",
        "BOOL",
        "flag",
        default_help="no",
    ),
    Option(
        "batched",
        False,
        "also check that the backward under vmap agrees with it one point at a time",
        "BOOL",
        "flag",
        default_help="no",
    ),
    Option(
        "wrt",
        "all",
        "which blocks to check: all, params, inputs, or block names or patterns (comma-separated)",
        "WHICH",
        "blocks",
        choices=("all", "params", "inputs"),
        per_session=False,
    ),
)

#: `OPTIONS` by name.
BY_NAME: Mapping[str, Option] = MappingProxyType({option.name: option for option in OPTIONS})
