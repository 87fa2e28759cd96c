"""Permutation specs: which axes of which tensors share a hidden-unit permutation.

A spec maps every entry of a model's ``state_dict`` (parameters and buffers such as
BatchNorm running statistics) to a tuple with one item per axis: the name of the
permutation acting on that axis, a :class:`Blocked` entry when the permutation moves
contiguous blocks of the axis (the input axis of a ``Linear`` after a convolution and a
flatten), or ``None`` when the axis is not permuted.
Residual streams share one permutation name across all the blocks that add to them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Blocked:
    """An axis of size ``n * block`` governed by permutation ``perm`` of ``n`` units, unit ``i`` owning the
    contiguous indices ``[i * block, (i + 1) * block)``.

    After ``conv -> flatten -> Linear`` the Linear's input axis has ``C * H * W`` entries, channel-major: the
    conv's channel permutation moves whole blocks of ``H * W`` of them, so that axis is ``Blocked(perm, H * W)``.
    """

    perm: str
    block: int

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ValueError(f"Blocked({self.perm!r}, ...): block must be a positive integer, got {self.block!r}")


# What one tensor axis carries: a permutation name, a permutation acting on blocks, or nothing.
AxisPerm = str | Blocked | None
AxesToPerm = dict[str, tuple[AxisPerm, ...]]


def perm_of(entry: AxisPerm) -> str | None:
    """The permutation name of an axis entry (``None`` when the axis is not permuted)."""
    return entry.perm if isinstance(entry, Blocked) else entry


def block_of(entry: AxisPerm) -> int:
    """How many consecutive indices of the axis each unit of its permutation owns (1 unless ``Blocked``)."""
    return entry.block if isinstance(entry, Blocked) else 1


@dataclass(frozen=True)
class PermutationSpec:
    """Tensor-axis to permutation mapping, plus the reverse index and each permutation's size.

    ``perm_to_axes[p]`` lists the ``(key, axis)`` pairs permutation ``p`` acts on; ``block(key, axis)`` says
    whether it moves single indices (1) or blocks of that many (a :class:`Blocked` axis).
    """

    axes_to_perm: AxesToPerm
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(init=False)

    def __post_init__(self) -> None:
        reverse: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key, axes in self.axes_to_perm.items():
            for axis, entry in enumerate(axes):
                if entry is not None and not isinstance(entry, (str, Blocked)):
                    raise TypeError(f"spec for {key} axis {axis}: expected a name, Blocked or None, got {entry!r}")
                perm = perm_of(entry)
                if perm is not None:
                    reverse[perm].append((key, axis))
        object.__setattr__(self, "perm_to_axes", dict(reverse))

    @property
    def perm_names(self) -> list[str]:
        """Permutation names in a stable order (order of first appearance)."""
        return list(self.perm_to_axes)

    @property
    def has_blocked_axes(self) -> bool:
        """Whether some axis is permuted in blocks (see :class:`Blocked`)."""
        return any(isinstance(entry, Blocked) for axes in self.axes_to_perm.values() for entry in axes)

    def block(self, key: str, axis: int) -> int:
        """Indices per unit on axis ``axis`` of entry ``key``: 1, or the block size of a :class:`Blocked` axis."""
        return block_of(self.axes_to_perm[key][axis])

    def units(self, key: str, axis: int, size: int) -> int:
        """The number of permuted units on axis ``axis`` of ``key`` when that axis has ``size`` entries."""
        block = self.block(key, axis)
        if size % block:
            raise ValueError(f"{key} axis {axis} has size {size}, not a multiple of its block size {block}")
        return size // block

    def perm_sizes(self, state: dict) -> dict[str, int]:
        """Size of every permutation, read off the tensors of ``state``; checks they agree."""
        sizes: dict[str, int] = {}
        for perm, axes in self.perm_to_axes.items():
            for key, axis in axes:
                size = state[key].shape[axis]
                n = self.units(key, axis, size)
                if sizes.setdefault(perm, n) != n:
                    blocks = f" ({n} blocks of {size // n})" if n != size else ""
                    raise ValueError(
                        f"permutation {perm!r}: {key} axis {axis} has size {size}{blocks}, expected {sizes[perm]}"
                    )
        return sizes

    def describe(self, state: dict | None = None) -> str:
        """Every permutation with the tensors and axes it acts on (and its size, given a state dict), one per
        line, then the tensors no permutation touches: a text to check a spec by eye. Blocked axes show their
        block size.

        >>> print(MLP(width=4, depth=1).permutation_spec().describe())  # doctest: +SKIP
        P_0: hidden.0.weight[0], hidden.0.bias[0], head.weight[1]
        """
        sizes = self.perm_sizes(state) if state is not None else {}
        lines = []
        for perm, axes in self.perm_to_axes.items():
            size = f" ({sizes[perm]} units)" if perm in sizes else ""
            lines.append(f"{perm}{size}: " + ", ".join(self._axis_text(key, axis) for key, axis in axes))
        fixed = [key for key, axes in self.axes_to_perm.items() if all(p is None for p in axes)]
        if fixed:
            lines.append("not permuted: " + ", ".join(fixed))
        return "\n".join(lines)

    def _axis_text(self, key: str, axis: int) -> str:
        block = self.block(key, axis)
        return f"{key}[{axis}]" + (f" (blocks of {block})" if block > 1 else "")

    def check_covers(self, state: dict) -> None:
        """Raise if the spec and a state dict disagree on keys, tensor ranks, or permutation sizes (a blocked
        axis must be a whole number of blocks)."""
        missing = [k for k, v in state.items() if k not in self.axes_to_perm and v.ndim > 0]
        extra = [k for k in self.axes_to_perm if k not in state]
        if missing or extra:
            raise ValueError(f"permutation spec does not match model: missing {missing}, unknown {extra}")
        for key, axes in self.axes_to_perm.items():
            if len(axes) != state[key].ndim:
                raise ValueError(f"spec for {key} has {len(axes)} axes, tensor has {state[key].ndim}")
        self.perm_sizes(state)


def linear_axes(name: str, p_out: str | None, p_in: AxisPerm, bias: bool = True) -> AxesToPerm:
    """Axes of a ``nn.Linear`` (or ``nn.Conv2d``, whose extra kernel axes are unpermuted); ``p_in`` may be
    :class:`Blocked` (a Linear after conv and flatten)."""
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
