"""The exceptions gradcheck raises.

Every error about the user's input is a subclass of `GradcheckInputError` (itself a
``ValueError``) with a one-line message naming what was expected and what came; catch that base
to catch them all. A failed check is a `GradientCheckError`, an ``AssertionError`` that carries
the `gradcheck.Report`. Both are also importable from ``gradcheck`` itself; the specific input
errors live here::

    from gradcheck.errors import ModelError, NonFiniteError
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._report import Report

__all__ = [
    "GradcheckInputError",
    "GradientCheckError",
    "InvalidOptionError",
    "MissingFrameworkError",
    "ModelError",
    "NonFiniteError",
    "NothingToCheckError",
    "ShapeMismatchError",
    "UnsupportedModelError",
]


class GradientCheckError(AssertionError):
    """The analytical gradients disagree with the numerical ones.

    ``str(error)`` is the readable report; ``error.report`` holds the data.
    """

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


class GradcheckInputError(ValueError):
    """Base class of every error about the arguments given to gradcheck."""


class InvalidOptionError(GradcheckInputError):
    """An option is out of range or not one of the allowed values."""


class UnsupportedModelError(GradcheckInputError, TypeError):
    """No adapter knows how to evaluate this model."""


class MissingFrameworkError(GradcheckInputError, ImportError):
    """The adapter for this model needs a framework that is not installed."""


class ShapeMismatchError(GradcheckInputError):
    """Shapes or keys disagree (gradient vs parameter, target vs output, ...)."""


class NonFiniteError(GradcheckInputError):
    """The loss or the analytical gradient is NaN or infinite at the starting point."""


class NothingToCheckError(GradcheckInputError):
    """The model has no parameter or input that could be checked."""


class ModelError(GradcheckInputError):
    """The model misbehaved in a way that makes checking impossible (wrong return type, ...)."""
