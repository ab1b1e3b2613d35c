"""The contract between adapters and the core: a loss of one flat float64 vector.

An adapter turns a model (NumPy, PyTorch, JAX) into a `FlatProblem`: the
starting point ``theta0``, a ``loss`` and its analytical ``gradient`` as functions
of a flat vector, and `Block` records that name slices of that vector
(one per parameter tensor or input). The core does all the numerics on this
record and never imports a framework; adapters only evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import _memory
from .errors import (
    GradcheckInputError,
    InvalidOptionError,
    NothingToCheckError,
    ShapeMismatchError,
)

BlockKind = Literal["param", "input"]
Precision = Literal["float64", "float32", "float16", "bfloat16"]

__all__ = ["Block", "FlatProblem", "Unavailable", "check_container", "output_projection"]


class Unavailable(Exception):
    """Raised by a contract hook of a `FlatProblem` when this model cannot offer the
    contract: no forward-mode rule, a backward that cannot be differentiated, no batching
    rule. The message says why in one line, naming the layer where it can."""


@dataclass(frozen=True)
class Block:
    """A named slice ``theta[offset : offset + size]`` holding one tensor of shape ``shape``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    kind: BlockKind = "param"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def index(self, flat: int) -> tuple[int, ...]:
        """The multi-index into ``shape`` of the block's ``flat``-th entry."""
        if not self.shape:
            return ()
        return tuple(int(i) for i in np.unravel_index(flat, self.shape))


@dataclass
class FlatProblem:
    """A scalar loss of a flat float64 vector, with its analytical gradient.

    Attributes:
        theta0: the point to check at, float64, 1-D. The problem keeps a read-only
            copy, or takes the array itself when it is already float64, 1-D, contiguous,
            and read-only down to the array that owns its memory (an adapter's fresh vector,
            `gradcheck._memory.freeze`-d: no O(P) copy).
        loss: ``loss(theta) -> float``, the model's loss with ``theta`` substituted.
        gradient: ``gradient(theta) -> ndarray``, the model's own (analytical)
            gradient, float64, same layout as ``theta``. Either may receive a
            read-only array (``theta0`` itself, the checker's reused rows): copy it to
            change it.
        blocks: the named slices of ``theta``; they must tile it exactly, in order.
        loss_batch: optional ``loss_batch(thetas) -> ndarray`` evaluating the
            loss at every row of a ``(k, P)`` array in one call (vmap). The core
            uses it when present, in chunks of at most ``max_batch`` rows.
        max_batch: the largest number of rows ``loss_batch`` accepts at once.
        precision: the floating-point type the model is actually evaluated in;
            steps and tolerances follow it.
        framework: "numpy", "torch", "jax" or "function", for the report.
        notes: lines the report shows as warnings (a fallback taken, ...).
        skipped: names of frozen parameters that were not checked.
        batching: how evaluations ran ("vmap", "loop", "eager", ...), for the report.
        loss_along: optional ``loss_along(v, steps) -> ndarray``: the loss at
            ``theta0 + s * v`` for each ``s`` of the 1-D array ``steps`` (``v`` float64 of
            ``theta``'s length; do not change it), float64 of ``steps``' length. Each point
            must hold, entry by entry, ``theta0 + (s * v)`` rounded as two float64 operations
            (the product, then the sum: the bits a row the core writes would hold), and be
            evaluated through the same path as ``loss_batch`` (or ``loss``), so that its
            values are comparable with the others'. The core uses it in float64, for
            directions that move every entry, instead of writing rows and calling
            ``loss_batch``: an adapter that evaluates on a working vector of its own writes
            the points there directly (no O(P) rows written and then copied).
        prepare: optional ``prepare(evaluations) -> FlatProblem``, for adapters whose
            evaluations get cheaper after a one-off cost (JAX compiles): the core calls it
            once, before evaluating anything, with the number of loss evaluations it
            expects, and checks the problem it returns; the adapter pays the cost only
            when that many evaluations repay it.

    The contracts beyond the first-order reverse-mode gradient (``order=2``, ``forward=True``,
    ``batched=True`` of `gradcheck.check_gradients`) need one optional hook each; an adapter
    leaves a hook None when its models cannot have that contract at all (NumPy), and a hook
    raises `Unavailable` when this model lacks it (a layer without a forward-mode rule):

        second_order: ``second_order(u) -> FlatProblem``: the problem of the scalar
            ``u . g(theta)`` (``g`` the model's own gradient, by its backward, as
            ``gradient`` computes it; ``u`` float64 of ``theta``'s length), whose
            ``gradient`` differentiates the backward (the Hessian-vector product ``H u``),
            on the same ``theta0`` and blocks.
        jvp: ``jvp(theta, V) -> ndarray``: the loss's directional derivatives at ``theta``
            along each row of the ``(k, P)`` array ``V``, by forward-mode differentiation
            (the model's forward-mode rules), float64 of length ``k``.
        gradient_batch: ``gradient_batch(thetas) -> (values, gradients)``: the loss
            ``(k,)`` and the gradient ``(k, P)`` at each row of a ``(k, P)`` array, float64,
            in one batched (vmapped) call through the model's batching rules; compared with
            ``loss`` and ``gradient`` row by row (a batching rule of the forward can change
            the values and leave the gradients alone, or the other way round).
    """

    theta0: np.ndarray
    loss: Callable[[np.ndarray], float]
    gradient: Callable[[np.ndarray], np.ndarray]
    blocks: Sequence[Block]
    loss_batch: Callable[[np.ndarray], np.ndarray] | None = None
    max_batch: int = 256
    precision: Precision = "float64"
    framework: str = "function"
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    batching: str = "loop"
    prepare: Callable[[int], FlatProblem] | None = None
    second_order: Callable[[np.ndarray], FlatProblem] | None = None
    jvp: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    gradient_batch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    loss_along: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        theta = np.asarray(self.theta0)
        if theta.ndim != 1:
            raise ShapeMismatchError(f"theta0 must be 1-D; got an array of shape {theta.shape}")
        if not np.issubdtype(theta.dtype, np.floating) and not np.issubdtype(
            theta.dtype, np.integer
        ):
            raise GradcheckInputError(
                f"theta0 must be real floating point; got dtype {theta.dtype}"
            )
        if not _owned_read_only(theta):
            theta = np.array(theta, dtype=np.float64, copy=True)
            theta.setflags(write=False)
        self.theta0 = theta
        self.blocks = tuple(self.blocks)
        if not self.blocks:
            raise NothingToCheckError("nothing to check: the problem has no blocks")
        offset = 0
        for block in self.blocks:
            if block.offset != offset:
                raise ShapeMismatchError(
                    f"block {block.name!r} starts at {block.offset}; expected {offset} "
                    "(blocks must tile theta in order)"
                )
            offset += block.size
        if offset != self.theta0.size:
            raise ShapeMismatchError(
                f"blocks cover {offset} entries; theta0 has {self.theta0.size}"
            )
        if not self.theta0.size:
            names = ", ".join(f"`{b.name}` {b.shape}" for b in self.blocks)
            raise NothingToCheckError(f"nothing to check: every block is empty ({names})")
        if self.max_batch < 1:
            raise GradcheckInputError(f"max_batch must be >= 1; got {self.max_batch}")

    @property
    def size(self) -> int:
        return int(self.theta0.size)


def _owned_read_only(theta: np.ndarray) -> bool:
    """Whether ``theta`` can be kept as it is: a float64 contiguous vector that nobody can
    write through (see `gradcheck._memory.freeze`)."""
    return theta.dtype == np.float64 and theta.flags.c_contiguous and _memory.frozen(theta)


def output_projection(shape: tuple[int, ...], seed: int, index: int = 0) -> np.ndarray:
    """The fixed random array ``r`` used to reduce an output to ``sum(out * r)`` when ``y is None``.

    Standard normal, float64, a function of ``shape``, ``seed`` and ``index`` (the
    position of the output among several, e.g. an LSTM's ``(out, (h, c))``) only,
    so every adapter projects the same output onto the same direction.
    """
    rng = np.random.default_rng([int(seed), 0x5EED, int(index)])  # every bit of the seed
    return rng.standard_normal(shape)


def block_layout(
    named_shapes: Sequence[tuple[str, tuple[int, ...], BlockKind]],
) -> tuple[Block, ...]:
    """Blocks tiling a flat vector in the given order: ``[(name, shape, kind), ...]``."""
    blocks = []
    offset = 0
    for name, shape, kind in named_shapes:
        block = Block(name=name, shape=tuple(int(s) for s in shape), offset=offset, kind=kind)
        blocks.append(block)
        offset += block.size
    return tuple(blocks)


def check_container(x: Any, name: str = "x") -> None:
    """Reject a one-shot iterable (a generator, ``map``, ``zip``, a file) as a model's input:
    it would be used up by the first evaluation. One line, naming what came."""
    if isinstance(x, Iterator):
        raise InvalidOptionError(
            f"{name} must be an array, a tuple, list or dict of arrays, or None; got a "
            f"{type(x).__name__}, which can be iterated only once (pass a tuple or list)"
        )
