"""Every model's permutation spec: covers the state dict, and permuting leaves outputs unchanged; the
``PermutableModel`` protocol and ``PermutationSpec.describe``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge.align import apply_permutation
from fedmerge.models import MLP, MODEL_NAMES, VGG11, PermutableModel, ResNet20, SmallCNN, build_model, model_spec
from fedmerge.models.protocol import activation_points
from fedmerge.models.spec import PermutationSpec
from tests.helpers import CASE_FIELDS, randomized_model

# (name, input shape, width, extra constructor arguments): small widths keep the suite fast.
CASES = [
    ("mlp", (1, 28, 28), 16, {}),
    ("cnn", (1, 28, 28), 0.25, {}),
    ("cnn", (3, 32, 32), 0.25, {}),
    ("vgg11", (3, 32, 32), 0.125, {}),
    ("vgg11", (1, 28, 28), 0.125, {}),
    ("vgg11", (3, 32, 32), 0.125, {"batch_norm": False}),
    ("resnet20", (3, 32, 32), 1.0, {}),
    ("resnet20", (1, 28, 28), 1.0, {}),
]
IDS = [f"{n}-{'x'.join(map(str, s))}-w{w}{'-nobn' if kw else ''}" for n, s, w, kw in CASES]
over_cases = pytest.mark.parametrize(CASE_FIELDS, CASES, ids=IDS)


def cyclic_perms(spec: PermutationSpec, state: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random single-cycle permutation (no fixed points) for every permutation of ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for p, n in spec.perm_sizes(state).items():
        order = torch.randperm(n, generator=gen)
        perm = torch.empty(n, dtype=torch.long)
        perm[order] = order.roll(-1)
        perms[p] = perm
    return perms


def outputs(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


@over_cases
def test_permuting_leaves_outputs_unchanged(name, in_shape, width, kwargs):
    model = randomized_model(name, in_shape, width, kwargs, spread_stats=True)
    spec = model.permutation_spec()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec.check_covers(state)
    x = torch.randn(8, *in_shape)
    reference = outputs(model, state, x)

    perms = cyclic_perms(spec, state)
    permuted = apply_permutation(spec, perms, state)
    for key, axes in spec.axes_to_perm.items():
        if any(axes):
            assert not torch.equal(permuted[key], state[key]), f"permutation left {key} unchanged"
    torch.testing.assert_close(outputs(model, permuted, x), reference, atol=1e-4, rtol=1e-4)


@over_cases
def test_every_spec_entry_is_needed(name, in_shape, width, kwargs):
    """Dropping any single axis entry from the spec breaks output invariance: the test above guards specs."""
    model = randomized_model(name, in_shape, width, kwargs, spread_stats=True)
    spec = model.permutation_spec()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, *in_shape)
    reference = outputs(model, state, x)
    perms = cyclic_perms(spec, state)
    for key, axes in spec.axes_to_perm.items():
        for axis, perm in enumerate(axes):
            if perm is None:
                continue
            broken_axes = dict(spec.axes_to_perm)
            broken_axes[key] = tuple(None if a == axis else p for a, p in enumerate(axes))
            broken = PermutationSpec(broken_axes)
            out = outputs(model, apply_permutation(broken, perms, state), x)
            gap = (out - reference).abs().max().item()
            assert gap > 1e-3, f"dropping {key} axis {axis} ({perm}) went unnoticed (max change {gap:.2e})"

    missing = dict(spec.axes_to_perm)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="missing"):
        PermutationSpec(missing).check_covers(state)


@over_cases
def test_activation_points_carry_their_permutation(name, in_shape, width, kwargs):
    model = build_model(name, in_shape, width=width, **kwargs).eval()
    spec = model.permutation_spec()
    sizes = spec.perm_sizes(model.state_dict())
    points = model.activation_points()
    assert set(points) == set(spec.perm_names)
    modules = dict(model.named_modules())
    seen: dict[str, int] = {}
    handles = [
        modules[m].register_forward_hook(lambda _m, _i, out, p=p: seen.__setitem__(p, out.shape[1]))
        for p, m in points.items()
    ]
    with torch.no_grad():
        model(torch.randn(2, *in_shape))
    for h in handles:
        h.remove()
    assert seen == sizes


def test_registry_builds_every_model_and_rejects_unknown_names():
    assert set(MODEL_NAMES) == {"mlp", "cnn", "vgg11", "resnet20"}
    classes = {"mlp": MLP, "cnn": SmallCNN, "vgg11": VGG11, "resnet20": ResNet20}
    for name in MODEL_NAMES:
        model = build_model(name.upper(), (1, 28, 28), num_classes=7, width=None if name == "mlp" else 0.25)
        assert isinstance(model, classes[name])
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)
        assert callable(model.permutation_spec) and callable(model.activation_points)
    assert build_model("mlp", (1, 28, 28)).head.in_features == 512
    assert build_model("mlp", (3, 32, 32), width=64, depth=2).head.in_features == 64
    with pytest.raises(ValueError, match="unknown model"):
        build_model("lenet", (1, 28, 28))
    with pytest.raises(ValueError):
        build_model("mlp", (1, 28, 28), width=0.5)


def test_tiny_width_multipliers_keep_at_least_one_channel():
    vgg = build_model("vgg11", (1, 28, 28), width=0.001)
    resnet = build_model("resnet20", (3, 32, 32), width=0.01)
    cnn = build_model("cnn", (1, 28, 28), width=0.001)
    for model, shape in ((vgg, (1, 28, 28)), (resnet, (3, 32, 32)), (cnn, (1, 28, 28))):
        sizes = model.permutation_spec().perm_sizes(model.state_dict())
        assert min(sizes.values()) >= 1
        assert model.eval()(torch.randn(2, *shape)).shape == (2, 10)


def test_vgg_batchnorm_layout_and_resnet_shared_streams():
    vgg = VGG11(width=0.125)
    state = vgg.state_dict()
    assert "features.0.bias" not in state and "features.1.running_var" in state
    assert VGG11(width=0.125, batch_norm=False).state_dict()["features.0.bias"].shape == (8,)
    spec = ResNet20().permutation_spec()
    assert spec.axes_to_perm["conv1.weight"][0] == "P_res1"
    assert spec.axes_to_perm["layer1.2.bn2.running_mean"] == ("P_res1",)
    assert spec.axes_to_perm["layer2.0.shortcut.0.weight"][:2] == ("P_res2", "P_res1")
    assert spec.axes_to_perm["layer2.0.conv1.weight"][:2] == ("P_layer2.0", "P_res1")
    assert spec.axes_to_perm["fc.weight"] == (None, "P_res3")
    assert len(spec.perm_names) == 3 + 9


# ------------------------------------------------------------------ PermutableModel protocol, spec descriptions


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_is_a_permutable_model(name):
    model = build_model(name, (1, 28, 28), width=16 if name == "mlp" else 0.125)
    assert isinstance(model, PermutableModel)
    assert model_spec(model) == model.permutation_spec()
    assert activation_points(model) == model.activation_points()


def test_models_without_a_spec_are_not_permutable():
    assert not isinstance(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), PermutableModel)
    assert not isinstance(nn.Linear(2, 2), PermutableModel)
    with pytest.raises(TypeError, match="Linear"):
        model_spec(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Sequential"):
        activation_points(nn.Sequential(nn.Linear(2, 2)))


def test_describe_lists_every_permutation_its_tensors_and_the_unpermuted_ones():
    spec = PermutationSpec(
        {"a.weight": ("P", None), "a.bias": ("P",), "b.weight": (None, "P"), "b.bias": (None,), "s": (None, None)}
    )
    state = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3), "b.weight": torch.zeros(5, 3)}
    state |= {"b.bias": torch.zeros(5), "s": torch.zeros(1, 1)}
    assert spec.describe(state) == "P (3 units): a.weight[0], a.bias[0], b.weight[1]\nnot permuted: b.bias, s"
    assert spec.describe() == "P: a.weight[0], a.bias[0], b.weight[1]\nnot permuted: b.bias, s"
    assert PermutationSpec({"w": ("P", "Q")}).describe() == "P: w[0]\nQ: w[1]"


@pytest.mark.parametrize(
    CASE_FIELDS,
    [
        ("mlp", (1, 8, 8), 8, {}),
        ("vgg11", (3, 32, 32), 0.125, {}),
        ("resnet20", (3, 8, 8), 0.25, {"blocks_per_stage": 1}),
    ],
    ids=["mlp", "vgg11", "resnet20"],
)
def test_describe_matches_the_models_spec(name, in_shape, width, kwargs):
    model = build_model(name, in_shape, width=width, **kwargs)
    spec, state = model.permutation_spec(), model.state_dict()
    sizes = spec.perm_sizes(state)
    lines = spec.describe(state).splitlines()
    *perm_lines, fixed_line = lines
    # One line per permutation, in spec order, each with its size and every tensor axis it acts on.
    assert [line.split(" ", 1)[0] for line in perm_lines] == spec.perm_names
    for line, perm in zip(perm_lines, spec.perm_names, strict=True):
        head, tensors = line.split(": ", 1)
        assert head == f"{perm} ({sizes[perm]} units)"
        assert tensors.split(", ") == [f"{key}[{axis}]" for key, axis in spec.perm_to_axes[perm]]
    # Then the tensors no permutation touches.
    fixed = [key for key, axes in spec.axes_to_perm.items() if not any(axes)]
    assert fixed
    assert fixed_line == "not permuted: " + ", ".join(fixed)
    for key in fixed:
        assert all(f"{key}[" not in line for line in perm_lines)
    # Without a state dict: the same lines, no sizes.
    unsized = [
        line.replace(f"{p} ({sizes[p]} units): ", f"{p}: ", 1)
        for line, p in zip(perm_lines, spec.perm_names, strict=True)
    ]
    assert spec.describe().splitlines() == [*unsized, fixed_line]
