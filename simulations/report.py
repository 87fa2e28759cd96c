"""What a finished run reports: scores of the merged, client and ensemble models, the results row, the table
printed at the end, and the files written under ``results-dir``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fedmerge.data.images import concat
from fedmerge.device import default_device, derive_seed
from fedmerge.federation import client_train_data, label_distribution
from fedmerge.merge import Ensemble, train_from_scratch
from fedmerge.merge.distill import DistillConfig, distill
from fedmerge.merge.functional import load_state
from fedmerge.models import reinitialized_copy
from simulations.client_cache import ClientCache, distillation_key
from simulations.config import RunSettings
from simulations.evaluation import scores, scoring_data
from simulations.memory import peak_gpu_mb, peak_rss_mb
from simulations.results_io import save_rows
from simulations.versions import version_columns
from strategies.merge_strategy import EnsembleWeighting, ensemble_weights, model_num_classes
from strategies.messages import ClientUpdate

log = logging.getLogger(__name__)

SURROGATE_EPOCHS = 50
"""Epochs of the train-on-surrogates baseline."""


@dataclass
class RunOutcome:
    """What a finished run produced: the final model, the last round's client updates and left-out clients, the
    seconds the last round's merge took, and the global test accuracy (%) after each round."""

    model: nn.Module
    updates: list[ClientUpdate]
    left_out: list[tuple[str, str]]
    merge_seconds: float
    round_accuracies: dict[int, float] = field(default_factory=dict)
    merge_only_state: dict[str, torch.Tensor] | None = None
    round_upload_bytes: dict[int, int] = field(default_factory=dict)


def client_models(template: nn.Module, updates: list[ClientUpdate]) -> dict[str, nn.Module]:
    """Each client's own trained model, named ``client<k>``."""
    return {f"client{u.partition_id}": load_state(template, u.state) for u in updates}


def surrogate_trained_model(
    settings: RunSettings, template: nn.Module, updates: list[ClientUpdate], device: torch.device | str = "cpu"
) -> nn.Module | None:
    """The "train on the surrogates" baseline: a fresh model trained on the union of the clients' surrogates for
    ``SURROGATE_EPOCHS`` epochs (a surrogate is tiny), otherwise with the clients' training settings (None when no
    client sent one)."""
    parts = [u.surrogate for u in updates if u.surrogate is not None]
    if not parts:
        return None
    config = dataclasses.replace(settings.train, epochs=SURROGATE_EPOCHS)
    return train_from_scratch(
        template,
        concat(parts, "surrogate union"),
        config,
        seed=derive_seed(settings.seed, "surrogate-trained"),
        device=device,
    )


def recipe_models(
    settings: RunSettings,
    template: nn.Module,
    updates: list[ClientUpdate],
    teacher: nn.Module,
    device: torch.device | str = "cpu",
    restored: set[str] | None = None,
) -> dict[str, nn.Module]:
    """The baselines trained with the server's distillation recipe (:meth:`RunSettings.recipe`): a fresh model
    trained on the pooled surrogates alone (``pooled-recipe``) and the clients' ensemble distilled into a fresh model
    (``distilled-fresh``, no merge). Empty when no client sent a surrogate or the run distils nothing.

    With ``settings.client_cache`` set, each is taken from the cache when the same inputs were distilled before (its
    name is then added to ``restored``) and saved there when it is new, so a run stopped after the first picks up
    at the second."""
    parts = [u.surrogate for u in updates if u.surrogate is not None]
    if not parts or not settings.distill_steps:
        return {}
    pooled = concat(parts, "surrogate union")
    fresh = reinitialized_copy(template, derive_seed(settings.seed, "recipe-init"))
    seed = derive_seed(settings.seed, "recipe")
    cache = ClientCache(settings.client_cache) if settings.client_cache else None
    restored = set() if restored is None else restored

    def distilled(name: str, teacher: nn.Module | None, recipe: DistillConfig) -> nn.Module:
        key = distillation_key(fresh, pooled, teacher, recipe, seed, device) if cache else ""
        state = cache.load_distilled(key) if cache else None
        if state is not None:
            restored.add(name)
            log.info("%s: restored from the cache (%s)", name, key)
            return load_state(fresh, state)
        model = distill(fresh, pooled, teacher, recipe, seed, device).model
        if cache:
            cache.save_distilled(key, model.state_dict())
        return model

    return {
        "pooled-recipe": distilled("pooled-recipe", None, settings.recipe(teacher=False)),
        "distilled-fresh": distilled("distilled-fresh", teacher, settings.recipe()),
    }


def score_models(
    settings: RunSettings, outcome: RunOutcome, restored: set[str] | None = None
) -> dict[str, dict[str, float]]:
    """Scores of the merged model (and of the merge alone, before fine-tuning or distillation), the clients' own
    models, their ensemble (weighted as the distillation teacher is: ``ensemble-weights``; also by sample count
    when that is another weighting) and, when the clients sent surrogates, a model trained on the
    surrogates alone (plain, and with the server's recipe) and the ensemble distilled into a fresh model (the names
    of those two taken from the client cache are added to ``restored``)."""
    spec = settings.federation
    distributions = {
        u.partition_id: label_distribution(client_train_data(spec, u.partition_id)) for u in outcome.updates
    }
    own = client_models(outcome.model, outcome.updates)
    members, num_classes = list(own.values()), model_num_classes(outcome.model)

    def ensemble_of(weighting: EnsembleWeighting) -> Ensemble:
        return Ensemble(members, ensemble_weights(outcome.updates, weighting, num_classes))

    ensemble = ensemble_of(settings.ensemble_weights)
    device = default_device()
    models = {"merged": outcome.model, **own, "ensemble": ensemble}
    if settings.ensemble_weights != "examples":  # the sample-weighted ensemble too, for comparison
        models["ensemble-examples"] = ensemble_of("examples")
    if outcome.merge_only_state is not None:
        models["merge-only"] = load_state(outcome.model, outcome.merge_only_state)
    on_surrogates = surrogate_trained_model(settings, outcome.model, outcome.updates, device)
    if on_surrogates is not None:
        models["surrogate-trained"] = on_surrogates
    models |= recipe_models(settings, outcome.model, outcome.updates, ensemble, device, restored)
    tests = scoring_data(spec, distributions)
    return {name: scores(model, tests, device) for name, model in models.items()}


def _metric_values(updates: list[ClientUpdate], name: str) -> list[float]:
    values = (u.metrics.get(name) for u in updates)
    return [float(v) for v in values if isinstance(v, (int, float))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def results_row(
    run_config: dict,
    run_id: int,
    num_clients: int,
    outcome: RunOutcome,
    table: dict[str, dict[str, float]],
    wall_seconds: float,
    references_cached: int = 0,
) -> dict:
    """One CSV row: the run config, who took part, every accuracy (``acc_<model>_<test set>``, and the global
    accuracy after each round), bytes each client uploaded, wall times of client training, surrogate building and
    merging, how many client models and reference distillations came from the cache, peak memory, and package
    versions."""
    row: dict = {"finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "run-id": run_id}
    row |= {f"cfg_{k}": v for k, v in run_config.items()}
    row |= {
        "num-clients": num_clients,
        "clients-merged": len(outcome.updates),
        "clients-left-out": len(outcome.left_out),
        "left-out": "; ".join(f"{who}: {why}" for who, why in outcome.left_out),
    }
    for model, accuracies in table.items():
        row |= {f"acc_{model}_{where}": round(acc, 2) for where, acc in accuracies.items()}
    row |= {f"acc_round{r}_global": round(acc, 2) for r, acc in sorted(outcome.round_accuracies.items())}
    uploaded = 0
    for r, sent in sorted(outcome.round_upload_bytes.items()):
        uploaded += sent
        row[f"bytes-uploaded_round{r}"] = uploaded  # cumulative over rounds, all clients
    for name in ("train-seconds", "surrogate-seconds", "weights-bytes", "surrogate-bytes", "train-accuracy"):
        row[f"client-mean_{name}"] = _mean(_metric_values(outcome.updates, name))
    for name in ("train-seconds", "surrogate-seconds", "peak-rss-mb"):
        row[f"client-max_{name}"] = max(_metric_values(outcome.updates, name), default=float("nan"))
    row["clients-cached"] = int(sum(_metric_values(outcome.updates, "cached")))
    row["references-cached"] = references_cached
    row |= {
        "merge-seconds": round(outcome.merge_seconds, 3),
        "wall-seconds": round(wall_seconds, 3),
        "server-peak-rss-mb": round(peak_rss_mb(), 1),
        "server-peak-gpu-mb": round(peak_gpu_mb(), 1),
    }
    return row | version_columns()


def print_scores(table: dict[str, dict[str, float]], title: str) -> None:
    """A table of accuracies (%): one row per model, one column per test set."""
    columns = list(next(iter(table.values())).keys())
    if len(columns) > 10:  # many clients: keep the global and mean columns
        columns = [c for c in columns if not c.startswith("client") or c == "clients-mean"]
    view = Table()
    view.add_column("model")
    for column in columns:
        view.add_column(
            column.replace("client", "client ") if column != "clients-mean" else "mean over clients", justify="right"
        )
    for model, accuracies in table.items():
        view.add_row(model, *(f"{accuracies[c]:.1f}" for c in columns))
    console = Console(width=160)
    console.print(title)
    console.print(view)


def save_outputs(settings: RunSettings, run_config: dict, row: dict, outcome: RunOutcome) -> tuple[Path, Path]:
    """Append the results row to ``<results-dir>/runs.csv`` and save the merged model next to it."""
    folder = Path(settings.results_dir).expanduser().resolve()
    stamp = row["finished"].replace(":", "").replace("+0000", "")
    label = "fedavg" if settings.strategy == "fedavg" else f"{settings.method}-{settings.schedule}"
    model_path = folder / "models" / f"{stamp}-{label}-{row['run-id']}.pt"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": outcome.model.state_dict(),
            "model": settings.model,
            "width": settings.width,
            "run_config": run_config,
            "results": row,
        },
        model_path,
    )
    csv_path = folder / "runs.csv"
    save_rows(csv_path, [row | {"model-file": str(model_path)}])
    return csv_path, model_path


def finish_run(
    settings: RunSettings, run_config: dict, run_id: int, num_clients: int, outcome: RunOutcome, seconds_so_far: float
) -> dict:
    """Score the run's models, print the table, append the results row and save the model; return the row."""
    started = time.perf_counter()
    restored: set[str] = set()
    table = score_models(settings, outcome, restored)
    label = "FedAvg" if settings.strategy == "fedavg" else f"{settings.method} merge ({settings.schedule})"
    print_scores(table, f"Accuracy (%) of the {label} and of each client's own model")
    wall_seconds = seconds_so_far + time.perf_counter() - started
    row = results_row(run_config, run_id, num_clients, outcome, table, wall_seconds, len(restored))
    csv_path, model_path = save_outputs(settings, run_config, row, outcome)
    log.info("results row appended to %s; merged model saved to %s", csv_path, model_path)
    return row | {"model-file": str(model_path)}
