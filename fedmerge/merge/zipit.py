"""ZipIt! (Stoica et al., ICLR 2024): merge correlated features within and across two models.

For every feature space of the architecture (a permutation of its :class:`~fedmerge.models.spec.PermutationSpec`,
recorded at the module ``activation_points()`` names), the ``n`` features of A and the ``n`` of B are pooled
(``2n``) and their Pearson correlations measured on the surrogate. Greedy matching then merges the most correlated
pair of feature groups, ``n`` times, leaving ``n`` groups:

* pairs *within* one model are allowed, up to a budget of ``beta * n / 2`` merges per model;
* a group's correlation to the others is the minimum over its members, times ``alpha`` after each merge
  (``alpha <= 0``: a group is never merged again).

The merge matrix ``M`` (n x 2n) averages each group's members (A's weighted by ``1 - lam``, B's by ``lam``; the
paper's plain mean at ``lam = 0.5``), the unmerge matrix ``U`` (2n x n) copies a merged feature back to every
member. Every tensor is zipped as ``M_A W_A U_A + M_B W_B U_B``: ``M`` on its output axis (axis 0: weights, biases,
BatchNorm entries), ``U`` on every input axis; a tensor with an unpermuted output axis (the classifier) takes
``(1 - lam) W_A U_A + lam W_B U_B``. Residual streams (ResNet20) are feature spaces like any other: every block
that writes a stream is merged by the same ``M``, every reader unmerged by the same ``U``, so the additions stay
consistent. BatchNorm parameters and running statistics are zipped linearly (the ``auto`` correction then resets
the statistics on the surrogate).

Partial zipping (``zip_layers = k``): ZipIt! zips the first ``k`` feature spaces and leaves the later layers of both
models apart, producing a multi-head model. One state dict cannot hold two heads, so here the feature spaces after
the ``k``-th (in spec order) are merged one-to-one across the models: a linear assignment on the same
correlations (activation matching), then interpolation. The later layers are thus A's and B's, permuted and
averaged; their input axis reads the zipped features through ``U``.

Defined for models with activation points: those that declare ``activation_points()`` (``MLP``, ``SmallCNN``,
``VGG11``, ``ResNet20``), and traced models, whose points are derived with their spec (see
:mod:`fedmerge.models.derive`; ZipIt! refuses one with a permutation that got none). The MLP's points are its
hidden Linear outputs (pre-ReLU; ReLU is applied functionally), the CNNs' the post-ReLU modules. Features that
are constant on the surrogate (dead ReLUs) correlate 1 with each other and 0 with the rest (the reference
implementation gives them 0 everywhere, which pairs dead units with arbitrary live ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmerge.align.activation_matching import _CrossMoments, paired_activations
from fedmerge.align.permute import Perms, State
from fedmerge.align.weight_matching import solve_assignment
from fedmerge.data.images import LabeledImages
from fedmerge.merge.ot_fusion import transport_along
from fedmerge.models.protocol import activation_points, has_activation_points
from fedmerge.models.spec import PermutationSpec, block_of, perm_of


@dataclass(frozen=True)
class ZipItConfig:
    """Settings of ZipIt!.

    ``alpha``: factor on a group's correlations after each merge (``<= 0``: groups are merged once); ``beta``:
    within-model merges allowed per model, as a fraction of ``n / 2`` (0: only pairs across the models);
    ``zip_layers``: zip only the first that many feature spaces in spec order (None: all), the later ones are merged
    one-to-one; ``batch_size``: surrogate images per forward pass. The defaults of ``alpha`` and ``beta`` are the
    reference implementation's.
    """

    alpha: float = 0.3
    beta: float = 0.125
    zip_layers: int | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.beta <= 1:
            raise ValueError(f"ZipItConfig.beta must be in [0, 1], got {self.beta!r}")
        if self.alpha > 1:
            raise ValueError(f"ZipItConfig.alpha must be at most 1, got {self.alpha!r}")
        if self.zip_layers is not None and self.zip_layers < 0:
            raise ValueError(f"ZipItConfig.zip_layers must be None or >= 0, got {self.zip_layers!r}")
        if self.batch_size < 1:
            raise ValueError(f"ZipItConfig.batch_size must be positive, got {self.batch_size!r}")


@dataclass(frozen=True)
class ZipResult:
    """The zipped state, the groups of every feature space (indices into A's ``n`` then B's features) and, for
    bookkeeping, the one-to-one cross-model matching of every feature space (what ``am`` would find)."""

    state: State
    groups: dict[str, list[list[int]]]
    perms: Perms


def require_activation_points(model: nn.Module) -> dict[str, str]:
    """``model``'s activation points (its own or derived with its spec); ``TypeError`` saying ZipIt! needs them
    when it has none for some permutation."""
    if not has_activation_points(model):
        try:
            activation_points(model)
        except TypeError as error:
            raise TypeError(
                f"ZipIt! needs activation points (where each feature space is recorded): {error}"
            ) from error
    return activation_points(model)


@torch.no_grad()
def feature_correlations(
    model_a: nn.Module,
    model_b: nn.Module,
    data: LabeledImages | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """For every feature space, the (2n x 2n) Pearson correlations of A's features followed by B's on ``data``
    (every spatial position of a conv feature map counts as a sample). Both models run in eval mode (their modes
    are restored)."""
    points = require_activation_points(model_a)
    moments = {p: _CrossMoments() for p in points}
    for acts_a, acts_b in paired_activations(model_a, model_b, points, data, batch_size, device):
        for p, m in moments.items():
            both = torch.cat([acts_a[p], acts_b[p]], 1)
            m.update(both, both)
    return {p: _constant_features_alike(m.similarity("correlation"), m).cpu() for p, m in moments.items()}


def _constant_features_alike(correlation: torch.Tensor, moments: _CrossMoments, tol: float = 1e-10) -> torch.Tensor:
    """Features constant on the data (dead ReLUs) correlate 1 with each other and 0 with the others, so the
    matching pairs dead units with dead units instead of with arbitrary live ones."""
    sums, n = moments.sums, moments.n
    var = sums[2] / n - (sums[0] / n) ** 2
    constant = var <= tol * max(float(var.max()), 1.0)
    if not bool(constant.any()):
        return correlation
    correlation = correlation.clone()
    correlation[constant] = 0.0
    correlation[:, constant] = 0.0
    correlation[constant[:, None] & constant[None, :]] = 1.0
    return correlation


def zip_groups(correlation: torch.Tensor, n_a: int, alpha: float = 0.3, beta: float = 0.125) -> list[list[int]]:
    """ZipIt!'s greedy matching: merge the most correlated groups of features until ``max(n_a, n_b)`` are left.

    Parameters
    ----------
    correlation : torch.Tensor
        (n_a + n_b) x (n_a + n_b) correlations, A's features first.
    n_a : int
        How many features are A's.
    alpha : float (default: 0.3)
        Factor on a merged group's correlations (``<= 0``: merged groups are final).
    beta : float (default: 0.125)
        Within-model merges allowed per model, as a fraction of half the merges to make.

    Returns
    -------
    list[list[int]]
        The groups (sorted member indices), ordered by their first member.
    """
    total = correlation.shape[0]
    target = max(n_a, total - n_a)
    origin = torch.tensor([0] * n_a + [1] * (total - n_a))
    sims = correlation.detach().double().clone().nan_to_num(0.0)
    sims.fill_diagonal_(-math.inf)
    budget = [int((total - target) // 2 * beta + 1e-4)] * 2
    groups: dict[int, list[int]] = {i: [i] for i in range(total)}
    for o in (0, 1):
        if budget[o] <= 0:
            _forbid_within(sims, origin, o, groups)
    while len(groups) > target:
        flat = int(sims.argmax())
        i, j = sorted(divmod(flat, total))
        if sims[i, j] == -math.inf:
            raise ValueError(
                f"ZipIt! cannot reduce {total} features to {target} with alpha={alpha}, beta={beta}: every remaining "
                "pair is excluded (raise alpha or beta)"
            )
        groups[i] += groups.pop(j)
        row = torch.minimum(sims[i], sims[j])
        if alpha > 0:
            row *= alpha
        else:
            row[(origin == origin[i]) | (origin == origin[j])] = -math.inf
        sims[i], sims[:, i] = row, row
        sims[j], sims[:, j] = -math.inf, -math.inf
        sims[i, i] = -math.inf
        if origin[i] == origin[j]:
            o = int(origin[i])
            budget[o] -= 1
            if budget[o] <= 0:
                _forbid_within(sims, origin, o, groups)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def _forbid_within(sims: torch.Tensor, origin: torch.Tensor, model: int, groups: dict[int, list[int]]) -> None:
    """No more merges between two live groups that both stem from ``model``."""
    live = torch.tensor([i for i in groups if int(origin[i]) == model], dtype=torch.long)
    if len(live):
        sims[live[:, None], live[None, :]] = -math.inf


def matched_groups(correlation: torch.Tensor, n_a: int) -> tuple[list[list[int]], torch.Tensor]:
    """One-to-one groups (A's unit ``i`` with B's unit ``perm[i]``, in A's order) from a linear assignment on the
    cross-model correlations, and ``perm`` (activation matching's permutation)."""
    perm = solve_assignment(correlation[:n_a, n_a:])
    return [[i, n_a + int(j)] for i, j in enumerate(perm)], perm


def merge_unmerge(
    groups: list[list[int]], n_a: int, total: int, lam: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(M_A, M_B), (U_A, U_B)``: the merge matrices (groups x each model's features; a group's members weighted by
    ``1 - lam`` for A's and ``lam`` for B's, normalised) and the unmerge matrices (each model's features x groups)."""
    unmerge = torch.zeros(total, len(groups), dtype=torch.float64)
    for k, group in enumerate(groups):
        unmerge[group, k] = 1.0
    weight = torch.tensor([1.0 - lam] * n_a + [lam] * (total - n_a), dtype=torch.float64)
    merge = unmerge.T * weight
    sums = merge.sum(1, keepdim=True)
    plain = unmerge.T / unmerge.T.sum(1, keepdim=True)
    merge = torch.where(sums > 0, merge / sums.clamp_min(1e-300), plain)
    return (merge[:, :n_a], merge[:, n_a:]), (unmerge[:n_a], unmerge[n_a:])


def zip_state(
    spec: PermutationSpec,
    state: State,
    merges: dict[str, torch.Tensor],
    unmerges: dict[str, torch.Tensor],
    scale: float,
) -> State:
    """One model's contribution to the zipped model: ``M`` on every tensor's permuted output axis (axis 0), ``U`` on
    its permuted input axes; ``scale`` multiplies the tensors whose output axis is not permuted."""
    out: State = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        axes = spec.axes_to_perm.get(key, ())
        zipped = tensor.double()
        for axis, entry in enumerate(axes):
            perm = perm_of(entry)
            if perm is None:
                continue
            plan = merges[perm] if axis == 0 else unmerges[perm].T
            zipped = transport_along(zipped, axis, plan.to(zipped.device), block_of(entry))
        if not axes or perm_of(axes[0]) is None:
            zipped = zipped * scale
        out[key] = zipped
    return out


def zipit(
    model: nn.Module,
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: LabeledImages,
    lam: float = 0.5,
    config: ZipItConfig = ZipItConfig(),
    device: torch.device | str = "cpu",
) -> ZipResult:
    """Zip two models of the same architecture into one (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The architecture template (it must declare ``activation_points()``).
    spec : PermutationSpec
        Its permutation spec: one feature space per permutation.
    model_a, model_b : nn.Module
        The two models (their weights are read, not changed).
    data : LabeledImages
        The surrogate the feature correlations are measured on.
    lam : float (default: 0.5)
        B's weight in every merged feature.
    config : ZipItConfig (default: ZipItConfig())
        ``alpha``, ``beta``, partial zipping, batch size.
    device : torch.device | str (default: "cpu")
        Where the models run.

    Returns
    -------
    ZipResult
        The zipped state dict, the groups of every feature space and the one-to-one matchings.
    """
    require_activation_points(model)
    correlations = feature_correlations(model_a, model_b, data, config.batch_size, device)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    sizes = spec.perm_sizes(state_a)
    groups: dict[str, list[list[int]]] = {}
    perms: Perms = {}
    merges_a, merges_b, unmerges_a, unmerges_b = {}, {}, {}, {}
    for index, perm in enumerate(spec.perm_names):
        corr, n = correlations[perm], sizes[perm]
        one_to_one, perms[perm] = matched_groups(corr, n)
        zipped = config.zip_layers is None or index < config.zip_layers
        groups[perm] = zip_groups(corr, n, config.alpha, config.beta) if zipped else one_to_one
        (merges_a[perm], merges_b[perm]), (unmerges_a[perm], unmerges_b[perm]) = merge_unmerge(
            groups[perm], n, 2 * n, lam
        )
    part_a = zip_state(spec, state_a, merges_a, unmerges_a, 1.0 - lam)
    part_b = zip_state(spec, state_b, merges_b, unmerges_b, lam)
    merged = {
        k: (part_a[k] + part_b[k].to(part_a[k].device)).to(v.dtype) if v.is_floating_point() else v
        for k, v in state_a.items()
    }
    return ZipResult(merged, groups, perms)
