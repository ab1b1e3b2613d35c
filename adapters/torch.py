"""PyTorch adapter: an ``nn.Module`` or a callable of tensors as a :class:`FlatProblem`.

What is checked:

* every parameter of an ``nn.Module`` with ``requires_grad=True``, one block per
  tensor, named as in ``named_parameters()`` (frozen ones are listed in ``skipped``;
  complex ones are named in a note and not checked);
* every floating-point tensor in the input, as blocks ``input`` (one tensor),
  ``input[1]`` (a tuple or list, passed as positional arguments), ``input['key']``
  (a dict, passed as keyword arguments); nested containers are walked the same
  way (``input[0]['a']``). Integer tensors (indices, labels) and other values pass
  through unchanged; complex ones are named in a note.

The user's module is never written to, nor run: it is deep-copied once per attempt
(float64, then the model's own precision where float64 is impossible), and the copy's
own parameters (``nn.Parameter``, views of one working vector) are set to each point evaluated.
Whatever runs, the forward, a backward that calls the module again (an adjoint method,
a re-entrant checkpoint) or a hook, sees those parameters; side effects of the forward
land on the copy. Buffers (a BatchNorm's running statistics) are restored before every
evaluation. Batched loss evaluations substitute views of many parameter vectors into the
copy with ``torch.func.functional_call`` under ``torch.func.vmap``, where the model allows
it; whether it does is tried only when a check expects enough evaluations to repay the
trial (`FlatProblem.prepare`: full mode), so a fast check pays for one gradient and the
evaluations it makes, nothing else. A loss callable that reads the user's module (a weight
penalty) sees the evaluated tensors: the user's module is substituted
(``functional_call``) while the loss runs.

Every evaluation runs outside inference mode, with autograd on or off as it needs
whatever the caller's grad mode, on fresh tensors (the inputs, the target a loss callable
receives), holding `gradcheck._state.GLOBAL_STATE` while it sets the torch RNG (CPU, and
CUDA when the model lives there) to a state derived from ``seed`` and restores the
caller's, so dropout masks are the same in every evaluation and in every thread.

The adapter does no numerics: it only evaluates ``loss``, ``loss_batch`` (many
parameter vectors per call with ``torch.func.vmap`` where the model allows it and the check
is worth the trial, a loop otherwise) and ``gradient`` (autograd).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from gradcheck import _memory
from gradcheck._calls import call, call_style, input_hint
from gradcheck._errors import first_line
from gradcheck._losses import (
    CLASS_LOSSES,
    canonical_loss_name,
    implementation,
    missing_target,
    nothing_to_check,
)
from gradcheck._problem import BlockKind, FlatProblem, Precision, block_layout, output_projection
from gradcheck._select import check_category
from gradcheck._state import GLOBAL_STATE
from gradcheck.errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
)

__all__ = ["build_problem", "matches"]

# Bytes of intermediate results one vmapped evaluation may use, per batch.
CPU_BATCH_BUDGET = 256 * 2**20
MAX_VMAP_BATCH = 512
MAX_LOOP_BATCH = 1024
# The fewest loss evaluations a check must expect before the batching choice (vmap or a
# loop: about five evaluations to make) is made; a fast check (two) runs a loop.
VMAP_FROM = 4
# Entries per piece where `_Evaluator.values_along` writes a point (the piece stays in cache).
_ALONG_PIECE = 1 << 15

_PRECISIONS: dict[torch.dtype, Precision] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_RANK = {torch.float64: 3, torch.float32: 2, torch.float16: 1, torch.bfloat16: 0}


# An error that shows the model cannot run in float64: a dtype mismatch names a dtype.
_DTYPE_ERROR = re.compile(r"double|float64|dtype|scalar type", re.IGNORECASE)


# torch.utils.checkpoint's warning (use_reentrant=True) when no input requires grad
_NO_INPUT_REQUIRES_GRAD = "None of the inputs have requires_grad=True"


class _NotFloat64(Exception):
    """Raised inside the float64 attempt when the model's output is not float64."""


class _Raised(Exception):
    """The user's code raised during an evaluation: in the model's forward, in the loss
    callable, or in the backward."""

    WHO: ClassVar[dict[str, str]] = {
        "forward": "the model's forward",
        "loss": "the loss",
        "backward": "the model's backward",
        "jvp": "the model's forward-mode rule (a Function's jvp, or torch's for an op)",
        "vmap": "the model under vmap (a Function's vmap rule, or torch's batching of an op)",
    }

    def __init__(self, where: str, exc: BaseException) -> None:
        super().__init__(f"{self.WHO[where]} raised {first_line(exc)}")
        self.where = where
        self.exc = exc

    def model_error(self, when: str, hint: str = "") -> ModelError:
        error = ModelError(f"{self.WHO[self.where]} raised {when}: {first_line(self.exc)}{hint}")
        error.__cause__ = self.exc
        return error


# --------------------------------------------------------------------------- dispatch
def matches(model: Any) -> bool:
    """Whether ``model`` is a torch model object: an ``nn.Module`` or an
    ``autograd.Function`` subclass. A plain callable (``torch.sin``, a lambda of
    tensors) is routed here by `gradcheck._dispatch`, by the tensors it is given."""
    if isinstance(model, nn.Module):
        return True
    return isinstance(model, type) and issubclass(model, torch.autograd.Function)


# --------------------------------------------------------------------------- trees
def _flatten(obj: Any, name: str, leaves: list[tuple[str, Any]]) -> Callable[[Iterator[Any]], Any]:
    """Append ``(name, leaf)`` for every leaf of ``obj``; return a function that
    rebuilds ``obj``'s structure from an iterator of new leaves (in the same order)."""
    if isinstance(obj, Mapping):
        keys = list(obj)
        subs = [_flatten(obj[k], f"{name}[{k!r}]", leaves) for k in keys]

        def rebuild_map(it: Iterator[Any]) -> Any:
            return {k: sub(it) for k, sub in zip(keys, subs, strict=True)}

        return rebuild_map
    if isinstance(obj, (tuple, list)):
        subs = [_flatten(v, f"{name}[{i}]", leaves) for i, v in enumerate(obj)]
        kind = type(obj)
        named = hasattr(obj, "_fields")

        def rebuild_seq(it: Iterator[Any]) -> Any:
            values = [sub(it) for sub in subs]
            if named:
                return kind(*values)
            return list(values) if kind is list else tuple(values)

        return rebuild_seq
    leaves.append((name, obj))
    return next


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nested output, dict entries in sorted key order (as JAX does)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        found = []
        for key in sorted(obj, key=repr):
            found.extend(_tensor_leaves(obj[key]))
        return found
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


# --------------------------------------------------------------------------- RNG
class _Rng:
    """Sets the torch RNG to one fixed state per evaluation; restores the caller's."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self._cpu = torch.Generator().manual_seed(int(seed)).get_state()
        self._cuda: torch.Generator | None = None
        self._cuda_state: torch.Tensor | None = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            gen = torch.cuda.default_generators[index]
            with GLOBAL_STATE:
                saved = gen.get_state()
                try:
                    gen.manual_seed(int(seed))
                    self._cuda_state = gen.get_state()
                finally:
                    gen.set_state(saved)
            self._cuda = gen

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Save the caller's state and restore it on the way out, holding `GLOBAL_STATE`
        throughout: a check in another thread cannot reset or restore it in between."""
        with GLOBAL_STATE:
            cpu = torch.default_generator.get_state()
            cuda = self._cuda.get_state() if self._cuda is not None else None
            try:
                yield
            finally:
                torch.default_generator.set_state(cpu)
                if self._cuda is not None and cuda is not None:
                    self._cuda.set_state(cuda)

    def reset(self) -> None:
        torch.default_generator.set_state(self._cpu)
        if self._cuda is not None and self._cuda_state is not None:
            self._cuda.set_state(self._cuda_state)


# --------------------------------------------------------------------------- losses
def _class_targets(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class targets as probabilities shaped like ``out`` (N, C), as in ``gradcheck._losses``."""
    if out.ndim != 2:
        raise ShapeMismatchError(f"loss {name!r} needs out of shape (N, C); got {tuple(out.shape)}")
    if y.shape == out.shape:
        return y.to(device=out.device, dtype=out.dtype)
    if y.shape == out.shape[:1] and not y.is_floating_point() and not y.is_complex():
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            raise ShapeMismatchError(
                f"loss {name!r}: labels must lie in [0, {out.shape[1]}); "
                f"got values from {int(y.min())} to {int(y.max())}"
            )
        probs = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
        probs[torch.arange(out.shape[0], device=out.device), y.to(out.device).long()] = 1.0
        return probs
    raise ShapeMismatchError(
        f"loss {name!r} with out of shape {tuple(out.shape)} needs y of shape "
        f"{tuple(out.shape)} or integer labels of shape {tuple(out.shape[:1])}; "
        f"got y of shape {tuple(y.shape)}, dtype {y.dtype}"
    )


def _batch(o: torch.Tensor) -> int:
    return int(o.shape[0])


#: The named losses in torch, by canonical name (`gradcheck._losses` defines them): each
#: takes the output and the target prepared by `_named_loss`.
TORCH_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda o, t: ((o - t) ** 2).mean(),
    "half_sse": lambda o, t: 0.5 * ((o - t) ** 2).sum(),
    "cross_entropy": lambda o, t: -(t * torch.log_softmax(o, dim=1)).sum() / _batch(o),
    "categorical_crossentropy": lambda o, t: -(t * torch.log(o)).sum() / _batch(o),
    "bce": lambda o, t: -(t * torch.log(o) + (1.0 - t) * torch.log1p(-o)).mean(),
    # log(1 + exp(z)) - y z, stable for any z
    "bce_with_logits": lambda o, t: (torch.logaddexp(o, torch.zeros_like(o)) - t * o).mean(),
}


def _named_loss(name: str, out: Any, y: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch version of a named loss with ``y`` fixed, checked against ``out``."""
    key, fn = implementation(TORCH_LOSSES, name, "torch")
    if not isinstance(out, torch.Tensor):
        raise ShapeMismatchError(
            f"loss {key!r} needs the model to return one tensor; got {type(out).__name__}"
        )
    if y is None:
        raise missing_target(key)
    target = torch.as_tensor(y, device=out.device)
    if key in CLASS_LOSSES:
        t = _class_targets(key, out, target)
    elif tuple(target.shape) != tuple(out.shape):
        raise ShapeMismatchError(
            f"loss {key!r} needs y of the output's shape {tuple(out.shape)}; "
            f"got {tuple(target.shape)}"
        )
    else:
        t = target.to(dtype=out.dtype)
    return lambda o: fn(o, t)


# --------------------------------------------------------------------------- memory
def _bytes_per_evaluation(run: Callable[[], Any]) -> int | None:
    """Bytes of every intermediate result one evaluation allocates (an upper bound)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # pragma: no cover - private module moved
        return None

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in _tensor_leaves(out):
                _Count.total += t.numel() * t.element_size()
            return out

    try:
        with _Count():
            run()
    except Exception:
        return None
    return _Count.total


# --------------------------------------------------------------------------- trees of tensors
def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (mappings, lists, tuples and named
    tuples are rebuilt; anything else is kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        values = [_map_tensors(v, fn) for v in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*values)
        return list(values) if isinstance(obj, list) else tuple(values)
    return obj


def _own(t: torch.Tensor) -> torch.Tensor:
    """A copy of a user's tensor that is ours: detached, not an inference tensor (made
    outside inference mode), and ``requires_grad`` as the user's was."""
    with torch.no_grad():
        mine = t.detach().clone()
    return mine.requires_grad_(t.requires_grad) if mine.is_floating_point() else mine


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _cast_tree(obj: Any, dtype: torch.dtype) -> Any:
    return _map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _reject_one_shot(obj: Any, name: str) -> None:
    """A one-shot or unordered iterable (a generator, ``map``, a set) cannot be an input:
    the first evaluation would use it up, or its order is not fixed. One line, naming it."""
    leaves: list[tuple[str, Any]] = []
    _flatten(obj, name, leaves)
    for where, value in leaves:
        if isinstance(value, (Iterator, set, frozenset)):
            raise InvalidOptionError(
                f"{where} must be a tensor, an array, a tuple, list or dict of them, or None; "
                f"got a {type(value).__name__}, which "
                + (
                    "has no fixed order"
                    if isinstance(value, (set, frozenset))
                    else "can be iterated only once"
                )
                + " (pass a tuple or list)"
            )


@contextlib.contextmanager
def _normal_mode(grad: bool) -> Iterator[None]:
    """Outside inference mode, autograd on or off: whatever the caller's modes are."""
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


# --------------------------------------------------------------------------- evaluator
class _Scope(nn.Module):
    """Holds modules as children so that one ``functional_call`` substitutes tensors in all
    of them while it runs a closure: our copy (``model``) and, while a loss callable runs,
    the user's module (``user``), so that a loss that reads the user's parameters sees the
    evaluated ones."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        return closure()


class _Spec:
    """What was asked, independent of the precision the model is evaluated in. Tensors the
    user gave (inputs, target) are copied once, outside inference mode: later changes to
    the user's tensors cannot reach the check, and inference tensors can be differentiated."""

    def __init__(self, model: Any, x: Any, y: Any, loss: Any, wrt: str, seed: int) -> None:
        check_category(wrt)
        if isinstance(model, type) and issubclass(model, torch.autograd.Function):
            model = model.apply
        self.module: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.fn: Callable[..., Any] = model
        self.wrt = wrt
        self.seed = int(seed)
        if loss is None and y is not None:
            loss = "mse"
        if isinstance(loss, str):
            canonical_loss_name(loss)
        elif loss is not None and not callable(loss):
            raise InvalidOptionError(
                "loss must be None, a callable loss(out, y) or a loss name; "
                f"got {type(loss).__name__}"
            )
        _reject_one_shot(x, "x")
        _reject_one_shot(y, "y")
        self.loss = loss
        self.device = self._device(x)
        self.y = _map_tensors(self._as_tensor(y, self._model_dtype()), _own)
        # the one rule of every adapter (gradcheck._calls); a module by its forward's signature
        target = self.module.forward if self.module is not None else model
        self.style = call_style(target, x)
        self.hint = input_hint(target, x)  # for an error the forward raises on its input
        self.leaves: list[tuple[str, Any]] = []
        self.rebuild = _flatten(x, "input", self.leaves) if x is not None else None
        model_dtype = self._model_dtype()
        self.leaves = [
            (n, _map_tensors(self._as_tensor(v, model_dtype), _own)) for n, v in self.leaves
        ]

    def _device(self, x: Any) -> torch.device:
        if self.module is not None:
            for t in [*self.module.parameters(), *self.module.buffers()]:
                return t.device
        leaves: list[tuple[str, Any]] = []
        _flatten(x, "input", leaves)
        for _, v in leaves:
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")

    def _model_dtype(self) -> torch.dtype | None:
        if self.module is not None:
            for p in self.module.parameters():
                if p.is_floating_point() and not _is_lazy(p):
                    return p.dtype
        return None

    def _as_tensor(self, value: Any, dtype: torch.dtype | None) -> Any:
        """NumPy arrays become tensors on the model's device (float ones in the model's dtype)."""
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(np.array(value))
            if tensor.is_floating_point() and dtype is not None:
                tensor = tensor.to(dtype)
            return tensor.to(self.device)
        return value

    def call(self, fn: Callable[..., Any], leaves: Sequence[Any]) -> Any:
        if self.rebuild is None:
            return fn()
        return call(fn, self.style, self.rebuild(iter(leaves)))


def _is_lazy(t: torch.Tensor) -> bool:
    return isinstance(t, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A deep copy of ``module`` in which the tensors named in ``memo`` (by ``id``) are
    replaced by their entries. Tensors the module keeps that are part of a graph (an
    activation cached by an earlier forward) are copied detached: a graph cannot be copied."""
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo.setdefault(id(value), _own(value))
    try:
        return copy.deepcopy(module, memo)
    except Exception as exc:
        raise ModelError(
            f"the module cannot be copied (copy.deepcopy raised {first_line(exc)}); "
            "gradcheck evaluates a copy so that the module is left as it was"
        ) from exc


class _Evaluator:
    """Evaluates the loss and its gradient at flat vectors, in one precision, on a copy
    of the user's module whose checked parameters are views of one working vector."""

    def __init__(self, spec: _Spec, *, float64: bool) -> None:
        self.spec = spec
        self.float64 = float64
        self.rng = _Rng(spec.seed, spec.device)
        module = spec.module
        check_params = spec.wrt in ("all", "params")
        check_inputs = spec.wrt in ("all", "inputs")

        def convert(t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if float64 and t.is_floating_point():
                    return t.detach().to(dtype=torch.float64, copy=True)
                return t.detach().clone()

        # checked tensors: (name, source tensor, kind)
        checked: list[tuple[str, torch.Tensor, BlockKind]] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.param_names: list[str] = []
        empty: list[tuple[str, tuple[int, ...]]] = []
        if module is not None:
            lazy = [
                n for n, t in [*module.named_parameters(), *module.named_buffers()] if _is_lazy(t)
            ]
            if lazy:
                raise ModelError(
                    "the model has uninitialized (lazy) parameters or buffers "
                    f"({', '.join(f'`{n}`' for n in lazy)}); call it once on an input to "
                    "initialize them before checking"
                )
            for name, p in module.named_parameters():
                if check_params and p.requires_grad and p.is_floating_point() and p.numel():
                    checked.append((name, p, "param"))
                    self.param_names.append(name)
                    continue
                if check_params and p.requires_grad and p.is_floating_point():
                    empty.append((name, tuple(p.shape)))
                    continue
                if check_params and p.requires_grad:
                    self.notes.append(f"parameter `{name}` has dtype {p.dtype} and is not checked")
                if check_params:
                    self.skipped.append(name)

        self.input_slots: list[int] = []  # positions of checked leaves in spec.leaves
        self.leaf_values: list[Any] = []  # the other leaves (None where a checked one goes)
        for i, (name, value) in enumerate(spec.leaves):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if check_inputs and not value.numel():
                    empty.append((name, tuple(value.shape)))
                elif check_inputs:
                    checked.append((name, value, "input"))
                    self.input_slots.append(i)
                    self.leaf_values.append(None)
                    continue
                self.leaf_values.append(convert(value) if float64 else value)
                continue
            if isinstance(value, torch.Tensor) and value.is_complex() and check_inputs:
                self.notes.append(f"`{name}` has dtype {value.dtype} and is not checked")
            self.leaf_values.append(value)
        # tensors without entries have no gradient to check: named, left out of the blocks
        listed = ", ".join(f"`{n}` {s}" for n, s in empty)
        if not checked and empty:
            raise NothingToCheckError(f"nothing to check: every block is empty ({listed})")
        if not checked:
            raise self._nothing_to_check(spec)
        if empty:
            self.notes.append(f"no entries, nothing to check: {listed}")

        dtypes = {t.dtype for _, t, _ in checked}
        if float64:
            self.dtype = torch.float64
        elif len(dtypes) == 1:
            self.dtype = dtypes.pop()
        else:
            listed = ", ".join(f"`{n}` {t.dtype}" for n, t, _ in checked)
            raise ModelError(
                f"cannot check tensors of mixed dtypes in their own precision; got {listed}"
            )
        self.blocks = block_layout([(n, tuple(t.shape), k) for n, t, k in checked])
        self.shapes = [tuple(t.shape) for _, t, _ in checked]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)
        self.theta0 = np.concatenate(
            [t.detach().to("cpu", torch.float64).reshape(-1).numpy() for _, t, _ in checked],
            out=_memory.empty(self.size),
        )
        # theta0 as a tensor for the evaluations there that only read it (`_load` copies it
        # into `work`), made before the array is frozen: torch.from_numpy warns on read-only
        # arrays, and a copy would be O(P) more at every check's first evaluation
        self._theta0_row = torch.from_numpy(self.theta0)
        _memory.freeze(self.theta0)  # the problem keeps it as it is (no second copy)
        # the working vector: the copy's checked parameters are views of it (filled from the
        # tensors themselves: no second O(P) copy through theta0)
        self.work = torch.empty(self.size, dtype=self.dtype, device=spec.device)
        views = self._views(self.work)
        with torch.no_grad():
            for view, (_, t, _) in zip(views, checked, strict=True):
                view.copy_(t.detach())
        n_params = len(self.param_names)
        self.input_views = views[n_params:]

        self.model: nn.Module | None = None  # our copy
        self.params: list[nn.Parameter] = []  # its checked parameters, in block order
        # buffers of the copy: (owner, name, tensor, its value at the start, version seen)
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor, list[int]]] = []
        self.scope: _Scope | None = None  # for vmap: the copy (and the user's module)
        self.user_scope: _Scope | None = None  # the user's module while a loss callable runs
        self.user_tensors: dict[str, torch.Tensor] = {}  # what stands in for its tensors
        if module is not None:
            memo: dict[int, Any] = {}
            chosen = dict(zip(self.param_names, views[:n_params], strict=True))
            for name, p in module.named_parameters():
                if name in chosen:
                    new = nn.Parameter(chosen[name], requires_grad=True)
                    self.params.append(new)
                else:
                    new = nn.Parameter(convert(p), requires_grad=p.requires_grad)
                memo[id(p)] = new
            for b in module.buffers():
                memo[id(b)] = convert(b)
            self.model = _copy_module(module, memo)
            for owner in self.model.modules():
                for name, b in owner.named_buffers(recurse=False):
                    master = b.detach().clone()
                    self.buffers.append((owner, name, b, master, [b._version]))
            self.scope = _Scope(model=self.model)
            if callable(spec.loss):
                self.user_scope = _Scope(user=module)
                self.scope = _Scope(model=self.model, user=module)
                named = [*self.model.named_parameters(), *self.model.named_buffers()]
                self.user_tensors = {f"user.{n}": t for n, t in named}
        self.call_fn: Callable[..., Any] = self.model if self.model is not None else spec.fn
        self.reducer: Callable[[Any], torch.Tensor] | None = None
        self.observed: set[torch.dtype] = {self.dtype}
        self._grad_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._use_backward = False  # autograd.grad failed where .backward() worked

    @staticmethod
    def _nothing_to_check(spec: _Spec) -> NothingToCheckError:
        frozen = []
        if spec.module is not None:
            frozen = [n for n, p in spec.module.named_parameters() if not p.requires_grad]
        extra = f" (frozen: {', '.join(frozen)})" if frozen and spec.wrt != "inputs" else ""
        return nothing_to_check(spec.wrt, extra)

    # ---------------------------------------------------------------- plumbing
    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The checked tensors as views of ``flat`` (one row of theta), in block order."""
        return [v.view(s) for v, s in zip(flat.split(self.sizes), self.shapes, strict=True)]

    def _leaves(self, checked: Sequence[torch.Tensor]) -> list[Any]:
        """The input leaves for one evaluation: ``checked`` in the checked slots, fresh
        copies of the other tensors (a forward that changes its input in place cannot
        reach the next evaluation)."""
        leaves = [_fresh(v) if isinstance(v, torch.Tensor) else v for v in self.leaf_values]
        for slot, value in zip(self.input_slots, checked, strict=True):
            leaves[slot] = value
        return leaves

    @contextlib.contextmanager
    def _evaluating(self, grad: bool) -> Iterator[None]:
        """One evaluation's context: `GLOBAL_STATE` held, normal (not inference) mode,
        autograd as asked, the caller's RNG saved and restored, our buffers restored."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(GLOBAL_STATE)
            if not grad:
                # A re-entrant checkpoint warns that gradients will be None when none of its
                # inputs requires grad, as none does in an evaluation without autograd.
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", _NO_INPUT_REQUIRES_GRAD, UserWarning)
            stack.enter_context(_normal_mode(grad))
            stack.enter_context(self.rng.guard())
            try:
                yield
            finally:
                self._restore_buffers()

    def _run(self, params: dict[str, torch.Tensor], closure: Callable[[], Any]) -> Any:
        if not params:
            return closure()
        scope = self.scope if any(k.startswith("model.") for k in params) else self.user_scope
        assert scope is not None
        return torch.func.functional_call(scope, params, (closure,), strict=False)

    def _objective(self, leaves: Sequence[Any], *, grad: bool) -> torch.Tensor:
        try:
            out = self.spec.call(self.call_fn, leaves)
        except GradcheckInputError:
            raise
        except Exception as exc:
            raise _Raised("forward", exc) from exc
        if self.reducer is None:
            self.reducer = self._make_reducer(out, grad=grad)
        return self.reducer(out)

    def _make_reducer(self, out: Any, *, grad: bool) -> Callable[[Any], torch.Tensor]:
        """Built at the first evaluation (the gradient's, ``grad=True``) from the output it sees."""
        spec = self.spec
        floats = [t for t in _tensor_leaves(out) if t.is_floating_point()]
        self.observed.update(t.dtype for t in floats)
        if self.float64 and any(t.dtype != torch.float64 for t in floats):
            kinds = sorted({str(t.dtype) for t in floats if t.dtype != torch.float64})
            raise _NotFloat64(f"its output came out {', '.join(kinds)} on float64 parameters")
        if isinstance(spec.loss, str):
            y = spec.y
            if self.float64 and isinstance(y, torch.Tensor) and y.is_floating_point():
                y = y.to(torch.float64)
            named = _named_loss(spec.loss, out, y)
            return lambda o: self._scalar(named(o))
        if spec.loss is not None:
            fn = spec.loss
            y = _cast_tree(spec.y, torch.float64) if self.float64 else spec.y

            def call_loss(o: Any) -> torch.Tensor:
                try:
                    value = fn(o, _map_tensors(y, _fresh))  # a fresh target every time
                except GradcheckInputError:
                    raise
                except Exception as exc:
                    raise _Raised("loss", exc) from exc
                return self._scalar(value)

            return call_loss
        if not floats:
            raise ModelError(
                f"the model returned no floating-point tensor to project; got {type(out).__name__}"
            )
        keep = list(range(len(floats)))
        if grad:
            # Like torch.autograd.gradcheck, leave out outputs the model declares
            # non-differentiable (no grad_fn while others have one: a BatchNorm's saved
            # statistics, mark_non_differentiable) rather than blame their zero gradient.
            differentiable = [k for k, t in enumerate(floats) if t.requires_grad]
            if differentiable and len(differentiable) < len(floats):
                left_out = [f"#{k + 1}" for k in keep if k not in differentiable]
                verb = "does" if len(left_out) == 1 else "do"
                self.notes.append(
                    f"output {', '.join(left_out)} of {len(floats)} floating-point outputs "
                    f"{verb} not require grad (declared non-differentiable): left out of the "
                    "output projection"
                )
                keep = differentiable
        projections = [
            torch.from_numpy(output_projection(tuple(floats[k].shape), spec.seed, k)).to(
                device=floats[k].device, dtype=floats[k].dtype
            )
            for k in keep
        ]

        def project(o: Any) -> torch.Tensor:
            leaves = [t for t in _tensor_leaves(o) if t.is_floating_point()]
            total = (leaves[keep[0]] * projections[0]).sum()
            for k, r in zip(keep[1:], projections[1:], strict=True):
                total = total + (leaves[k] * r).sum()
            return total

        return project

    @staticmethod
    def _scalar(value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = (
                f"a tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ModelError(f"the loss must return a scalar tensor; got {got}")
        return value.reshape(())

    def _restore_buffers(self) -> None:
        """Every buffer of the copy back to its value at the start (a BatchNorm in train mode
        updates them in place; a forward may also assign a new tensor to one)."""
        with torch.no_grad():
            for owner, name, work, master, version in self.buffers:
                if getattr(owner, name, None) is not work:
                    setattr(owner, name, work)
                if work._version != version[0]:
                    work.copy_(master)
                    version[0] = work._version

    def _rows(self, thetas: np.ndarray) -> torch.Tensor:
        """``thetas`` as a tensor on the model's device, copying only where needed."""
        arr = np.ascontiguousarray(thetas, dtype=np.float64)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        return torch.from_numpy(arr).to(device=self.spec.device, dtype=self.dtype)

    #: whether anything was loaded into (or evaluated on) ``work`` yet: until then it holds
    #: theta0, as the constructor filled it, and loading theta0 copies nothing
    _loaded = False

    def _load(self, row: torch.Tensor | None) -> None:
        """Set the copy's checked parameters to ``row`` (if given); reset buffers and the RNG."""
        pristine = not self._loaded and row is self._theta0_row
        self._loaded = True
        if row is not None and not pristine:  # (the first load of theta0: O(P) saved)
            with torch.no_grad():
                self.work.copy_(row)
        self._restore_buffers()
        self.rng.reset()

    # ---------------------------------------------------------------- evaluations
    def values_loop(self, thetas: np.ndarray) -> torch.Tensor:
        """Loss at every row, one row at a time."""
        with _normal_mode(False):
            rows = self._rows(np.atleast_2d(thetas))
        return self._each([functools.partial(self._load, row) for row in rows])

    def values_along(self, direction: np.ndarray, steps: np.ndarray) -> torch.Tensor:
        """Loss at ``theta0 + s * direction`` for every ``s`` in ``steps``, one at a time, as
        `values_loop` evaluates rows (`FlatProblem.loss_along`).

        On a float64 working vector in CPU memory, each point is written straight into it,
        a cache-sized piece at a time, as ``theta0 + (s * direction)`` (the bits a row of
        the core's would hold): no row of P entries is written and then copied."""
        direction = np.asarray(direction, dtype=np.float64)
        theta0, size = self.theta0, self.size
        if self.work.device.type != "cpu" or self.dtype != torch.float64:
            rows = np.empty((len(steps), size))
            for row, s in zip(rows, steps, strict=True):
                np.multiply(direction, s, out=row)
                np.add(theta0, row, out=row)
            return self.values_loop(rows)
        target = self.work.numpy()  # (shares its memory: written in place)
        shift = np.empty(min(_ALONG_PIECE, size))

        def write(s: float) -> None:
            self._load(None)  # buffers and RNG
            for lo in range(0, size, _ALONG_PIECE):
                hi = min(lo + _ALONG_PIECE, size)
                np.multiply(direction[lo:hi], s, out=shift[: hi - lo])
                np.add(theta0[lo:hi], shift[: hi - lo], out=target[lo:hi])
            # (what a copy_ would record: the parameters, views of ``work``, were modified)
            torch.autograd.graph.increment_version(self.work)

        return self._each([functools.partial(write, float(s)) for s in steps])

    def _each(self, loads: Sequence[Callable[[], None]]) -> torch.Tensor:
        """The loss after each of ``loads`` (each sets the working vector, buffers, RNG)."""

        def body() -> torch.Tensor:
            values = []
            for load in loads:
                load()
                leaves = self._leaves([_fresh(v) for v in self.input_views])
                values.append(self._objective(leaves, grad=False))
            return torch.stack(values)

        with self._evaluating(grad=False):
            return self._run(self.user_tensors, body)

    def values_vmap(self, thetas: np.ndarray) -> torch.Tensor:
        """Loss at every row in one ``torch.func.vmap`` call (substituting views of each row
        into the copy with ``functional_call``)."""
        with _normal_mode(False):
            rows = self._rows(np.atleast_2d(thetas))
        n_params = len(self.param_names)

        def one(row: torch.Tensor) -> torch.Tensor:
            views = self._views(row)
            leaves = self._leaves([_fresh(v) for v in views[n_params:]])
            if self.scope is None:
                return self._objective(leaves, grad=False)
            params = dict(self.user_tensors)
            for name, view in zip(self.param_names, views[:n_params], strict=True):
                params[f"model.{name}"] = view
                if self.user_tensors:
                    params[f"user.{name}"] = view
            return self._run(params, lambda: self._objective(leaves, grad=False))

        with self._evaluating(grad=False):
            self._load(None)  # buffers and RNG
            return torch.func.vmap(one, randomness="same")(rows)

    def loss(self, theta: np.ndarray) -> float:
        return float(self.values_loop(np.asarray(theta)[None, :])[0].item())

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, dtype=np.float64)
        cache = self._grad_cache
        if cache is not None and (cache[0] is theta or np.array_equal(cache[0], theta)):
            self._grad_cache = None  # handed over once, without a copy
            return cache[1]
        return self.gradient_and_loss(theta)[0]

    def gradient_and_loss(self, theta: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """The gradient at ``theta`` and the loss its evaluation computed on the way (with
        autograd on), detached."""
        theta = np.asarray(theta, dtype=np.float64)
        with _normal_mode(False):
            row = self._theta0_row if theta is self.theta0 else self._rows(theta[None, :])[0]
        if self._use_backward:
            grads, value = self._gradient_once(row, use_backward=True)
        else:
            try:
                grads, value = self._gradient_once(row, use_backward=False)
            except _Raised as exc:
                if exc.where != "backward":
                    raise
                # A backward that runs backward itself (a re-entrant checkpoint) cannot run
                # under autograd.grad: try .backward(); if that fails too, the first error stands.
                try:
                    grads, value = self._gradient_once(row, use_backward=True)
                except Exception:
                    raise exc from exc.exc
                self._use_backward = True
                self.notes.append(
                    f"torch.autograd.grad could not differentiate the model ({exc}); "
                    "gradients were taken with .backward() instead"
                )
        return flat_gradient(self.sizes, grads), value

    def _gradient_once(
        self, row: torch.Tensor, *, use_backward: bool
    ) -> tuple[list[Any], torch.Tensor]:
        """The gradient at ``row`` with respect to the copy's checked parameters and fresh
        input leaves (the model receives copies of them, so it may change them in place),
        and the loss there (detached)."""
        with self._evaluating(grad=True):
            self._load(row)
            inputs = [v.detach().clone().requires_grad_(True) for v in self.input_views]
            leaves = self._leaves([t.clone() for t in inputs])
            targets: list[torch.Tensor] = [*self.params, *inputs]

            def body() -> tuple[list[Any], torch.Tensor]:
                value = self._objective(leaves, grad=True)
                if not value.requires_grad:
                    return [None] * len(targets), value.detach()
                try:
                    if use_backward:
                        return self._backward(value, targets), value.detach()
                    grads = torch.autograd.grad(value, targets, allow_unused=True)
                    return list(grads), value.detach()
                except GradcheckInputError:
                    raise
                except Exception as exc:
                    raise _Raised("backward", exc) from exc

            result: tuple[list[Any], torch.Tensor] = self._run(self.user_tensors, body)
            return result

    def _backward(self, value: torch.Tensor, targets: list[torch.Tensor]) -> list[Any]:
        """``value.backward()`` and the ``.grad`` of ``targets``; the ``.grad`` of other
        leaves the graph reaches (tensors of the user's that require grad) is put back."""
        ours = {id(t) for t in targets}
        if self.model is not None:
            ours.update(id(p) for p in self.model.parameters())
        others = [t for t in _graph_leaves(value) if id(t) not in ours]
        saved = [(t, t.grad) for t in others]
        for t in [*targets, *others]:
            t.grad = None
        try:
            torch.autograd.backward(value)
            return [t.grad for t in targets]
        finally:
            for t, g in saved:
                t.grad = g
            for t in targets:
                t.grad = None
            if self.model is not None:
                for p in self.model.parameters():
                    p.grad = None

    def cache_gradient(self, theta: np.ndarray, grad: np.ndarray) -> None:
        """Keep ``grad`` (at ``theta``; neither is copied nor changed later) for the next call."""
        self._grad_cache = (theta, grad)

    @property
    def precision(self) -> Precision:
        lowest = min((d for d in self.observed if d in _RANK), key=_RANK.__getitem__)
        return _PRECISIONS[lowest]


def flat_gradient(sizes: Sequence[int], grads: Sequence[Any]) -> np.ndarray:
    """Per-block gradients (None for zeros, sparse ones made dense) as one float64 vector."""
    out = _memory.empty(sum(sizes))
    flat = torch.from_numpy(out)
    offset = 0
    for g, size in zip(grads, sizes, strict=True):
        part = flat[offset : offset + size]
        if g is None:
            part.zero_()
        else:
            if g.layout != torch.strided:
                g = g.to_dense()
            part.copy_(g.detach().reshape(-1))
        offset += size
    return out


def _graph_leaves(value: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors the autograd graph of ``value`` accumulates gradients into."""
    found: list[torch.Tensor] = []
    seen: set[Any] = set()
    stack = [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.append(variable)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


# --------------------------------------------------------------------------- building
def _probe(ev: _Evaluator) -> tuple[float, np.ndarray]:
    """Evaluate the gradient and the loss at theta0 (where a model fails, if it does).

    One evaluation, with autograd on: the reducer is built from the output it sees, so
    that outputs the model declares non-differentiable are known, and the loss it computes
    on the way tells its dtype (no second evaluation without autograd: a fast check that
    needs two more evaluations would pay a third of its cost for it).
    """
    grad, value = ev.gradient_and_loss(ev.theta0)
    ev.observed.add(value.dtype)
    if ev.float64 and value.dtype != torch.float64:
        raise _NotFloat64(f"its loss came out {value.dtype} on float64 parameters")
    return float(value.item()), grad


def _cannot_run_in_float64(exc: Exception) -> str | None:
    """Why the float64 attempt shows that the model cannot run in float64, or None when
    ``exc`` is an error of the model's own (not about dtypes)."""
    if isinstance(exc, _NotFloat64):
        return str(exc)
    if isinstance(exc, _Raised) and _DTYPE_ERROR.search(str(exc.exc)):
        return str(exc)
    return None


def _choose_batching(ev: _Evaluator, loss0: float) -> tuple[str, int, str | None]:
    """Use vmap if it runs and agrees with one-at-a-time evaluation; else a loop."""
    # any point off theta0 will do; no random draw (O(P) of work that large models feel)
    rows = np.stack([ev.theta0, ev.theta0 * (1.0 + 1e-3) + 1e-3])
    try:
        batched = ev.values_vmap(rows).detach().to("cpu", torch.float64).numpy()
    except Exception as exc:  # whatever vmap cannot do, the loop can
        cause = exc.exc if isinstance(exc, _Raised) else exc
        try:  # what vmap cannot do, it cannot do twice: else the model raised, not vmap
            ev.values_vmap(rows)
        except Exception:
            return "loop", MAX_LOOP_BATCH, f"torch.func.vmap cannot run it ({first_line(cause)})"
        raise ModelError(
            f"the model's forward raised during the check: {first_line(cause)} "
            "(once: the same batched evaluation ran when repeated)"
        ) from cause
    single = ev.values_loop(rows).detach().to("cpu", torch.float64).numpy()
    rtol = 1e-10 if ev.precision == "float64" else 1e-4
    if not np.allclose(batched, single, rtol=rtol, atol=rtol * max(1.0, abs(loss0))):
        why = f"torch.func.vmap gives different values ({batched[0]!r} vs {single[0]!r} at theta0)"
        return "loop", MAX_LOOP_BATCH, why
    used = _bytes_per_evaluation(lambda: ev.values_loop(ev.theta0[None, :]))
    per_row = (used or 64 * 8 * ev.size) + 8 * ev.size
    if ev.spec.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(ev.spec.device)
        budget = min(4 * CPU_BATCH_BUDGET, free // 4)
    else:
        budget = CPU_BATCH_BUDGET
    return "vmap", int(max(1, min(MAX_VMAP_BATCH, budget // per_row))), None


def _during_check(fn: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
    """``fn`` with the user's errors raised as `ModelError` saying where they came from."""

    def call(theta: np.ndarray) -> Any:
        try:
            return fn(theta)
        except _Raised as exc:
            raise exc.model_error("during the check") from exc.exc

    return call


def build_problem(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    wrt: str = "all",
    seed: int = 0,
) -> FlatProblem:
    """A :class:`FlatProblem` for a torch model (see the module docstring).

    Args:
        model: an ``nn.Module``, an ``autograd.Function`` subclass (its ``apply``
            is called) or a callable of tensors.
        x: the input: a tensor, a tuple/list (positional arguments), a dict (keyword
            arguments), nested containers, or None (no arguments). NumPy arrays are
            turned into tensors on the model's device.
        y: the target for the loss, or None for a fixed random projection of the output.
        loss: None, a callable ``loss(out, y)`` returning a scalar tensor, or a name
            from ``gradcheck._losses``.
        wrt: "all", "params" or "inputs".
        seed: seeds the RNG state set before every evaluation and the projection.

    The result does not depend on the caller's grad mode (``torch.no_grad()``,
    ``torch.inference_mode()``) nor on other threads' checks.
    """
    with _normal_mode(False):
        return _build(model, x, y, loss=loss, wrt=wrt, seed=seed)


def _build(model: Any, x: Any, y: Any, *, loss: Any, wrt: str, seed: int) -> FlatProblem:
    with GLOBAL_STATE:  # no other check's evaluation substitutes the user's module meanwhile
        spec = _Spec(model, x, y, loss, wrt, seed)
        # A model that is all float64 already is evaluated as it is (one attempt).
        attempts = [False] if _all_float64(spec) else [True, False]
    notes: list[str] = []
    # float64 first; the model's own dtype only where float64 is impossible (a dtype error,
    # an output that is not float64). Any other error is the model's own.
    ev: _Evaluator | None = None
    loss0 = math.nan
    for float64 in attempts:
        with GLOBAL_STATE:
            ev = _Evaluator(spec, float64=float64)
        try:
            loss0, grad0 = _probe(ev)
        except (_Raised, _NotFloat64) as exc:
            why = _cannot_run_in_float64(exc) if float64 else None
            if why is not None:
                notes.append(
                    f"the model cannot run in float64 ({why}); "
                    "checked in its own precision: steps and tolerances follow it"
                )
                continue
            if isinstance(exc, _Raised):
                hint = spec.hint if exc.where == "forward" else ""
                raise exc.model_error("at the starting point", hint) from exc.exc
            raise  # pragma: no cover - only the float64 attempt checks the output's dtype
        ev.cache_gradient(ev.theta0, grad0)
        break
    assert ev is not None
    notes.extend(ev.notes)
    if not notes and ev.precision != "float64":
        notes.append(
            f"the model computes in {ev.precision}: steps and tolerances follow {ev.precision}"
        )
    looped = FlatProblem(
        theta0=ev.theta0,
        loss=_during_check(ev.loss),
        gradient=_during_check(ev.gradient),
        blocks=ev.blocks,
        loss_batch=_during_check(_batched(ev, "loop", MAX_LOOP_BATCH)),
        max_batch=MAX_LOOP_BATCH,
        precision=ev.precision,
        framework="torch",
        notes=notes,
        skipped=ev.skipped,
        batching="loop",
        loss_along=_along(ev),
    )
    looped.prepare = _LazyBatching(ev, loss0, looped).prepare
    from gradcheck.adapters._torch_contracts import attach  # it imports this module

    attach(looped, ev)  # second_order, jvp, gradient_batch
    return looped


def _batched(ev: _Evaluator, batching: str, max_batch: int) -> Callable[[np.ndarray], np.ndarray]:
    """``loss_batch`` evaluating rows with ``torch.func.vmap`` or a loop, ``max_batch`` a call."""

    def loss_batch(thetas: np.ndarray) -> np.ndarray:
        thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
        chunks = []
        for start in range(0, thetas.shape[0], max_batch):
            part = thetas[start : start + max_batch]
            values = ev.values_vmap(part) if batching == "vmap" else ev.values_loop(part)
            chunks.append(values.detach().to("cpu", torch.float64).numpy())
        return np.concatenate(chunks) if chunks else np.zeros(0)

    return loss_batch


def _along(ev: _Evaluator) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``FlatProblem.loss_along`` of a problem whose rows run one at a time (`values_loop`:
    the same path), with the user's errors raised as `_during_check` raises them. Not for
    a vmapped problem: its points must be evaluated as its rows are."""

    def loss_along(direction: np.ndarray, steps: np.ndarray) -> np.ndarray:
        try:
            values = ev.values_along(direction, np.asarray(steps, dtype=np.float64))
        except _Raised as exc:
            raise exc.model_error("during the check") from exc.exc
        return values.detach().to("cpu", torch.float64).numpy()

    return loss_along


class _LazyChoice:
    """A problem whose batched evaluations are chosen once, when the core first says it
    expects `VMAP_FROM` evaluations or more (`FlatProblem.prepare`, before it evaluates
    anything), under a lock (checks may run in several threads); a check expecting fewer gets
    the problem as built (``looped``). Subclasses say how to choose (``_choose``)."""

    def __init__(self, looped: FlatProblem) -> None:
        self._looped = looped
        self._lock = threading.Lock()
        self._chosen: FlatProblem | None = None

    def prepare(self, evaluations: int) -> FlatProblem:
        if evaluations < VMAP_FROM:
            return self._looped
        with self._lock:
            if self._chosen is None:
                self._chosen = self._choose()
            return self._chosen

    def _choose(self) -> FlatProblem:
        raise NotImplementedError


class _LazyBatching(_LazyChoice):
    """How a problem's batched evaluations run, chosen when the core first says it expects
    enough of them (`FlatProblem.prepare`, before it evaluates anything), not while the
    problem is built: the choice (`_choose_batching`: vmap twice, the loop, a count of the
    memory one evaluation uses, about five evaluations) costs more than a fast check's two
    evaluations. A check expecting fewer than `VMAP_FROM` evaluations gets the problem as
    built (one parameter vector at a time, ``batching="loop"``); the others share one
    choice per problem, made once under a lock (checks may run in several threads)."""

    def __init__(self, ev: _Evaluator, loss0: float, looped: FlatProblem) -> None:
        super().__init__(looped)
        self._ev = ev
        self._loss0 = loss0

    def _choose(self) -> FlatProblem:
        ev, looped = self._ev, self._looped
        try:
            with _normal_mode(False):  # whatever the caller's grad mode
                batching, max_batch, why = _choose_batching(ev, self._loss0)
        except _Raised as exc:
            raise exc.model_error("near the starting point") from exc.exc
        notes = list(looped.notes)
        if why is not None:
            notes.append(f"evaluated one parameter vector at a time: {why}")
        return dataclasses.replace(
            looped,
            loss_batch=_during_check(_batched(ev, batching, max_batch)),
            max_batch=max_batch,
            notes=notes,
            batching=batching,
            prepare=None,
            # a vmapped problem evaluates every point itself (one path per check)
            loss_along=None if batching == "vmap" else looped.loss_along,
        )


def _all_float64(spec: _Spec) -> bool:
    """True when the model and its float inputs are float64 already (one attempt suffices)."""
    tensors: list[torch.Tensor] = []
    if spec.module is not None:
        tensors.extend(t for t in spec.module.parameters() if not _is_lazy(t))
        tensors.extend(t for t in spec.module.buffers() if not _is_lazy(t))
    tensors.extend(v for _, v in spec.leaves if isinstance(v, torch.Tensor))
    return all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
