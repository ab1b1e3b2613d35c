"""Evaluations for `gradcheck.check_kernel` in torch: a low-precision kernel and its reference.

Evaluates only (the rule is `gradcheck._verdict.judge_against_reference`): the kernel in its
own precision, the reference in float64 and in the kernel's precision, all on the same
quantized inputs and parameters and the same upstream gradient. The user's modules, tensors and
RNG state are left as they were: modules are copied, tensors cloned, the RNG forked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from gradcheck._errors import first_line
from gradcheck._problem import output_projection
from gradcheck._reference_check import KernelEvaluation
from gradcheck._report import Report
from gradcheck._state import GLOBAL_STATE
from gradcheck.errors import GradcheckInputError, InvalidOptionError, ModelError

from .torch import _PRECISIONS, _copy_module, _flatten, _named_loss

__all__ = ["evaluate"]

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def _as_function(obj: Any) -> Any:
    if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
        return obj.apply
    return obj


def _tensor(value: Any, device: torch.device | None) -> Any:
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(np.array(value))
        return t.to(device) if device is not None else t
    return value


def _float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _cast(t: Any, dtype: torch.dtype) -> Any:
    return t.detach().to(dtype) if _float(t) else t


@contextlib.contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """TF32 off for the golden evaluation on CUDA, restored afterwards. The flags are
    process-wide: they are saved, set and restored under `GLOBAL_STATE`, so that checks in
    threads cannot restore each other's values out of order."""
    if device.type != "cuda":
        yield
        return
    with GLOBAL_STATE:
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = cudnn


class _Case:
    """The inputs, target and parameters, quantized to the kernel's precision once."""

    def __init__(
        self, kernel: Any, reference: Any, x: Any, y: Any, loss: Any, seed: int, precision: Any
    ) -> None:
        self.kernel = _as_function(kernel)
        self.reference = _as_function(reference)
        self.seed = int(seed)
        self.loss = loss
        if not callable(self.kernel) or not callable(self.reference):
            raise InvalidOptionError(
                "kernel and reference must be torch modules or functions of tensors; got "
                f"{type(kernel).__name__} and {type(reference).__name__}"
            )
        if loss is not None and not (callable(loss) or isinstance(loss, str)):
            raise InvalidOptionError(
                "loss must be None, a callable loss(out, y) or a loss name; "
                f"got {type(loss).__name__}"
            )
        kmod = self.kernel if isinstance(self.kernel, nn.Module) else None
        self.params: dict[str, torch.Tensor] = {}
        device: torch.device | None = None
        if kmod is not None:
            for name, p in kmod.named_parameters():
                device = device or p.device
                if p.is_floating_point() and p.requires_grad:
                    self.params[name] = p.detach().clone()
        self.leaves: list[tuple[str, Any]] = []
        self.style = "none"
        self.rebuild: Callable[[Iterator[Any]], Any] | None = None
        if x is not None:
            self.style = (
                "args"
                if isinstance(x, (tuple, list)) and not hasattr(x, "_fields")
                else "kwargs"
                if isinstance(x, Mapping)
                else "single"
            )
            self.rebuild = _flatten(x, "input", self.leaves)
        if device is None:
            device = next((v.device for _, v in self.leaves if isinstance(v, torch.Tensor)), None)
        self.device = device or torch.device("cpu")
        self.leaves = [(n, _tensor(v, self.device)) for n, v in self.leaves]
        dtypes = [p.dtype for p in self.params.values()] or [
            v.dtype for _, v in self.leaves if _float(v)
        ]
        if not dtypes:
            raise GradcheckInputError(
                "cannot tell the kernel's precision: it has no float parameters and x has no "
                "float tensors"
            )
        self.dtype = dtypes[0] if precision is None else _DTYPES[precision]
        if self.dtype == torch.float64:
            raise InvalidOptionError(
                "the kernel runs in float64: check it against finite differences with "
                "check_gradients(kernel, x) instead"
            )
        # inputs and target quantized to the kernel's precision (then upcast for the golden
        # evaluation: the quantization of the inputs must not hide the kernel's error)
        self.leaves = [(n, _cast(v, self.dtype)) for n, v in self.leaves]
        # parameters too, in their own dtype (a float32 master copy of a bfloat16 kernel)
        self.params = {n: v.to(self.dtype).to(v.dtype) for n, v in self.params.items()}
        y = _tensor(y, self.device)
        self.y = _cast(y, self.dtype) if isinstance(y, torch.Tensor) else y
        if isinstance(self.reference, nn.Module):
            names = {n for n, p in self.reference.named_parameters() if p.is_floating_point()}
            if names != set(self.params):
                raise ModelError(
                    "the reference must have the kernel's parameters, by name: "
                    f"kernel {sorted(self.params)}, reference {sorted(names)}"
                )
        elif self.params:
            raise ModelError(
                "the kernel is a module with parameters; the reference must be a module with "
                f"the same parameter names ({sorted(self.params)}); got "
                f"{type(reference).__name__}"
            )
        self.projections: list[np.ndarray] | None = None

    def inputs(self, dtype: torch.dtype) -> list[Any]:
        return [_cast(v, dtype) for _, v in self.leaves]

    def call(self, fn: Any, params: dict[str, torch.Tensor], leaves: list[Any]) -> Any:
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        if self.rebuild is not None:
            xs = self.rebuild(iter(leaves))
            if self.style == "args":
                args = tuple(xs)
            elif self.style == "kwargs":
                kwargs = dict(xs)
            else:
                args = (xs,)
        if isinstance(fn, nn.Module):
            return functional_call(fn, params, args, kwargs)
        return fn(*args, **kwargs)

    def run(self, who: str, fn: Any, dtype: torch.dtype | None) -> dict[str, np.ndarray]:
        """Outputs and gradients of ``fn`` on the quantized values cast to ``dtype`` (the
        kernel's own values where ``dtype`` is None)."""
        cast = self.dtype if dtype is None else dtype
        params = {
            n: (v.clone() if dtype is None else v.to(cast)).requires_grad_(True)
            for n, v in self.params.items()
        }
        leaves = [v.clone().requires_grad_(True) if _float(v) else v for v in self.inputs(cast)]
        targets = [*params.values(), *(v for v in leaves if _float(v))]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            with torch.enable_grad():
                try:
                    out = self.call(fn, params, leaves)
                except Exception as exc:
                    raise ModelError(f"the {who} raised: {first_line(exc)}") from exc
                names: list[tuple[str, Any]] = []
                _flatten(out, "output", names)
                outs = [(n, t) for n, t in names if _float(t)]
                if not outs:
                    raise ModelError(f"the {who} returned no float tensor")
                if self.loss is None and self.y is None:
                    if self.projections is None:  # the kernel's own dtype: quantized once
                        self.projections = [
                            torch.from_numpy(output_projection(tuple(t.shape), self.seed, i))
                            .to(t.dtype)
                            .double()
                            .numpy()
                            for i, (_, t) in enumerate(outs)
                        ]
                    roots = [t for _, t in outs]
                    grads_out = [
                        torch.from_numpy(r).to(device=t.device, dtype=t.dtype)
                        for r, (_, t) in zip(self.projections, outs, strict=True)
                    ]
                else:
                    y = _cast(self.y, cast) if isinstance(self.y, torch.Tensor) else self.y
                    if isinstance(self.loss, str) or self.loss is None:
                        value = _named_loss(self.loss or "mse", out, y)(out)
                    else:
                        value = self.loss(out, y)
                    roots, grads_out = [value], [torch.ones_like(value)]
                live = [i for i, t in enumerate(roots) if t.requires_grad]
                grads: Sequence[torch.Tensor | None]
                if targets and live:
                    try:
                        grads = torch.autograd.grad(
                            [roots[i] for i in live],
                            targets,
                            grad_outputs=[grads_out[i] for i in live],
                            allow_unused=True,
                        )
                    except Exception as exc:
                        raise ModelError(f"the {who}'s backward raised: {first_line(exc)}") from exc
                else:
                    grads = tuple(None for _ in targets)
        values = {n: _numpy(t) for n, t in outs}
        names_in = [n for (n, v) in self.leaves if _float(v)]
        for name, target, g in zip([*params, *names_in], targets, grads, strict=True):
            values[name] = _numpy(g) if g is not None else np.zeros(tuple(target.shape))
        return values

    def blocks(
        self, kernel_values: dict[str, np.ndarray]
    ) -> list[tuple[str, str, tuple[int, ...]]]:
        outs = [n for n in kernel_values if n.startswith("output")]
        names_in = [n for (n, v) in self.leaves if _float(v)]
        return [
            *((n, "output", tuple(kernel_values[n].shape)) for n in outs),
            *((n, "param", tuple(self.params[n].shape)) for n in self.params),
            *((n, "input", tuple(kernel_values[n].shape)) for n in names_in),
        ]

    def size(self) -> int:
        floats = [v for _, v in self.leaves if _float(v)]
        return sum(int(t.numel()) for t in [*self.params.values(), *floats])

    def reference_check(self, seed: int, mode: str) -> Report:
        """The float64 reference's gradients against finite differences (`check_gradients`),
        at the quantized parameters and inputs."""
        from gradcheck._api import check_gradients

        model: Any = self.reference
        if isinstance(model, nn.Module):
            model = _copy_module(model, {}).to(torch.float64)
            with torch.no_grad():
                mine = dict(model.named_parameters())
                for name, value in self.params.items():
                    mine[name].copy_(value.to(torch.float64))
        x = self.rebuild(iter(self.inputs(torch.float64))) if self.rebuild is not None else None
        y = _cast(self.y, torch.float64) if isinstance(self.y, torch.Tensor) else self.y
        return check_gradients(model, x, y, loss=self.loss, seed=seed, mode=mode)  # type: ignore[arg-type]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.array(t.detach().to(device="cpu", dtype=torch.float64).numpy(), copy=True)


def evaluate(
    kernel: Any,
    reference: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    seed: int = 0,
    precision: str | None = None,
) -> KernelEvaluation:
    """The kernel's and the reference's values for `gradcheck.check_kernel`."""
    case = _Case(kernel, reference, x, y, loss, seed, precision)
    kernel_fn = case.kernel
    if isinstance(kernel_fn, nn.Module):
        kernel_fn = _copy_module(kernel_fn, {})
    ref = case.reference
    golden_fn: Any = ref
    lowprec_fn: Any = ref
    if isinstance(ref, nn.Module):
        golden_fn = _copy_module(ref, {}).to(torch.float64)
        lowprec_fn = _copy_module(ref, {}).to(case.dtype)
    kernel_values = case.run("kernel", kernel_fn, None)
    with _no_tf32(case.device):
        golden = case.run("reference (float64)", golden_fn, torch.float64)
    lowprec = case.run(f"reference ({_PRECISIONS[case.dtype]})", lowprec_fn, case.dtype)
    for name in kernel_values:
        if golden[name].shape != kernel_values[name].shape:
            raise ModelError(
                f"the kernel's {name} has shape {kernel_values[name].shape}, the reference's "
                f"{golden[name].shape}"
            )
    return KernelEvaluation(
        blocks=case.blocks(kernel_values),
        kernel=kernel_values,
        golden=golden,
        lowprec=lowprec,
        precision=_PRECISIONS[case.dtype],
        framework="torch",
        evaluations=3,
        reference_check=case.reference_check,
        size=case.size(),
    )
