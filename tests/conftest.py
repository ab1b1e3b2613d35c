"""Shared test set-up: pin torch to one thread (tiny float64 matmuls are slow otherwise)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# Hypothesis profiles: "ci" (small, derandomized) by default; `--hypothesis-profile=long`
# or GRADCHECK_HYPOTHESIS_PROFILE=long for a longer search.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass
else:
    _common = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
        "print_blob": True,
    }
    settings.register_profile("ci", max_examples=24, derandomize=True, **_common)
    settings.register_profile("long", max_examples=600, **_common)
    import os

    settings.load_profile(os.environ.get("GRADCHECK_HYPOTHESIS_PROFILE", "ci"))
