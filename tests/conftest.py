"""Shared test settings: deterministic, single-threaded-friendly, float64 where exactness is checked."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "stagecomp",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "stagecomp"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
