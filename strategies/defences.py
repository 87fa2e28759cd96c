"""Defences against hostile or broken clients, applied to the updates :func:`strategies.validation.accept_replies`
kept, before they are merged (:func:`apply_defences`; the strategies call it from ``aggregate_train``).

Every rule judges a client against the others, so each needs at least ``min_clients`` (default 3) clients: with
fewer, no client can be told from the rest and the rule is skipped (logged at INFO). Every rule assumes that most
clients are honest (the medians below are robust to a minority of hostile clients, not to a majority). Each decision
is logged at WARNING level naming the client. The rules, in the order :func:`apply_defences` applies them:

1. **Outlying weight norms** (:func:`norm_outliers`, ``norm_outlier_ratio`` R, default 10): for every
   floating-point tensor, each client's L2 norm is divided by the median of all clients' norms of that tensor (the
   median over all clients, the client included, so that with three clients one hostile norm cannot move it); a
   client whose typical ratio (the geometric mean over its tensors) is beyond R (above R or below 1/R), or whose
   ratio on one tensor is beyond R^2, is left out. Honest clients trained from their own seeds on Dirichlet parts
   stayed within 0.64x..1.5x on every tensor (MNIST and digits, 8 clients, default width), and narrow MLPs (width
   16-32) within 2.4x; on a disjoint split (two classes per client) one tensor of a narrow MLP reached 10.3x while
   the typical ratio stayed below 3.3x, hence the two bounds. Weights scaled up (x100) are far outside; weights
   drawn from N(0, 1) and freshly initialised MLPs often are (their biases), and the model check catches them
   otherwise. Tensors whose median norm is zero are not compared.
2. **Models that disagree with the surrogates** (:func:`model_outliers`, ``model_ratio``, default 0.25): each
   client's model is scored by its accuracy on every *other* client's surrogate (the median over those
   surrogates), counting only their images of the classes the client trained on (its ``label-counts``, else its
   surrogate's labels: a specialist is not blamed for classes it never saw; before this, an honest 3-class client
   of 32 on MNIST Dirichlet(0.5) with 10 local epochs was left out); a client whose score's excess over chance
   (1 / classes) is below ``model_ratio`` x the excess of the clients' median score is left out (its weights are
   suspect). This catches random weights, whose norms can look like a trained model's, but whose score is chance.
   The ratio is low because an honest model still knows its classes less well than the others know theirs: on
   digits, Dirichlet(0.5), 8 clients, the weakest honest client's excess was 0.43 x the median's (scored on all
   classes).
3. **Surrogates that disagree with the models** (:func:`surrogate_outliers`, ``surrogate_check``, ``surrogate_ratio``
   default 0.5): each surrogate is scored twice, by the accuracy on it of the ensemble (mean class probabilities,
   every member weighted alike, so that no claimed sample count counts) of the *other* clients' models that passed
   rules 1 and 2, and by that of its own client's model; a surrogate is flagged when either score's excess over
   chance is below ``surrogate_ratio`` x the excess of that score's median over the clients (honest clients were at
   0.85 x or more), by more than two binomial standard errors on that surrogate's number of labels (a 10-label
   surrogate is too small to judge a small shortfall). This catches shifted labels and noise images. On a split with
   disjoint classes the others cannot vouch for a client's labels (that score judges nobody, see below), but its own
   model still can: shifted labels are caught there too, noise images only when the client holds several classes (a
   model that knows one class calls everything that class). A client whose own model fails its own surrogate is
   flagged whichever of the two is broken: an honest client whose training collapsed (a model at chance on its own
   data) is left out too. ``surrogate_check="leave-out"`` (the default) leaves a flagged client out: a client without
   a surrogate would make every merge on its way up the tree (and the universe merge) data-free and skip fine-tuning
   and distillation, which costs more than one client's model, and a client that sends a hostile surrogate is not
   trusted with its weights either; ``"drop-surrogate"`` keeps its weights, merged data-free.
4. **Cap on one client's merge weight** (:func:`cap_counts`), on the clients left after rules 1-3 (when at least
   ``min_clients`` were accepted, even if only two are left): a client's sample count (which decides its merge
   weight, ``lambda = n_B / (n_A + n_B)``) is clipped to ``max_count_ratio`` (default 3) x the median count of the
   *other* clients, and then so that no client holds more than ``max_share_ratio`` (default 1.25) x an equal share
   (1 / clients) of the total, nor more than ``max_weight_share`` of it (off by default), by water filling: the
   largest counts are lowered to one level, the shares renormalised, until every share is within the cap. The
   clipped count is what the merge, the distillation teacher and the round's metrics use. The same relative cap
   holds in every pairwise merge of the tree and all-to-one schedules (:mod:`strategies.schedule`): no client holds
   more than ``max_share_ratio`` / m of a merge of m clients, so a client with an inflated count cannot dominate
   the first merges it is in (there its count is set against one or three others, not the round's median). Why
   1.25: an STE tree is fragile to one dominant client: on MNIST Dirichlet(0.5), 8 clients, one client counting
   1.5 x the others' median (18 % of the weight, 66 % of its first merge) cost 4.0 points, 3 x the median (its old
   cap) 12.3, while weighting all clients equally cost nothing (+1.1). A claim of 10^9 examples among eight
   clients now counts 1.25 / 8 of the weight and 62.5 % of its first merge at most. Honest clients of Dirichlet
   splits that hold more than 1.25 x an equal share are clipped too (logged): their weight is lowered to the cap,
   they are still merged.

Rules 2 and 3 need surrogates from at least ``min_clients`` clients and a model to evaluate (the strategy's
template; each client's model makes one pass over all the surrogates, on the merge's device), and a score judges
only when its median over the clients is at least halfway from chance to 100 % (``(1 + 1/classes) / 2``, 55 % for
ten classes): when the clients' models do not know each other's classes (disjoint classes) or are barely trained,
nobody is judged by it (logged). Barely trained models (digits, 2 epochs, median agreement about 30 %) disagree
with honest surrogates too much to tell a hostile one. A rule that fails with an exception is skipped with the
error logged: a defence never ends the round.

Duplicate partition ids (every claimant is left out), malformed or non-finite weights and oversized surrogates are
handled by :mod:`strategies.validation`, which always applies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.data.images import concat
from fedmerge.merge.functional import load_state
from fedmerge.train import predict_logits
from strategies.messages import ClientUpdate, reported_label_counts

log = logging.getLogger(__name__)

SURROGATE_ACTIONS: tuple[str, ...] = ("leave-out", "drop-surrogate", "off")
"""What :func:`apply_defences` does with a client whose surrogate fails the check (``"off"``: no check)."""

LeftOut = list[tuple[str, str]]
"""(client, reason) pairs."""


@dataclass(frozen=True)
class Defences:
    """Which defences a strategy applies to the accepted updates, and their thresholds (see the module docstring).

    Parameters
    ----------
    enabled : bool (default: True)
        The master switch: False applies none of them.
    max_count_ratio : float (default: 3.0)
        A client's sample count is clipped to this multiple of the other clients' median count (0: no clip).
    max_weight_share : float (default: 1.0)
        No client may hold more than this share of the total sample count (1.0: no cap).
    norm_outlier_ratio : float (default: 10.0)
        R: a client whose tensors' L2 norms are typically (geometric mean) more than R times the clients' medians
        or less than 1/R, or one tensor's more than R^2 times or less than 1/R^2, is left out (0: no norm check).
    model_ratio : float (default: 0.25)
        Leave out a client whose model's agreement above chance with the other clients' surrogates is below this
        fraction of the clients' median (0: no model check).
    surrogate_check : str (default: "leave-out")
        What to do with a client whose surrogate the other clients' models disagree with far more than typical:
        "leave-out", "drop-surrogate" (merge its weights data-free) or "off" (no check).
    surrogate_ratio : float (default: 0.5)
        The surrogate check flags an agreement above chance below this fraction of the clients' median.
    min_clients : int (default: 3)
        The fewest accepted clients the defences judge (fewer: nothing is checked); the model and surrogate checks
        also need that many surrogates.
    max_share_ratio : float (default: 1.25)
        No client may hold more than this multiple of an equal share of the round's total count (1 / clients), nor
        of any pairwise merge in the tree and all-to-one schedules (1 / clients in the merge) (0: no cap; else >= 1).
    """

    enabled: bool = True
    max_count_ratio: float = 3.0
    max_weight_share: float = 1.0
    norm_outlier_ratio: float = 10.0
    model_ratio: float = 0.25
    surrogate_check: str = "leave-out"
    surrogate_ratio: float = 0.5
    min_clients: int = 3
    max_share_ratio: float = 1.25

    def __post_init__(self) -> None:
        if self.max_count_ratio != 0 and not self.max_count_ratio >= 1:
            raise ValueError(f"max_count_ratio must be 0 (no clip) or >= 1, got {self.max_count_ratio}")
        if self.max_share_ratio != 0 and not self.max_share_ratio >= 1:
            raise ValueError(f"max_share_ratio must be 0 (no cap) or >= 1, got {self.max_share_ratio}")
        if not 0 < self.max_weight_share <= 1:
            raise ValueError(f"max_weight_share must be in (0, 1] (1: no cap), got {self.max_weight_share}")
        if self.norm_outlier_ratio != 0 and not self.norm_outlier_ratio > 1:
            raise ValueError(f"norm_outlier_ratio must be 0 (no check) or > 1, got {self.norm_outlier_ratio}")
        if self.surrogate_check not in SURROGATE_ACTIONS:
            raise ValueError(
                f"surrogate_check must be one of {', '.join(SURROGATE_ACTIONS)}, got {self.surrogate_check!r}"
            )
        for name in ("model_ratio", "surrogate_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.min_clients < 3:
            raise ValueError(
                f"min_clients must be >= 3 (a median needs a majority to be robust), got {self.min_clients}"
            )

    @classmethod
    def off(cls) -> Defences:
        """No defence at all."""
        return cls(enabled=False)


def describe_defences(defences: Defences) -> str:
    """One line saying which defences are on, with their thresholds (for logs)."""
    if not defences.enabled:
        return "off"
    parts = [
        f"norm check {defences.norm_outlier_ratio:g}x" if defences.norm_outlier_ratio else "no norm check",
        f"model check {defences.model_ratio:g}" if defences.model_ratio else "no model check",
        f"surrogate check {defences.surrogate_ratio:g} ({defences.surrogate_check})"
        if defences.surrogate_check != "off"
        else "no surrogate check",
        f"counts capped at {defences.max_count_ratio:g}x the others' median" if defences.max_count_ratio else "",
        f"weight share capped at {defences.max_weight_share:g}" if defences.max_weight_share < 1 else "",
        f"shares capped at {defences.max_share_ratio:g}x an equal share of the round and of every merge"
        if defences.max_share_ratio
        else "",
    ]
    return ", ".join(p for p in parts if p) + f" (with at least {defences.min_clients} clients)"


@dataclass
class DefenceReport:
    """What :func:`apply_defences` decided: the updates to merge (counts clipped, surrogates dropped), the clients
    left out, those whose count was clipped and those whose surrogate was dropped (client, reason), the checks
    that were skipped (with why), and the share cap every pairwise merge of the round must keep (``share_ratio``,
    :func:`strategies.schedule.run_schedule`; 0: none, when the defences are off or judged nobody)."""

    updates: list[ClientUpdate]
    left_out: LeftOut = field(default_factory=list)
    clipped: LeftOut = field(default_factory=list)
    surrogates_dropped: LeftOut = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    share_ratio: float = 0.0


def _skip(skipped: list[str] | None, what: str) -> None:
    log.info("defences: %s", what)
    if skipped is not None:
        skipped.append(what)


# --------------------------------------------------------------------------------------------------- sample counts


def share_cap(counts: Sequence[float], share: float) -> float:
    """The count c such that clipping every count to c leaves no count above ``share`` of the total (water filling;
    ``share`` below ``1 / len(counts)`` is raised to it)."""
    share = max(share, 1.0 / len(counts))
    ordered = sorted(counts, reverse=True)
    for clipped in range(1, len(ordered) + 1):
        if clipped * share >= 1:
            return ordered[-1]
        rest = sum(ordered[clipped:])
        cap = share * rest / (1 - clipped * share)
        if clipped == len(ordered) or cap >= ordered[clipped]:
            return cap
    return ordered[-1]


def cap_counts(
    updates: Sequence[ClientUpdate],
    max_count_ratio: float = 3.0,
    max_weight_share: float = 1.0,
    min_clients: int = 3,
    skipped: list[str] | None = None,
    max_share_ratio: float = 0.0,
) -> tuple[list[ClientUpdate], LeftOut]:
    """Clip the sample counts that would give one client too large a merge weight.

    A count is clipped to ``max_count_ratio`` x the median of the other clients' counts (0: no such clip), then to
    the largest count that keeps every client's share of the total at most ``max_weight_share`` and at most
    ``max_share_ratio`` / clients (0: no such cap), by water filling (:func:`share_cap`). Clipped clients are copies
    (the input is not changed); each clip is logged, naming the client.

    Returns
    -------
    tuple[list[ClientUpdate], list[tuple[str, str]]]
        The updates (in order, clipped ones replaced by copies) and (client, reason) for each clipped client.
    """
    updates = list(updates)
    share = min(max_weight_share, max_share_ratio / len(updates) if max_share_ratio and updates else 1.0)
    if not max_count_ratio and share >= 1:
        return updates, []
    if len(updates) < min_clients:
        _skip(skipped, f"count cap skipped: {len(updates)} client(s), it needs at least {min_clients}")
        return updates, []
    counts = [float(u.num_examples) for u in updates]
    caps = [math.inf] * len(updates)
    if max_count_ratio:
        for i in range(len(updates)):
            others = counts[:i] + counts[i + 1 :]
            caps[i] = max_count_ratio * statistics.median(others)
    reasons = [
        f"{max_count_ratio:g} x the other clients' median count {caps[i] / max_count_ratio:g}"
        if max_count_ratio
        else ""
        for i in range(len(updates))
    ]
    if share < 1:
        after = [min(n, c) for n, c in zip(counts, caps, strict=True)]
        cap = share_cap(after, share)
        relative = f" ({max_share_ratio:g} x an equal share)" if share < max_weight_share else ""
        for i in range(len(updates)):
            if cap < caps[i]:
                caps[i] = cap
                reasons[i] = f"the largest count that keeps every client within {share:.3g}{relative} of the total"
    result, clipped = [], []
    for update, count, cap, reason in zip(updates, counts, caps, reasons, strict=True):
        if count <= cap:
            result.append(update)
            continue
        new = max(1, math.floor(cap))
        why = f"reported {update.num_examples} examples; its merge weight counts {new} ({reason})"
        log.warning("defences: clipping the sample count of %s: %s", update.name, why)
        clipped.append((update.name, why))
        result.append(dataclasses.replace(update, num_examples=new))
    return result, clipped


# ---------------------------------------------------------------------------------------------------- weight norms


def norm_outliers(
    updates: Sequence[ClientUpdate],
    max_ratio: float = 10.0,
    min_clients: int = 3,
    skipped: list[str] | None = None,
) -> tuple[list[ClientUpdate], LeftOut]:
    """Leave out the clients whose weights are far larger or smaller than the others' (0: no check).

    Each floating-point tensor's L2 norm is divided by the median of all clients' norms of that tensor. A client is
    left out when its typical ratio (the geometric mean over its tensors) is above ``max_ratio`` or below
    ``1 / max_ratio``, or when one tensor's ratio is above ``max_ratio ** 2`` or below its inverse. Tensors whose
    median norm is zero are not compared.

    Returns
    -------
    tuple[list[ClientUpdate], list[tuple[str, str]]]
        The clients kept (in order) and (client, reason) for each client left out.
    """
    updates = list(updates)
    if not max_ratio:
        return updates, []
    if len(updates) < min_clients:
        _skip(skipped, f"norm check skipped: {len(updates)} client(s), it needs at least {min_clients}")
        return updates, []
    names = [k for k, v in updates[0].state.items() if v.is_floating_point()]
    norms = torch.tensor(
        [[float(u.state[k].double().norm()) if k in u.state else math.nan for k in names] for u in updates],
        dtype=torch.float64,
    ).reshape(len(updates), len(names))
    medians = torch.nanquantile(norms, 0.5, dim=0) if names else torch.zeros(0, dtype=torch.float64)
    compared = [j for j in range(len(names)) if medians[j] > 0]
    if not compared:
        return updates, []
    kept, left_out = [], []
    for i, update in enumerate(updates):
        ratios = {names[j]: float(norms[i, j] / medians[j]) for j in compared if not math.isnan(float(norms[i, j]))}
        logs = [math.log(r) if r > 0 else -math.inf for r in ratios.values()]
        typical = math.exp(sum(logs) / len(logs)) if logs else 1.0
        worst = max(ratios, key=lambda k: abs(math.log(ratios[k])) if ratios[k] > 0 else math.inf, default="")
        problem = ""
        if not 1 / max_ratio <= typical <= max_ratio:
            problem = (
                f"its tensors' L2 norms are typically {typical:.3g} x the clients' medians (geometric mean over "
                f"{len(ratios)} tensors; allowed {1 / max_ratio:g}x..{max_ratio:g}x)"
            )
        elif worst and not 1 / max_ratio**2 <= ratios[worst] <= max_ratio**2:
            problem = (
                f"the L2 norm of its {worst} is {ratios[worst]:.3g} x the clients' median "
                f"{float(medians[names.index(worst)]):.3g} (allowed {1 / max_ratio**2:g}x..{max_ratio**2:g}x)"
            )
        if problem:
            if worst and problem.startswith("its tensors"):
                problem += f"; the most outlying, {worst}, is {ratios[worst]:.3g} x"
            log.warning("defences: leaving out %s: %s", update.name, problem)
            left_out.append((update.name, problem))
        else:
            kept.append(update)
    return kept, left_out


# ---------------------------------------------------------------------------------- models against the surrogates


@dataclass(frozen=True)
class Predictions:
    """Class probabilities of client models on client surrogates: ``probs[(j, k)]`` is model ``j``'s on surrogate
    ``k`` (partition ids), ``labels[k]`` surrogate ``k``'s labels."""

    probs: dict[tuple[int, int], torch.Tensor]
    labels: dict[int, torch.Tensor]
    num_classes: int

    def accuracy(self, model: int, surrogate: int, classes: torch.Tensor | None = None) -> float:
        """Model ``model``'s accuracy (0..1) on surrogate ``surrogate``'s labels (only on its images of
        ``classes`` when given; NaN when it has none)."""
        probs, labels = self.probs[(model, surrogate)], self.labels[surrogate]
        if classes is not None:
            keep = torch.isin(labels, classes)
            probs, labels = probs[keep], labels[keep]
        return _accuracy(probs, labels)

    def ensemble_accuracy(self, models: Sequence[int], surrogate: int) -> float:
        """The accuracy (0..1) of the mean class probabilities of ``models`` on surrogate ``surrogate``."""
        mean = torch.stack([self.probs[(j, surrogate)] for j in models]).mean(0)
        return _accuracy(mean, self.labels[surrogate])


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean()) if len(labels) else math.nan


def predictions(
    template: nn.Module, updates: Sequence[ClientUpdate], device: torch.device | str = "cpu"
) -> Predictions:
    """Every client model's class probabilities on every client surrogate (NaN outputs count as wrong)."""
    with_data = [u for u in updates if u.surrogate is not None]
    if len({u.partition_id for u in updates}) != len(updates):
        raise ValueError("predictions need unique partition ids")
    surrogates = [u.surrogate for u in with_data if u.surrogate is not None]
    probs = {}
    if surrogates:
        union, sizes = concat(surrogates, name="surrogates"), [len(data) for data in surrogates]
        for update in updates:  # one pass of each model over every surrogate
            logits = predict_logits(load_state(template, update.state).eval(), union, device=device).double()
            parts = torch.nan_to_num(torch.softmax(logits, 1), nan=0.0).split(sizes)
            for other, part in zip(with_data, parts, strict=True):
                probs[(update.partition_id, other.partition_id)] = part
    labels = {u.partition_id: u.surrogate.y.cpu() for u in with_data if u.surrogate is not None}
    num_classes = next(iter(probs.values())).shape[1] if probs else 1
    return Predictions(probs, labels, num_classes)


def _enough_surrogates(
    updates: list[ClientUpdate], min_clients: int, what: str, skipped: list[str] | None
) -> list[int] | None:
    """The partition ids of the clients that sent a surrogate, or None (logged) when there are fewer than
    ``min_clients`` clients or surrogates to judge with."""
    with_data = [u.partition_id for u in updates if u.surrogate is not None]
    if len(updates) < min_clients or len(with_data) < min_clients:
        _skip(
            skipped,
            f"{what} skipped: {len(with_data)} of {len(updates)} client(s) sent a surrogate, "
            f"it needs at least {min_clients}",
        )
        return None
    return with_data


def _judgeable(scores: dict[int, float], chance: float, what: str, skipped: list[str] | None) -> float | None:
    """The median score, or None (logged) when the clients agree too little with each other to judge anyone."""
    reference = statistics.median(scores.values())
    floor = (1 + chance) / 2
    if reference < floor:
        _skip(
            skipped,
            f"{what} skipped: the clients' median agreement is {100 * reference:.1f} %, below {100 * floor:.0f} % "
            "(halfway from chance to 100 %): the models are too weak, or know too little of each other's classes, "
            "to judge",
        )
        return None
    return reference


def _flag(score: float, reference: float, chance: float, ratio: float) -> bool:
    """Whether ``score``'s agreement above chance is below ``ratio`` x that of ``reference``."""
    return score - chance < ratio * (reference - chance)


SURROGATE_CHECK_Z = 2.0
"""How many binomial standard errors a surrogate's score must fall below the threshold to be flagged."""


def _significant(score: float, threshold: float, n: int) -> bool:
    """Whether ``score`` (an accuracy on n labels) is below ``threshold`` by more than :data:`SURROGATE_CHECK_Z`
    binomial standard errors of an accuracy at the threshold on n labels: with a few labels (1 image per class) an
    honest score scatters widely and is not judged by its shortfall alone."""
    return n > 0 and threshold - score > SURROGATE_CHECK_Z * math.sqrt(threshold * (1 - threshold) / n)


def _threshold_value(reference: float, chance: float, ratio: float) -> float:
    """The accuracy below which :func:`_flag` flags a score: chance + ``ratio`` x the reference's excess over it."""
    return chance + ratio * (reference - chance)


def _threshold(reference: float, chance: float, ratio: float) -> str:
    return (
        f"{100 * _threshold_value(reference, chance, ratio):.1f} % (chance {100 * chance:.0f} % + {ratio:g} x the "
        f"clients' median {100 * reference:.1f} % above chance)"
    )


def trained_classes(update: ClientUpdate, num_classes: int) -> torch.Tensor | None:
    """The classes a client says it trained on: those with a positive ``label-counts`` entry when it sent valid
    counts, else those of its surrogate's labels, else None (all classes)."""
    counts = reported_label_counts(update, num_classes)
    if counts is not None:
        return (counts > 0).nonzero().flatten()
    if update.surrogate is not None and len(update.surrogate):
        return update.surrogate.y.cpu().unique()
    return None


def model_outliers(
    updates: Sequence[ClientUpdate],
    preds: Predictions,
    ratio: float = 0.25,
    min_clients: int = 3,
    skipped: list[str] | None = None,
) -> tuple[list[ClientUpdate], LeftOut]:
    """Leave out the clients whose model agrees with the other clients' surrogates far less than the others' do.

    A model's score is the median of its accuracies on the other clients' surrogates, each taken on the images of
    the classes the client trained on (:func:`trained_classes`: a specialist is not blamed for classes it never
    saw); a client whose score above
    chance (1 / classes) is below ``ratio`` x the median score's (over all ``updates``) is left out. Skipped with
    fewer than ``min_clients`` surrogates or when the median score is below halfway from chance to 100 %. ``preds``
    must cover ``updates`` (:func:`predictions`).

    Returns
    -------
    tuple[list[ClientUpdate], list[tuple[str, str]]]
        The clients kept (in order) and (client, reason) for each client left out.
    """
    updates = list(updates)
    with_data = _enough_surrogates(updates, min_clients, "model check", skipped)
    if with_data is None:
        return updates, []
    scores = {}
    for u in updates:
        classes = trained_classes(u, preds.num_classes)
        accuracies = [preds.accuracy(u.partition_id, k, classes) for k in with_data if k != u.partition_id]
        judged = [a for a in accuracies if not math.isnan(a)]
        if judged:
            scores[u.partition_id] = statistics.median(judged)
    if not scores:
        return updates, []
    chance = 1.0 / preds.num_classes
    reference = _judgeable(scores, chance, "model check", skipped)
    if reference is None:
        return updates, []
    kept, left_out = [], []
    for update in updates:
        score = scores.get(update.partition_id)  # None: nothing of its classes to judge it on, kept
        if score is not None and _flag(score, reference, chance, ratio):
            others = len(with_data) - (update.surrogate is not None)
            why = (
                f"its model agrees with {100 * score:.1f} % of the other clients' surrogate labels (median over "
                f"{others} surrogates), below {_threshold(reference, chance, ratio)}: its weights are suspect"
            )
            log.warning("defences: leaving out %s: %s", update.name, why)
            left_out.append((update.name, why))
        else:
            kept.append(update)
    return kept, left_out


def surrogate_outliers(
    updates: Sequence[ClientUpdate],
    preds: Predictions,
    ratio: float = 0.5,
    min_clients: int = 3,
    skipped: list[str] | None = None,
) -> tuple[list[ClientUpdate], LeftOut]:
    """Flag the surrogates whose labels the clients' models disagree with far more than typical.

    Each surrogate gets two scores: the accuracy on it of the ensemble (mean class probabilities, members weighted
    alike) of the *other* clients' models in ``updates`` ("the others' agreement"), and the accuracy on it of its
    own client's model ("its own model's agreement"). A surrogate is flagged when either score's excess over chance
    (1 / classes) is below ``ratio`` x the excess of that score's median over the clients with a surrogate, by more
    than two binomial standard errors of a score at that threshold on as many labels (:func:`_significant`; without
    it, 1-image-per-class surrogates of honest clients were flagged: 4 of 10 labels against a 45 % threshold). A score
    whose median is below halfway from chance to 100 % judges nobody (logged): on a split with disjoint classes the
    others cannot vouch for a client's labels, but its own model still can. Skipped with fewer than
    ``min_clients`` clients or surrogates. ``preds`` must cover ``updates`` (:func:`predictions`).

    Returns
    -------
    tuple[list[ClientUpdate], list[tuple[str, str]]]
        The clients whose surrogate passed or who sent none (in order), and (client, reason) for each flagged one.
    """
    updates = list(updates)
    with_data = _enough_surrogates(updates, min_clients, "surrogate check", skipped)
    if with_data is None:
        return updates, []
    judges = [u.partition_id for u in updates]
    chance = 1.0 / preds.num_classes
    checks = [
        (
            "surrogate check by the other clients' models",
            f"the ensemble of the other {len(judges) - 1} clients' models agrees",
            {k: preds.ensemble_accuracy([j for j in judges if j != k], k) for k in with_data},
        ),
        (
            "surrogate check by each client's own model",
            "its own model agrees (its surrogate or its model is broken)",
            {k: preds.accuracy(k, k) for k in with_data},
        ),
    ]
    reasons: dict[int, list[str]] = {}
    for check, who, scores in checks:
        reference = _judgeable(scores, chance, check, skipped)
        if reference is None:
            continue
        for k, score in scores.items():
            threshold, n = _threshold_value(reference, chance, ratio), len(preds.labels[k])
            if _flag(score, reference, chance, ratio) and _significant(score, threshold, n):
                agrees, _, why = who.partition(" (")
                reasons.setdefault(k, []).append(
                    f"{agrees} with {100 * score:.1f} % of its {len(preds.labels[k])} labels, below "
                    f"{_threshold(reference, chance, ratio)}" + (f" ({why}" if why else "")
                )
    passed, flagged = [], []
    for update in updates:
        if update.partition_id in reasons:
            why = "; ".join(reasons[update.partition_id])
            log.warning("defences: the surrogate of %s fails the check: %s", update.name, why)
            flagged.append((update.name, why))
        else:
            passed.append(update)
    return passed, flagged


# ------------------------------------------------------------------------------------------------------- all rules


def apply_defences(
    updates: Sequence[ClientUpdate],
    defences: Defences | None = None,
    template: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> DefenceReport:
    """Apply ``defences`` (None: the defaults) to the accepted ``updates`` (unique partition ids, as
    :func:`strategies.validation.accept_replies` returns them): norm check, model check, surrogate check, count cap,
    in that order (see the module docstring). The model and surrogate checks need ``template`` (the architecture
    the states load into; None skips them) and run their forward passes on ``device``.

    Nothing is changed in place: clipped clients and clients whose surrogate is dropped are copies. A rule that
    raises is skipped (the error logged); the others still apply.

    Returns
    -------
    DefenceReport
        The updates to merge, in order, and what was decided.
    """
    defences = defences if defences is not None else Defences()
    report = DefenceReport(list(updates))
    if not defences.enabled or not updates:
        return report
    kept, skipped, n = report.updates, report.skipped, defences.min_clients
    if len(updates) < n:
        _skip(skipped, f"{len(updates)} client(s), fewer than {n}: no client can be judged against the others")
        return report
    try:
        kept, left = norm_outliers(kept, defences.norm_outlier_ratio, n, skipped)
        report.left_out += left
    except Exception:  # a defence never ends the round
        log.exception("defences: the norm check failed; it is skipped")
    wants_data = bool(defences.model_ratio) or defences.surrogate_check != "off"
    if wants_data and template is None:
        _skip(skipped, "model and surrogate checks skipped: the strategy has no model to evaluate the clients with")
    elif wants_data and template is not None and sum(u.surrogate is not None for u in kept) < n:
        _skip(skipped, f"model and surrogate checks skipped: fewer than {n} of the clients sent a surrogate")
    elif wants_data and template is not None:
        try:
            preds = predictions(template, kept, device)
            if defences.model_ratio:
                kept, left = model_outliers(kept, preds, defences.model_ratio, n, skipped)
                report.left_out += left
            if defences.surrogate_check != "off":
                passed, flagged = surrogate_outliers(kept, preds, defences.surrogate_ratio, n, skipped)
                good = {u.partition_id for u in passed}
                if defences.surrogate_check == "leave-out":
                    for who, why in flagged:
                        log.warning("defences: leaving out %s: its surrogate fails the check", who)
                        report.left_out.append((who, f"its surrogate fails the check: {why}"))
                    kept = passed
                else:
                    for who, _ in flagged:
                        log.warning("defences: dropping the surrogate of %s; its weights are merged data-free", who)
                    report.surrogates_dropped += flagged
                    kept = [u if u.partition_id in good else dataclasses.replace(u, surrogate=None) for u in kept]
        except Exception:  # a defence never ends the round
            log.exception("defences: the model / surrogate checks failed; they are skipped")
    try:
        # with min_clients accepted, the cap still applies when checks left fewer (a claim is judged against the rest)
        kept, report.clipped = cap_counts(
            kept, defences.max_count_ratio, defences.max_weight_share, 2, skipped, defences.max_share_ratio
        )
        report.share_ratio = defences.max_share_ratio
    except Exception:  # a defence never ends the round
        log.exception("defences: the count cap failed; it is skipped")
    report.updates = kept
    if report.left_out or report.clipped or report.surrogates_dropped:
        log.warning(
            "defences: %d of %d client(s) left out %s, %d count(s) clipped %s, %d surrogate(s) dropped %s",
            len(report.left_out),
            len(updates),
            [who for who, _ in report.left_out],
            len(report.clipped),
            [who for who, _ in report.clipped],
            len(report.surrogates_dropped),
            [who for who, _ in report.surrogates_dropped],
        )
    else:
        log.info("defences: all %d client(s) passed%s", len(updates), " the checks that ran" if skipped else "")
    return report
