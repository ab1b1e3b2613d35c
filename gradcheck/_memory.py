"""Large scratch arrays that the kernel can back with huge pages.

A fresh array of a million float64 entries is 8 MB of memory never touched
before: filling it takes one page fault per 4 KiB page unless the kernel backs it
with 2 MiB huge pages. NumPy asks for those (``madvise``) on every allocation of
4 MiB or more, but only whole 2 MiB-aligned stretches can get one, and an 8 MB
allocation starts wherever the allocator puts it: up to 4 MiB of it is then
faulted in 4 KiB pages, which on virtual machines costs several milliseconds (as
much as a forward pass of a million-parameter model). `empty` starts the array on
a 2 MiB boundary instead, so that all of it can be backed by huge pages; the
unused head and tail of the allocation are never touched, and where the kernel
gives no huge pages nothing is lost but address space.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

#: bytes of one huge page (x86-64 and arm64 Linux)
HUGE_PAGE = 2 << 20


def empty(shape: int | tuple[int, ...], dtype: DTypeLike = np.float64) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a `HUGE_PAGE` boundary when it is
    at least that large (a view of a slightly larger allocation), else a plain one."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    size = count * dtype.itemsize
    if size < HUGE_PAGE:
        return np.empty(shape, dtype=dtype)
    raw = np.empty(size + HUGE_PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start : start + size].view(dtype).reshape(shape)


def copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` in memory from `empty`."""
    out = empty(a.shape, a.dtype)
    out[...] = a
    return out


def freeze(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only, with every array it is a view of: nobody can write to the
    memory through any of them (without setting the flag back)."""
    view: object = a
    while isinstance(view, np.ndarray):
        view.setflags(write=False)
        view = view.base
    return a


def frozen(a: np.ndarray) -> bool:
    """Whether ``a`` and every array it is a view of are read-only, down to the one that
    owns the memory (as `freeze` leaves them)."""
    view: object = a
    while isinstance(view, np.ndarray):
        if view.flags.writeable:
            return False
        if view.base is None:
            return True
        view = view.base
    return False  # memory owned by something else (a buffer, another library's array)
