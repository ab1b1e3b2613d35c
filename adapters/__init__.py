"""Adapters: each turns one framework's models into a `gradcheck.FlatProblem`.

Installed as ``gradcheck.adapters``. Each module defines ``matches(model)`` and
``build_problem(model, x, y, *, loss, wrt, seed)``; importing one imports its
framework, so `gradcheck._dispatch` imports them only when needed.
"""
