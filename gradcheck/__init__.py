"""gradcheck: check hand-written gradients against numerical derivatives, in NumPy, PyTorch and JAX.

The public names live here; every implementation module is private.
"""

from ._api import assert_gradients as assert_gradients
from ._api import check_gradients as check_gradients
from ._check import check_flat as check_flat
from ._errors import GradcheckInputError as GradcheckInputError
from ._errors import GradientCheckError as GradientCheckError
from ._errors import InvalidOptionError as InvalidOptionError
from ._errors import MissingFrameworkError as MissingFrameworkError
from ._errors import ModelError as ModelError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import NothingToCheckError as NothingToCheckError
from ._errors import ShapeMismatchError as ShapeMismatchError
from ._errors import UnsupportedModelError as UnsupportedModelError
from ._options import TOLERANCES as TOLERANCES
from ._options import Tolerance as Tolerance
from ._problem import Block as Block
from ._problem import FlatProblem as FlatProblem
from ._report import BlockResult as BlockResult
from ._report import Entry as Entry
from ._report import Report as Report

__version__ = "0.1.0"

__all__ = [
    "TOLERANCES",
    "Block",
    "BlockResult",
    "Entry",
    "FlatProblem",
    "GradcheckInputError",
    "GradientCheckError",
    "InvalidOptionError",
    "MissingFrameworkError",
    "ModelError",
    "NonFiniteError",
    "NothingToCheckError",
    "Report",
    "ShapeMismatchError",
    "Tolerance",
    "UnsupportedModelError",
    "__version__",
    "assert_gradients",
    "check_flat",
    "check_gradients",
]

# the public path in tracebacks and reprs (``gradcheck.GradientCheckError``), not the private module
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "gradcheck"
del _name, _obj
