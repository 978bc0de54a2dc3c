"""Shared fixtures: small configs and a deterministic CPU setup for every test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Under pytest-xdist each worker is one of several processes sharing the cores: one torch thread
# each, since a second thread only waits for a core another worker holds.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before
# triton is first imported (by any test module importing matwm_fast → kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the smoke model is tiny, and on a shared CPU a second thread only waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def smoke_cfg():
    from matwm_fast.config import preset

    return preset("smoke")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
