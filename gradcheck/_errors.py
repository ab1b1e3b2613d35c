"""How an error of the user's code is quoted in one of ours."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: how an error of the user's code is quoted
    in one of ours."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
