"""The Flower ServerApp run by ``flwr run .``: collect every client's weights and surrogate, merge them (or run
FedAvg), score the result on the global test set and on each client's domain, and write a results row and the
merged model under ``results-dir``.

Settings come from ``[tool.flwr.app.config]`` in ``pyproject.toml`` and ``flwr run . --run-config 'key=value'``
(see :mod:`simulations.config`).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.table import Table
from torch import nn

from fedmerge.device import default_device, derive_seed, seed_everything
from fedmerge.federation import client_train_data, global_test_data, label_distribution
from fedmerge.merge import Ensemble
from fedmerge.merge.functional import load_state
from fedmerge.models import build_model, reinitialized_copy
from simulations.config import DEFAULT_RUN_CONFIG, RunSettings, settings_from_run_config
from simulations.evaluation import scores
from simulations.results_io import save_rows
from simulations.versions import package_versions
from strategies import PermutationMerge, SortedFedAvg, make_runner
from strategies.messages import ClientUpdate

log = logging.getLogger(__name__)
app = ServerApp()


@dataclass
class RunOutcome:
    """What a finished run produced."""

    model: nn.Module
    updates: list[ClientUpdate]
    left_out: list[tuple[str, str]]
    merge_seconds: float


def show_library_logs() -> None:
    """Send fedmerge's and the strategies' INFO logs through Flower's log handlers (they show in ``--stream``)."""
    handlers = logging.getLogger("flwr").handlers
    for name in ("fedmerge", "strategies", "simulations"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False


def connected_clients(grid: Grid, timeout: float = 120.0) -> int:
    """The number of connected client nodes, once it has stopped changing for two seconds."""
    deadline, last, stable_since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(list(grid.get_node_ids()))
        if count != last:
            last, stable_since = count, time.monotonic()
        elif count > 0 and time.monotonic() - stable_since >= 2.0:
            return count
        time.sleep(0.5)
    if last <= 0:
        raise RuntimeError(f"no client node connected within {timeout:.0f} s")
    return last


def template_model(settings: RunSettings) -> nn.Module:
    """The run's architecture, initialised from the run seed (the weights the server sends first)."""
    test = global_test_data(settings.federation)
    model = build_model(settings.model, test.image_shape, test.num_classes, settings.width)
    return reinitialized_copy(model, derive_seed(settings.seed, "global-init"))


def make_strategy(settings: RunSettings, template: nn.Module, num_clients: int) -> PermutationMerge | SortedFedAvg:
    """The strategy the run config names, waiting for and sampling all ``num_clients`` clients."""
    nodes = {"min_train_nodes": num_clients, "min_available_nodes": num_clients}
    num_classes = global_test_data(settings.federation).num_classes
    if settings.strategy == "fedavg":
        return SortedFedAvg(num_classes, **nodes)
    return PermutationMerge(template, settings.merge_config(), settings.schedule, make_runner(settings.merge_workers),
                            clients_start_from_global=settings.clients_start_from_global, num_classes=num_classes, **nodes)


def run_federation(grid: Grid, settings: RunSettings, num_clients: int) -> RunOutcome:
    """Run the configured strategy for ``num_rounds`` rounds; raise when no client could be used."""
    template = template_model(settings)
    strategy = make_strategy(settings, template, num_clients)
    result = strategy.start(grid, ArrayRecord(template.state_dict()), num_rounds=settings.num_rounds)
    if not strategy.client_updates:
        reasons = "; ".join(f"{who}: {why}" for who, why in strategy.left_out) or "no replies"
        raise RuntimeError(f"no client update could be used in the last round ({reasons})")
    model = load_state(template, result.arrays.to_torch_state_dict())
    return RunOutcome(model, strategy.client_updates, strategy.left_out, strategy.merge_seconds)


def client_models(template: nn.Module, updates: list[ClientUpdate]) -> dict[str, nn.Module]:
    """Each client's own trained model, named ``client<k>``."""
    return {f"client{u.partition_id}": load_state(template, u.state) for u in updates}


def score_models(settings: RunSettings, outcome: RunOutcome) -> dict[str, dict[str, float]]:
    """Scores of the merged model, the clients' own models and their example-weighted ensemble."""
    spec = settings.federation
    distributions = {u.partition_id: label_distribution(client_train_data(spec, u.partition_id)) for u in outcome.updates}
    own = client_models(outcome.model, outcome.updates)
    ensemble = Ensemble(list(own.values()), [u.num_examples for u in outcome.updates])
    device = default_device()
    models = {"merged": outcome.model, **own, "ensemble": ensemble}
    return {name: scores(model, spec, distributions, device) for name, model in models.items()}


def _mean_metric(updates: list[ClientUpdate], name: str) -> float:
    values = [float(u.metrics[name]) for u in updates if name in u.metrics]
    return sum(values) / len(values) if values else float("nan")


def results_row(run_config: dict, run_id: int, num_clients: int, outcome: RunOutcome, table: dict[str, dict[str, float]], wall_seconds: float) -> dict:
    """One CSV row: the run config, who took part, every accuracy, sizes, wall times and package versions."""
    row: dict = {"finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "run-id": run_id}
    row |= {f"cfg_{k}": v for k, v in run_config.items()}
    row |= {"num-clients": num_clients, "clients-merged": len(outcome.updates), "clients-left-out": len(outcome.left_out),
            "left-out": "; ".join(f"{who}: {why}" for who, why in outcome.left_out)}
    for model, accuracies in table.items():
        row |= {f"acc_{model}_{where}": round(acc, 2) for where, acc in accuracies.items()}
    for name in ("train-seconds", "surrogate-seconds", "weights-bytes", "surrogate-bytes", "train-accuracy"):
        row[f"client-mean_{name}"] = _mean_metric(outcome.updates, name)
    row |= {"merge-seconds": round(outcome.merge_seconds, 3), "wall-seconds": round(wall_seconds, 3)}
    return row | {f"version_{k}": v for k, v in package_versions().items()}


def print_scores(table: dict[str, dict[str, float]], title: str) -> None:
    """A table of accuracies (%): one row per model, one column per test set."""
    columns = list(next(iter(table.values())).keys())
    if len(columns) > 10:  # many clients: keep the global and mean columns
        columns = [c for c in columns if not c.startswith("client") or c == "clients-mean"]
    view = Table()
    view.add_column("model")
    for column in columns:
        view.add_column(column.replace("client", "client ") if column != "clients-mean" else "mean over clients", justify="right")
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
    torch.save({"state_dict": outcome.model.state_dict(), "model": settings.model, "width": settings.width,
                "run_config": run_config, "results": row}, model_path)
    csv_path = folder / "runs.csv"
    save_rows(csv_path, [row | {"model-file": str(model_path)}])
    return csv_path, model_path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Merge (or average) the clients' models, score them and save the results."""
    started = time.perf_counter()
    show_library_logs()
    num_clients = connected_clients(grid)
    settings = settings_from_run_config(context.run_config, num_clients)
    run_config = DEFAULT_RUN_CONFIG | dict(context.run_config)
    seed_everything(settings.seed)
    log.info("fedmerge run: %d clients, %s split of %s, strategy %s (%s, %s schedule)", num_clients,
             settings.federation.split, settings.federation.dataset, settings.strategy, settings.method, settings.schedule)
    outcome = run_federation(grid, settings, num_clients)
    table = score_models(settings, outcome)
    label = "FedAvg" if settings.strategy == "fedavg" else f"{settings.method} merge ({settings.schedule})"
    print_scores(table, f"Accuracy (%) of the {label} and of each client's own model")
    row = results_row(run_config, context.run_id, num_clients, outcome, table, time.perf_counter() - started)
    csv_path, model_path = save_outputs(settings, run_config, row, outcome)
    log.info("results row appended to %s; merged model saved to %s", csv_path, model_path)
