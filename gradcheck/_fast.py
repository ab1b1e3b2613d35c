"""Fast mode: random directional probes per block, with localisation of wrong entries."""

from __future__ import annotations

import numpy as np

from ._numerics import Evaluator
from ._options import CheckOptions, Tolerance
from ._problem import FlatProblem
from ._report import BlockResult


def run_fast(
    problem: FlatProblem,
    ev: Evaluator,
    g: np.ndarray,
    f0: float,
    tol: Tolerance,
    options: CheckOptions,
) -> tuple[list[BlockResult], list[str]]:
    raise NotImplementedError
