"""The Flower ServerApp run by ``flwr run .``: collect every client's weights and surrogate, merge them (or run
FedAvg), score the result on the global test set and on each client's domain, and write a results row and the
merged model under ``results-dir``.

Settings come from ``[tool.flwr.app.config]`` in ``pyproject.toml`` and ``flwr run . --run-config 'key=value'``
(see :mod:`simulations.config`).
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedmerge.device import derive_seed, seed_everything
from fedmerge.federation import global_test_data
from fedmerge.merge.functional import load_state
from fedmerge.models import build_model, reinitialized_copy
from simulations.config import DEFAULT_RUN_CONFIG, RunSettings, settings_from_run_config
from simulations.report import (
    RunOutcome,
    print_scores,
    results_row,
    save_outputs,
    score_models,
)
from strategies import PermutationMerge, SortedFedAvg, make_runner

log = logging.getLogger(__name__)
app = ServerApp()


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
