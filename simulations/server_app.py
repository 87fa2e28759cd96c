"""The Flower ServerApp run by ``flwr run .``: collect every client's weights and surrogate, merge them (or run
FedAvg), score the result on the global test set and on each client's domain, and write a results row and the
merged model under ``results-dir``.

Settings come from ``[tool.flwr.app.config]`` in ``pyproject.toml`` and ``flwr run . --run-config 'key=value'``
(see :mod:`simulations.config`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedmerge.device import default_device, derive_seed, seed_everything
from fedmerge.federation import global_test_data
from fedmerge.merge.functional import load_state
from fedmerge.models import build_model, reinitialized_copy
from fedmerge.train import evaluate
from simulations.config import DEFAULT_RUN_CONFIG, RunSettings, settings_from_run_config
from simulations.report import RunOutcome, finish_run
from strategies import PermutationMerge, SortedFedAvg, make_runner, send_logs_to_flower
from strategies.fedavg import LIBRARY_LOGGERS

log = logging.getLogger(__name__)
app = ServerApp()


def show_library_logs() -> None:
    """Send fedmerge's and the strategies' INFO logs through Flower's log handlers (they show in ``--stream``).

    Importing :mod:`strategies` already does it (:func:`strategies.send_logs_to_flower`); this also sets the
    library loggers to INFO when a level was set before.
    """
    send_logs_to_flower()
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


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
    test = global_test_data(settings.federation)
    num_classes, image_shape = test.num_classes, test.image_shape
    if settings.strategy == "fedavg":
        return SortedFedAvg(
            num_classes,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
            image_shape=image_shape,
            num_partitions=num_clients,
            fraction_evaluate=0.0,  # the ClientApp has no evaluate handler: the server scores the models
            defences=settings.defences,
        )
    return PermutationMerge(
        template,
        settings.merge_config(),
        settings.schedule,
        make_runner(settings.merge_workers),
        clients_start_from_global=settings.clients_start_from_global,
        num_classes=num_classes,
        finetune=settings.finetune_config(),
        distill=settings.distill_config(),
        ensemble_weighting=settings.ensemble_weights,
        image_shape=image_shape,
        num_partitions=num_clients,
        fraction_evaluate=0.0,
        min_train_nodes=num_clients,
        min_available_nodes=num_clients,
        defences=settings.defences,
    )


def round_evaluation(
    settings: RunSettings, template: nn.Module, accuracies: dict[int, float]
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """A Flower ``evaluate_fn`` that records the global test accuracy (%) after each round in ``accuracies``."""
    test = global_test_data(settings.federation)

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # the untrained initial model
            return None
        model = load_state(template, arrays.to_torch_state_dict())
        accuracies[server_round] = evaluate(model, test, device=default_device())
        log.info("round %d: global test accuracy %.2f%%", server_round, accuracies[server_round])
        return MetricRecord({"global-accuracy": accuracies[server_round]})

    return evaluate_round


def run_federation(grid: Grid, settings: RunSettings, num_clients: int) -> RunOutcome:
    """Run the configured strategy for ``num_rounds`` rounds; raise when no client could be used."""
    template = template_model(settings)
    strategy = make_strategy(settings, template, num_clients)
    accuracies: dict[int, float] = {}
    result = strategy.start(
        grid,
        ArrayRecord(template.state_dict()),
        num_rounds=settings.num_rounds,
        evaluate_fn=round_evaluation(settings, template, accuracies),
    )
    if not strategy.client_updates:
        reasons = "; ".join(f"{who}: {why}" for who, why in strategy.left_out) or "no replies"
        raise RuntimeError(f"no client update could be used in the last round ({reasons})")
    model = load_state(template, result.arrays.to_torch_state_dict())
    merge_only = strategy.merge_only() if isinstance(strategy, PermutationMerge) else None
    return RunOutcome(
        model,
        strategy.client_updates,
        strategy.left_out,
        strategy.merge_seconds,
        accuracies,
        merge_only,
        strategy.round_upload_bytes,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Merge (or average) the clients' models, score them and save the results."""
    started = time.perf_counter()
    show_library_logs()
    num_clients = connected_clients(grid)
    settings = settings_from_run_config(context.run_config, num_clients)
    run_config = DEFAULT_RUN_CONFIG | dict(context.run_config)
    seed_everything(settings.seed)
    log.info(
        "fedmerge run: %d clients, %s split of %s, strategy %s (%s, %s schedule)",
        num_clients,
        settings.federation.split,
        settings.federation.dataset,
        settings.strategy,
        settings.method,
        settings.schedule,
    )
    outcome = run_federation(grid, settings, num_clients)
    finish_run(settings, run_config, context.run_id, num_clients, outcome, time.perf_counter() - started)
