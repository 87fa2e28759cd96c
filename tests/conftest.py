"""Shared test set-up: one torch thread (CI has 2 cores and tests share them), quiet progress bars."""

import os

import pytest
import torch

os.environ.setdefault("FEDMERGE_PROGRESS", "0")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
