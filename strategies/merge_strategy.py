"""A Flower strategy that merges client models by permutation alignment (WM, STE, NP Merge) instead of averaging."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from fedmerge.device import default_device, derive_seed
from fedmerge.merge import Ensemble, class_weights, fine_tune, get_method
from fedmerge.merge.distill import DistillConfig, distill
from fedmerge.merge.functional import load_state
from fedmerge.merge.pairwise import MergeConfig
from fedmerge.models.protocol import activation_points, derived_spec, has_activation_points, model_spec
from fedmerge.surrogate.build import last_linear
from fedmerge.train import TrainConfig
from strategies.defences import Defences
from strategies.fedavg import MetricsAggregation, SortedFedAvg, State
from strategies.messages import ARRAYS_KEY, CONFIG_KEY, LABEL_COUNTS, NUM_EXAMPLES, ClientUpdate, reported_label_counts
from strategies.parallel import RayRunner, SequentialRunner
from strategies.schedule import (
    SCHEDULES,
    MergeNode,
    MergeRunner,
    MergeStep,
    Schedule,
    run_schedule,
)

log = logging.getLogger(__name__)


class PermutationMerge(SortedFedAvg):
    """Collect weights (and surrogate data) from the clients, then merge them into one model.

    A drop-in for Flower's ``FedAvg``: it takes the same arguments, with the same names and defaults, after its own.
    Replies are read, checked and sorted by partition id as in :class:`SortedFedAvg`: a failed client, mismatched
    shapes, NaN/Inf weights or an unusable surrogate leave that client out (logged with the reason), and a client
    without surrogate is merged by data-free weight matching. The surviving models are merged by ``merge`` (STE by
    default) along ``schedule``, the pairwise merges of a tree level running on ``runner``. A round in which no
    reply is usable (or merging fails) keeps the global weights. Clients build their replies with
    :func:`strategies.client_helper.merge_reply` (or :func:`strategies.messages.client_reply`).

    After a round, ``merge_steps`` lists the pairwise merges and ``merge_only_state`` holds the merged weights
    before fine-tuning or distillation, besides what :class:`SortedFedAvg` records.

    Parameters
    ----------
    model : nn.Module
        The architecture template: a :class:`fedmerge.models.PermutableModel` (with ``permutation_spec()``), or any
        ``torch.fx``-traceable model, whose permutation spec is derived by tracing it on an example batch:
        ``example_input``, else zeros of ``image_shape``, else (at the first merge, with a log line) the first
        client surrogate's images.
    merge : MergeConfig | None (default: None)
        The merge method, correction and settings (:class:`fedmerge.merge.MergeConfig`; None: STE). Activation
        matching (``"am"``) and ZipIt! (``"zipit"``) need activation points (the model's ``activation_points()``,
        else those derived with its spec): they are refused for a model with a permutation that has none.
    schedule : str (default: "tree")
        "tree", "all-to-one" or "universe" (see :mod:`strategies.schedule`).
    runner : MergeRunner | None (default: None)
        Where a tree level's pairwise merges run (None: one after the other in this process).
    want_surrogate : bool (default: True)
        Ask clients for a surrogate (the data-based methods need one).
    clients_start_from_global : bool (default: False)
        Whether clients train round 1 from the sent weights (usual FL) or from their own initialisation (one-shot
        merging of independently trained models).
    num_classes : int | None (default: None)
        The number of classes; None: the output size of the model's last ``nn.Linear``.
    finetune : TrainConfig | None (default: None)
        Train the merged model further on the union of the surrogates.
    distill : DistillConfig | None (default: None)
        Distil the clients' ensemble into the merged model on augmented, mixed-up surrogate images (after any
        fine-tuning).
    ensemble_weighting : "examples" or "labels" (default: "examples")
        How the distillation teacher weighs the clients: by sample count, or class by class by the ``label-counts``
        metric clients report (see :func:`client_ensemble`; much stronger on label-skewed splits).
    image_shape : tuple[int, int, int] | None (default: None)
        The model's input (C, H, W): surrogates of another shape are refused.
    num_partitions : int | None (default: None)
        The federation's size: partition ids outside ``0..num_partitions-1`` are refused.
    fraction_train : float (default: 1.0)
        Fraction of nodes used during training. In case `min_train_nodes` is larger than
        `fraction_train * total_connected_nodes`, `min_train_nodes` will still be sampled.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes used during validation (federated evaluation, Flower's default). Set it to 0.0 when the
        ClientApp has no ``evaluate`` function (evaluate the merged model on the server with ``evaluate_fn``).
    min_train_nodes : int (default: 2)
        Minimum number of nodes used during training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes used during validation.
    min_available_nodes : int (default: 2)
        Minimum number of total nodes in the system.
    weighted_by_key : str (default: "num-examples")
        The key within each reply's MetricRecord whose value is the client's sample count (its merge weight).
    arrayrecord_key : str (default: "arrays")
        The key of the weights' ArrayRecord in sent messages and in replies (a reply with a single weights
        ArrayRecord besides its surrogate is read whatever its key).
    configrecord_key : str (default: "config")
        Key used to store the ConfigRecord when constructing Messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord, used to aggregate the metrics of the
        training replies (one RecordDict per merged client, see :class:`SortedFedAvg`). If `None`, defaults to
        Flower's `aggregate_metricrecords`, a weighted average.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord, used to aggregate the MetricRecords of
        evaluation replies. If `None`, defaults to Flower's `aggregate_metricrecords`.
    example_input : torch.Tensor | None (default: None)
        A batch of model inputs (e.g. ``torch.zeros(2, 3, 32, 32)``) to derive the permutation spec of a model
        without ``permutation_spec()`` from, at construction.
    defences : Defences | None (default: None)
        The defences against hostile clients applied before merging (:class:`strategies.defences.Defences`); None:
        the defaults (on), ``Defences.off()``: none.
    """

    def __init__(
        self,
        model: nn.Module,
        merge: MergeConfig | None = None,
        schedule: Schedule = "tree",
        runner: MergeRunner | None = None,
        want_surrogate: bool = True,
        clients_start_from_global: bool = False,
        num_classes: int | None = None,
        finetune: TrainConfig | None = None,
        distill: DistillConfig | None = None,
        ensemble_weighting: EnsembleWeighting = "examples",
        image_shape: tuple[int, int, int] | None = None,
        num_partitions: int | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = NUM_EXAMPLES,
        arrayrecord_key: str = ARRAYS_KEY,
        configrecord_key: str = CONFIG_KEY,
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        example_input: torch.Tensor | None = None,
        defences: Defences | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown merge schedule {schedule!r}; choose from {SCHEDULES}")
        if ensemble_weighting not in ENSEMBLE_WEIGHTINGS:
            raise ValueError(f"unknown ensemble weighting {ensemble_weighting!r}; choose from {ENSEMBLE_WEIGHTINGS}")
        merge = merge if merge is not None else MergeConfig()
        if not has_activation_points(model) and example_input is None and image_shape is not None:
            example_input = torch.zeros(2, *image_shape)
        if example_input is not None:
            model_spec(model, example_input)  # derived now (once), so that an untraceable model fails here
            refuse_without_activation_points(model, merge)  # without an example: once the spec is derived
        super().__init__(
            model_num_classes(model, num_classes),
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            image_shape=image_shape,
            num_partitions=num_partitions,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            defences=defences,
        )
        self.model = model
        self.merge = merge
        self.schedule = schedule
        self.runner: MergeRunner = runner if runner is not None else SequentialRunner()
        self.want_surrogate = want_surrogate
        self.clients_start_from_global = clients_start_from_global
        self.finetune = finetune
        self.distill = distill
        self.ensemble_weighting: EnsembleWeighting = ensemble_weighting
        self.merge_only_state: State = {}
        self.merge_steps: list[MergeStep] = []
        self._reference = model.state_dict()  # until configure_train sends the global weights

    def merge_only(self) -> State | None:
        """The last round's merged weights before fine-tuning or distillation; None when neither ran."""
        if (self.finetune is None and self.distill is None) or not self.merge_only_state:
            return None
        return self.merge_only_state

    def defence_template(self) -> nn.Module:
        """The model template: the defences check client weights against the surrogates with it."""
        return self.model

    def summary(self) -> None:
        super().summary()
        runner = f"Ray ({self.runner.workers} workers)" if isinstance(self.runner, RayRunner) else "in-process"
        log.info(
            "merge: method %s, correction %s, schedule %s, pairwise merges %s",
            self.merge.method,
            self.merge.correction,
            self.schedule,
            runner,
        )

    def prepare_spec(self, updates: list[ClientUpdate]) -> None:
        """Make sure the model's permutation spec is known before merging: a model without ``permutation_spec()``
        and no spec derived yet gets one derived from the first client surrogate's images (logged).

        Parameters
        ----------
        updates : list[ClientUpdate]
            The usable updates, in partition-id order.

        Raises
        ------
        ValueError
            When there is nothing to derive the spec from (no ``example_input``, no ``image_shape``, no surrogate).
        """
        if has_activation_points(self.model) or derived_spec(self.model) is not None:
            return
        with_data = next((u for u in updates if u.surrogate is not None and len(u.surrogate) > 0), None)
        if with_data is None or with_data.surrogate is None:
            raise ValueError(
                f"cannot derive the permutation spec of {type(self.model).__name__} (it has no permutation_spec()): "
                "no client sent a surrogate to trace it on. Pass example_input=<a batch of model inputs, e.g. "
                "torch.zeros(2, 3, 32, 32)> or image_shape=(C, H, W) to PermutationMerge"
            )
        log.info(
            "deriving the permutation spec of %s by tracing it on %s's surrogate images %s "
            "(pass example_input to PermutationMerge to do it at construction)",
            type(self.model).__name__,
            with_data.name,
            tuple(with_data.surrogate.image_shape),
        )
        spec = model_spec(self.model, with_data.surrogate.x[:2])
        log.info("permutation spec of %s: %d permutations", type(self.model).__name__, len(spec.perm_names))
        refuse_without_activation_points(self.model, self.merge)

    def combine(self, updates: list[ClientUpdate]) -> State:
        """Merge the usable updates (sorted by partition id) along the schedule."""
        self.prepare_spec(updates)
        for update in updates:
            if update.surrogate is None and self.want_surrogate:
                log.warning("%s sent no surrogate: it is merged by data-free weight matching", update.name)
        merged, self.merge_steps = run_schedule(
            self.schedule,
            self.model,
            [MergeNode.from_update(u) for u in updates],
            self.merge,
            self.runner,
            self.defence_report.share_ratio,  # the defences' cap on one client's share of every merge
        )
        if self.merge_steps:
            log.info(
                "merged clients %s by %s",
                list(merged.members),
                ", ".join(sorted({step.method for step in self.merge_steps})),
            )
        self.merge_only_state = merged.state
        if self.finetune is None and self.distill is None:
            return merged.state
        if merged.surrogate is None:
            log.warning(
                "fine-tuning / distillation skipped: clients %s sent no surrogate", list(merged.without_surrogate)
            )
            return merged.state
        model = load_state(self.model, merged.state)
        if self.finetune is not None:
            log.info(
                "fine-tuning the merged model on %d surrogate images for %d epochs",
                len(merged.surrogate),
                self.finetune.epochs,
            )
            model = fine_tune(
                model,
                merged.surrogate,
                self.finetune,
                seed=derive_seed(self.merge.seed, "finetune"),
                device=default_device(),
            )
        if self.distill is not None:
            teacher = client_ensemble(self.model, updates, self.ensemble_weighting, self.num_classes)
            log.info(
                "distilling the ensemble of %d clients into the merged model on %d surrogate images (%d steps)",
                len(updates),
                len(merged.surrogate),
                self.distill.steps,
            )
            model = distill(
                model,
                merged.surrogate,
                teacher,
                self.distill,
                seed=derive_seed(self.merge.seed, "distill"),
                device=default_device(),
            ).model
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def refuse_without_activation_points(model: nn.Module, merge: MergeConfig) -> None:
    """Raise ``ValueError`` when ``merge``'s method needs activation points (activation matching, ZipIt!) and
    ``model`` has none for some permutation (neither its own ``activation_points()`` nor derived ones).

    Parameters
    ----------
    model : nn.Module
        The architecture template.
    merge : MergeConfig
        The merge settings.
    """
    if not get_method(merge.method).needs_activation_points:
        return
    try:
        activation_points(model)
    except TypeError as error:
        raise ValueError(f"merge method {merge.method!r} needs activation points: {error}") from error


ENSEMBLE_WEIGHTINGS: tuple[str, ...] = ("examples", "labels")
"""How the clients' ensemble weighs its members: by sample count, or class by class by label counts."""
EnsembleWeighting = Literal["examples", "labels"]


def model_num_classes(model: nn.Module, num_classes: int | None = None) -> int:
    """``num_classes`` when given, else the output size of ``model``'s last ``nn.Linear`` (ValueError without one)."""
    if num_classes is not None:
        return num_classes
    head = last_linear(model)
    if head is None:
        raise ValueError("cannot tell the number of classes from the model: pass num_classes")
    return head.out_features


def client_ensemble(
    template: nn.Module,
    updates: list[ClientUpdate],
    weighting: EnsembleWeighting = "examples",
    num_classes: int | None = None,
) -> Ensemble:
    """The clients' models as one output ensemble, weighted by :func:`ensemble_weights`."""
    weights = ensemble_weights(updates, weighting, model_num_classes(template, num_classes))
    return Ensemble([load_state(template, u.state) for u in updates], weights)


def ensemble_weights(updates: list[ClientUpdate], weighting: EnsembleWeighting, num_classes: int) -> torch.Tensor:
    """The weights of the clients' ensemble (for :class:`fedmerge.merge.Ensemble`, members in ``updates`` order).

    ``weighting="examples"`` weighs each client by its sample count. ``"labels"`` weighs it class by class by its
    share of that class's training examples (:func:`fedmerge.merge.class_weights` of the ``label-counts`` the
    clients report, scaled to their defended sample counts), so a client's vote counts on the classes it learnt; a
    client that sent no valid counts is treated as holding its examples evenly over the classes (logged).
    """
    if weighting not in ENSEMBLE_WEIGHTINGS:
        raise ValueError(f"unknown ensemble weighting {weighting!r}; choose from {ENSEMBLE_WEIGHTINGS}")
    if weighting == "examples":
        return torch.tensor([float(u.num_examples) for u in updates])
    rows = []
    for update in updates:
        counts = reported_label_counts(update, num_classes)
        if counts is not None:
            counts = counts * (update.num_examples / counts.sum())  # the defended sample count, spread as reported
        else:
            log.warning(
                "%s sent no valid %r (%d whole numbers): its ensemble weight is spread evenly over the classes",
                update.name,
                LABEL_COUNTS,
                num_classes,
            )
            counts = torch.full((num_classes,), update.num_examples / num_classes, dtype=torch.float64)
        rows.append(counts)
    single_class = [u.name for u, row in zip(updates, rows, strict=True) if int((row > 0).sum()) < 2]
    if single_class:
        log.warning(
            "%s trained on one class only: such a model predicts that class for every image, and the class-wise "
            "teacher takes its vote as the verdict on that class (with one class per client it is near chance; "
            "ensemble-weights=examples is no better there)",
            ", ".join(single_class),
        )
    return class_weights(torch.stack(rows))
