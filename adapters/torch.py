"""PyTorch adapter: an ``nn.Module`` or a callable of tensors as a :class:`FlatProblem`.

What is checked:

* every parameter of an ``nn.Module`` with ``requires_grad=True``, one block per
  tensor, named as in ``named_parameters()`` (frozen ones are listed in ``skipped``);
* every floating-point tensor in the input, as blocks ``input`` (one tensor),
  ``input[1]`` (a tuple or list, passed as positional arguments), ``input['key']``
  (a dict, passed as keyword arguments); nested containers are walked the same
  way (``input[0]['a']``). Integer tensors (indices, labels) and other values pass
  through unchanged.

The user's module is never written to: every evaluation substitutes our own
tensors with ``torch.func.functional_call`` (parameters *and* buffers, so a
BatchNorm in train mode updates our copies of its running statistics, which are
restored before the next evaluation). By default those tensors are float64
copies; a model that cannot run in float64 is evaluated in its own dtype and the
problem says so (``precision`` and a note). Before every evaluation, the
analytical one included, the torch RNG (CPU, and CUDA when the model lives
there) is set to a state derived from ``seed`` and the caller's state is restored
afterwards, so dropout masks are the same in every evaluation.

The adapter does no numerics: it only evaluates ``loss``, ``loss_batch`` (many
parameter vectors per call with ``torch.func.vmap`` where the model allows it, a
loop inside one substitution otherwise) and ``gradient`` (autograd).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradcheck import _memory
from gradcheck._errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
)
from gradcheck._losses import canonical_loss_name
from gradcheck._problem import BlockKind, FlatProblem, Precision, block_layout, output_projection

__all__ = ["build_problem", "matches"]

WRT_CHOICES = ("all", "params", "inputs")
# Bytes of intermediate results one vmapped evaluation may use, per batch.
CPU_BATCH_BUDGET = 256 * 2**20
MAX_VMAP_BATCH = 512
MAX_LOOP_BATCH = 1024
# Frameworks whose callables belong to another adapter.
_FOREIGN_MODULES = ("jax", "jaxlib", "equinox", "flax", "haiku", "numpy")

_PRECISIONS: dict[torch.dtype, Precision] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_RANK = {torch.float64: 3, torch.float32: 2, torch.float16: 1, torch.bfloat16: 0}


class _NotFloat64(Exception):
    """Raised inside the float64 attempt when the model's output is not float64."""


# --------------------------------------------------------------------------- dispatch
def matches(model: Any) -> bool:
    """Whether ``model`` is a torch model: an ``nn.Module``, an ``autograd.Function``
    subclass, or a plain callable that belongs to no other framework."""
    if isinstance(model, nn.Module):
        return True
    if isinstance(model, type):
        return issubclass(model, torch.autograd.Function)
    if isinstance(model, (tuple, list, dict)) or not callable(model):
        return False
    if hasattr(model, "params") and hasattr(model, "backward"):  # the NumPy protocol
        return False
    owners = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    return not owners.intersection(_FOREIGN_MODULES)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
            saved = gen.get_state()
            try:
                gen.manual_seed(int(seed))
                self._cuda_state = gen.get_state()
            finally:
                gen.set_state(saved)
            self._cuda = gen

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
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


def _named_loss(name: str, out: Any, y: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch version of a named loss with ``y`` fixed, checked against ``out``."""
    key = canonical_loss_name(name)
    if not isinstance(out, torch.Tensor):
        raise ShapeMismatchError(
            f"loss {key!r} needs the model to return one tensor; got {type(out).__name__}"
        )
    if y is None:
        raise InvalidOptionError(f"loss {key!r} needs a target y; got None")
    target = torch.as_tensor(y, device=out.device)
    if key in ("cross_entropy", "categorical_crossentropy"):
        probs = _class_targets(key, out, target)
        batch = int(out.shape[0])
        if key == "cross_entropy":
            return lambda o: -(probs * torch.log_softmax(o, dim=1)).sum() / batch
        return lambda o: -(probs * torch.log(o)).sum() / batch
    if tuple(target.shape) != tuple(out.shape):
        raise ShapeMismatchError(
            f"loss {key!r} needs y of the output's shape {tuple(out.shape)}; "
            f"got {tuple(target.shape)}"
        )
    t = target.to(dtype=out.dtype)
    if key == "mse":
        return lambda o: ((o - t) ** 2).mean()
    if key == "bce":
        return lambda o: -(t * torch.log(o) + (1.0 - t) * torch.log1p(-o)).mean()
    # bce_with_logits: log(1 + exp(z)) - y z, stable for any z
    return lambda o: (torch.logaddexp(o, torch.zeros_like(o)) - t * o).mean()


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


# --------------------------------------------------------------------------- evaluator
class _Scope(nn.Module):
    """Holds the user's module as a child so that ``functional_call`` on it substitutes the
    user's parameters while running any closure: the model *and* the loss (a loss that
    reads the module's parameters sees the substituted ones)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        return closure()


class _Spec:
    """What was asked, independent of the precision the model is evaluated in."""

    def __init__(self, model: Any, x: Any, y: Any, loss: Any, wrt: str, seed: int) -> None:
        if wrt not in WRT_CHOICES:
            raise InvalidOptionError(f"wrt must be one of {WRT_CHOICES}; got {wrt!r}")
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
        self.loss = loss
        self.device = self._device(x)
        self.y = self._as_tensor(y, self._model_dtype())
        self.style = "single"
        if x is None:
            self.style = "none"
        elif isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
            self.style = "args"
        elif isinstance(x, Mapping):
            self.style = "kwargs"
        self.leaves: list[tuple[str, Any]] = []
        self.rebuild = _flatten(x, "input", self.leaves) if x is not None else None
        model_dtype = self._model_dtype()
        self.leaves = [(n, self._as_tensor(v, model_dtype)) for n, v in self.leaves]

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
                if p.is_floating_point():
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

    def call(self, leaves: Sequence[Any]) -> Any:
        if self.rebuild is None:
            return self.fn()
        x = self.rebuild(iter(leaves))
        if self.style == "args":
            return self.fn(*x)
        if self.style == "kwargs":
            return self.fn(**x)
        return self.fn(x)


class _Evaluator:
    """Evaluates the loss and its gradient at flat vectors, in one precision."""

    def __init__(self, spec: _Spec, *, float64: bool) -> None:
        self.spec = spec
        self.float64 = float64
        self.rng = _Rng(spec.seed, spec.device)
        module = spec.module
        check_params = spec.wrt in ("all", "params")
        check_inputs = spec.wrt in ("all", "inputs")

        def convert(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if float64 and t.is_floating_point():
                return t.to(dtype=torch.float64, copy=True)
            return t.clone()

        # checked tensors: (name, source tensor, kind)
        checked: list[tuple[str, torch.Tensor, BlockKind]] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []
        constants: dict[str, torch.Tensor] = {}
        self.param_names: list[str] = []
        if module is not None:
            for name, p in module.named_parameters():
                if check_params and p.requires_grad and p.is_floating_point():
                    checked.append((name, p, "param"))
                    self.param_names.append(name)
                    continue
                if check_params and p.requires_grad:
                    self.notes.append(f"parameter `{name}` has dtype {p.dtype} and is not checked")
                if check_params:
                    self.skipped.append(name)
                if float64 and p.is_floating_point():
                    constants[name] = convert(p)
        # buffers: our own copies (BatchNorm updates them), restored before every evaluation
        self.buffers: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
        if module is not None:
            for name, b in module.named_buffers():
                work = convert(b)
                constants[name] = work
                self.buffers.append((work, work.clone(), [work._version]))

        self.input_slots: list[int] = []  # positions of checked leaves in spec.leaves
        self.leaf_values: list[Any] = []
        for i, (name, value) in enumerate(spec.leaves):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if check_inputs:
                    checked.append((name, value, "input"))
                    self.input_slots.append(i)
                    self.leaf_values.append(None)
                    continue
                self.leaf_values.append(convert(value) if float64 else value)
            else:
                self.leaf_values.append(value)
        if not checked:
            raise NothingToCheckError(self._nothing_message(spec))

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
        _memory.freeze(self.theta0)  # the problem keeps it as it is (no second copy)
        self.constants = {f"model.{k}": v for k, v in constants.items()}
        self.scope = _Scope(module) if module is not None else None
        # the working vector whose views stand in for the checked tensors
        self.work = torch.empty(self.size, dtype=self.dtype, device=spec.device)
        self.work.copy_(torch.from_numpy(self.theta0.copy()))
        self.work_params, self.work_leaves = self._bind(self.work)
        self.reducer: Callable[[Any], torch.Tensor] | None = None
        self.observed: set[torch.dtype] = {self.dtype}
        self._grad_cache: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _nothing_message(spec: _Spec) -> str:
        what = {"all": "parameters or inputs", "params": "parameters", "inputs": "inputs"}
        frozen = []
        if spec.module is not None:
            frozen = [n for n, p in spec.module.named_parameters() if not p.requires_grad]
        extra = f" (frozen: {', '.join(frozen)})" if frozen and spec.wrt != "inputs" else ""
        return (
            f"nothing to check: wrt={spec.wrt!r} needs floating-point {what[spec.wrt]} "
            f"with requires_grad; the model has none{extra}"
        )

    # ---------------------------------------------------------------- plumbing
    def _bind(self, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Parameters and input leaves as views of ``flat`` (one row of theta)."""
        views = [v.view(s) for v, s in zip(flat.split(self.sizes), self.shapes, strict=True)]
        n = len(self.param_names)
        params = dict(self.constants)
        params.update(zip([f"model.{k}" for k in self.param_names], views[:n], strict=True))
        leaves = list(self.leaf_values)
        for slot, view in zip(self.input_slots, views[n:], strict=True):
            leaves[slot] = view
        return params, leaves

    def _objective(self, leaves: Sequence[Any]) -> torch.Tensor:
        out = self.spec.call(leaves)
        if self.reducer is None:
            self.reducer = self._make_reducer(out)
        value = self.reducer(out)
        return value

    def _make_reducer(self, out: Any) -> Callable[[Any], torch.Tensor]:
        """Built at the first (single, unbatched) evaluation, from the output it sees."""
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
            return lambda o: self._scalar(fn(o, y))
        if not floats:
            raise ModelError(
                f"the model returned no floating-point tensor to project; got {type(out).__name__}"
            )
        keep = list(range(len(floats)))
        if torch.is_grad_enabled():
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
        for work, master, version in self.buffers:
            if work._version != version[0]:
                work.copy_(master)
                version[0] = work._version

    def _run(self, params: dict[str, torch.Tensor], closure: Callable[[], torch.Tensor]) -> Any:
        if self.scope is None:
            return closure()
        return torch.func.functional_call(self.scope, params, (closure,), strict=False)

    def _rows(self, thetas: np.ndarray) -> torch.Tensor:
        """``thetas`` as a tensor on the model's device, copying only where needed."""
        arr = np.ascontiguousarray(thetas, dtype=np.float64)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        return torch.from_numpy(arr).to(device=self.spec.device, dtype=self.dtype)

    # ---------------------------------------------------------------- evaluations
    def values_loop(self, thetas: np.ndarray) -> torch.Tensor:
        """Loss at every row, one row at a time inside one substitution."""
        rows = self._rows(np.atleast_2d(thetas))

        def body() -> torch.Tensor:
            values = []
            for row in rows:
                self.work.copy_(row)
                self._restore_buffers()
                self.rng.reset()
                values.append(self._objective(self.work_leaves))
            return torch.stack(values)

        with torch.no_grad(), self.rng.guard():
            try:
                return self._run(self.work_params, body)
            finally:
                self._restore_buffers()

    def values_vmap(self, thetas: np.ndarray) -> torch.Tensor:
        """Loss at every row in one ``torch.func.vmap`` call."""
        rows = self._rows(np.atleast_2d(thetas))

        def one(row: torch.Tensor) -> torch.Tensor:
            params, leaves = self._bind(row)
            return self._run(params, lambda: self._objective(leaves))

        with torch.no_grad(), self.rng.guard():
            try:
                self._restore_buffers()
                self.rng.reset()
                return torch.func.vmap(one, randomness="same")(rows)
            finally:
                self._restore_buffers()

    def loss(self, theta: np.ndarray) -> float:
        return float(self.values_loop(np.asarray(theta)[None, :])[0].item())

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, dtype=np.float64)
        cache = self._grad_cache
        if cache is not None and np.array_equal(cache[0], theta):
            self._grad_cache = None  # handed over once, without a copy
            return cache[1]
        flat = self._rows(theta[None, :])[0].requires_grad_(True)
        params, leaves = self._bind(flat)
        with torch.enable_grad(), self.rng.guard():
            try:
                self._restore_buffers()
                self.rng.reset()
                value = self._run(params, lambda: self._objective(leaves))
                if value.requires_grad:
                    (grad,) = torch.autograd.grad(value, flat, allow_unused=True)
                else:
                    grad = None
            finally:
                self._restore_buffers()
        if grad is None:
            return np.zeros(self.size)
        return _memory.copy(grad.detach().to("cpu", torch.float64).numpy())

    def cache_gradient(self, theta: np.ndarray, grad: np.ndarray) -> None:
        """Keep ``grad`` (at ``theta``; neither is copied nor changed later) for the next call."""
        self._grad_cache = (theta, grad)

    @property
    def precision(self) -> Precision:
        lowest = min((d for d in self.observed if d in _RANK), key=_RANK.__getitem__)
        return _PRECISIONS[lowest]


def _cast_tree(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _cast_tree(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(_cast_tree(v, dtype) for v in obj)
    return obj


# --------------------------------------------------------------------------- building
def _probe(ev: _Evaluator) -> tuple[float, np.ndarray]:
    """Evaluate the gradient and the loss at theta0 (where a model fails, if it does).

    The gradient comes first: the reducer is built from the output it sees, with
    autograd on, so that outputs the model declares non-differentiable are known.
    """
    grad = ev.gradient(ev.theta0)
    first = ev.values_loop(ev.theta0[None, :])
    value = first[0]
    ev.observed.add(value.dtype)
    if ev.float64 and value.dtype != torch.float64:
        raise _NotFloat64(f"its loss came out {value.dtype} on float64 parameters")
    return float(value.item()), grad


def _choose_batching(ev: _Evaluator, loss0: float) -> tuple[str, int, str | None]:
    """Use vmap if it runs and agrees with one-at-a-time evaluation; else a loop."""
    # any point off theta0 will do; no random draw (O(P) of work that large models feel)
    rows = np.stack([ev.theta0, ev.theta0 * (1.0 + 1e-3) + 1e-3])
    try:
        batched = ev.values_vmap(rows).detach().to("cpu", torch.float64).numpy()
    except Exception as exc:  # whatever vmap cannot do, the loop can
        return "loop", MAX_LOOP_BATCH, f"torch.func.vmap cannot run it ({_first_line(exc)})"
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
    """
    spec = _Spec(model, x, y, loss, wrt, seed)
    notes: list[str] = []
    # float64 first; the model's own dtype if that fails. A model that is all float64
    # already is evaluated as it is (one attempt).
    attempts = [False] if _all_float64(spec) else [True, False]
    ev: _Evaluator | None = None
    loss0 = math.nan
    for float64 in attempts:
        ev = _Evaluator(spec, float64=float64)
        try:
            loss0, grad0 = _probe(ev)
        except GradcheckInputError:
            raise
        except Exception as exc:
            if float64 and len(attempts) > 1:
                notes.append(
                    f"the model cannot run in float64 ({_first_line(exc)}); "
                    "checked in its own precision: steps and tolerances follow it"
                )
                continue
            raise ModelError(f"the model raised at the starting point: {_first_line(exc)}") from exc
        ev.cache_gradient(ev.theta0, grad0)
        break
    assert ev is not None
    notes.extend(ev.notes)
    if not notes and ev.precision != "float64":
        notes.append(
            f"the model computes in {ev.precision}: steps and tolerances follow {ev.precision}"
        )
    batching, max_batch, why = _choose_batching(ev, loss0)
    if why is not None:
        notes.append(f"evaluated one parameter vector at a time: {why}")
    evaluator = ev

    def loss_batch(thetas: np.ndarray) -> np.ndarray:
        thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
        chunks = []
        for start in range(0, thetas.shape[0], max_batch):
            part = thetas[start : start + max_batch]
            values = (
                evaluator.values_vmap(part) if batching == "vmap" else evaluator.values_loop(part)
            )
            chunks.append(values.detach().to("cpu", torch.float64).numpy())
        return np.concatenate(chunks) if chunks else np.zeros(0)

    return FlatProblem(
        theta0=ev.theta0,
        loss=evaluator.loss,
        gradient=evaluator.gradient,
        blocks=ev.blocks,
        loss_batch=loss_batch,
        max_batch=max_batch,
        precision=ev.precision,
        framework="torch",
        notes=notes,
        skipped=ev.skipped,
        batching=batching,
    )


def _all_float64(spec: _Spec) -> bool:
    """True when the model and its float inputs are float64 already (one attempt suffices)."""
    tensors: list[torch.Tensor] = []
    if spec.module is not None:
        tensors.extend(spec.module.parameters())
        tensors.extend(spec.module.buffers())
    tensors.extend(v for _, v in spec.leaves if isinstance(v, torch.Tensor))
    return all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
