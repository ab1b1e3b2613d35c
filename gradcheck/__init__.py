"""gradcheck: check hand-written gradients against numerical derivatives, in NumPy, PyTorch and JAX.

The public names live here, and the exceptions in `gradcheck.errors`; every implementation
module is private.
"""

import warnings as _warnings
from typing import Any as _Any

from . import errors as errors
from ._api import assert_gradients as assert_gradients
from ._api import check_flat as check_flat
from ._api import check_gradients as check_gradients
from ._options import TOLERANCES as TOLERANCES
from ._options import Tolerance as Tolerance
from ._problem import Block as Block
from ._problem import FlatProblem as FlatProblem
from ._reference_check import check_kernel as check_kernel
from ._report import BlockResult as BlockResult
from ._report import Entry as Entry
from ._report import Report as Report
from .errors import GradcheckInputError as GradcheckInputError
from .errors import GradientCheckError as GradientCheckError

__version__ = "0.1.0"

__all__ = [
    "TOLERANCES",
    "Block",
    "BlockResult",
    "Entry",
    "FlatProblem",
    "GradcheckInputError",
    "GradientCheckError",
    "Report",
    "Tolerance",
    "__version__",
    "assert_gradients",
    "check_flat",
    "check_gradients",
    "check_kernel",
    "errors",
]

# the public path in tracebacks and reprs (``gradcheck.Report``), not the private module; the
# exceptions keep theirs (``gradcheck.errors.ModelError``), except the two also kept here
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "gradcheck"
del _name, _obj

#: Exceptions that moved to `gradcheck.errors`; the old names keep working, with a warning.
_MOVED = frozenset(errors.__all__) - {"GradcheckInputError", "GradientCheckError"}


def __getattr__(name: str) -> _Any:
    if name in _MOVED:
        _warnings.warn(
            f"gradcheck.{name} moved to gradcheck.errors.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(errors, name)
    raise AttributeError(f"module 'gradcheck' has no attribute {name!r}")
