"""Derive a :class:`PermutationSpec` for any ``torch.fx``-traceable model: ``derive_permutation_spec``.

The model is traced with ``torch.fx.symbolic_trace`` and run once on an example input
(``torch.fx.passes.shape_prop.ShapeProp``) to know every intermediate tensor's shape. Each tensor carries
a *channel group* on one axis (its units); a union-find joins the groups that must share one permutation:

* every ``Linear`` / ``Conv`` output starts a new group, named ``P_<module path>``;
* BatchNorm / LayerNorm / GroupNorm / InstanceNorm (affine parameters and running statistics),
  activations (ReLU, GELU, SiLU, LeakyReLU, ELU, Tanh, Sigmoid, ...), pooling, dropout, ``Identity``,
  softmax and ``.contiguous()``-like calls pass the group through;
* an element-wise ``add`` / ``sub`` / ``mul`` / ``div`` of two tensors (residual connections, gating) joins
  their groups: both sides then share one permutation (a side that is not permuted, such as the model's input,
  fixes the other; a side broadcast along the units, such as an attention map, leaves them free);
* ``flatten`` / ``view`` / ``reshape`` / ``squeeze`` / ``unsqueeze`` keep track of the units through the
  memory layout: after ``conv -> flatten`` a unit owns ``H * W`` consecutive inputs of the next ``Linear``,
  whose input axis becomes ``Blocked(perm, H * W)``; ``transpose`` / ``permute`` / ``movedim`` move the
  channel axis along (so conv1d -> transpose -> per-token Linear works); ``mean`` / ``sum`` / ``amax`` over
  other axes keep it, over the units they give a tensor no permutation acts on;
* ``torch.cat`` (and ``chunk`` / ``split``) along the channel axis: a permutation of the concatenation is not
  a permutation of each part, and a spec has one permutation per axis, so the groups feeding a channel
  concatenation (or coming out of a channel split) are *fixed*: left unpermuted. Concatenating along another
  axis (batch, space, sequence) joins the inputs' groups instead;
* a depthwise convolution (``groups == in_channels == out_channels``) keeps its input's group: its weight's
  axis 0 carries it, axis 1 (size 1) does not; any other grouped convolution fixes both its input and its
  output group (a general permutation would move channels across groups);
* the groups of the model's inputs and of whatever reaches the output (the logits) are fixed.

Fixed groups map to ``None`` in the spec. Anything else (an unknown module, ``torch.sort``, indexing a
tensor, a parameter used directly by ``forward``, a reshape that splits the channel axis, ...) raises
``NotImplementedError`` naming the op and the module it is called in; a model that cannot be traced raises
``ValueError``. Prefer an example batch of two or more samples: with a batch of one, a reshape that merges the
batch axis into the units' axis looks like one that does not.

:func:`derive_spec_and_activation_points` also names, for every permutation, a module whose output carries its
units on axis 1 (what activation matching and ZipIt! record): the group's first nonlinearity module (ReLU, GELU,
...), else its first norm layer, else its first other module (the Linear / Conv that starts it, pooling, ...). A
module called more than once is never chosen (a forward hook sees only its last call); a permutation with no such
module (e.g. units only ever on the last axis of a 3-d tensor) gets no activation point.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fedmerge.models.spec import AxesToPerm, AxisPerm, Blocked, PermutationSpec, block_of, perm_of

__all__ = ["derive_permutation_spec", "derive_spec_and_activation_points", "same_up_to_renaming"]


@dataclass(frozen=True)
class _Units:
    """What a tensor carries: channel group ``group`` on axis ``axis``, each unit owning ``block`` consecutive
    indices of that axis (1 unless the axis was flattened together with later ones)."""

    group: int
    axis: int
    block: int = 1


class _NotTensor:
    """Marks a value that is no tensor (a shape, a size, a Python number): it carries no units."""


NOT_TENSOR = _NotTensor()
Value = Any  # _Units, NOT_TENSOR, or a tuple / list of those (ops returning several tensors)


class _Groups:
    """Union-find over channel groups; each group has a size (its number of units), a name and a fixed flag.
    The root of a class is its oldest group, so names follow the first layer of a residual stream."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []
        self.fixed: list[bool] = []

    def new(self, size: int, name: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            raise ValueError(f"cannot share one permutation between {self.size[a]} and {self.size[b]} units")
        a, b = min(a, b), max(a, b)
        self.parent[b] = a
        self.fixed[a] = self.fixed[a] or self.fixed[b]
        return a

    def fix(self, g: int) -> None:
        self.fixed[self.find(g)] = True

    def is_fixed(self, g: int) -> bool:
        return self.fixed[self.find(g)]


# ----------------------------------------------------------------------------------------------- op tables

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
_PER_CHANNEL_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NONLINEARITIES = tuple(
    m
    for m in _ACTIVATION_MODULES
    if m not in (nn.Identity, nn.Softmax, nn.LogSoftmax) and not issubclass(m, nn.modules.dropout._DropoutNd)
)
"""Activation modules that are real nonlinearities (the preferred activation points)."""
_NORMS: tuple[type[nn.Module], ...] = (*_PER_CHANNEL_NORMS, nn.LayerNorm, nn.GroupNorm)

# Functions and Tensor methods, by kind. "elementwise": output = f(first tensor argument), unit by unit.
# "spatial": acts on the axes after the channel axis (pooling, resizing). "binary": element-wise with
# broadcasting. "reshape": same memory layout, new shape. "reduce": reduction over ``dim``. "meta": the
# result is no tensor (sizes, shapes).
_FUNCTIONS: dict[Callable[..., Any], str] = {
    **dict.fromkeys(
        [
            torch.relu,
            torch.relu_,
            F.relu,
            F.relu_,
            F.relu6,
            F.gelu,
            F.silu,
            F.leaky_relu,
            F.elu,
            F.selu,
            F.celu,
            F.hardswish,
            F.hardsigmoid,
            F.hardtanh,
            F.mish,
            F.softplus,
            F.softmax,
            F.log_softmax,
            torch.softmax,
            torch.log_softmax,
            torch.tanh,
            torch.sigmoid,
            F.tanh,
            F.sigmoid,
            F.dropout,
            F.dropout1d,
            F.dropout2d,
            F.dropout3d,
            F.alpha_dropout,
            torch.clamp,
            torch.abs,
            torch.neg,
            torch.exp,
            operator.neg,
        ],
        "elementwise",
    ),
    **dict.fromkeys(
        [
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
            F.interpolate,
        ],
        "spatial",
    ),
    **dict.fromkeys(
        [
            operator.add,
            operator.iadd,
            torch.add,
            operator.sub,
            operator.isub,
            torch.sub,
            operator.mul,
            operator.imul,
            torch.mul,
            operator.truediv,
            operator.itruediv,
            torch.div,
        ],
        "binary",
    ),
    **dict.fromkeys([torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze], "reshape"),
    **dict.fromkeys([torch.transpose, torch.swapaxes, torch.permute, torch.movedim], "transpose"),
    **dict.fromkeys([torch.mean, torch.sum, torch.amax, torch.amin], "reduce"),
    **dict.fromkeys([torch.cat, torch.concat, torch.stack], "cat"),
    **dict.fromkeys([torch.chunk, torch.split], "split"),
    **dict.fromkeys(
        [getattr, operator.getitem, operator.floordiv, len, operator.eq, operator.ne, torch._assert], "meta"
    ),
}
_METHODS: dict[str, str] = {
    **dict.fromkeys(
        [
            "relu",
            "relu_",
            "sigmoid",
            "sigmoid_",
            "tanh",
            "tanh_",
            "softmax",
            "log_softmax",
            "clamp",
            "clamp_",
            "clamp_min",
            "clamp_max",
            "abs",
            "neg",
            "exp",
            "contiguous",
            "clone",
            "detach",
            "float",
            "double",
            "half",
            "bfloat16",
            "to",
            "type_as",
        ],
        "elementwise",
    ),
    **dict.fromkeys(["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"], "binary"),
    **dict.fromkeys(["view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"], "reshape"),
    **dict.fromkeys(["transpose", "swapaxes", "permute", "movedim"], "transpose"),
    **dict.fromkeys(["mean", "sum", "amax", "amin"], "reduce"),
    **dict.fromkeys(["chunk", "split"], "split"),
    **dict.fromkeys(["size", "dim", "numel"], "meta"),
}


# ----------------------------------------------------------------------------------------------- the analysis


def derive_permutation_spec(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> PermutationSpec:
    """The permutation spec of ``model``, found by tracing it with ``torch.fx`` and running it once on
    ``example_input`` (a tensor, or a sequence of tensors for a model with several inputs; two samples are
    enough), in eval mode. See the module docstring for the rules; the model's parameters, buffers and modes
    are left as they were.

    Every state-dict entry with at least one axis is covered; a permutation ``P_<path>`` is named after the
    first layer (module path) whose outputs it permutes. Raises ``ValueError`` if the model is not traceable
    and ``NotImplementedError`` naming the op and module for anything the rules do not cover.
    """
    return derive_spec_and_activation_points(model, example_input)[0]


def derive_spec_and_activation_points(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[PermutationSpec, dict[str, str]]:
    """:func:`derive_permutation_spec`'s spec, and the activation points found in the same pass: for each
    permutation, the module whose output carries its units on axis 1 (see the module docstring). Permutations
    with no such module are missing from the points.

    Parameters
    ----------
    model : nn.Module
        A ``torch.fx``-traceable model.
    example_input : torch.Tensor | Sequence[torch.Tensor]
        A batch of model inputs (two samples are enough), or a sequence of them for several inputs.

    Returns
    -------
    tuple[PermutationSpec, dict[str, str]]
        The spec, and the module path (a key of ``model.named_modules()``) of each permutation's activation point.
    """
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    modes = {module: module.training for module in model.modules()}
    try:
        # The inference graph (no stochastic depth or dropout branches), run without BatchNorm statistics updates.
        model.eval()
        try:
            graph_module = fx.symbolic_trace(model)
        except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, ...) for untraceable code
            raise ValueError(
                f"{type(model).__name__} cannot be traced by torch.fx.symbolic_trace ({type(error).__name__}: "
                f"{error}); derive_permutation_spec needs a traceable model, or write its permutation_spec() by hand"
            ) from error
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*inputs)
    finally:
        for module, training in modes.items():
            module.training = training
    derivation = _Derivation(model, graph_module)
    spec = derivation.run()
    return spec, derivation.activation_points()


class _Derivation:
    """One walk over the traced graph, in topological order, recording every parameter axis's group."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule):
        self.model = model
        self.graph = graph_module.graph
        self.modules = dict(model.named_modules())
        self.groups = _Groups()
        self.values: dict[fx.Node, Value] = {}
        # state-dict key -> per axis: (group, block), or None when the axis is never permuted
        self.entries: dict[str, list[tuple[int, int] | None]] = {}
        self.node: fx.Node | None = None
        # (module path, module, output value, output rank) of every module call, in order
        self.module_calls: list[tuple[str, nn.Module, Value, int]] = []
        self.perm_names: dict[int, str] = {}  # group root -> its permutation's name in the spec

    # ----------------------------------------------------------------------------------- driver

    def run(self) -> PermutationSpec:
        for node in self.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.values[node] = self._input(node)
            elif node.op == "get_attr":
                self.values[node] = self._get_attr(node)
            elif node.op == "output":
                for value in self._flat(self._value(node.args)):
                    self.groups.fix(value.group)
            else:
                if node.op == "call_module":
                    module = self.modules[str(node.target)]
                    value = self._call_module(node, module)
                    self.module_calls.append((str(node.target), module, value, len(self._shape(node) or ())))
                else:
                    value = self._call(node)
                if value is NOT_TENSOR and (self._shape(node) or ()):
                    raise self._unsupported("it returns a tensor the analysis does not follow")
                self.values[node] = value
        return self._spec()

    def _spec(self) -> PermutationSpec:
        state = self.model.state_dict(keep_vars=True)
        # Entries that alias a recorded tensor (a module registered under two names) share its axes.
        recorded = {id(state[key]): key for key in self.entries if key in state}
        names = self.perm_names
        taken: set[str] = set()

        def entry(item: tuple[int, int] | None) -> AxisPerm:
            if item is None or self.groups.is_fixed(item[0]):
                return None
            root = self.groups.find(item[0])
            if root not in names:
                name, suffix = self.groups.name[root], 2
                while name in taken:
                    name, suffix = f"{self.groups.name[root]}#{suffix}", suffix + 1
                names[root] = name
                taken.add(name)
            return names[root] if item[1] == 1 else Blocked(names[root], item[1])

        axes: AxesToPerm = {}
        for key, tensor in state.items():
            if tensor.ndim == 0:
                continue
            items = self.entries.get(recorded.get(id(tensor), key), [None] * tensor.ndim)
            axes[key] = tuple(entry(item) for item in items)
        return PermutationSpec(axes)

    def activation_points(self) -> dict[str, str]:
        """After :meth:`run`: for every permutation, the module whose output carries its units on axis 1, one
        index per unit: the first nonlinearity, else the first norm, else the first other module; modules called
        more than once are skipped (a forward hook would see only their last output)."""
        calls = Counter(path for path, *_ in self.module_calls)
        best: dict[str, tuple[int, int, str]] = {}
        for order, (path, module, value, ndim) in enumerate(self.module_calls):
            if calls[path] > 1 or not isinstance(value, _Units) or ndim < 2 or (value.axis, value.block) != (1, 1):
                continue
            root = self.groups.find(value.group)
            name = self.perm_names.get(root)
            if name is None or self.groups.is_fixed(root):
                continue
            rank = 0 if isinstance(module, _NONLINEARITIES) else 1 if isinstance(module, _NORMS) else 2
            if name not in best or (rank, order) < best[name][:2]:
                best[name] = (rank, order, path)
        return {name: path for name, (_, _, path) in sorted(best.items())}

    # ----------------------------------------------------------------------------------- helpers

    def _where(self) -> str:
        node = self.node
        assert node is not None
        if node.op == "call_module":
            return f"module {node.target!r}"
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack), "") if stack else ""
        inside = f"module {path!r}" if path else f"the forward of {type(self.model).__name__} itself"
        return f"{inside} (graph node {node.name!r})"

    def _op_name(self) -> str:
        node = self.node
        assert node is not None
        if node.op == "call_module":
            return type(self.modules[node.target]).__name__
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        if node.op == "get_attr":
            return f"direct use of attribute {node.target!r}"
        target = node.target
        module = getattr(target, "__module__", None) or "torch"
        module = "operator" if module == "_operator" else module
        return f"{module}.{getattr(target, '__name__', repr(target))}"

    def _unsupported(self, why: str = "no rule for this op") -> NotImplementedError:
        return NotImplementedError(
            f"derive_permutation_spec: cannot handle {self._op_name()} in {self._where()}: {why}. "
            "Write the model's permutation_spec() by hand, or restructure the model"
        )

    def _shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def _value(self, arg: Any) -> Value:
        if isinstance(arg, fx.Node):
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._value(a) for a in arg)
        if isinstance(arg, dict):
            return tuple(self._value(a) for a in arg.values())
        return NOT_TENSOR

    def _flat(self, value: Value) -> Iterable[_Units]:
        if isinstance(value, _Units):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from self._flat(item)

    def _tensor_args(self, node: fx.Node) -> list[tuple[fx.Node, _Units]]:
        """The node's arguments that are tensors carrying units, in order (positional, then keyword)."""
        found = []
        for arg in [*node.args, *node.kwargs.values()]:
            for item in arg if isinstance(arg, (list, tuple)) else [arg]:
                if isinstance(item, fx.Node) and isinstance(self.values[item], _Units):
                    found.append((item, self.values[item]))
        return found

    def _fresh_fixed(self, node: fx.Node, axis: int | None = None) -> Value:
        """A tensor whose units no permutation moves (an input, a reduction over channels, a concatenation)."""
        shape = self._shape(node)
        if shape is None or len(shape) == 0:
            return NOT_TENSOR
        axis = (1 if len(shape) > 1 else 0) if axis is None else axis
        return _Units(self.groups.new(shape[axis], "", fixed=True), axis)

    def _record(self, key: str, ndim: int, axis: int, units: _Units) -> None:
        """Axis ``axis`` of state entry ``key`` carries ``units`` (its group and block)."""
        entries = self.entries.setdefault(key, [None] * ndim)
        previous = entries[axis]
        if previous is not None:  # a module called twice: its weights tie the groups of both calls
            if previous[1] != units.block:
                raise self._unsupported(f"{key} axis {axis} is reached in blocks of {previous[1]} and {units.block}")
            self._union(previous[0], units.group)
        entries[axis] = (units.group, units.block)

    def _record_module(self, path: str, name: str, units: _Units | None, axis: int = 0) -> None:
        """Record axis ``axis`` of ``path.name`` (if the module has that parameter or buffer); ``units=None``: that
        axis is not permuted (a fixed group, so that a second call of the module cannot permute it either)."""
        tensor = getattr(self.modules[path], name, None)
        if isinstance(tensor, torch.Tensor):
            if units is None:
                units = _Units(self.groups.new(tensor.shape[axis], "", fixed=True), axis)
            self._record(f"{path}.{name}" if path else name, tensor.ndim, axis, units)

    def _union(self, a: int, b: int) -> int:
        try:
            return self.groups.union(a, b)
        except ValueError as error:
            raise self._unsupported(str(error)) from error

    def _first(self, node: fx.Node) -> _Units:
        """The units of the node's first tensor argument."""
        value = self._value(node.args[0]) if node.args else NOT_TENSOR
        if not isinstance(value, _Units):
            raise self._unsupported("its first argument is not a tensor the analysis follows")
        return value

    def _arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        """Argument ``index`` (counting the tensor itself for functions, not for methods) or keyword ``name``."""
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # ----------------------------------------------------------------------------------- graph inputs / attrs

    def _input(self, node: fx.Node) -> Value:
        return self._fresh_fixed(node)

    def _get_attr(self, node: fx.Node) -> Value:
        if self._shape(node) is None:
            return NOT_TENSOR
        raise self._unsupported(
            "a parameter or buffer used directly by forward() (not through a module such as nn.Linear) "
            "has no known permutation"
        )

    # ----------------------------------------------------------------------------------- modules

    def _call_module(self, node: fx.Node, module: nn.Module) -> Value:
        path = str(node.target)
        if isinstance(module, nn.Linear):
            return self._linear(node, path, module)
        if isinstance(module, _CONVS):
            return self._conv(node, path, module)
        if isinstance(module, (*_PER_CHANNEL_NORMS, nn.LayerNorm, nn.GroupNorm, nn.PReLU)):
            return self._per_unit_module(node, path, module)
        if isinstance(module, _ACTIVATION_MODULES):
            return self._first(node)
        if isinstance(module, _SPATIAL_MODULES):
            return self._spatial(node)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self._reshape(node)
        raise self._unsupported()

    def _linear(self, node: fx.Node, path: str, module: nn.Linear) -> Value:
        units = self._first(node)
        shape = self._shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if shape is None or units.axis != len(shape) - 1:
            raise self._unsupported("its input's units are not on the last axis, the one nn.Linear mixes")
        out = _Units(self.groups.new(module.out_features, f"P_{path}"), units.axis)
        self._record_module(path, "weight", out, 0)
        self._record_module(path, "weight", units, 1)
        self._record_module(path, "bias", out, 0)
        return out

    def _conv(self, node: fx.Node, path: str, module: nn.Module) -> Value:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        units = self._first(node)
        if units.axis != 1 or units.block != 1:
            raise self._unsupported("its input's units are not on the channel axis (axis 1)")
        groups, c_in, c_out = module.groups, module.in_channels, module.out_channels
        if groups == 1:
            out = _Units(self.groups.new(c_out, f"P_{path}"), 1)
            self._record_module(path, "weight", out, 0)
            self._record_module(path, "weight", units, 1)
            self._record_module(path, "bias", out, 0)
            return out
        if groups == c_in == c_out:  # depthwise: channel c only sees input channel c, so they share a permutation
            self._record_module(path, "weight", units, 0)
            self._record_module(path, "weight", None, 1)
            self._record_module(path, "bias", units, 0)
            return units
        # Other grouped convolutions mix channels within fixed groups: leave both sides unpermuted.
        self.groups.fix(units.group)
        self._record_module(path, "weight", None)
        self._record_module(path, "bias", None)
        return _Units(self.groups.new(c_out, f"P_{path}", fixed=True), 1)

    def _per_unit_module(self, node: fx.Node, path: str, module: nn.Module) -> Value:
        """Norm layers (and PReLU): per-unit parameters / statistics follow the input's units."""
        units = self._first(node)
        shape = self._shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        assert shape is not None
        names = ("weight", "bias", "running_mean", "running_var")
        if isinstance(module, nn.LayerNorm):
            # Normalises over the last len(normalized_shape) axes; statistics are permutation invariant.
            first = len(shape) - len(module.normalized_shape)
            if units.axis >= first:
                for name in ("weight", "bias"):
                    self._record_module(path, name, units, units.axis - first)
            else:
                for name in ("weight", "bias"):
                    self._record_module(path, name, None)
            return units
        if units.axis != 1:
            raise self._unsupported("its input's units are not on the channel axis (axis 1)")
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            self._record_module(path, "weight", None)
            return units
        if isinstance(module, nn.GroupNorm) and module.num_groups not in (1, module.num_channels):
            # Statistics over groups of consecutive channels: only permutations within groups are symmetries.
            self.groups.fix(units.group)
            for name in names:
                self._record_module(path, name, None)
            return units
        for name in names:
            self._record_module(path, name, units)
        return units

    # ----------------------------------------------------------------------------------- functions / methods

    def _call(self, node: fx.Node) -> Value:
        if node.op == "call_method":
            kind = _METHODS.get(str(node.target))
        else:
            try:
                kind = _FUNCTIONS.get(node.target)  # type: ignore[arg-type]
            except TypeError:  # unhashable target
                kind = None
        if kind == "meta" or (kind in ("binary", "elementwise") and self._shape(node) is None):
            return self._meta(node)
        if kind is None:
            raise self._unsupported()
        handler: Callable[[fx.Node], Value] = getattr(self, f"_{kind}")
        return handler(node)

    def _meta(self, node: fx.Node) -> Value:
        """Sizes, shapes, ``getitem`` on tuples; getitem on a tensor (slicing) is not followed."""
        if node.target is operator.getitem:
            source = self._value(node.args[0])
            if isinstance(source, (list, tuple)) and isinstance(node.args[1], (int, slice)):
                return source[node.args[1]]
            if any(True for _ in self._flat(source)):
                raise self._unsupported("indexing or slicing a tensor is not followed")
            return NOT_TENSOR
        if self._shape(node) is not None and any(True for _ in self._tensor_args(node)):
            raise self._unsupported("it returns a tensor computed from tensors in a way the analysis does not know")
        return NOT_TENSOR

    def _elementwise(self, node: fx.Node) -> Value:
        units = self._first(node)
        others = [u for n, u in self._tensor_args(node)[1:] if n is not node.args[0]]
        if others and node.target not in ("to", "type_as"):
            raise self._unsupported("a second tensor argument is not followed")
        return units

    def _spatial(self, node: fx.Node) -> Value:
        units = self._first(node)
        if units.axis != 1 or units.block != 1:
            raise self._unsupported("it acts on the axes after axis 1, but the units are not on axis 1")
        return units

    def _binary(self, node: fx.Node) -> Value:
        """Element-wise op of two operands, with broadcasting.

        An operand's units move nothing on an axis where they are broadcast (size 1). Two operands with their
        units on the same output axis must share one permutation (their groups are joined). If the other operand
        has that axis (size > 1) but carries no units there, nothing permutes it there, so neither may the units
        (their group is fixed). The result carries the units of the operands whose group is still free.
        """
        out_shape = self._shape(node)
        assert out_shape is not None
        operands: list[tuple[_Units, tuple[int, ...]]] = []
        for arg in (node.args[0] if node.args else None, self._arg(node, 1, "other")):
            if isinstance(arg, fx.Node) and isinstance(self.values[arg], _Units):
                shape = self._shape(arg)
                assert shape is not None
                # Broadcasting aligns shapes on the right: express the unit axis in the output's axes.
                unit = self.values[arg]
                operands.append((_Units(unit.group, unit.axis + len(out_shape) - len(shape), unit.block), shape))

        def size_at(shape: tuple[int, ...], axis: int) -> int:
            index = axis - (len(out_shape) - len(shape))
            return shape[index] if index >= 0 else 1

        carriers = [u for u, shape in operands if size_at(shape, u.axis) > 1 or out_shape[u.axis] == 1]
        for unit in carriers:
            for other, shape in operands:
                if other is unit or size_at(shape, unit.axis) == 1:
                    continue
                if other.axis == unit.axis:
                    if other.block != unit.block:
                        raise self._unsupported("its operands carry their units in different block sizes")
                    self._union(unit.group, other.group)
                else:
                    self.groups.fix(unit.group)
        free = [u for u in carriers if not self.groups.is_fixed(u.group)]
        if len({u.axis for u in free}) > 1:
            raise self._unsupported("its result would carry units on two axes (an outer product)")
        if free:
            return free[0]
        return carriers[0] if carriers else self._fresh_fixed(node)

    def _reshape(self, node: fx.Node) -> Value:
        """A new shape over the same memory layout: find where the units went.

        The input is (lead, n units x per-unit inner block) in row-major order; the output carries the units on
        the axis ``a`` where the leading axes multiply to ``lead`` and whose size is a multiple of ``n``. A
        reshape that splits the units across axes (e.g. into attention heads) is not followed.
        """
        units = self._first(node)
        in_shape = self._shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        out_shape = self._shape(node)
        assert in_shape is not None and out_shape is not None
        n = in_shape[units.axis] // units.block
        lead = math.prod(in_shape[: units.axis])
        candidates = []
        acc = 1
        for axis, size in enumerate(out_shape):
            if acc == lead and size > 0 and size % max(n, 1) == 0 and (size > 1 or n <= 1):
                candidates.append(axis)
            acc *= size
        if not candidates:
            raise self._unsupported(
                f"the reshape {in_shape} -> {out_shape} splits or mixes the {n} units of axis {units.axis}"
            )
        # Several candidates only when n <= 1 and size-1 axes sit at the boundary (a batch of one, one channel):
        # any is right for the layout; prefer the axis holding the block, then the same axis as before.
        preferred = [a for a in candidates if out_shape[a] > 1] + [a for a in candidates if a == units.axis]
        target = (preferred or candidates)[0]
        return _Units(units.group, target, out_shape[target] // n if n else 1)

    def _transpose(self, node: fx.Node) -> Value:
        """``transpose`` / ``swapaxes`` / ``permute`` / ``movedim``: the units move with their axis."""
        units = self._first(node)
        ndim = len(self._shape(node) or ())
        args: list[Any] = list(node.args[1:])
        kwargs: dict[str, Any] = dict(node.kwargs)
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")

        def constant(value: Any) -> list[int]:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(d, int) for d in items):
                raise self._unsupported("its axes are not constants")
            return [d % ndim for d in items]

        order = list(range(ndim))  # output axis i is input axis order[i]
        if name in ("transpose", "swapaxes"):
            first = args[0] if args else kwargs.get("dim0", kwargs.get("axis0"))
            second = args[1] if len(args) > 1 else kwargs.get("dim1", kwargs.get("axis1"))
            d0, d1 = constant([first, second])
            order[d0], order[d1] = order[d1], order[d0]
        elif name == "permute":
            order = constant(args[0] if len(args) == 1 else args or kwargs.get("dims"))
        elif name == "movedim":
            source = constant(args[0] if args else kwargs.get("source"))
            dest = constant(args[1] if len(args) > 1 else kwargs.get("destination"))
            order = torch.arange(ndim).movedim(tuple(source), tuple(dest)).tolist()
        else:
            raise self._unsupported()
        return _Units(units.group, order.index(units.axis), units.block)

    def _reduce(self, node: fx.Node) -> Value:
        units = self._first(node)
        in_shape = self._shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        assert in_shape is not None
        ndim = len(in_shape)
        dim = self._arg(node, 1, "dim")
        keepdim = bool(self._arg(node, 2, "keepdim", False))
        if dim is None:
            return self._fresh_fixed(node)  # a full reduction is invariant to any permutation
        dims = {d % ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if units.axis in dims:
            # Summing over the units is invariant to their order: the result carries no permutation.
            return self._fresh_fixed(node, units.axis if keepdim else None)
        axis = units.axis if keepdim else units.axis - sum(d < units.axis for d in dims)
        return _Units(units.group, axis, units.block)

    def _cat(self, node: fx.Node) -> Value:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = self._arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise self._unsupported("its tensors or dim are not given as constants")
        parts = [self.values[t] for t in tensors if isinstance(t, fx.Node)]
        if len(parts) != len(tensors) or not all(isinstance(p, _Units) for p in parts):
            raise self._unsupported("it concatenates values the analysis does not follow")
        in_shape = self._shape(tensors[0])
        assert in_shape is not None
        stack = node.target is torch.stack
        dim = dim % (len(in_shape) + (1 if stack else 0))
        axes = {p.axis for p in parts}
        if len(axes) != 1:
            raise self._unsupported("its inputs carry their units on different axes")
        axis = axes.pop()
        if not stack and dim == axis:
            # Segments of one axis would need one permutation each: leave the inputs unpermuted.
            for part in parts:
                self.groups.fix(part.group)
            return self._fresh_fixed(node, axis)
        first = parts[0]
        for part in parts[1:]:
            if part.block != first.block:
                raise self._unsupported("its inputs carry their units in different block sizes")
            self._union(first.group, part.group)
        return _Units(first.group, axis + (1 if stack and dim <= axis else 0), first.block)

    def _split(self, node: fx.Node) -> Value:
        units = self._first(node)
        in_shape = self._shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        assert in_shape is not None
        dim = self._arg(node, 2, "dim", 0)
        if not isinstance(dim, int):
            raise self._unsupported("its dim is not a constant")
        metas = node.meta.get("tensor_meta")
        if not isinstance(metas, (list, tuple)):
            raise self._unsupported("its outputs have no known shapes")
        if dim % len(in_shape) != units.axis:
            return tuple(units for _ in metas)
        # Splitting the units into parts: no permutation of the whole is one of each part. Fix them all.
        self.groups.fix(units.group)
        return tuple(
            _Units(self.groups.new(meta.shape[units.axis], "", fixed=True), units.axis)
            for meta in metas
            if isinstance(meta, TensorMetadata)
        )


# ----------------------------------------------------------------------------------------------- comparison


def same_up_to_renaming(spec_a: PermutationSpec, spec_b: PermutationSpec) -> bool:
    """Whether two specs are the same up to the names of their permutations: same keys and ranks, the same
    axes unpermuted, the same block sizes, and one bijection of names mapping ``spec_a``'s onto ``spec_b``'s."""
    if spec_a.axes_to_perm.keys() != spec_b.axes_to_perm.keys():
        return False
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for key, axes_a in spec_a.axes_to_perm.items():
        axes_b = spec_b.axes_to_perm[key]
        if len(axes_a) != len(axes_b):
            return False
        for entry_a, entry_b in zip(axes_a, axes_b, strict=True):
            name_a, name_b = perm_of(entry_a), perm_of(entry_b)
            if (name_a is None) != (name_b is None) or block_of(entry_a) != block_of(entry_b):
                return False
            if name_a is None or name_b is None:
                continue
            if forward.setdefault(name_a, name_b) != name_b or backward.setdefault(name_b, name_a) != name_a:
                return False
    return True
