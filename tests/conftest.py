"""Shared test settings: deterministic and single-threaded."""

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


# The tests run small tensors, where a second OpenMP thread costs more in
# synchronisation than it gains, and stalls badly when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
