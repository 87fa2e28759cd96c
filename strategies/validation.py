"""Checks that decide whether a client's update may enter the merge, with a reason when it may not.

The rules (:func:`accept_replies` applies them; a round never ends because of a reply):

- a reply that cannot be read (:func:`strategies.messages.read_reply`: failed client, bad counts, non-numeric
  arrays, malformed surrogate) is left out; so is a reply whose reading or checking raises anything at all (the
  exception text is the reason);
- a partition id outside ``0..num_partitions-1`` is left out, when the server gives ``num_partitions``;
- **duplicate partition ids**: when several readable replies claim one partition id, *all* of them are left out
  (the reason names every node id), whatever their node ids or contents, so no client can displace another by
  claiming its id;
- **weights** must have the reference model's names and shapes; a tensor that is floating point in the reference
  must be floating point (float16/32/64 are cast to the reference dtype), finite and no larger than
  ``max_abs_weight`` (default :data:`MAX_ABS_WEIGHT` = 1e6) in absolute value; an integer tensor of the reference
  (BatchNorm's ``num_batches_tracked``) must be an integer tensor;
- **surrogate** (optional): non-empty, finite images no larger than ``max_abs_weight`` in absolute value, labels in
  ``0..num_classes-1``, images of shape ``image_shape``; when the server does not give ``image_shape``, the first
  accepted client's surrogate (lowest partition id) sets it and later clients whose images differ are left out. A
  bad surrogate leaves the whole client out (its sender is broken);
- **surrogate size caps**: a surrogate with more than ``max_surrogate_per_class`` images of one class or more than
  ``max_surrogate_total`` images in all is dropped with a warning naming the client, and the client's weights are
  still merged (as a client without surrogate: data-free weight matching).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch
from flwr.app import Message

from strategies.messages import ARRAYS_KEY, NUM_EXAMPLES, ClientUpdate, InvalidReply, read_reply

log = logging.getLogger(__name__)

MAX_ABS_WEIGHT = 1e6
"""Largest absolute value accepted in a floating-point weight or a surrogate pixel. Trained networks here stay far
below it (normalised inputs, weights of order 1, BatchNorm running variances of order 1e2 at most); above it sums
and similarity matrices overflow float32 (the assignment solver then fails) and one client dominates an average."""
MAX_SURROGATE_PER_CLASS = 500
"""Default cap on a client's surrogate images of one class (the project uses 1 to 100 per class)."""
MAX_SURROGATE_TOTAL = 20_000
"""Default cap on a client's surrogate images in all."""


def state_problems(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], max_abs_weight: float = MAX_ABS_WEIGHT
) -> list[str]:
    """Why ``state`` cannot be merged with models shaped like ``reference`` (empty when it can).

    Names and shapes must match; a floating-point reference tensor needs a floating-point, finite tensor whose
    absolute values are at most ``max_abs_weight``; an integer reference tensor needs an integer tensor.
    """
    if not state:
        return ["sent no weights"]
    problems = []
    missing, extra = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
    if missing:
        problems.append(f"missing weights {missing}")
    if extra:
        problems.append(f"unexpected weights {extra}")
    for key in reference.keys() & state.keys():
        got, want = state[key], reference[key]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif want.is_floating_point():
            if not got.is_floating_point():
                problems.append(f"{key} has dtype {got.dtype}, expected floating point ({want.dtype})")
            elif not bool(torch.isfinite(got).all()):
                problems.append(f"{key} holds NaN or Inf values")
            elif got.numel() and float(got.abs().max()) > max_abs_weight:
                problems.append(f"{key} holds values up to {float(got.abs().max()):.3g} in size (> {max_abs_weight:g})")
        elif not _is_integer(want):
            continue  # a reference tensor of another kind (bool, complex): its shape is all we check
        elif not _is_integer(got):
            problems.append(f"{key} has dtype {got.dtype}, expected an integer tensor ({want.dtype})")
    return sorted(problems)


def _is_integer(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def conform_state(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor cast to the dtype of ``reference``'s (e.g. float64 -> float32), in its key order.

    Use on a state without :func:`state_problems`.
    """
    return {key: state[key].to(reference[key].dtype) if key in reference else state[key] for key in state}


def surrogate_problems(
    update: ClientUpdate,
    image_shape: tuple[int, ...] | None,
    num_classes: int,
    max_abs_value: float = MAX_ABS_WEIGHT,
    shape_source: str = "",
) -> list[str]:
    """Why ``update``'s surrogate is unusable (empty, wrong image shape, bad labels, NaN/Inf or huge pixels).

    Empty when the surrogate is fine or absent. ``shape_source`` says where ``image_shape`` came from (for the
    message), when not from the server.
    """
    data = update.surrogate
    if data is None:
        return []
    if len(data) == 0:
        return ["sent an empty surrogate"]
    problems = []
    if image_shape is not None and data.image_shape != tuple(image_shape):
        source = f" ({shape_source})" if shape_source else ""
        problems.append(f"surrogate images have shape {data.image_shape}, expected {tuple(image_shape)}{source}")
    if not bool(torch.isfinite(data.x).all()):
        problems.append("surrogate images hold NaN or Inf values")
    elif float(data.x.abs().max()) > max_abs_value:
        problems.append(f"surrogate images hold values up to {float(data.x.abs().max()):.3g} (> {max_abs_value:g})")
    if int(data.y.min()) < 0 or int(data.y.max()) >= num_classes:
        problems.append(f"surrogate labels outside 0..{num_classes - 1}")
    return problems


def surrogate_over_cap(update: ClientUpdate, max_per_class: int | None, max_total: int | None) -> str:
    """Why ``update``'s surrogate is too large ("" when it is within the caps or absent; None: no cap).

    Call on a surrogate without :func:`surrogate_problems` (labels in range).
    """
    data = update.surrogate
    if data is None:
        return ""
    if max_total is not None and len(data) > max_total:
        return f"its surrogate has {len(data)} images, more than the cap of {max_total}"
    if max_per_class is not None and len(data):
        counts = torch.bincount(data.y)
        if int(counts.max()) > max_per_class:
            big = int(counts.argmax())
            return f"its surrogate has {int(counts[big])} images of class {big}, more than the cap of {max_per_class}"
    return ""


def _sender(message: object, index: int) -> str:
    """How logs name the sender of a reply that could not be read (its node id when the metadata has one)."""
    try:
        return f"node {message.metadata.src_node_id}"  # type: ignore[attr-defined]
    except Exception:
        return f"reply #{index} (no readable node id)"


def accept_replies(
    replies: Iterable[Message],
    reference: Mapping[str, torch.Tensor],
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
    *,
    max_surrogate_per_class: int | None = MAX_SURROGATE_PER_CLASS,
    max_surrogate_total: int | None = MAX_SURROGATE_TOTAL,
    max_abs_weight: float = MAX_ABS_WEIGHT,
    num_partitions: int | None = None,
    arrays_key: str = ARRAYS_KEY,
    num_examples_key: str = NUM_EXAMPLES,
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """Read and check every reply; return the usable updates sorted by partition id, and (client, reason) for
    each reply left out. Every left-out reply, and every dropped surrogate, is logged at WARNING level with its
    reason. Nothing a reply holds makes this raise: see the module docstring for the rules.

    Weights are checked against ``reference`` (the model sent to the clients) and cast to its dtypes; when it is
    empty, against the first reply (lowest partition id) whose weights are finite and within ``max_abs_weight``.
    Surrogate images must have shape ``image_shape`` (C, H, W); when it is None, the shape of the first accepted
    client's surrogate. ``max_surrogate_per_class`` / ``max_surrogate_total`` (None: no cap) bound a surrogate's
    size: a larger one is dropped, the client's weights are kept. With ``num_partitions``, a reply whose partition
    id is not in ``0..num_partitions-1`` is left out. ``arrays_key`` and ``num_examples_key`` say where a reply
    keeps its weights and its sample count (:func:`strategies.messages.read_reply`).
    """
    rejected: list[tuple[str, str]] = []
    readable: list[ClientUpdate] = []
    leave_out = functools.partial(_leave_out, rejected)

    for index, message in enumerate(replies):
        try:
            readable.append(read_reply(message, num_classes, arrays_key=arrays_key, num_examples_key=num_examples_key))
        except InvalidReply as err:
            leave_out(err.who or _sender(message, index), str(err))
        except Exception as err:  # the last line of defence: a reply never ends the round
            leave_out(_sender(message, index), f"unreadable reply ({type(err).__name__}: {err})")

    if num_partitions is not None:
        for update in readable:
            if update.partition_id >= num_partitions:
                leave_out(update.name, f"partition id {update.partition_id} is not in 0..{num_partitions - 1}")
        readable = [u for u in readable if u.partition_id < num_partitions]
    claims = Counter(u.partition_id for u in readable)
    for update in readable:
        if claims[update.partition_id] > 1:
            nodes = sorted(u.node_id for u in readable if u.partition_id == update.partition_id)
            leave_out(
                update.name,
                f"partition id {update.partition_id} was claimed by {len(nodes)} replies (nodes {nodes}): "
                "all of them are left out",
            )
    unique = sorted((u for u in readable if claims[u.partition_id] == 1), key=lambda u: u.partition_id)
    accepted, left_out = check_updates(
        unique,
        reference,
        num_classes,
        image_shape,
        max_surrogate_per_class=max_surrogate_per_class,
        max_surrogate_total=max_surrogate_total,
        max_abs_weight=max_abs_weight,
    )
    return accepted, rejected + left_out


def check_updates(
    updates: Sequence[ClientUpdate],
    reference: Mapping[str, torch.Tensor],
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
    *,
    max_surrogate_per_class: int | None = MAX_SURROGATE_PER_CLASS,
    max_surrogate_total: int | None = MAX_SURROGATE_TOTAL,
    max_abs_weight: float = MAX_ABS_WEIGHT,
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """The weight and surrogate checks of :func:`accept_replies` on updates already read (one per partition id,
    in order): returns the usable ones, their weights cast to ``reference``'s dtypes and oversized surrogates
    dropped, and (client, reason) for each left out (logged). The in-process backend uses it on its clients'
    updates, so a client whose training diverged (NaN weights) is left out there as under Flower."""
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[str, str]] = []
    leave_out = functools.partial(_leave_out, rejected)

    if not reference:
        reference = next((u.state for u in updates if _sound_alone(u, max_abs_weight)), {})
    shape_source = ""
    for update in updates:
        try:
            problems = state_problems(update.state, reference, max_abs_weight)
            problems += surrogate_problems(update, image_shape, num_classes, max_abs_weight, shape_source)
            if problems:
                leave_out(update.name, "; ".join(problems))
                continue
            update.state = conform_state(update.state, reference)
            too_big = surrogate_over_cap(update, max_surrogate_per_class, max_surrogate_total)
            if too_big:
                log.warning("dropping the surrogate of %s: %s; its weights are still merged", update.name, too_big)
                update.surrogate = None
            if image_shape is None and update.surrogate is not None:
                image_shape = update.surrogate.image_shape
                shape_source = f"the shape of {update.name}'s surrogate, the first accepted"
        except Exception as err:  # the last line of defence: a reply never ends the round
            leave_out(update.name, f"cannot be checked ({type(err).__name__}: {err})")
            continue
        accepted.append(update)
    return accepted, rejected


def _leave_out(rejected: list[tuple[str, str]], who: str, reason: str) -> None:
    """Log that ``who`` is left out and why, and record it in ``rejected``."""
    log.warning("leaving out %s: %s", who, reason)
    rejected.append((who, reason))


def _sound_alone(update: ClientUpdate, max_abs_weight: float) -> bool:
    """Whether ``update``'s weights could serve as the reference: finite and within ``max_abs_weight``."""
    try:
        return not state_problems(update.state, update.state, max_abs_weight)
    except Exception:
        return False
