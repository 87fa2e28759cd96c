"""One entry point for merging N models at once: alignment of all clients into one universe, the method's N-model
merge, and the post-merge correction. The pairwise alternative is :func:`fedmerge.merge.pairwise.merge_pair`
chained along a schedule (``strategies.schedule``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.align.permute import Perms, State
from fedmerge.data.images import LabeledImages
from fedmerge.merge.methods import ManyInputs, example_batch, get_method, runnable_method
from fedmerge.merge.pairwise import MergeConfig, check_compatible, correct
from fedmerge.models.protocol import model_spec

log = logging.getLogger(__name__)


@dataclass
class ManyResult:
    """The merged weights, each client's permutation into them, what actually ran and how long it took."""

    state: State
    perms: list[Perms]
    method: str
    seconds: float
    align_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def merge_models(
    model: nn.Module,
    states: Sequence[State],
    weights: Sequence[float],
    surrogate: LabeledImages | None = None,
    config: MergeConfig = MergeConfig(),
    device: torch.device | str = "cpu",
    example_input: torch.Tensor | None = None,
) -> ManyResult:
    """Merge N models (weighted by ``weights``, e.g. their sample counts) into one, all at once.

    Every client is mapped into one shared universe (``config.alignment``: MergeMany weight matching or C2M3), then
    merged by ``config.method``'s N-model form. Methods that need data fall back to data-free weight matching,
    with a log line, when ``surrogate`` (the union of the clients' surrogates) is missing or empty. Post-merge
    correction: a BatchNorm reset on the surrogate (``auto`` on a model with BatchNorm, or ``bn-reset``); REPAIR
    is pairwise only and is replaced by a BatchNorm reset here.

    Parameters
    ----------
    model : nn.Module
        The architecture: a :class:`fedmerge.models.PermutableModel`, or any ``torch.fx``-traceable model whose
        permutation spec is derived (once per model object) from an example batch (see
        :func:`fedmerge.models.protocol.model_spec`).
    states : Sequence[dict[str, torch.Tensor]]
        The clients' state dicts.
    weights : Sequence[float]
        One weight per client (e.g. its sample count).
    surrogate : LabeledImages | None (default: None)
        The union of the clients' surrogates, for the methods that need data; its first two images also serve as
        the example batch a spec is derived from.
    config : MergeConfig (default: MergeConfig())
        Which method, alignment and correction to run, with their settings.
    device : torch.device | str (default: "cpu")
        Where to merge.
    example_input : torch.Tensor | None (default: None)
        A batch of model inputs to derive the spec from when there is no surrogate (and the model has no
        ``permutation_spec()`` nor a spec derived before).

    Returns
    -------
    ManyResult
        The merged weights, each client's permutation into them, the method that ran and its wall times.
    """
    start = time.perf_counter()
    if not states:
        raise ValueError("nothing to merge: no client models")
    if len(weights) != len(states):
        raise ValueError(f"need one weight per model: {len(weights)} weights for {len(states)} models")
    spec = model_spec(model, example_batch(surrogate, example_input))
    for state in states[1:]:
        check_compatible(spec, states[0], state)
    if get_method(config.method).merge_many is None:
        raise ValueError(f"merge method {config.method!r} has no N-model form; use a pairwise schedule (tree)")
    data = surrogate if surrogate is not None and len(surrogate) > 0 else None
    method = runnable_method(config.method, data is not None)
    assert method.merge_many is not None
    on_device = [{k: v.to(device) for k, v in s.items()} for s in states]
    out = method.merge_many(ManyInputs(model, spec, on_device, [float(w) for w in weights], data, config, device))
    correction = config.correction
    if correction == "repair":
        log.warning("REPAIR is defined for pairs of models: a BatchNorm reset corrects the N-model merge instead")
        correction = "bn-reset"
    merged = correct(model, out.merged, data, correction, device)
    return ManyResult(
        {k: v.detach().cpu() for k, v in merged.items()},
        out.perms,
        method.name,
        time.perf_counter() - start,
        out.align_seconds,
        out.losses,
    )
