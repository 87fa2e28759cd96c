"""Interpolation of state dicts (``fedmerge.merge.interpolate``): ``interpolate_states`` and ``weighted_average``."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.merge import interpolate_states, weighted_average
from tests.helpers import assert_states_equal

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def toy_state(seed: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(steps),
    }


def test_interpolate_states_endpoints_and_integer_buffers():
    a, b = toy_state(0, 5), toy_state(1, 9)
    at_a = interpolate_states(a, b, 0.0)
    at_b = interpolate_states(a, b, 1.0)
    assert_states_equal(at_a, a)
    for key in ("w", "b"):
        assert torch.equal(at_b[key], b[key]), key
    assert at_b["bn.num_batches_tracked"].item() == 5  # integer buffers come from A, at any lambda
    assert at_b["bn.num_batches_tracked"].dtype == torch.int64
    quarter = interpolate_states(a, b, 0.25)
    for key in ("w", "b"):
        torch.testing.assert_close(quarter[key], 0.75 * a[key] + 0.25 * b[key])
    assert quarter["bn.num_batches_tracked"].item() == 5
    at_a["w"].add_(1.0)  # a new state dict, not views of the inputs
    at_a["bn.num_batches_tracked"].add_(1)
    assert_states_equal(a, toy_state(0, 5))


@pytest.mark.parametrize("lam", [-0.1, 1.01, math.nan])
def test_interpolate_states_rejects_bad_lambda(lam):
    with pytest.raises(ValueError, match="lambda"):
        interpolate_states(toy_state(0, 1), toy_state(1, 1), lam)


def test_interpolate_states_rejects_mismatched_keys_or_shapes():
    a = toy_state(0, 1)
    with pytest.raises(ValueError, match="keys"):
        interpolate_states(a, {k: v for k, v in a.items() if k != "b"}, 0.5)
    with pytest.raises(ValueError, match="keys"):
        interpolate_states(a, {**a, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_states(a, {**a, "w": torch.zeros(4, 3)}, 0.5)


def test_weighted_average_normalises_weights():
    states = [toy_state(s, s + 1) for s in range(3)]
    merged = weighted_average(states, [1.0, 2.0, 5.0])
    for key in ("w", "b"):
        expected = (states[0][key] + 2 * states[1][key] + 5 * states[2][key]) / 8
        torch.testing.assert_close(merged[key], expected)
    assert merged["bn.num_batches_tracked"].item() == 1  # from the first state dict
    assert_states_equal(weighted_average(states, [10.0, 20.0, 50.0]), merged)
    # Two states with weights (1 - lam, lam) are interpolation.
    pair = weighted_average(states[:2], [3.0, 1.0])
    for key in ("w", "b"):
        torch.testing.assert_close(pair[key], interpolate_states(states[0], states[1], 0.25)[key])
    single = weighted_average(states[:1], [0.3])
    for key in ("w", "b"):
        torch.testing.assert_close(single[key], states[0][key])


def test_weighted_average_rejects_bad_weights():
    states = [toy_state(0, 1), toy_state(1, 1)]
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average(states, [1.0])
    with pytest.raises(ValueError, match="positive"):
        weighted_average(states, [0.0, 0.0])
