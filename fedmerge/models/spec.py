"""Permutation specs: which axes of which tensors share a hidden-unit permutation.

A spec maps every entry of a model's ``state_dict`` (parameters and buffers such as
BatchNorm running statistics) to a tuple with one item per axis: the name of the
permutation acting on that axis, or ``None`` when the axis is not permuted.
Residual streams share one permutation name across all the blocks that add to them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

AxesToPerm = dict[str, tuple[str | None, ...]]


@dataclass(frozen=True)
class PermutationSpec:
    """Tensor-axis to permutation mapping, plus the reverse index and each permutation's size."""

    axes_to_perm: AxesToPerm
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(init=False)

    def __post_init__(self) -> None:
        reverse: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key, axes in self.axes_to_perm.items():
            for axis, perm in enumerate(axes):
                if perm is not None:
                    reverse[perm].append((key, axis))
        object.__setattr__(self, "perm_to_axes", dict(reverse))

    @property
    def perm_names(self) -> list[str]:
        """Permutation names in a stable order (order of first appearance)."""
        return list(self.perm_to_axes)

    def perm_sizes(self, state: dict) -> dict[str, int]:
        """Size of every permutation, read off the tensors of ``state``; checks they agree."""
        sizes: dict[str, int] = {}
        for perm, axes in self.perm_to_axes.items():
            for key, axis in axes:
                n = state[key].shape[axis]
                if sizes.setdefault(perm, n) != n:
                    raise ValueError(f"permutation {perm!r}: {key} axis {axis} has size {n}, expected {sizes[perm]}")
        return sizes

    def describe(self, state: dict | None = None) -> str:
        """Every permutation with the tensors and axes it acts on (and its size, given a state dict), one per
        line, then the tensors no permutation touches: a text to check a spec by eye.

        >>> print(MLP(width=4, depth=1).permutation_spec().describe())  # doctest: +SKIP
        P_0: hidden.0.weight[0], hidden.0.bias[0], head.weight[1]
        """
        sizes = self.perm_sizes(state) if state is not None else {}
        lines = []
        for perm, axes in self.perm_to_axes.items():
            size = f" ({sizes[perm]} units)" if perm in sizes else ""
            lines.append(f"{perm}{size}: " + ", ".join(f"{key}[{axis}]" for key, axis in axes))
        fixed = [key for key, axes in self.axes_to_perm.items() if all(p is None for p in axes)]
        if fixed:
            lines.append("not permuted: " + ", ".join(fixed))
        return "\n".join(lines)

    def check_covers(self, state: dict) -> None:
        """Raise if the spec and a state dict disagree on keys or tensor ranks."""
        missing = [k for k, v in state.items() if k not in self.axes_to_perm and v.ndim > 0]
        extra = [k for k in self.axes_to_perm if k not in state]
        if missing or extra:
            raise ValueError(f"permutation spec does not match model: missing {missing}, unknown {extra}")
        for key, axes in self.axes_to_perm.items():
            if len(axes) != state[key].ndim:
                raise ValueError(f"spec for {key} has {len(axes)} axes, tensor has {state[key].ndim}")
        self.perm_sizes(state)


def linear_axes(name: str, p_out: str | None, p_in: str | None, bias: bool = True) -> AxesToPerm:
    """Axes of a ``nn.Linear`` (or ``nn.Conv2d``, whose extra kernel axes are unpermuted)."""
    axes: AxesToPerm = {f"{name}.weight": (p_out, p_in)}
    if bias:
        axes[f"{name}.bias"] = (p_out,)
    return axes


def conv_axes(name: str, p_out: str | None, p_in: str | None, bias: bool = False) -> AxesToPerm:
    """Axes of a ``nn.Conv2d``: (out, in, kh, kw)."""
    axes: AxesToPerm = {f"{name}.weight": (p_out, p_in, None, None)}
    if bias:
        axes[f"{name}.bias"] = (p_out,)
    return axes


def batchnorm_axes(name: str, perm: str) -> AxesToPerm:
    """Affine parameters and running statistics of a BatchNorm layer."""
    return {f"{name}.{k}": (perm,) for k in ("weight", "bias", "running_mean", "running_var")}
