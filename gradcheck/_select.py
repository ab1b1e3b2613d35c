"""``wrt`` by block name: a problem restricted to the blocks a user names, in every adapter.

``wrt`` is ``"all"``, ``"params"``, ``"inputs"``, a block name, a pattern (``"layer1.*"``,
``"*.bias"``: `fnmatch` rules, case-sensitive), or a list of these; a block is checked when
any of them selects it. A single category goes to the adapter as it is (it builds only those
blocks). Anything else goes to the adapter as ``"all"``, and `select_blocks` then keeps the
named blocks: the others stay at their starting values, and the report names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from fnmatch import fnmatchcase

import numpy as np

from . import _memory
from ._problem import Block, FlatProblem, block_layout
from .errors import InvalidOptionError

CATEGORIES = ("all", "params", "inputs")
_KIND = {"params": "param", "inputs": "input"}


def adapter_wrt(wrt: str | tuple[str, ...]) -> str:
    """What the adapter builds: a single category as it is, ``"all"`` for anything else."""
    return wrt if isinstance(wrt, str) and wrt in CATEGORIES else "all"


def check_category(wrt: object) -> str:
    """``wrt`` as an adapter takes it: one of `CATEGORIES` (`check_gradients` turns names
    and patterns into ``"all"`` and selects the blocks itself)."""
    if not isinstance(wrt, str) or wrt not in CATEGORIES:
        allowed = ", ".join(repr(c) for c in CATEGORIES)
        raise InvalidOptionError(
            f"wrt must be one of {allowed} when an adapter builds a problem "
            f"(check_gradients also takes block names and patterns); got {wrt!r}"
        )
    return wrt


def _selects(item: str, block: Block) -> bool:
    if item == "all":
        return True
    if item in _KIND:
        return block.kind == _KIND[item]
    return fnmatchcase(block.name, item)


def select_blocks(problem: FlatProblem, wrt: str | tuple[str, ...]) -> FlatProblem:
    """``problem`` restricted to the blocks ``wrt`` selects (``problem`` itself when that is
    every block). A name or pattern that selects no block is an `InvalidOptionError`
    listing the blocks there are."""
    items = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    if all(item in CATEGORIES for item in items) and len(items) == 1:
        return problem  # the adapter built exactly these
    blocks = list(problem.blocks)
    for item in items:
        if item not in CATEGORIES and not any(_selects(item, b) for b in blocks):
            names = ", ".join(repr(b.name) for b in blocks)
            raise InvalidOptionError(f"wrt {item!r} matches no block; the blocks are {names}")
    chosen = [b for b in blocks if any(_selects(item, b) for item in items)]
    if len(chosen) == len(blocks):
        return problem
    return _restricted(problem, chosen, wrt)


def _restricted(problem: FlatProblem, chosen: Sequence[Block], wrt: object) -> FlatProblem:
    full0 = problem.theta0
    slices = [b.slice for b in chosen]
    layout = block_layout([(b.name, b.shape, b.kind) for b in chosen])
    parts = [(old, new.slice) for old, new in zip(slices, layout, strict=True)]

    def embed(theta: np.ndarray) -> np.ndarray:
        full = _memory.copy(full0)
        for old, new in parts:
            full[old] = theta[new]
        return full

    def gather(full: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(full, dtype=np.float64)[old] for old, _ in parts])

    def embed_rows(thetas: np.ndarray, base: np.ndarray) -> np.ndarray:
        rows = np.repeat(base[None, :], thetas.shape[0], axis=0)
        for old, new in parts:
            rows[:, old] = thetas[:, new]
        return rows

    theta0 = _memory.freeze(gather(full0))
    batch = problem.loss_batch

    def loss_batch(thetas: np.ndarray) -> np.ndarray:
        assert batch is not None
        return batch(embed_rows(thetas, full0))

    def scatter(u: np.ndarray) -> np.ndarray:  # a vector of the chosen blocks, 0 elsewhere
        return embed_rows(np.asarray(u)[None, :], np.zeros_like(full0))[0]

    second, jvp, gradient_batch = problem.second_order, problem.jvp, problem.gradient_batch
    along = problem.loss_along

    def batched(thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert gradient_batch is not None
        values, gradients = gradient_batch(embed_rows(thetas, full0))
        return values, np.stack([gather(g) for g in gradients])

    prepare = problem.prepare
    left_out = ", ".join(f"`{b.name}`" for b in problem.blocks if b not in chosen)
    return replace(
        problem,
        theta0=theta0,
        loss=lambda theta: problem.loss(embed(theta)),
        gradient=lambda theta: gather(problem.gradient(embed(theta))),
        blocks=layout,
        loss_batch=loss_batch if batch is not None else None,
        notes=[*problem.notes, f"not checked (wrt={wrt!r}): {left_out}"],
        prepare=(lambda n: _restricted(prepare(n), chosen, wrt)) if prepare else None,
        second_order=(lambda u: _restricted(second(scatter(u)), chosen, wrt)) if second else None,
        jvp=(
            (lambda theta, v: jvp(embed(theta), embed_rows(v, np.zeros_like(full0))))
            if jvp
            else None
        ),
        gradient_batch=batched if gradient_batch else None,
        # the blocks left out move by s * 0: they keep their bits, as `embed` keeps them
        loss_along=(lambda v, steps: along(scatter(v), steps)) if along else None,
    )
