"""``derive_permutation_spec``: derived specs leave outputs unchanged under random permutations, permute every
hidden layer they can, match the hand-written specs of our four models, recover permutations by weight
matching through conv -> flatten -> linear, and name what they cannot handle; ``Blocked`` spec axes; derived
activation points record their permutation's units, and activation matching recovers a permutation with them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align import apply_permutation, invert, random_perms, weight_matching
from fedmerge.align.activation_matching import activation_matching, record_activations
from fedmerge.align.permute import expand_blocks
from fedmerge.models import (
    Blocked,
    PermutationSpec,
    build_model,
    derive_permutation_spec,
    derive_spec_and_activation_points,
    model_spec,
)
from fedmerge.models.derive import same_up_to_renaming
from fedmerge.models.protocol import activation_points, has_activation_points
from fedmerge.models.spec import linear_axes, perm_of
from tests.helpers import CASE_FIELDS, randomize_parameters

# ------------------------------------------------------------------ models that do not declare a spec


class LeNet(nn.Module):
    """The Flower quickstart CNN: conv(3,6,5)-relu-pool-conv(6,16,5)-relu-pool-flatten-fc(400,120)-fc(84)-fc(10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CatNet(nn.Module):
    """Two branches concatenated along channels (fixed: a spec has one permutation per axis), then two convs
    whose outputs are concatenated along the height axis (which makes them share one permutation)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_a = nn.Conv2d(3, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(3, 5, 3, padding=1)
        self.mix = nn.Conv2d(9, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.deep = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.branch_a(x)), torch.tanh(self.branch_b(x))], dim=1)
        y = F.relu(self.bn(self.mix(y)))
        z = F.gelu(self.deep(y))
        w = torch.cat([y, z], dim=2)
        return self.head(w.mean((2, 3)))


class DepthwiseNet(nn.Module):
    """Pointwise conv, depthwise conv (keeps the permutation), then a grouped conv (fixes its input and output)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.project = nn.Conv2d(12, 7, 1)
        self.head = nn.Linear(7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn1(self.expand(x)))
        x = F.relu6(self.bn2(self.depthwise(x)))
        x = F.leaky_relu(self.grouped(self.pointwise(x)))
        x = F.elu(self.project(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FlatResidualNet(nn.Module):
    """conv-BN-pool, view(size(0), -1), BatchNorm1d over the flat (blocked) axis, a residual Linear block with
    LayerNorm, dropout: functional pooling, view, a blocked BatchNorm, residual Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.flat_bn = nn.BatchNorm1d(5 * 4 * 4)
        self.fc1 = nn.Linear(5 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        x = self.flat_bn(x.view(x.size(0), -1))
        h = F.relu(self.fc1(x))
        h = self.norm(h + torch.sigmoid(self.fc2(h)))
        return self.head(self.drop(h))


class SequenceNet(nn.Module):
    """Conv1d over (batch, channels, length), transpose to (batch, length, channels), then per-token Linear
    layers and a mean over tokens: the channel axis moves and the analysis follows it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.token = nn.Linear(6, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv(x.flatten(2)))  # (N, 3, 8, 8) -> (N, 3, 64)
        h = torch.relu(self.token(h.transpose(1, 2)))  # (N, 64, 8)
        return self.head(h.mean(1))


class GatingNet(nn.Module):
    """Channel split (fixes the conv before it), split / stack / max along other axes, resizing, channel and
    spatial attention by broadcasting, a permute to channels-last and a per-pixel Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        y = self.conv2(a * torch.sigmoid(b))
        top, bottom = torch.split(y, 4, dim=2)
        y = torch.stack([top, bottom], dim=0).amax(0)
        y = F.interpolate(y, scale_factor=2.0)
        y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))  # channel attention
        y = y * torch.sigmoid(y.mean(1, keepdim=True))  # spatial attention: one map for all channels
        z = torch.relu(self.fc(y.permute(0, 2, 3, 1)))
        return self.head(z.mean((1, 2)))


# (model factory, input shape, the Linear / Conv layers whose outputs are expected to stay unpermuted)
CUSTOM = {
    "lenet": (LeNet, (3, 32, 32), {"fc3"}),
    "cat": (CatNet, (3, 8, 8), {"branch_a", "branch_b", "head"}),
    "depthwise": (DepthwiseNet, (3, 8, 8), {"pointwise", "grouped", "head"}),
    "flat-residual": (FlatResidualNet, (3, 8, 8), {"head"}),
    "sequence": (SequenceNet, (3, 8, 8), {"head"}),
    "gating": (GatingNet, (3, 8, 8), {"conv", "head"}),
}
# Our models: (name, input shape, width, extra constructor arguments), as in tests/test_models.py.
OURS = [
    ("mlp", (1, 28, 28), 16, {}),
    ("cnn", (1, 28, 28), 0.25, {}),
    ("cnn", (3, 32, 32), 0.25, {}),
    ("vgg11", (3, 32, 32), 0.125, {}),
    ("vgg11", (1, 28, 28), 0.125, {}),
    ("vgg11", (3, 32, 32), 0.125, {"batch_norm": False}),
    ("resnet20", (3, 32, 32), 0.5, {}),
    ("resnet20", (1, 28, 28), 0.5, {"blocks_per_stage": 2}),
]
OUR_IDS = [f"{n}-{'x'.join(map(str, s))}{'-' + '-'.join(kw) if kw else ''}" for n, s, _, kw in OURS]
over_ours = pytest.mark.parametrize(CASE_FIELDS, OURS, ids=OUR_IDS)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, BN affine parameters and running statistics (LayerNorm / BatchNorm1d too), eval mode."""
    torch.manual_seed(seed)
    randomize_parameters(model, running_stats=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 1.0)
                module.running_var.uniform_(0.5, 3.0)
    return model.eval()


def unpermuted_layers(model: nn.Module, spec: PermutationSpec) -> set[str]:
    """The Linear / Conv layers whose output axis carries no permutation."""
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return {
        n for n, m in model.named_modules() if isinstance(m, layers) and spec.axes_to_perm[f"{n}.weight"][0] is None
    }


def assert_invariant(model: nn.Module, spec: PermutationSpec, in_shape: tuple[int, ...], seed: int = 0) -> None:
    """Random permutations of ``spec`` change the weights but not the outputs."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec.check_covers(state)
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model(x)
    perms = random_perms(spec, state, torch.Generator().manual_seed(seed + 1))
    permuted = apply_permutation(spec, perms, state)
    moved = [k for k, axes in spec.axes_to_perm.items() if any(axes) and not torch.equal(permuted[k], state[k])]
    assert moved, "the permutations left every tensor unchanged"
    model.load_state_dict(permuted)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)
    model.load_state_dict(state)


# ------------------------------------------------------------------ derived specs are right


@pytest.mark.parametrize("case", list(CUSTOM))
def test_derived_spec_leaves_outputs_unchanged_and_permutes_every_hidden_layer(case):
    factory, in_shape, unpermuted = CUSTOM[case]
    model = randomize(factory())
    spec = derive_permutation_spec(model, torch.randn(1, *in_shape))
    assert unpermuted_layers(model, spec) == unpermuted
    assert_invariant(model, spec, in_shape)


@pytest.mark.parametrize("case", list(CUSTOM))
def test_every_derived_entry_is_needed(case):
    """Leaving any one permuted axis out of a derived spec changes the outputs: the invariance test has teeth."""
    factory, in_shape, _ = CUSTOM[case]
    model = randomize(factory())
    spec = derive_permutation_spec(model, torch.randn(1, *in_shape))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    perms = random_perms(spec, state, torch.Generator().manual_seed(3))
    for key, axes in spec.axes_to_perm.items():
        for axis in (a for a, entry in enumerate(axes) if entry is not None):
            broken = spec.axes_to_perm | {key: tuple(None if a == axis else e for a, e in enumerate(axes))}
            model.load_state_dict(apply_permutation(PermutationSpec(broken), perms, state))
            with torch.no_grad():
                gap = (model(x) - reference).abs().max().item()
            assert gap > 1e-4, f"leaving out {key} axis {axis} went unnoticed"


def test_lenet_spec_permutes_fc1_inputs_in_blocks_of_the_conv_map():
    model = LeNet()
    spec = derive_permutation_spec(model, torch.randn(2, 3, 32, 32))
    conv2 = spec.axes_to_perm["conv2.weight"][0]
    assert isinstance(conv2, str)
    assert spec.axes_to_perm["fc1.weight"] == (spec.axes_to_perm["fc1.bias"][0], Blocked(conv2, 25))
    assert spec.axes_to_perm["conv1.weight"][1] is None and spec.axes_to_perm["fc3.weight"][0] is None
    assert spec.perm_sizes(model.state_dict()) == {"P_conv1": 6, "P_conv2": 16, "P_fc1": 120, "P_fc2": 84}
    assert "fc1.weight[1] (blocks of 25)" in spec.describe()


def test_cat_and_depthwise_specs_share_and_fix_the_right_permutations():
    cat = derive_permutation_spec(CatNet(), torch.randn(1, 3, 8, 8)).axes_to_perm
    assert cat["mix.weight"][:2] == ("P_mix", None)  # its inputs come from a channel concatenation
    assert cat["deep.weight"][:2] == ("P_mix", "P_mix")  # concatenated with mix's output along the height
    assert cat["head.weight"] == (None, "P_mix")
    dw = derive_permutation_spec(DepthwiseNet(), torch.randn(1, 3, 8, 8)).axes_to_perm
    assert dw["depthwise.weight"] == ("P_expand", None, None, None)
    assert dw["bn2.running_var"] == ("P_expand",)
    assert dw["pointwise.weight"] == (None, "P_expand", None, None)
    assert dw["grouped.weight"] == (None,) * 4 and dw["project.weight"][:2] == ("P_project", None)


def test_flat_batchnorm_and_sequence_axes():
    flat = derive_permutation_spec(FlatResidualNet(), torch.randn(2, 3, 8, 8)).axes_to_perm
    assert flat["flat_bn.running_mean"] == (Blocked("P_conv", 16),)
    assert flat["fc1.weight"] == ("P_fc1", Blocked("P_conv", 16))
    assert flat["fc2.weight"] == ("P_fc1", "P_fc1") and flat["norm.weight"] == ("P_fc1",)
    seq = derive_permutation_spec(SequenceNet(), torch.randn(2, 3, 8, 8)).axes_to_perm
    assert seq["token.weight"] == ("P_token", "P_conv")
    gating = derive_permutation_spec(GatingNet(), torch.randn(2, 3, 8, 8)).axes_to_perm
    assert gating["conv2.weight"][:2] == ("P_conv2", None) and gating["fc.weight"] == ("P_fc", "P_conv2")


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = randomize(torchvision.models.resnet18(weights=None, num_classes=10))
    spec = derive_permutation_spec(model, torch.randn(1, 3, 32, 32))
    assert unpermuted_layers(model, spec) == {"fc"}
    # One residual stream per stage, plus the inner channels of each of the 8 blocks.
    assert len(spec.perm_names) == 4 + 8
    axes = spec.axes_to_perm
    # The shortcut maps stage 1's stream into stage 2's, which the next block reads.
    assert axes["layer2.0.downsample.0.weight"][:2] == (
        axes["layer2.1.conv1.weight"][1],
        axes["layer2.0.conv1.weight"][1],
    )
    assert_invariant(model, spec, (3, 32, 32))


@over_ours
def test_derived_spec_of_our_models_leaves_outputs_unchanged(name, in_shape, width, kwargs):
    model = randomize(build_model(name, in_shape, width=width, **kwargs))
    spec = derive_permutation_spec(model, torch.randn(1, *in_shape))
    head = {"mlp": "head", "cnn": "fc2", "vgg11": "classifier", "resnet20": "fc"}[name]
    assert unpermuted_layers(model, spec) == {head}
    assert_invariant(model, spec, in_shape)


@over_ours
def test_derived_spec_equals_the_hand_written_one_up_to_renaming(name, in_shape, width, kwargs):
    """SmallCNN included: its fc1 is a Conv2d over the whole feature map, so conv2 is aligned without blocks."""
    model = build_model(name, in_shape, width=width, **kwargs)
    derived = derive_permutation_spec(model, torch.randn(2, *in_shape))
    assert same_up_to_renaming(derived, model.permutation_spec())
    assert not derived.has_blocked_axes


def test_same_up_to_renaming_needs_one_bijection():
    base = PermutationSpec({"a": ("P", None), "b": (None, "Q")})
    assert same_up_to_renaming(base, PermutationSpec({"a": ("X", None), "b": (None, "Y")}))
    assert not same_up_to_renaming(base, PermutationSpec({"a": ("X", None), "b": (None, "X")}))  # merged
    assert not same_up_to_renaming(PermutationSpec({"a": ("P", "P")}), PermutationSpec({"a": ("X", "Y")}))  # split
    assert not same_up_to_renaming(base, PermutationSpec({"a": ("X", None), "b": (None, None)}))
    assert not same_up_to_renaming(base, PermutationSpec({"a": ("X", None), "b": (None, Blocked("Y", 2))}))
    assert not same_up_to_renaming(base, PermutationSpec({"a": ("X", None)}))
    assert not same_up_to_renaming(base, PermutationSpec({"a": ("X",), "b": (None, "Y")}))


def test_weight_matching_recovers_a_permutation_through_conv_flatten_linear():
    model = randomize(LeNet())
    spec = derive_permutation_spec(model, torch.randn(1, 3, 32, 32))
    state_a = model.state_dict()
    hidden = random_perms(spec, state_a, torch.Generator().manual_seed(5))
    state_b = apply_permutation(spec, hidden, state_a)
    perms = weight_matching(spec, state_a, state_b)
    assert all(torch.equal(perms[p], invert(hidden)[p]) for p in spec.perm_names)
    aligned = apply_permutation(spec, perms, state_b)
    assert all(torch.equal(aligned[k], state_a[k]) for k in state_a)


def test_derivation_leaves_the_model_as_it_was():
    model = CatNet().train()
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    derive_permutation_spec(model, torch.randn(3, 3, 8, 8) * 5)
    assert model.training and not model.bn.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ what it cannot handle


class Sort(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=1).values


class Cumsum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


class Heads(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 8) -> (N, 2, 4): units split into heads
        return x.view(x.shape[0], 2, 4).flatten(1)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class InputResidual(nn.Module):
    """Adds the model's input to a hidden layer: that layer cannot be permuted either."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)) + x)))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x).unsqueeze(2) * self.b(x).unsqueeze(1)).flatten(1)


def test_element_wise_ops_fix_what_they_cannot_permute():
    model = randomize(InputResidual())
    spec = derive_permutation_spec(model, torch.randn(2, 6))
    assert unpermuted_layers(model, spec) == {"a", "head"}
    assert_invariant(model, spec, (6,))
    with pytest.raises(NotImplementedError, match=r"operator.mul in the forward of Outer itself.*two axes"):
        derive_permutation_spec(Outer(), torch.randn(2, 3))


@pytest.mark.parametrize(
    ("model", "in_shape", "match"),
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), Sort(), nn.Flatten(), nn.LazyLinear(2)),
            (3, 5, 5),
            r"torch.sort in module '1'",
        ),
        (nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), Cumsum())), (3,), r"Tensor.cumsum in module '1.1'"),
        (nn.Sequential(nn.Linear(3, 8), Heads(), nn.Linear(8, 2)), (3,), r"Tensor.view in module '1'.*splits"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3)), (3, 5, 5), r"ConvTranspose2d in module '1'"),
        (Scaled(), (4,), r"attribute 'scale'"),
    ],
    ids=["sort", "cumsum", "heads", "conv-transpose", "get-attr"],
)
def test_unsupported_ops_are_named(model, in_shape, match):
    model(torch.randn(1, *in_shape))  # materialise lazy layers
    with pytest.raises(NotImplementedError, match=match):
        derive_permutation_spec(model, torch.randn(2, *in_shape))


def test_untraceable_models_raise_value_error():
    with pytest.raises(ValueError, match="DataDependent cannot be traced"):
        derive_permutation_spec(DataDependent(), torch.randn(2, 3))


# ------------------------------------------------------------------ Blocked axes in PermutationSpec


def blocked_spec() -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    """A conv (2 channels) whose 2x3 feature map is flattened into a Linear: blocks of 6 inputs."""
    spec = PermutationSpec(
        {"conv.weight": ("P", None, None, None), "conv.bias": ("P",)} | linear_axes("fc", None, Blocked("P", 6))
    )
    state = {
        "conv.weight": torch.randn(2, 1, 3, 3),
        "conv.bias": torch.randn(2),
        "fc.weight": torch.arange(24.0).reshape(2, 12),
        "fc.bias": torch.randn(2),
    }
    return spec, state


def test_blocked_axes_permute_whole_blocks():
    spec, state = blocked_spec()
    assert spec.has_blocked_axes and not PermutationSpec({"w": ("P", None)}).has_blocked_axes
    assert spec.perm_to_axes == {"P": [("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1)]}
    assert spec.block("fc.weight", 1) == 6 and spec.block("conv.weight", 0) == 1
    out = apply_permutation(spec, {"P": torch.tensor([1, 0])}, state)
    torch.testing.assert_close(out["fc.weight"], state["fc.weight"][:, [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]])
    torch.testing.assert_close(out["conv.bias"], state["conv.bias"].flip(0))
    # The same as permuting the (out, channel, h*w) view of the weight on its channel axis.
    perm = torch.tensor([1, 0])
    view = state["fc.weight"].reshape(2, 2, 6)[:, perm].reshape(2, 12)
    torch.testing.assert_close(out["fc.weight"], view)
    assert expand_blocks(torch.tensor([2, 0, 1]), 2).tolist() == [4, 5, 0, 1, 2, 3]
    assert expand_blocks(torch.tensor([[1, 0]]), 3).tolist() == [[3, 4, 5, 0, 1, 2]]


def test_blocked_axes_sizes_checks_and_description():
    spec, state = blocked_spec()
    assert spec.perm_sizes(state) == {"P": 2}
    spec.check_covers(state)
    with pytest.raises(ValueError, match="not a multiple of its block size 6"):
        spec.check_covers(state | {"fc.weight": torch.zeros(2, 13)})
    with pytest.raises(ValueError, match=r"has size 18 \(3 blocks of 6\), expected 2"):
        spec.perm_sizes(state | {"fc.weight": torch.zeros(2, 18)})
    assert spec.describe(state) == (
        "P (2 units): conv.weight[0], conv.bias[0], fc.weight[1] (blocks of 6)\nnot permuted: fc.bias"
    )
    assert spec.describe().startswith("P: conv.weight[0], conv.bias[0], fc.weight[1] (blocks of 6)\n")
    with pytest.raises(ValueError, match="positive integer"):
        Blocked("P", 0)
    with pytest.raises(TypeError, match="expected a name, Blocked or None"):
        PermutationSpec({"w": (("P", 2),)})  # type: ignore[dict-item]
    # Frozen and comparable: specs with equal blocked axes are equal.
    assert blocked_spec()[0] == spec and Blocked("P", 6) != Blocked("P", 3)


# ------------------------------------------------------------------ derived activation points


def assert_points_follow_the_permutations(
    model: nn.Module, spec: PermutationSpec, points: dict[str, str], in_shape: tuple[int, ...], seed: int = 0
) -> None:
    """Every point records its permutation's units: after permuting the weights, unit i there is unit perm[i]."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, *in_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), record_activations(model, points) as acts:
        model(x)
        before = dict(acts)
        perms = random_perms(spec, state, torch.Generator().manual_seed(seed + 1))
        model.load_state_dict(apply_permutation(spec, perms, state))
        model(x)
        after = dict(acts)
    model.load_state_dict(state)
    for perm, module in points.items():
        assert after[perm].shape[1] == len(perms[perm]), f"{module} does not carry {perm}"
        torch.testing.assert_close(after[perm], before[perm][:, perms[perm]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", [c for c in CUSTOM if c not in ("sequence", "gating")])
def test_derived_activation_points_cover_and_carry_every_permutation(case):
    factory, in_shape, _ = CUSTOM[case]
    model = randomize(factory())
    spec, points = derive_spec_and_activation_points(model, torch.randn(2, *in_shape))
    assert set(points) == set(spec.perm_names)
    assert_points_follow_the_permutations(model, spec, points, in_shape)


def test_derived_activation_points_prefer_the_nonlinearity_and_skip_modules_called_twice():
    torchvision = pytest.importorskip("torchvision")
    model = randomize(torchvision.models.resnet18(weights=None, num_classes=10))
    spec, points = derive_spec_and_activation_points(model, torch.randn(2, 3, 32, 32))
    assert set(points) == set(spec.perm_names)
    # Each block calls its `relu` twice (inner channels, then the residual stream): the BatchNorm is used instead.
    assert points[perm_of(spec.axes_to_perm["layer1.0.conv1.weight"][0])] == "layer1.0.bn1"
    assert points[perm_of(spec.axes_to_perm["conv1.weight"][0])] == "relu"  # the stem's relu is called once
    assert_points_follow_the_permutations(model, spec, points, (3, 32, 32))


@over_ours
def test_derived_activation_points_of_our_models(name, in_shape, width, kwargs):
    model = randomize(build_model(name, in_shape, width=width, **kwargs))
    spec, points = derive_spec_and_activation_points(model, torch.randn(2, *in_shape))
    assert set(points) == set(spec.perm_names)
    if name != "resnet20":  # its residual streams are recorded at another module carrying the same permutation
        assert set(points.values()) == set(model.activation_points().values())
    assert_points_follow_the_permutations(model, spec, points, in_shape)


def test_units_only_on_the_last_axis_get_no_activation_point():
    for model, missing in ((GatingNet(), {"P_fc"}), (SequenceNet(), {"P_token"})):  # channels-last Linear layers
        spec, points = derive_spec_and_activation_points(model, torch.randn(2, 3, 8, 8))
        assert set(spec.perm_names) - set(points) == missing
    model = SequenceNet()
    model_spec(model, torch.randn(2, 3, 8, 8))
    assert not has_activation_points(model)
    with pytest.raises(TypeError, match=r"\['P_token'\]"):
        activation_points(model)


def test_activation_matching_recovers_a_permutation_of_a_derived_model():
    model_a = randomize(LeNet())
    spec = model_spec(model_a, torch.randn(2, 3, 32, 32))
    state_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    model_b = copy.deepcopy(model_a)  # carries the derived spec and points
    hidden = random_perms(spec, state_a, torch.Generator().manual_seed(5))
    model_b.load_state_dict(apply_permutation(spec, hidden, state_a))
    perms = activation_matching(
        model_a, model_b, torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    )
    aligned = apply_permutation(spec, perms, model_b.state_dict())
    assert all(torch.equal(aligned[k], state_a[k]) for k in state_a)
