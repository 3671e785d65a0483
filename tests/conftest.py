"""Tests run tiny models: one intra-op thread is faster, immune to CPU contention, and makes
numbers independent of the machine's core count. Ray trial workers set their own threads."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
