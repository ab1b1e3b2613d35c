"""The zoo's layers, each written once against ``ops`` (see ``ops.py``), with its mutants.

A layer is a :class:`Layer`: ``point(seed)`` builds the parameters, input and
constants at which it is checked; ``forward(ops, p, x, cfg) -> (out, cache)``;
``backward(ops, p, x, cfg, cache, dout, bug) -> (grads, dx)`` is the hand-written
backward pass. ``bug=None`` is the correct backward; every name in
``layer.mutants`` is a planted mistake of the kind people make in that layer.
:data:`GENERIC` mutants (a sign flip, one wrong entry, 1% and 0.1% scale errors,
a clamp) apply to every layer and are planted by :func:`run_backward`.

The points are chosen so that every mutant changes the gradient there
(``tests/test_zoo.py`` asserts it); where a mutant is invisible at a random point
(an overlapping window's shared maximum, a gradient above the clamp), the point
or the layer's ``clamp`` is chosen to make it visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Arrays = dict[str, Any]

#: Mutants every layer gets, planted on the backward's result.
GENERIC: tuple[str, ...] = ("sign_flip", "one_entry", "scale_1%", "scale_0.1%", "clamp")

#: The clamp mutant clips every gradient to [-c, c] (``grad.clamp(-c, c)``), with ``c`` the
#: layer's ``clamp`` (this default unless the layer's gradients are all smaller).
CLAMP = 0.1


@dataclass(frozen=True)
class Point:
    params: dict[str, np.ndarray]
    x: np.ndarray
    cfg: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Layer:
    name: str
    point: Callable[[int], Point]
    forward: Callable[..., tuple[Any, Arrays]]
    backward: Callable[..., tuple[Arrays, Any]]
    mutants: tuple[str, ...]
    #: the loss is not differentiable at some entries of the point (ties in a max)
    kinks: bool = False
    #: threshold of the clamp mutant, below the largest gradient at the layer's points
    clamp: float = CLAMP

    @property
    def all_mutants(self) -> tuple[str, ...]:
        return self.mutants + GENERIC

    def __repr__(self) -> str:
        return self.name


def run_backward(
    layer: Layer, ops: Any, p: Arrays, x: Any, cfg: dict, cache: Arrays, dout: Any, bug: str | None
) -> tuple[Arrays, Any]:
    """``layer.backward`` with ``bug`` planted (a layer mutant or a generic one)."""
    grads, dx = layer.backward(ops, p, x, cfg, cache, dout, bug if bug in layer.mutants else None)
    if bug not in GENERIC:
        return grads, dx
    xp = ops.xp
    names = list(grads)
    blocks = [grads[n] for n in names] + ([dx] if dx is not None else [])
    if bug == "sign_flip":
        blocks[0] = -blocks[0]
    elif bug == "one_entry":
        g = blocks[0]
        hot = np.zeros(tuple(g.shape))
        hot.reshape(-1)[hot.size // 2] = 1.0
        blocks[0] = g + ops.like(hot, g) * (0.01 * xp.max(xp.abs(g)))
    elif bug in ("scale_1%", "scale_0.1%"):
        factor = 1.01 if bug == "scale_1%" else 1.001
        blocks = [factor * g for g in blocks]
    elif bug == "clamp":
        blocks = [xp.clip(g, -layer.clamp, layer.clamp) for g in blocks]
    grads = dict(zip(names, blocks[: len(names)], strict=True))
    return grads, (blocks[-1] if dx is not None else None)


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, salt])


def _sigmoid(xp: Any, z: Any) -> Any:
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def _amax(ops: Any, z: Any, axis: int) -> Any:
    if ops.name == "torch":
        return ops.xp.amax(z, dim=axis, keepdim=True)
    return ops.xp.max(z, axis=axis, keepdims=True)


# ---------------------------------------------------------------- linear
def _linear_point(seed: int) -> Point:
    r = _rng(seed, 1)
    # square W and N == D, so a transposed dW or a bias summed over the wrong axis has the
    # right shape (a shape error would not test the verdict)
    return Point({"W": r.normal(size=(4, 4)) / 2, "b": r.normal(size=4)}, r.normal(size=(4, 4)))


def _linear_fwd(ops, p, x, cfg):
    return x @ p["W"] + p["b"], {}


def _linear_bwd(ops, p, x, cfg, cache, dout, bug):
    xp = ops.xp
    dW = x.T @ dout
    if bug == "transpose":
        dW = dW.T
    db = xp.sum(dout, axis=0)
    if bug == "mean_not_sum":
        db = xp.mean(dout, axis=0)
    elif bug == "wrong_axis":
        db = xp.sum(dout, axis=1)
    dx = dout @ (p["W"] if bug == "dx_no_transpose" else p["W"].T)
    return {"W": dW, "b": db}, dx


LINEAR = Layer(
    "linear",
    _linear_point,
    _linear_fwd,
    _linear_bwd,
    ("transpose", "mean_not_sum", "wrong_axis", "dx_no_transpose"),
)


# ---------------------------------------------------------------- conv1d
def _conv1d_point(seed: int) -> Point:
    r = _rng(seed, 2)
    params = {"W": r.normal(size=(3, 2, 3)) / 2, "b": r.normal(size=3)}
    return Point(params, r.normal(size=(2, 2, 7)), {"stride": 2, "pad": 1})


def _windows(length: int, k: int, stride: int) -> tuple[int, list[slice]]:
    n_out = (length - k) // stride + 1
    return n_out, [slice(i, i + stride * (n_out - 1) + 1, stride) for i in range(k)]


def _conv1d_fwd(ops, p, x, cfg):
    xp, w = ops.xp, p["W"]
    xpad = ops.pad_last(x, (cfg["pad"],))
    k = w.shape[2]
    _, sl = _windows(xpad.shape[-1], k, cfg["stride"])
    out = sum(xp.einsum("ncl,oc->nol", xpad[:, :, sl[i]], w[:, :, i]) for i in range(k))
    return out + p["b"][None, :, None], {"xpad": xpad}


def _conv1d_bwd(ops, p, x, cfg, cache, dout, bug):
    xp, w, xpad = ops.xp, p["W"], cache["xpad"]
    k, pad = w.shape[2], cfg["pad"]
    _, sl = _windows(xpad.shape[-1], k, cfg["stride"])
    shift = 1 if bug == "off_by_one" else 0
    dW = xp.stack(
        [xp.einsum("nol,ncl->oc", dout, xpad[:, :, sl[(i + shift) % k]]) for i in range(k)],
        axis=-1,
    )
    db = xp.mean(dout, axis=(0, 2)) if bug == "mean_not_sum" else xp.sum(dout, axis=(0, 2))
    dxpad = xp.zeros_like(xpad)
    put = ops.set_slice if bug == "assign_not_accumulate" else ops.add_slice
    for i in range(k):
        dxpad = put(
            dxpad, (slice(None), slice(None), sl[i]), xp.einsum("nol,oc->ncl", dout, w[:, :, i])
        )
    return {"W": dW, "b": db}, dxpad[:, :, pad : pad + x.shape[-1]]


CONV1D = Layer(
    "conv1d",
    _conv1d_point,
    _conv1d_fwd,
    _conv1d_bwd,
    ("off_by_one", "mean_not_sum", "assign_not_accumulate"),
)


# ---------------------------------------------------------------- conv2d
def _conv2d_point(seed: int) -> Point:
    r = _rng(seed, 3)
    params = {"W": r.normal(size=(2, 2, 3, 3)) / 3, "b": r.normal(size=2)}
    return Point(params, r.normal(size=(1, 2, 4, 4)), {"stride": 2, "pad": 1})


def _conv2d_fwd(ops, p, x, cfg):
    xp, w = ops.xp, p["W"]
    xpad = ops.pad_last(x, (cfg["pad"], cfg["pad"]))
    k = w.shape[2]
    _, sh = _windows(xpad.shape[-2], k, cfg["stride"])
    _, sw = _windows(xpad.shape[-1], k, cfg["stride"])
    out = sum(
        xp.einsum("nchw,oc->nohw", xpad[:, :, sh[i], sw[j]], w[:, :, i, j])
        for i in range(k)
        for j in range(k)
    )
    return out + p["b"][None, :, None, None], {"xpad": xpad}


def _conv2d_bwd(ops, p, x, cfg, cache, dout, bug):
    xp, w, xpad = ops.xp, p["W"], cache["xpad"]
    k, pad = w.shape[2], cfg["pad"]
    _, sh = _windows(xpad.shape[-2], k, cfg["stride"])
    _, sw = _windows(xpad.shape[-1], k, cfg["stride"])
    rows = [
        xp.stack(
            [xp.einsum("nohw,nchw->oc", dout, xpad[:, :, sh[i], sw[j]]) for j in range(k)], axis=-1
        )
        for i in range(k)
    ]
    dW = xp.stack(rows, axis=-2)
    if bug == "transpose":
        dW = xp.swapaxes(dW, 2, 3)
    db = xp.sum(dout, axis=(0, 2, 3))
    dxpad = xp.zeros_like(xpad)
    put = ops.set_slice if bug == "assign_not_accumulate" else ops.add_slice
    shift = 1 if bug == "off_by_one" else 0
    for i in range(k):
        for j in range(k):
            contrib = xp.einsum("nohw,oc->nchw", dout, w[:, :, i, j])
            dxpad = put(dxpad, (slice(None), slice(None), sh[i], sw[(j + shift) % k]), contrib)
    return {"W": dW, "b": db}, dxpad[:, :, pad : pad + x.shape[-2], pad : pad + x.shape[-1]]


CONV2D = Layer(
    "conv2d",
    _conv2d_point,
    _conv2d_fwd,
    _conv2d_bwd,
    ("transpose", "off_by_one", "assign_not_accumulate"),
)


# ---------------------------------------------------------------- max-pool (overlapping, ties)
def _maxpool_point(seed: int) -> Point:
    r = _rng(seed, 4)
    # values on a coarse grid: most windows hold ties
    x = r.integers(-2, 3, size=(2, 2, 9)) * 0.5
    # one strict maximum shared by two overlapping windows (so accumulation matters there)
    x[0, 0, 2] = 2.0
    return Point({}, x, {"k": 3, "stride": 2})


def _maxpool_fwd(ops, p, x, cfg):
    xp = ops.xp
    _, sl = _windows(x.shape[-1], cfg["k"], cfg["stride"])
    win = xp.stack([x[:, :, s] for s in sl], axis=-1)  # (N, C, L_out, k)
    arg = ops.argmax(win, axis=-1)  # first of any tie
    out = ops.take_along(win, arg[..., None], axis=-1)[..., 0]
    return out, {"arg": arg}


def _maxpool_bwd(ops, p, x, cfg, cache, dout, bug):
    xp = ops.xp
    n, c, length = x.shape
    k, stride = cfg["k"], cfg["stride"]
    n_out, _ = _windows(length, k, stride)
    arg = cache["arg"]
    if bug == "off_by_one":
        arg = (arg + 1) % k
    pos = arg + ops.asarray(stride * np.arange(n_out))[None, None, :]
    index = (
        ops.asarray(np.arange(n)[:, None, None]),
        ops.asarray(np.arange(c)[None, :, None]),
        pos,
    )
    scatter = ops.scatter_set if bug == "assign_not_accumulate" else ops.scatter_add
    return {}, scatter(xp.zeros_like(x), index, dout)


MAXPOOL = Layer(
    "maxpool_ties",
    _maxpool_point,
    _maxpool_fwd,
    _maxpool_bwd,
    ("off_by_one", "assign_not_accumulate"),
    kinks=True,
)


# ---------------------------------------------------------------- layer norm / batch norm
EPS = 1e-5


def _norm_point(seed: int, salt: int, shape: tuple[int, int]) -> Point:
    r = _rng(seed, salt)
    d = shape[1]
    params = {"gamma": 1.0 + 0.3 * r.normal(size=d), "beta": 0.3 * r.normal(size=d)}
    return Point(params, 2.0 * r.normal(size=shape) + 0.5)


def _norm_fwd(axis: int):
    def fwd(ops, p, x, cfg):
        xp = ops.xp
        mu = xp.mean(x, axis=axis, keepdims=True)
        xc = x - mu
        var = xp.mean(xc * xc, axis=axis, keepdims=True)
        inv = 1.0 / xp.sqrt(var + EPS)
        xhat = xc * inv
        return p["gamma"] * xhat + p["beta"], {"xhat": xhat, "inv": inv}

    return fwd


def _norm_bwd(axis: int, wrong: int):
    def bwd(ops, p, x, cfg, cache, dout, bug):
        xp = ops.xp
        xhat, inv = cache["xhat"], cache["inv"]
        dgamma = xp.sum(dout * xhat, axis=0)
        dbeta = xp.mean(dout, axis=0) if bug == "mean_not_sum" else xp.sum(dout, axis=0)
        g = dout * p["gamma"]
        ax = wrong if bug == "wrong_axis" else axis
        reduce = xp.sum if bug == "missing_1/N" else xp.mean
        if bug == "stats_constant":
            dx = g * inv
        elif bug == "dropped_term":
            dx = inv * (g - reduce(g, axis=ax, keepdims=True))
        else:
            dx = inv * (
                g
                - reduce(g, axis=ax, keepdims=True)
                - xhat * reduce(g * xhat, axis=ax, keepdims=True)
            )
        return {"gamma": dgamma, "beta": dbeta}, dx

    return bwd


_NORM_MUTANTS = ("stats_constant", "wrong_axis", "missing_1/N", "dropped_term", "mean_not_sum")

LAYERNORM = Layer(
    "layernorm",
    lambda seed: _norm_point(seed, 5, (3, 5)),
    _norm_fwd(-1),
    _norm_bwd(-1, 0),
    _NORM_MUTANTS,
)

BATCHNORM = Layer(
    "batchnorm_train",
    lambda seed: _norm_point(seed, 6, (5, 3)),
    _norm_fwd(0),
    _norm_bwd(0, 1),
    _NORM_MUTANTS,
)


# ---------------------------------------------------------------- softmax cross-entropy
def _ce_point(seed: int) -> Point:
    r = _rng(seed, 7)
    n, c = 4, 5
    labels = r.integers(0, c, size=n)
    return Point({}, 2.0 * r.normal(size=(n, c)), {"labels": labels, "onehot": np.eye(c)[labels]})


def _ce_fwd(ops, p, x, cfg):
    xp = ops.xp
    z = x - _amax(ops, x, -1)
    logp = z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))
    picked = ops.take_along(logp, ops.asarray(cfg["labels"][:, None]), axis=-1)
    return -xp.mean(picked), {"z": z}


def _ce_bwd(ops, p, x, cfg, cache, dout, bug):
    xp = ops.xp
    e = xp.exp(cache["z"])
    prob = e / xp.sum(e, axis=0 if bug == "wrong_axis" else -1, keepdims=True)
    onehot = cfg["onehot"]
    if bug == "off_by_one":
        onehot = np.roll(onehot, 1, axis=1)
    delta = prob - ops.like(onehot, x)
    if bug != "missing_1/N":
        delta = delta / x.shape[0]
    return {}, dout * delta


SOFTMAX_CE = Layer(
    "softmax_cross_entropy",
    _ce_point,
    _ce_fwd,
    _ce_bwd,
    ("missing_1/N", "wrong_axis", "off_by_one"),
    clamp=0.01,  # |d mean-CE / d logit| <= 1/N: a clamp at 0.1 would change nothing
)


# ---------------------------------------------------------------- scaled dot-product attention
def _attention_point(seed: int) -> Point:
    r = _rng(seed, 8)
    d = 3
    params = {k: r.normal(size=(d, d)) / math.sqrt(d) for k in ("Wq", "Wk", "Wv")}
    return Point(params, r.normal(size=(4, d)))


def _attention_fwd(ops, p, x, cfg):
    xp = ops.xp
    scale = 1.0 / math.sqrt(x.shape[-1])
    q, k, v = x @ p["Wq"], x @ p["Wk"], x @ p["Wv"]
    s = (q @ k.T) * scale
    e = xp.exp(s - _amax(ops, s, -1))
    a = e / xp.sum(e, axis=-1, keepdims=True)
    return a @ v, {"q": q, "k": k, "v": v, "a": a}


def _attention_bwd(ops, p, x, cfg, cache, dout, bug):
    xp = ops.xp
    q, k, v, a = cache["q"], cache["k"], cache["v"], cache["a"]
    scale = 1.0 / math.sqrt(x.shape[-1])
    dv = a.T @ dout
    da = dout @ v.T
    ds = a * da if bug == "dropped_term" else a * (da - xp.sum(da * a, axis=-1, keepdims=True))
    dq = ds @ k if bug == "missing_scale" else (ds @ k) * scale
    dk = (ds @ q) * scale if bug == "transpose" else (ds.T @ q) * scale
    dx = dq @ p["Wq"].T + dv @ p["Wv"].T
    if bug != "dropped_path":
        dx = dx + dk @ p["Wk"].T
    return {"Wq": x.T @ dq, "Wk": x.T @ dk, "Wv": x.T @ dv}, dx


ATTENTION = Layer(
    "attention",
    _attention_point,
    _attention_fwd,
    _attention_bwd,
    ("dropped_term", "missing_scale", "transpose", "dropped_path"),
)


# ---------------------------------------------------------------- embedding
def _embedding_point(seed: int) -> Point:
    r = _rng(seed, 9)
    idx = r.integers(0, 5, size=6)
    idx[3] = idx[0] = idx[1]  # duplicates
    return Point({"W": r.normal(size=(5, 3))}, idx.astype(np.int64))


def _embedding_fwd(ops, p, x, cfg):
    return p["W"][x], {}


def _embedding_bwd(ops, p, x, cfg, cache, dout, bug):
    idx = (x + 1) % p["W"].shape[0] if bug == "off_by_one" else x
    scatter = ops.scatter_set if bug == "assign_not_accumulate" else ops.scatter_add
    return {"W": scatter(ops.xp.zeros_like(p["W"]), (idx,), dout)}, None


EMBEDDING = Layer(
    "embedding_duplicates",
    _embedding_point,
    _embedding_fwd,
    _embedding_bwd,
    ("assign_not_accumulate", "off_by_one"),
)


# ---------------------------------------------------------------- residual block
def _residual_point(seed: int) -> Point:
    r = _rng(seed, 10)
    d = 4
    params = {
        "W1": r.normal(size=(d, d)) / 2,
        "b1": 0.3 * r.normal(size=d),
        "W2": r.normal(size=(d, d)) / 2,
        "b2": 0.3 * r.normal(size=d),
    }
    return Point(params, r.normal(size=(3, d)))


def _residual_fwd(ops, p, x, cfg):
    h = ops.xp.tanh(x @ p["W1"] + p["b1"])
    return x + h @ p["W2"] + p["b2"], {"h": h}


def _residual_bwd(ops, p, x, cfg, cache, dout, bug):
    xp, h = ops.xp, cache["h"]
    dh = dout @ p["W2"].T
    dz = dh * (1.0 - h) if bug == "wrong_derivative" else dh * (1.0 - h * h)
    db1 = xp.mean(dz, axis=0) if bug == "mean_not_sum" else xp.sum(dz, axis=0)
    dx = dz @ p["W1"].T
    if bug != "forgot_skip":
        dx = dx + dout
    grads = {"W1": x.T @ dz, "b1": db1, "W2": h.T @ dout, "b2": xp.sum(dout, axis=0)}
    return grads, dx


RESIDUAL = Layer(
    "residual_block",
    _residual_point,
    _residual_fwd,
    _residual_bwd,
    ("forgot_skip", "wrong_derivative", "mean_not_sum"),
)


# ---------------------------------------------------------------- LSTM cell
def _lstm_point(seed: int) -> Point:
    r = _rng(seed, 11)
    n, d, hdim = 2, 3, 2
    params = {
        "Wx": r.normal(size=(d, 4 * hdim)) / 2,
        "Wh": r.normal(size=(hdim, 4 * hdim)) / 2,
        "b": 0.5 * r.normal(size=4 * hdim),
        "h0": r.normal(size=(n, hdim)),
        "c0": r.normal(size=(n, hdim)),
    }
    return Point(params, r.normal(size=(n, d)))


def _lstm_fwd(ops, p, x, cfg):
    xp = ops.xp
    hd = p["h0"].shape[1]
    z = x @ p["Wx"] + p["h0"] @ p["Wh"] + p["b"]
    i = _sigmoid(xp, z[:, :hd])
    f = _sigmoid(xp, z[:, hd : 2 * hd])
    g = xp.tanh(z[:, 2 * hd : 3 * hd])
    o = _sigmoid(xp, z[:, 3 * hd :])
    c = f * p["c0"] + i * g
    tc = xp.tanh(c)
    h = o * tc
    return xp.concatenate([h, c], axis=1), {"i": i, "f": f, "g": g, "o": o, "c": c, "tc": tc}


def _lstm_bwd(ops, p, x, cfg, cache, dout, bug):
    xp = ops.xp
    hd = p["h0"].shape[1]
    i, f, g, o, c, tc = (cache[k] for k in ("i", "f", "g", "o", "c", "tc"))
    dh, dc = dout[:, :hd], dout[:, hd:]
    dtanh = 1.0 - c * c if bug == "wrong_derivative" else 1.0 - tc * tc
    dct = dc if bug == "dropped_term" else dc + dh * o * dtanh
    di, df, dg, do = dct * g, dct * p["c0"], dct * i, dh * tc
    dc0 = xp.zeros_like(dct) if bug == "forget_path" else dct * f
    if bug == "gate_order":  # i and f swapped in backward
        di, df = df, di
    dz = xp.concatenate(
        [di * i * (1.0 - i), df * f * (1.0 - f), dg * (1.0 - g * g), do * o * (1.0 - o)], axis=1
    )
    grads = {
        "Wx": x.T @ dz,
        "Wh": p["h0"].T @ dz,
        "b": xp.sum(dz, axis=0),
        "h0": dz @ p["Wh"].T,
        "c0": dc0,
    }
    return grads, dz @ p["Wx"].T


LSTM = Layer(
    "lstm_cell",
    _lstm_point,
    _lstm_fwd,
    _lstm_bwd,
    ("wrong_derivative", "dropped_term", "forget_path", "gate_order"),
)


# ---------------------------------------------------------------- seeded dropout
def _dropout_point(seed: int) -> Point:
    r = _rng(seed, 12)
    return Point({}, r.normal(size=(3, 4)), {"p": 0.5})


def _dropout_fwd(ops, p, x, cfg):
    keep = 1.0 - cfg["p"]
    mask = ops.xp.where(ops.rand(tuple(x.shape), x) < keep, 1.0 / keep, 0.0)
    return x * mask, {"mask": mask}


def _dropout_bwd(ops, p, x, cfg, cache, dout, bug):
    mask = cache["mask"]
    if bug == "missing_scale":
        mask = mask * (1.0 - cfg["p"])
    elif bug == "new_mask":  # backward draws its own mask instead of reusing forward's
        keep = 1.0 - cfg["p"]
        mask = ops.xp.where(ops.rand(tuple(x.shape), x, stream=1) < keep, 1.0 / keep, 0.0)
    return {}, dout * mask


DROPOUT = Layer(
    "dropout_seeded",
    _dropout_point,
    _dropout_fwd,
    _dropout_bwd,
    ("missing_scale", "new_mask"),
)


# ---------------------------------------------------------------- activations
def _activation_point(salt: int) -> Callable[[int], Point]:
    def point(seed: int) -> Point:
        r = _rng(seed, salt)
        x = 1.5 * r.normal(size=(3, 4))
        x = np.where(np.abs(x) < 0.1, x + 0.3, x)  # clear of 0 (ELU's kink)
        return Point({}, x)

    return point


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_fwd(ops, p, x, cfg):
    t = ops.xp.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * x * (1.0 + t), {"t": t}


def _gelu_bwd(ops, p, x, cfg, cache, dout, bug):
    t = cache["t"]
    inner = 1.0 if bug == "wrong_derivative" else 1.0 + 3 * 0.044715 * x * x
    d = 0.5 * (1.0 + t)
    if bug != "dropped_term":
        d = d + 0.5 * x * (1.0 - t * t) * _GELU_C * inner
    return {}, dout * d


GELU = Layer(
    "gelu", _activation_point(13), _gelu_fwd, _gelu_bwd, ("dropped_term", "wrong_derivative")
)


def _softplus_fwd(ops, p, x, cfg):
    xp = ops.xp
    return xp.where(x > 0, x, 0.0 * x) + xp.log1p(xp.exp(-xp.abs(x))), {}


def _softplus_bwd(ops, p, x, cfg, cache, dout, bug):
    return {}, dout * _sigmoid(ops.xp, -x if bug == "wrong_derivative" else x)


SOFTPLUS = Layer(
    "softplus", _activation_point(14), _softplus_fwd, _softplus_bwd, ("wrong_derivative",)
)

ELU_ALPHA = 1.3


def _elu_fwd(ops, p, x, cfg):
    xp = ops.xp
    out = xp.where(x > 0, x, ELU_ALPHA * xp.expm1(xp.where(x > 0, 0.0 * x, x)))
    return out, {"out": out}


def _elu_bwd(ops, p, x, cfg, cache, dout, bug):
    xp, out = ops.xp, cache["out"]
    neg = out if bug == "dropped_term" else out + ELU_ALPHA
    return {}, dout * xp.where(x > 0, 1.0 + 0.0 * x, neg)


ELU = Layer("elu", _activation_point(15), _elu_fwd, _elu_bwd, ("dropped_term",))


# ---------------------------------------------------------------- L1/L2 penalties
L1, L2 = 0.3, 0.7


def _penalty_point(seed: int) -> Point:
    r = _rng(seed, 16)
    w = r.normal(size=(3, 2))
    w = np.sign(w) * (0.1 + np.abs(w))  # clear of L1's kink at 0
    return Point({"W": w}, r.normal(size=(2, 3)))


def _penalty_fwd(ops, p, x, cfg):
    xp, w = ops.xp, p["W"]
    penalty = L1 * xp.sum(xp.abs(w)) + 0.5 * L2 * xp.sum(w * w)
    out = x @ w
    return xp.concatenate([out.reshape(-1), penalty.reshape(1)]), {}


def _penalty_bwd(ops, p, x, cfg, cache, dout, bug):
    xp, w = ops.xp, p["W"]
    d = dout[:-1].reshape(x.shape[0], w.shape[1])
    l1 = -L1 if bug == "sign_l1" else L1
    l2 = 2.0 * L2 if bug == "missing_half" else L2
    dW = x.T @ d
    if bug != "dropped_term":
        dW = dW + dout[-1] * (l1 * xp.sign(w) + l2 * w)
    return {"W": dW}, d @ w.T


PENALTY = Layer(
    "l1_l2_penalty",
    _penalty_point,
    _penalty_fwd,
    _penalty_bwd,
    ("sign_l1", "missing_half", "dropped_term"),
)


# ---------------------------------------------------------------- tied weight (used twice)
def _tied_point(seed: int) -> Point:
    r = _rng(seed, 17)
    return Point({"W": r.normal(size=(3, 3)) / 2}, r.normal(size=(4, 3)))


def _tied_fwd(ops, p, x, cfg):
    h = ops.xp.tanh(x @ p["W"])
    return h @ p["W"].T, {"h": h}


def _tied_bwd(ops, p, x, cfg, cache, dout, bug):
    h, w = cache["h"], p["W"]
    dw_dec = h.T @ dout if bug == "transpose" else dout.T @ h
    dh = dout @ w
    dz = dh if bug == "wrong_derivative" else dh * (1.0 - h * h)
    dw_enc = x.T @ dz
    dW = dw_dec if bug == "assign_not_accumulate" else dw_enc + dw_dec
    return {"W": dW}, dz @ w.T


TIED = Layer(
    "tied_weight",
    _tied_point,
    _tied_fwd,
    _tied_bwd,
    ("assign_not_accumulate", "transpose", "wrong_derivative"),
)


LAYERS: tuple[Layer, ...] = (
    LINEAR,
    CONV1D,
    CONV2D,
    MAXPOOL,
    LAYERNORM,
    BATCHNORM,
    SOFTMAX_CE,
    ATTENTION,
    EMBEDDING,
    RESIDUAL,
    LSTM,
    DROPOUT,
    GELU,
    SOFTPLUS,
    ELU,
    PENALTY,
    TIED,
)

BY_NAME = {layer.name: layer for layer in LAYERS}


def cases(include_correct: bool = True) -> list[tuple[Layer, str | None]]:
    """``(layer, mutant)`` for every layer and mutant (``None``: the correct backward)."""
    out: list[tuple[Layer, str | None]] = []
    for layer in LAYERS:
        if include_correct:
            out.append((layer, None))
        out += [(layer, m) for m in layer.all_mutants]
    return out
