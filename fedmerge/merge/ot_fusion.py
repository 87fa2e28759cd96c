"""OT fusion (Singh and Jaggi, NeurIPS 2020, "Model fusion via optimal transport"), weight-based.

Layer by layer (the permutations of a :class:`~fedmerge.models.spec.PermutationSpec` in order), the neurons of B
are transported onto the neurons of A:

1. the incoming weights of B's neurons (every tensor whose output axis carries the permutation: weight, bias,
   BatchNorm affine parameters) have their *input* axes already transported by the maps of the earlier layers;
2. the ground metric is the Euclidean distance (``sqeuclidean``: its square) between A's and B's incoming-weight
   vectors, and both layers carry uniform marginals;
3. the transport plan ``T`` is exact (``ot.emd``, the earth mover's distance) or entropic (``ot.sinkhorn``, log
   domain, with ``reg`` relative to the largest cost); ``R = T / rowsum(T)`` maps B's units onto A's:
   aligned B's unit ``i`` is ``sum_j R[i, j] * B's unit j``, on every axis the permutation acts on (the paper's
   marginal correction by ``1 / beta``).

Fused = ``(1 - lam) * A + lam * aligned B``. With exact transport between equal-sized layers under uniform
marginals the plan is a permutation matrix: B is then permuted (:func:`fedmerge.align.permute.apply_permutation`),
exactly as weight matching would. With Sinkhorn the plan is soft and B is *transported*, not permuted: the result
records, for bookkeeping (tree schedules, logs), the permutation closest to each plan (a linear assignment that
maximises the plan's mass), and the transported B itself (what REPAIR must compare the merge against).

Residual streams (ResNet20) are shared by several layers; a stream's plan is computed from the incoming weights
whose other axes are already transported (the stem and the blocks' BatchNorms before the stream's inner
convolutions are aligned), like the paper's handling of skip connections by the first layer that writes them.

``tune_lambda`` picks ``lam`` on a grid by the accuracy on the *surrogate* (the paper tuned it on the test set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ot
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedmerge.align.permute import Perms, State, apply_permutation
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import load_state
from fedmerge.merge.interpolate import interpolate_states
from fedmerge.models.spec import PermutationSpec, block_of, perm_of
from fedmerge.train import predict_logits

log = logging.getLogger(__name__)

Transport = Literal["exact", "sinkhorn"]
GroundMetric = Literal["euclidean", "sqeuclidean"]
DEFAULT_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class OTConfig:
    """Settings of OT fusion.

    ``transport``: ``exact`` (earth mover's distance) or ``sinkhorn`` (entropic, soft plans); ``reg``: Sinkhorn's
    entropic regularisation, relative to the largest ground cost of the layer; ``ground_metric``: ``euclidean`` or
    ``sqeuclidean`` distance between incoming-weight vectors; ``grid``: the values of ``lam`` that ``ot-tuned``
    scores on the surrogate.
    """

    transport: Transport = "exact"
    reg: float = 0.01
    ground_metric: GroundMetric = "euclidean"
    grid: tuple[float, ...] = DEFAULT_GRID

    def __post_init__(self) -> None:
        if self.transport not in ("exact", "sinkhorn"):
            raise ValueError(f"OTConfig.transport must be 'exact' or 'sinkhorn', got {self.transport!r}")
        if self.ground_metric not in ("euclidean", "sqeuclidean"):
            raise ValueError(f"OTConfig.ground_metric must be 'euclidean' or 'sqeuclidean', got {self.ground_metric!r}")
        if not self.reg > 0:
            raise ValueError(f"OTConfig.reg must be positive, got {self.reg!r}")
        if not self.grid or any(not 0.0 <= g <= 1.0 for g in self.grid):
            raise ValueError(f"OTConfig.grid must be a non-empty tuple of values in [0, 1], got {self.grid!r}")


@dataclass(frozen=True)
class OTAlignment:
    """B aligned to A by OT: the row-normalised plan of every permutation (A's units x B's units), the permutation
    closest to each plan, and B's state transported (permuted, when every plan is a permutation)."""

    maps: dict[str, torch.Tensor]
    perms: Perms
    aligned_b: State

    @property
    def is_permutation(self) -> bool:
        """Whether every plan is a permutation matrix (exact transport between equal-sized layers)."""
        return all(_as_permutation(m) is not None for m in self.maps.values())


def transport_along(tensor: torch.Tensor, axis: int, plan: torch.Tensor, block: int = 1) -> torch.Tensor:
    """``tensor`` with axis ``axis`` mapped by ``plan`` (n x n, rows: new units, columns: old units); on a blocked
    axis every unit owns ``block`` consecutive indices."""
    moved = tensor.movedim(axis, 0)
    shape = moved.shape
    if shape[0] != plan.shape[1] * block:
        raise ValueError(f"axis {axis} has {shape[0]} entries, not {plan.shape[1]} units of {block}")
    units = moved.reshape(plan.shape[1], -1)
    out = plan.to(units.dtype) @ units
    return out.reshape(plan.shape[0] * block, *shape[1:]).movedim(0, axis)


def transport_tensor(
    spec: PermutationSpec, maps: dict[str, torch.Tensor], key: str, tensor: torch.Tensor, skip_axis: int | None = None
) -> torch.Tensor:
    """Map every axis of ``tensor`` (state entry ``key``) whose permutation has a plan in ``maps``."""
    if not tensor.is_floating_point():
        return tensor
    for axis, entry in enumerate(spec.axes_to_perm.get(key, ())):
        perm = perm_of(entry)
        if perm is not None and perm in maps and axis != skip_axis:
            tensor = transport_along(tensor, axis, maps[perm].to(tensor.device), block_of(entry))
    return tensor


def ground_cost(
    spec: PermutationSpec,
    perm: str,
    params_a: State,
    state_b: State,
    maps: dict[str, torch.Tensor],
    metric: GroundMetric = "euclidean",
) -> torch.Tensor:
    """``M[i, j]``: distance between the incoming weights of A's unit ``i`` and of B's unit ``j`` (B's input axes
    transported by ``maps``), over the parameters of ``params_a`` whose output axis carries ``perm``."""
    incoming = [(k, a) for k, a in spec.perm_to_axes[perm] if a == 0 and k in params_a]
    resolved = [
        (k, a)
        for k, a in incoming
        if all(perm_of(e) in (None, perm) or perm_of(e) in maps for e in spec.axes_to_perm[k][1:])
    ]
    entries = resolved or incoming or [(k, a) for k, a in spec.perm_to_axes[perm] if k in params_a]
    if not entries:
        raise ValueError(f"no parameter carries permutation {perm!r}")
    rows_a, rows_b = [], []
    for key, axis in entries:
        n = spec.units(key, axis, params_a[key].shape[axis])
        rows_a.append(params_a[key].detach().double().movedim(axis, 0).reshape(n, -1))
        b = transport_tensor(spec, maps, key, state_b[key].detach().double(), skip_axis=axis)
        rows_b.append(b.movedim(axis, 0).reshape(n, -1))
    cost = torch.cdist(torch.cat(rows_a, 1), torch.cat(rows_b, 1))
    return cost**2 if metric == "sqeuclidean" else cost


def transport_plan(cost: torch.Tensor, transport: Transport = "exact", reg: float = 0.01) -> torch.Tensor:
    """The optimal plan between two uniform marginals for ``cost`` (rows: A's units, columns: B's), rows
    normalised to sum to 1; ``exact`` (``ot.emd``) or ``sinkhorn`` (``reg`` relative to the largest cost)."""
    m = cost.detach().cpu().double().numpy()
    a = np.full(m.shape[0], 1.0 / m.shape[0])
    b = np.full(m.shape[1], 1.0 / m.shape[1])
    if transport == "exact":
        plan = ot.emd(a, b, m)
    else:
        scale = m.max() if m.max() > 0 else 1.0
        plan = ot.sinkhorn(a, b, m / scale, reg, method="sinkhorn_log", numItermax=10_000)
    plan = torch.from_numpy(np.asarray(plan, dtype=np.float64))
    return plan / plan.sum(1, keepdim=True).clamp_min(1e-300)


def _as_permutation(plan: torch.Tensor) -> torch.Tensor | None:
    """The permutation ``perm`` (``plan[i, perm[i]] == 1``) when ``plan`` is a permutation matrix, else None."""
    if plan.shape[0] != plan.shape[1]:
        return None
    top, index = plan.max(1)
    if bool((top > 1 - 1e-6).all()) and len(set(index.tolist())) == len(index):
        return index
    return None


def closest_permutation(plan: torch.Tensor) -> torch.Tensor:
    """The permutation that carries the most mass of ``plan`` (a linear assignment; the plan itself when it is a
    permutation matrix)."""
    exact = _as_permutation(plan)
    if exact is not None:
        return exact
    _, cols = linear_sum_assignment(plan.cpu().numpy(), maximize=True)
    return torch.from_numpy(cols).long()


def ot_align(spec: PermutationSpec, params_a: State, state_b: State, config: OTConfig = OTConfig()) -> OTAlignment:
    """Align B to A by optimal transport, layer by layer (see the module docstring).

    Parameters
    ----------
    spec : PermutationSpec
        The architecture's permutation spec.
    params_a : dict[str, torch.Tensor]
        A's parameters (the ground metric's vectors; BatchNorm running statistics are left out).
    state_b : dict[str, torch.Tensor]
        B's full state dict (transported entirely, buffers included).
    config : OTConfig (default: OTConfig())
        Exact or Sinkhorn transport, the ground metric.

    Returns
    -------
    OTAlignment
        The plans, the closest permutations and B transported onto A's units.
    """
    maps: dict[str, torch.Tensor] = {}
    for perm in spec.perm_names:
        cost = ground_cost(spec, perm, params_a, state_b, maps, config.ground_metric)
        maps[perm] = transport_plan(cost, config.transport, config.reg)
    perms = {p: closest_permutation(m) for p, m in maps.items()}
    if all(_as_permutation(m) is not None for m in maps.values()):
        aligned = apply_permutation(spec, perms, state_b)
    else:
        aligned = {k: transport_tensor(spec, maps, k, v) for k, v in state_b.items()}
    return OTAlignment(maps, perms, aligned)


@torch.no_grad()
def surrogate_score(
    model: nn.Module, state: State, data: LabeledImages, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(accuracy in %, cross-entropy) of ``state`` on ``data``; a model with BatchNorm has its statistics reset on
    ``data`` first (as the ``auto`` correction would)."""
    from fedmerge.merge.repair import has_batchnorm, reset_batchnorm

    net = load_state(model, state)
    if has_batchnorm(net):
        net = reset_batchnorm(net, data, device=device)
    logits = predict_logits(net, data, device=device)
    labels = data.y.cpu()
    accuracy = 100.0 * (logits.argmax(1) == labels).double().mean().item()
    return accuracy, F.cross_entropy(logits, labels).item()


def tune_lambda(
    model: nn.Module,
    state_a: State,
    aligned_b: State,
    surrogate: LabeledImages,
    grid: tuple[float, ...] = DEFAULT_GRID,
    device: torch.device | str = "cpu",
) -> tuple[float, State, list[float]]:
    """The interpolation weight of aligned B on ``grid`` that scores best on the surrogate (accuracy, then lower
    cross-entropy; the paper tuned it on the test set instead), the merge at that weight and the surrogate
    cross-entropy at every grid point.

    Parameters
    ----------
    model : nn.Module
        The architecture template.
    state_a, aligned_b : dict[str, torch.Tensor]
        A and B aligned to A.
    surrogate : LabeledImages
        The data that scores each weight (the union of the clients' surrogates).
    grid : tuple[float, ...] (default: 0, 0.1, ..., 1)
        The candidate weights of B.
    device : torch.device | str (default: "cpu")
        Where to score.

    Returns
    -------
    tuple[float, dict[str, torch.Tensor], list[float]]
        The chosen weight, the merged state at that weight, the surrogate loss at every grid point.
    """
    best: tuple[float, float] | None = None
    chosen, losses = grid[0], []
    for lam in grid:
        accuracy, loss = surrogate_score(model, interpolate_states(state_a, aligned_b, lam), surrogate, device)
        losses.append(loss)
        if best is None or (accuracy, -loss) > best:
            best, chosen = (accuracy, -loss), lam
    log.info("OT (tuned): lambda %.2f scores best on the surrogate (%.1f%%)", chosen, best[0] if best else 0.0)
    return chosen, interpolate_states(state_a, aligned_b, chosen), losses
