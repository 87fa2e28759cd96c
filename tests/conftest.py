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


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory: pytest.TempPathFactory):
    """Convert datasets into a throw-away cache instead of ~/.cache (modules opt in with ``usefixtures``)."""
    cache = tmp_path_factory.mktemp("fedmerge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMERGE_CACHE", str(cache))
        yield cache


@pytest.fixture
def quiet_single_thread(monkeypatch):
    """No progress bars; one intra-op thread (the merge tests opt in with ``usefixtures``)."""
    from tests.helpers import one_thread

    monkeypatch.setenv("FEDMERGE_PROGRESS", "0")
    with one_thread():
        yield


@pytest.fixture(scope="session")
def split_pairs():
    """Two specialists trained on disjoint classes of the tiny blobs, per seed (``tests.helpers.SplitPair``):
    built once and shared, with their memoised merges, by every merge test module."""
    from tests.helpers import SPLIT_SEEDS, SplitPair, one_thread

    with one_thread():
        return {seed: SplitPair(seed) for seed in SPLIT_SEEDS}
