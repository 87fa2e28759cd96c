"""A Flower strategy that merges client models by permutation alignment (WM, STE, NP Merge) instead of averaging."""

from __future__ import annotations

import logging

from torch import nn

from fedmerge.device import default_device, derive_seed
from fedmerge.merge import Ensemble, fine_tune
from fedmerge.merge.distill import DistillConfig, distill
from fedmerge.merge.functional import load_state
from fedmerge.merge.pairwise import MergeConfig
from fedmerge.models.protocol import model_spec
from fedmerge.surrogate.build import last_linear
from fedmerge.train import TrainConfig
from strategies.fedavg import SortedFedAvg, State
from strategies.messages import ClientUpdate
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

    Replies are read, checked and sorted by partition id as in :class:`SortedFedAvg`: a failed client, mismatched
    shapes, NaN/Inf weights or an unusable surrogate leave that client out (logged with the reason), and a client
    without surrogate is merged by data-free weight matching. The surviving models are merged by ``merge`` (a
    :class:`fedmerge.merge.MergeConfig`, STE by default) along ``schedule`` ("tree" or "all-to-one"), the pairwise
    merges of a tree level running on ``runner`` (default: in this process).

    ``model`` is an architecture template (any model with ``permutation_spec()``). ``clients_start_from_global``
    tells clients whether to train from the sent weights (usual FL) or from their own initialisation (one-shot
    merging of independently trained models). Federated evaluation is off by default (``fraction_evaluate=0``):
    evaluate the merged model on the server with ``evaluate_fn``. With ``finetune`` (a
    :class:`fedmerge.train.TrainConfig`), the merged model is then trained further on the union of the surrogates.
    With ``distill`` (a :class:`fedmerge.merge.distill.DistillConfig`), the clients' ensemble (weighted by sample
    counts) is distilled into the merged model on augmented, mixed-up surrogate images (after any fine-tuning).
    After a round, ``merge_steps`` lists the pairwise merges and ``merge_only_state`` holds the merged weights
    before fine-tuning or distillation, besides what :class:`SortedFedAvg` records.
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
        image_shape: tuple[int, int, int] | None = None,
        num_partitions: int | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown merge schedule {schedule!r}; choose from {SCHEDULES}")
        model_spec(model)  # TypeError unless the model is a PermutableModel
        if num_classes is None:
            head = last_linear(model)
            if head is None:
                raise ValueError("cannot tell the number of classes from the model: pass num_classes")
            num_classes = head.out_features
        super().__init__(
            num_classes,
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            image_shape=image_shape,
            num_partitions=num_partitions,
        )
        self.model = model
        self.merge = merge if merge is not None else MergeConfig()
        self.schedule = schedule
        self.runner: MergeRunner = runner if runner is not None else SequentialRunner()
        self.want_surrogate = want_surrogate
        self.clients_start_from_global = clients_start_from_global
        self.finetune = finetune
        self.distill = distill
        self.merge_only_state: State = {}
        self.merge_steps: list[MergeStep] = []
        self._reference = model.state_dict()  # until configure_train sends the global weights

    def merge_only(self) -> State | None:
        """The last round's merged weights before fine-tuning or distillation; None when neither ran."""
        if (self.finetune is None and self.distill is None) or not self.merge_only_state:
            return None
        return self.merge_only_state

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

    def combine(self, updates: list[ClientUpdate]) -> State:
        """Merge the usable updates (sorted by partition id) along the schedule."""
        for update in updates:
            if update.surrogate is None and self.want_surrogate:
                log.warning("%s sent no surrogate: it is merged by data-free weight matching", update.name)
        merged, self.merge_steps = run_schedule(
            self.schedule, self.model, [MergeNode.from_update(u) for u in updates], self.merge, self.runner
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
            teacher = client_ensemble(self.model, updates)
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


def client_ensemble(template: nn.Module, updates: list[ClientUpdate]) -> Ensemble:
    """The clients' models as one output ensemble, each weighted by its sample count."""
    return Ensemble([load_state(template, u.state) for u in updates], [u.num_examples for u in updates])
