"""Weight matching (Ainsworth et al., 2023): coordinate descent over permutations, one LAP each.

For permutation ``p`` the similarity between target unit ``i`` and source unit ``j`` is the
inner product of every weight slice they own, with the source's *other* axes already
permuted; ``scipy.optimize.linear_sum_assignment`` then picks the best one-to-one match.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedmerge.align.permute import Perms, State, identity_perms, permute_tensor
from fedmerge.models.spec import PermutationSpec


def similarity_matrix(spec: PermutationSpec, perm: str, target: State, source: State, perms: Perms) -> torch.Tensor:
    """``S[i, j]``: similarity of target unit ``i`` and source unit ``j`` under permutation ``perm``.

    Entries of the spec that ``target`` lacks (e.g. buffers, when matching parameters only) are skipped. On a
    :class:`~fedmerge.models.spec.Blocked` axis a unit's feature vector holds its whole block.
    """
    total = None
    for key, axis in spec.perm_to_axes[perm]:
        if key not in target:
            continue
        # A blocked axis (n * block entries) becomes n rows: each unit's block joins its feature vector.
        n = spec.units(key, axis, target[key].shape[axis])
        t = target[key].detach().movedim(axis, 0).reshape(n, -1)
        s = permute_tensor(spec, perms, key, source[key].detach(), skip_axis=axis)
        s = s.movedim(axis, 0).reshape(n, -1)
        term = t.float() @ s.float().T
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"no tensor of the target carries permutation {perm!r}")
    return total


def solve_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """Column index matched to each row, maximising total similarity."""
    _, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    return torch.from_numpy(cols).long()


def weight_matching(
    spec: PermutationSpec,
    target: State,
    source: State,
    init: Perms | None = None,
    max_sweeps: int = 100,
    seed: int = 0,
    tol: float = 1e-7,
) -> Perms:
    """Permutations ``P`` such that ``apply_permutation(spec, P, source)`` is close to ``target``.

    Each sweep visits every permutation once in a random order; stops once a whole sweep
    no longer improves the objective, or after ``max_sweeps``. ``init`` warm-starts the search.
    """
    perms = {p: v.clone() for p, v in (init or identity_perms(spec, source)).items()}
    rng = np.random.default_rng(seed)
    names = spec.perm_names
    for _ in range(max_sweeps):
        improved = False
        for index in rng.permutation(len(names)):
            name = names[index]
            sim = similarity_matrix(spec, name, target, source, perms)
            new = solve_assignment(sim)
            rows = torch.arange(len(new))
            gain = sim[rows, new].double().sum() - sim[rows, perms[name]].double().sum()
            if gain > tol * max(1.0, float(sim.abs().sum())):
                improved = True
            perms[name] = new
        if not improved:
            break
    return perms
