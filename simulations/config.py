"""The Flower run config (``[tool.flwr.app.config]``, keys with dashes) as typed settings for both apps.

``DEFAULT_RUN_CONFIG`` is what ``pyproject.toml`` declares; :func:`settings_from_run_config` checks a run config
(missing keys take these defaults, unknown keys, wrong types and bad values are errors naming the key) and returns
:class:`RunSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from fedmerge.align.universe import UNIVERSE_METHODS, UniverseMethod
from fedmerge.federation import SPLITS, FederationSpec
from fedmerge.merge import CORRECTIONS, METHODS, MergeConfig, NPConfig, STEConfig
from fedmerge.merge.distill import DISTILL_LOSSES, DistillConfig, DistillLoss
from fedmerge.merge.methods import MethodName
from fedmerge.merge.pairwise import Correction
from fedmerge.models import MODEL_NAMES
from fedmerge.surrogate import CONDENSED_INIT, SURROGATE_KINDS, CondenseConfig, SurrogateConfig
from fedmerge.train import TrainConfig
from strategies.defences import SURROGATE_ACTIONS, Defences
from strategies.merge_strategy import ENSEMBLE_WEIGHTINGS, EnsembleWeighting
from strategies.schedule import SCHEDULES, Schedule

STRATEGIES: tuple[str, ...] = ("merge", "fedavg")
"""Server strategies: merge the clients' models pairwise, or Flower's FedAvg."""
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

ConfigValue = bool | int | float | str
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class _Key:
    """One run-config key: its default, the Python type it must have, and its allowed values."""

    default: ConfigValue
    kind: type
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    exclusive: bool = False  # the minimum itself is not allowed
    below: float | None = None  # values must be smaller than this
    maximum: float | None = None  # values must not exceed this

    def check(self, key: str, value: object) -> ConfigValue:
        """``value`` if it is valid for this key (ints accepted for float keys); ValueError naming ``key``."""
        allowed = (int, float) if self.kind is float else (self.kind,)
        if isinstance(value, bool) is not (self.kind is bool) or not isinstance(value, allowed):
            raise ValueError(
                f"run config {key!r} must be {_TYPE_NAMES[self.kind]}, got {value!r} ({type(value).__name__})"
            )
        if self.choices and value not in self.choices:
            raise ValueError(f"run config {key!r} must be one of {', '.join(self.choices)}, got {value!r}")
        checked = cast(ConfigValue, value)
        too_small = (
            self.minimum is not None
            and isinstance(checked, (int, float))
            and (checked <= self.minimum if self.exclusive else checked < self.minimum)
        )
        if too_small:
            bound = f"> {self.minimum}" if self.exclusive else f">= {self.minimum}"
            raise ValueError(f"run config {key!r} must be {bound}, got {value!r}")
        if self.below is not None and isinstance(checked, (int, float)) and not checked < self.below:
            raise ValueError(f"run config {key!r} must be < {self.below}, got {value!r}")
        if self.maximum is not None and isinstance(checked, (int, float)) and checked > self.maximum:
            raise ValueError(f"run config {key!r} must be <= {self.maximum}, got {value!r}")
        return float(checked) if self.kind is float else checked


_KEYS: dict[str, _Key] = {
    # data and its split among clients
    "dataset": _Key("digits", str),
    "split": _Key("disjoint", str, SPLITS),
    "alpha": _Key(0.5, float, minimum=0, exclusive=True),
    "min-size": _Key(10, int, minimum=0),
    "data-root": _Key("", str),
    # model and local training
    "model": _Key("mlp", str, MODEL_NAMES),
    "width": _Key(0, float, minimum=0),
    "epochs": _Key(20, int, minimum=0),
    "lr": _Key(0.05, float, minimum=0, exclusive=True),
    "batch-size": _Key(64, int, minimum=1),
    "optimizer": _Key("sgd", str, OPTIMIZERS),
    "surrogate": _Key("random", str, SURROGATE_KINDS),
    "per-class": _Key(10, int, minimum=1),
    "condense-iterations": _Key(0, int, minimum=0),  # networks condensation matches on (0: the library's default)
    # server
    "strategy": _Key("merge", str, STRATEGIES),
    "method": _Key("ste", str, METHODS),
    "schedule": _Key("tree", str, SCHEDULES),
    "alignment": _Key("merge-many", str, UNIVERSE_METHODS),
    "alignment-iters": _Key(100, int, minimum=1),
    "correction": _Key("auto", str, CORRECTIONS),
    "ste-steps": _Key(200, int, minimum=0),
    "np-steps": _Key(200, int, minimum=0),
    "num-rounds": _Key(1, int, minimum=1),
    "merge-workers": _Key(2, int, minimum=0),
    "finetune-epochs": _Key(0, int, minimum=0),
    "finetune-lr": _Key(0.01, float, minimum=0, exclusive=True),
    "distill-steps": _Key(0, int, minimum=0),
    "distill-lr": _Key(0.001, float, minimum=0, exclusive=True),
    "distill-shift": _Key(2, int, minimum=0),
    "distill-mixup": _Key(1.0, float, minimum=0),
    "distill-temperature": _Key(1.0, float, minimum=0, exclusive=True),
    "distill-label-weight": _Key(1.0, float, minimum=0),
    "distill-bank": _Key(0, int, minimum=0),
    "distill-rotate": _Key(0.0, float, minimum=0),
    "distill-scale": _Key(0.0, float, minimum=0, below=1),  # images scaled by 1 +- it
    "distill-weight-decay": _Key(5e-4, float, minimum=0),
    "distill-cutmix": _Key(0.0, float, minimum=0, maximum=1),  # share of batches mixed by CutMix, not mixup
    "distill-boundary": _Key(0.0, float, minimum=0, maximum=1),  # share of the bank moved to teacher boundaries
    "distill-elastic": _Key(0.0, float, minimum=0),  # elastic distortion's scale in pixels (0: none)
    "distill-loss": _Key("kl", str, DISTILL_LOSSES),  # the distillation term: KL, or MSE of centred logits
    "ensemble-weights": _Key("examples", str, ENSEMBLE_WEIGHTINGS),
    "same-init": _Key(False, bool),
    # defences against hostile clients (strategies.defences)
    "defences": _Key(True, bool),
    "max-count-ratio": _Key(3.0, float, minimum=0),
    "max-weight-share": _Key(1.0, float, minimum=0, exclusive=True),
    "max-share-ratio": _Key(1.25, float, minimum=0),
    "norm-outlier-ratio": _Key(10.0, float, minimum=0),
    "model-check-ratio": _Key(0.25, float, minimum=0),
    "surrogate-check": _Key("leave-out", str, SURROGATE_ACTIONS),
    "surrogate-check-ratio": _Key(0.5, float, minimum=0),
    "seed": _Key(0, int),
    "results-dir": _Key("results/runs", str),
    "client-cache": _Key("", str),
}

DEFAULT_RUN_CONFIG: dict[str, ConfigValue] = {key: spec.default for key, spec in _KEYS.items()}
"""The run config's keys and defaults, as ``[tool.flwr.app.config]`` in ``pyproject.toml`` declares them."""


@dataclass(frozen=True)
class RunSettings:
    """Typed settings of one Flower run, shared by the ClientApp and the ServerApp.

    ``width`` None means the model's default; ``merge_workers`` is the number of Ray tasks per merge-tree level
    (0: merge in the server process); ``clients_start_from_global``: clients train from the server's weights
    rather than from their own initialisation; ``finetune_epochs``: epochs of fine-tuning the merged model on the
    union of the surrogates (0: none); ``client_cache``: folder of trained client models, surrogates and
    reference distillations reused across runs ("" for none, see :mod:`simulations.client_cache`); ``defences``:
    what the server does against hostile clients (:class:`strategies.defences.Defences`).
    """

    federation: FederationSpec = field(default_factory=FederationSpec)
    model: str = "mlp"
    width: float | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=0.05, batch_size=64))
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    strategy: str = "merge"
    method: MethodName = "ste"
    schedule: Schedule = "tree"
    alignment: UniverseMethod = "merge-many"
    alignment_iters: int = 100
    correction: Correction = "auto"
    ste_steps: int = 200
    np_steps: int = 200
    num_rounds: int = 1
    merge_workers: int = 2
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    distill_steps: int = 0
    distill_lr: float = 0.001
    distill_shift: int = 2
    distill_mixup: float = 1.0
    distill_temperature: float = 1.0
    distill_label_weight: float = 1.0
    distill_bank: int = 0
    distill_rotate: float = 0.0
    distill_scale: float = 0.0
    distill_weight_decay: float = 5e-4
    distill_cutmix: float = 0.0
    distill_boundary: float = 0.0
    distill_elastic: float = 0.0
    distill_loss: DistillLoss = "kl"
    ensemble_weights: EnsembleWeighting = "examples"
    clients_start_from_global: bool = False
    defences: Defences = field(default_factory=Defences)
    seed: int = 0
    results_dir: str = "results/runs"
    client_cache: str = ""

    def finetune_config(self) -> TrainConfig | None:
        """How the server fine-tunes the merged model on the union of the surrogates (None: it does not)."""
        if not self.finetune_epochs:
            return None
        return dataclasses.replace(self.train, epochs=self.finetune_epochs, lr=self.finetune_lr)

    def distill_config(self) -> DistillConfig | None:
        """How the server distils the clients' ensemble into the merged model (None: it does not). The same recipe
        without a teacher trains the pooled-surrogates baseline of the results row."""
        if not self.distill_steps:
            return None
        return self.recipe()

    def recipe(self, teacher: bool = True) -> DistillConfig:
        """The server-side training recipe (steps, learning rate, shifts, mixup, temperature, label weight, teacher
        bank) of the run config; with ``distill-steps`` = 0 it uses 2000 steps. Without a ``teacher`` (the
        pooled-surrogates baseline) the labels are all there is to learn from: their weight is 1."""
        return DistillConfig(
            steps=self.distill_steps or 2000,
            lr=self.distill_lr,
            shift=self.distill_shift,
            mixup=self.distill_mixup,
            temperature=self.distill_temperature,
            label_weight=self.distill_label_weight if teacher else 1.0,
            bank=self.distill_bank if teacher else 0,
            rotate=self.distill_rotate,
            scale=self.distill_scale,
            weight_decay=self.distill_weight_decay,
            cutmix=self.distill_cutmix,
            boundary=self.distill_boundary if teacher else 0.0,
            elastic=self.distill_elastic,
            loss=self.distill_loss,
        )

    def merge_config(self) -> MergeConfig:
        """The pairwise merge the server runs."""
        return MergeConfig(
            method=self.method,
            correction=self.correction,
            ste=STEConfig(steps=self.ste_steps),
            np=NPConfig(steps=self.np_steps),
            seed=self.seed,
            alignment=self.alignment,
            alignment_iters=self.alignment_iters,
        )


def _checked(run_config: Mapping[str, object]) -> dict[str, ConfigValue]:
    """Every key's value (defaults filled in), each checked; ValueError for unknown keys or bad values."""
    unknown = sorted(set(run_config) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown run config keys {unknown}; valid keys: {', '.join(_KEYS)}")
    return {key: spec.check(key, run_config.get(key, spec.default)) for key, spec in _KEYS.items()}


def _federation(values: Mapping[str, ConfigValue], num_clients: int) -> FederationSpec:
    try:
        return FederationSpec(
            dataset=str(values["dataset"]),
            split=str(values["split"]),
            num_clients=num_clients,
            alpha=float(values["alpha"]),
            min_size=int(values["min-size"]),
            seed=int(values["seed"]),
            data_root=str(values["data-root"]) or None,
        )
    except ValueError as err:
        raise ValueError(f"run config 'dataset' / 'split' with {num_clients} clients: {err}") from err


def _defences(values: Mapping[str, ConfigValue]) -> Defences:
    """The defences of the run config; ValueError naming the key for a value out of range."""
    ranges = {
        "max-count-ratio": ("0 (no cap) or >= 1", lambda v: v == 0 or v >= 1),
        "max-weight-share": ("<= 1 (1: no cap)", lambda v: v <= 1),
        "max-share-ratio": ("0 (no cap) or >= 1", lambda v: v == 0 or v >= 1),
        "norm-outlier-ratio": ("0 (no check) or > 1", lambda v: v == 0 or v > 1),
        "model-check-ratio": ("< 1 (0: no check)", lambda v: v < 1),
        "surrogate-check-ratio": ("< 1", lambda v: v < 1),
    }
    for key, (allowed, ok) in ranges.items():
        if not ok(float(values[key])):
            raise ValueError(f"run config {key!r} must be {allowed}, got {values[key]!r}")
    return Defences(
        enabled=bool(values["defences"]),
        max_count_ratio=float(values["max-count-ratio"]),
        max_weight_share=float(values["max-weight-share"]),
        max_share_ratio=float(values["max-share-ratio"]),
        norm_outlier_ratio=float(values["norm-outlier-ratio"]),
        model_ratio=float(values["model-check-ratio"]),
        surrogate_check=str(values["surrogate-check"]),
        surrogate_ratio=float(values["surrogate-check-ratio"]),
    )


def _condense_config(values: Mapping[str, ConfigValue]) -> CondenseConfig:
    """The condensation's knobs: the run config's for a condensed surrogate, the library's defaults for any other
    kind (condensation does not run there, and a surrogate's cache key must not change with them)."""
    if values["surrogate"] not in CONDENSED_INIT:
        return CondenseConfig()
    return CondenseConfig(iterations=int(values["condense-iterations"]) or None)


def settings_from_run_config(run_config: Mapping[str, object], num_clients: int) -> RunSettings:
    """Typed settings from a Flower run config for a federation of ``num_clients`` clients."""
    values = _checked(run_config)
    if values["model"] == "mlp" and values["width"] != int(values["width"]):
        raise ValueError(
            f"run config 'width' is the MLP's number of hidden units and must be whole, got {values['width']}"
        )
    if values["distill-boundary"] and not values["distill-bank"]:
        raise ValueError(
            "run config 'distill-boundary' moves images of the teacher bank: set 'distill-bank' > 0 as well, got "
            f"distill-boundary {values['distill-boundary']} with distill-bank 0"
        )
    return RunSettings(
        federation=_federation(values, num_clients),
        model=str(values["model"]),
        width=float(values["width"]) or None,
        train=TrainConfig(
            epochs=int(values["epochs"]),
            lr=float(values["lr"]),
            batch_size=int(values["batch-size"]),
            optimizer=str(values["optimizer"]),
        ),
        surrogate=SurrogateConfig(
            kind=str(values["surrogate"]),
            per_class=int(values["per-class"]),
            condense=_condense_config(values),
        ),
        strategy=str(values["strategy"]),
        method=cast(MethodName, values["method"]),
        schedule=cast(Schedule, values["schedule"]),
        alignment=cast(UniverseMethod, values["alignment"]),
        alignment_iters=int(values["alignment-iters"]),
        correction=cast(Correction, values["correction"]),
        ste_steps=int(values["ste-steps"]),
        np_steps=int(values["np-steps"]),
        num_rounds=int(values["num-rounds"]),
        merge_workers=int(values["merge-workers"]),
        finetune_epochs=int(values["finetune-epochs"]),
        finetune_lr=float(values["finetune-lr"]),
        distill_steps=int(values["distill-steps"]),
        distill_lr=float(values["distill-lr"]),
        distill_shift=int(values["distill-shift"]),
        distill_mixup=float(values["distill-mixup"]),
        distill_temperature=float(values["distill-temperature"]),
        distill_label_weight=float(values["distill-label-weight"]),
        distill_bank=int(values["distill-bank"]),
        distill_rotate=float(values["distill-rotate"]),
        distill_scale=float(values["distill-scale"]),
        distill_weight_decay=float(values["distill-weight-decay"]),
        distill_cutmix=float(values["distill-cutmix"]),
        distill_boundary=float(values["distill-boundary"]),
        distill_elastic=float(values["distill-elastic"]),
        distill_loss=cast(DistillLoss, values["distill-loss"]),
        ensemble_weights=cast(EnsembleWeighting, values["ensemble-weights"]),
        clients_start_from_global=bool(values["same-init"]),
        defences=_defences(values),
        seed=int(values["seed"]),
        results_dir=str(values["results-dir"]),
        client_cache=str(values["client-cache"]),
    )
