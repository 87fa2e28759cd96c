"""Checks that decide whether a client's update may enter the merge, with a reason when it may not."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from flwr.app import Message

from strategies.messages import ClientUpdate, InvalidReply, read_reply

log = logging.getLogger(__name__)


def state_problems(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> list[str]:
    """Why ``state`` cannot be merged with models shaped like ``reference`` (empty when it can)."""
    problems = []
    missing, extra = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
    if missing:
        problems.append(f"missing weights {missing}")
    if extra:
        problems.append(f"unexpected weights {extra}")
    for key in reference.keys() & state.keys():
        got, want = tuple(state[key].shape), tuple(reference[key].shape)
        if got != want:
            problems.append(f"{key} has shape {got}, expected {want}")
        elif state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            problems.append(f"{key} holds NaN or Inf values")
    return sorted(problems)


def surrogate_problems(update: ClientUpdate, image_shape: tuple[int, ...] | None, num_classes: int) -> list[str]:
    """Why ``update``'s surrogate is unusable (empty, wrong image shape, bad labels, NaN/Inf).

    Empty when the surrogate is fine or absent.
    """
    data = update.surrogate
    if data is None:
        return []
    if len(data) == 0:
        return ["sent an empty surrogate"]
    problems = []
    if image_shape is not None and data.image_shape != tuple(image_shape):
        problems.append(f"surrogate images have shape {data.image_shape}, expected {tuple(image_shape)}")
    if not bool(torch.isfinite(data.x).all()):
        problems.append("surrogate images hold NaN or Inf values")
    if int(data.y.min()) < 0 or int(data.y.max()) >= num_classes:
        problems.append(f"surrogate labels outside 0..{num_classes - 1}")
    return problems


def accept_replies(
    replies: Iterable[Message],
    reference: Mapping[str, torch.Tensor],
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """Read and check every reply; return the usable updates sorted by partition id, and (client, reason) for
    each reply left out. Every left-out reply is logged at WARNING level with its reason.

    Weights are checked against ``reference`` (the model sent to the clients); when it is empty, against the
    readable reply with the lowest partition id.
    """
    accepted: dict[int, ClientUpdate] = {}
    rejected: list[tuple[str, str]] = []
    readable: list[ClientUpdate] = []

    def leave_out(who: str, reason: str) -> None:
        log.warning("leaving out %s: %s", who, reason)
        rejected.append((who, reason))

    for message in replies:
        try:
            readable.append(read_reply(message, num_classes))
        except InvalidReply as err:
            leave_out(f"node {message.metadata.src_node_id}", str(err))
    readable.sort(key=lambda u: (u.partition_id, u.node_id))
    if not reference and readable:
        reference = readable[0].state
    for update in readable:
        problems = state_problems(update.state, reference) + surrogate_problems(update, image_shape, num_classes)
        if update.partition_id in accepted:
            problems.append(
                f"partition id {update.partition_id} was already sent by {accepted[update.partition_id].name}"
            )
        if problems:
            leave_out(update.name, "; ".join(problems))
            continue
        accepted[update.partition_id] = update
    return [accepted[pid] for pid in sorted(accepted)], rejected
