"""The Flower run's computation without Flower or Ray's client actors: the same clients, strategy, scores and
results row, with the clients run one after another in this process. Used to measure what the Flower simulation
adds (``python -m simulations.sweep --backend in-process``) and to run a federation from Python."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from fedmerge.device import default_device, seed_everything
from fedmerge.federation import global_test_data
from fedmerge.merge.functional import load_state
from fedmerge.train import evaluate
from simulations.client_app import client_work
from simulations.config import DEFAULT_RUN_CONFIG, RunSettings, settings_from_run_config
from simulations.report import RunOutcome, finish_run
from simulations.server_app import make_strategy, template_model
from strategies import PermutationMerge
from strategies.fedavg import upload_bytes
from strategies.messages import ClientUpdate
from strategies.validation import check_updates

log = logging.getLogger(__name__)


def client_updates(
    settings: RunSettings,
    num_clients: int,
    server_round: int,
    start: dict[str, torch.Tensor] | None,
    want_surrogate: bool,
) -> list[ClientUpdate]:
    """Every client's round (see :func:`simulations.client_app.client_work`), one after another, as the server
    would read their replies (the partition id standing in for the node id)."""
    device = default_device()
    updates = []
    for partition_id in range(num_clients):
        work = client_work(settings, partition_id, server_round, start, want_surrogate, device)
        updates.append(
            ClientUpdate(partition_id, partition_id, work.state, work.num_examples, work.surrogate, work.metrics)
        )
    return updates


def federate_in_process(settings: RunSettings, num_clients: int) -> RunOutcome:
    """Run ``settings.num_rounds`` rounds of the configured strategy over ``num_clients`` clients in this process."""
    template = template_model(settings)
    strategy = make_strategy(settings, template, num_clients)
    test, device = global_test_data(settings.federation), default_device()
    global_state: dict[str, torch.Tensor] = template.state_dict()
    accuracies: dict[int, float] = {}
    updates: list[ClientUpdate] = []
    merge_seconds = 0.0
    for server_round in range(1, settings.num_rounds + 1):
        start = global_state if strategy.starts_from_global(server_round) else None
        updates = client_updates(settings, num_clients, server_round, start, strategy.want_surrogate)
        began = time.perf_counter()
        # the checks aggregate_train runs on the replies (a diverged client's NaN weights are left out), then its
        # defences, which add to this round's left_out
        updates, strategy.left_out = check_updates(updates, global_state, strategy.num_classes, strategy.image_shape)
        strategy.round_upload_bytes[server_round] = upload_bytes(updates)
        updates = strategy.defend(updates)
        if updates:
            global_state = strategy.combine(updates)
        else:
            log.error("round %d: no usable client update: the global model stays as it was", server_round)
        merge_seconds = time.perf_counter() - began
        accuracies[server_round] = evaluate(load_state(template, global_state), test, device=device)
    merge_only = strategy.merge_only() if isinstance(strategy, PermutationMerge) else None
    return RunOutcome(
        load_state(template, global_state),
        updates,
        strategy.left_out,
        merge_seconds,
        accuracies,
        merge_only,
        strategy.round_upload_bytes,
    )


def run_in_process(run_config: Mapping[str, object], num_clients: int) -> dict:
    """What ``flwr run . --run-config ...`` with ``num_clients`` supernodes does, in this process; returns the
    results row (also appended to ``<results-dir>/runs.csv``)."""
    started = time.perf_counter()
    settings = settings_from_run_config(run_config, num_clients)
    seed_everything(settings.seed)
    outcome = federate_in_process(settings, num_clients)
    return finish_run(
        settings, DEFAULT_RUN_CONFIG | dict(run_config), 0, num_clients, outcome, time.perf_counter() - started
    )
