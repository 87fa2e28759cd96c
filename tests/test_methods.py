"""The merge-method registry (``fedmerge.merge.methods``): every method runs, the names are in step everywhere and
the README's method table is the registry's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest
import torch

from fedmerge.merge import MergeConfig, NPConfig, STEConfig, merge_pair
from fedmerge.merge.methods import (
    DATA_METHODS,
    MERGE_METHODS,
    METHODS,
    MergeMethod,
    MethodName,
    get_method,
    methods_table,
)
from tests.helpers import NUM_CLASSES, blobs, mlp

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def table_rows() -> list[str]:
    """The rows of :func:`methods_table` below its header and separator."""
    lines = methods_table().splitlines()
    assert lines[0].startswith("| method |") and set(lines[1]) <= set("|-: ")
    return lines[2:]


@pytest.mark.parametrize("name", METHODS)
def test_every_registered_method_merges_a_tiny_mlp(name):
    template = mlp(width=8, depth=1)
    state_a, state_b = mlp(width=8, depth=1, seed=1).state_dict(), mlp(width=8, depth=1, seed=2).state_dict()
    surrogate = blobs(range(NUM_CLASSES), 2, seed=3)
    config = MergeConfig(
        method=name, ste=STEConfig(steps=2, batch_size=8), np=NPConfig(steps=2, batch_size=8), correction="none"
    )
    result = merge_pair(template, state_a, state_b, surrogate, config=config)
    assert result.method == name
    assert result.state.keys() == template.state_dict().keys()
    for key, value in template.state_dict().items():
        assert result.state[key].shape == value.shape, key
        assert torch.isfinite(result.state[key].float()).all(), key
    assert result.perms.keys() == set(template.permutation_spec().perm_names)
    assert all(math.isfinite(loss) for loss in result.losses)
    merged = mlp(width=8, depth=1)
    merged.load_state_dict(result.state)
    with torch.no_grad():
        assert merged.eval()(surrogate.x).shape == (len(surrogate), NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in METHODS if n not in DATA_METHODS])
def test_data_free_methods_run_without_a_surrogate(name):
    template = mlp(width=8, depth=1)
    state_a, state_b = mlp(width=8, depth=1, seed=1).state_dict(), mlp(width=8, depth=1, seed=2).state_dict()
    result = merge_pair(template, state_a, state_b, None, config=MergeConfig(method=name))
    assert result.method == name
    assert result.state.keys() == template.state_dict().keys()


def test_registry_is_keyed_by_each_methods_own_name():
    assert MERGE_METHODS
    assert tuple(MERGE_METHODS) == METHODS
    for name, method in MERGE_METHODS.items():
        assert isinstance(method, MergeMethod)
        assert method.name == name
        assert get_method(name) is method
        assert method.summary and method.paper
        assert callable(method.merge)


def test_method_name_literal_lists_exactly_the_registered_methods():
    names = get_args(MethodName)
    assert len(names) == len(set(names))
    assert set(names) == set(MERGE_METHODS)


def test_get_method_rejects_unknown_names_listing_the_choices():
    with pytest.raises(ValueError, match="nope") as error:
        get_method("nope")
    for name in METHODS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="method"):
        MergeConfig(method="nope")


def test_data_methods_are_exactly_those_that_need_data():
    assert set(DATA_METHODS) == {name for name, m in MERGE_METHODS.items() if m.needs_data}
    assert len(DATA_METHODS) == len(set(DATA_METHODS))
    assert {"am", "ste", "np", "ste+np"} <= set(DATA_METHODS)
    assert not {"average", "wm"} & set(DATA_METHODS)


def test_methods_table_has_one_row_per_method():
    rows = table_rows()
    assert len(rows) == len(MERGE_METHODS)
    for row, (name, method) in zip(rows, MERGE_METHODS.items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == f"`{name}`"
        assert cells[1] == ("yes" if method.needs_data else "no")
        assert method.summary in row and method.paper in row


def test_readme_contains_the_methods_table():
    readme = README.read_text()
    missing = [row for row in table_rows() if row not in readme]
    assert not missing, "README's method table is out of date; paste `python -m fedmerge.merge.methods`:\n" + "\n".join(
        missing
    )
