"""A disk cache of trained client models and their surrogates, so that a sweep compares merge methods on the same
clients without training them again, and of the server's reference distillations (the pooled-surrogate baseline and
the fresh student), so that a run stopped after one of them picks up where it was.

An entry's key is a hash of everything that decides the result: the federation (dataset, split, clients, seed; not
the data folder),
the model, the training settings, the partition, the round, the weights training started from, and the torch
version. A surrogate's key adds its settings to its model's key. A distillation's key hashes what it is computed
from (the student's starting weights, the teacher's weights, the transfer images, the recipe, the seed, the kind of
device), so an entry is never reused for other inputs. Entries are written to a temporary file and
renamed, so a crash never leaves a half-written entry; concurrent clients write different keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedmerge.data import LabeledImages
from fedmerge.merge.distill import TEACHER_ONLY_FIELDS, DistillConfig
from fedmerge.surrogate import SurrogateConfig
from simulations.config import RunSettings

CACHE_FORMAT = 1
State = dict[str, torch.Tensor]


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim tensors too
    return digest.hexdigest()


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> State:
    """A detached copy of ``state`` on the CPU, as an entry stores it."""
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_key(
    settings: RunSettings, partition_id: int, server_round: int, start: Mapping[str, torch.Tensor] | None
) -> str:
    """The cache key of the model client ``partition_id`` trains in ``server_round`` from ``start`` (None: its own
    seeded initialisation)."""
    return _hash(
        {
            "format": CACHE_FORMAT,
            "torch": torch.__version__,
            "federation": dataclasses.asdict(settings.federation) | {"data_root": None},  # where files are is no result
            "model": settings.model,
            "width": settings.width,
            "train": dataclasses.asdict(settings.train),
            "seed": settings.seed,
            "partition": partition_id,
            "round": server_round,
            "start": "own-init" if start is None else state_digest(start),
        }
    )


def surrogate_key(model_cache_key: str, surrogate: SurrogateConfig) -> str:
    """The cache key of the surrogate built with the model cached under ``model_cache_key``."""
    return _hash({"format": CACHE_FORMAT, "model": model_cache_key, "surrogate": dataclasses.asdict(surrogate)})


def distillation_key(
    student: nn.Module,
    data: LabeledImages,
    teacher: nn.Module | None,
    recipe: DistillConfig,
    seed: int,
    device: torch.device | str,
) -> str:
    """The cache key of ``distill(student, data, teacher, recipe, seed, device)``: a hash of its inputs' values
    (without a teacher, of the recipe fields it then reads, so teacher-side probes share one pooled baseline)."""

    def module(m: nn.Module | None) -> list[str] | None:
        return None if m is None else [type(m).__qualname__, state_digest(m.state_dict())]

    return _hash(
        {
            "format": CACHE_FORMAT,
            "torch": torch.__version__,
            "student": module(student),
            "teacher": module(teacher),
            "data": [state_digest({"x": data.x, "y": data.y}), data.num_classes],
            "recipe": {
                k: v for k, v in recipe.as_dict().items() if teacher is not None or k not in TEACHER_ONLY_FIELDS
            },
            "seed": seed,
            "device": torch.device(device).type,
        }
    )


@dataclass
class TrainedClient:
    """A cached client model: its weights, its training time and its accuracy on its own data."""

    state: State
    train_seconds: float
    train_accuracy: float


@dataclass
class BuiltSurrogate:
    """A cached surrogate and the seconds it took to build."""

    data: LabeledImages
    seconds: float


class ClientCache:
    """Trained client models, surrogates and distilled reference models under ``root`` (``models/<key>.pt``,
    ``surrogates/<key>.pt``, ``distilled/<key>.pt``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def _load(self, kind: str, key: str, fields: tuple[str, ...]) -> dict | None:
        """The entry's dict, or None when it is missing, unreadable or lacks ``fields`` (it is then made again and
        overwritten)."""
        path = self._path(kind, key)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - torch.load raises many kinds on foreign bytes; all mean "not usable"
            return None
        return entry if isinstance(entry, dict) and all(f in entry for f in fields) else None

    def _save(self, kind: str, key: str, entry: dict) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(entry, tmp)
        tmp.replace(path)

    def load_model(self, key: str) -> TrainedClient | None:
        """The client model cached under ``key``, or None."""
        entry = self._load("models", key, ("state", "train_seconds", "train_accuracy"))
        if entry is None:
            return None
        return TrainedClient(entry["state"], float(entry["train_seconds"]), float(entry["train_accuracy"]))

    def save_model(self, key: str, client: TrainedClient) -> None:
        """Cache a trained client model under ``key``."""
        self._save(
            "models",
            key,
            {
                "state": _cpu_copy(client.state),
                "train_seconds": client.train_seconds,
                "train_accuracy": client.train_accuracy,
            },
        )

    def load_surrogate(self, key: str) -> BuiltSurrogate | None:
        """The surrogate cached under ``key``, or None."""
        entry = self._load("surrogates", key, ("x", "y", "num_classes", "name", "seconds"))
        if entry is None:
            return None
        data = LabeledImages(entry["x"], entry["y"], int(entry["num_classes"]), str(entry["name"]))
        return BuiltSurrogate(data, float(entry["seconds"]))

    def save_surrogate(self, key: str, surrogate: BuiltSurrogate) -> None:
        """Cache a built surrogate under ``key``."""
        data = surrogate.data
        self._save(
            "surrogates",
            key,
            {
                "x": data.x.detach().cpu(),
                "y": data.y.detach().cpu(),
                "num_classes": data.num_classes,
                "name": data.name,
                "seconds": surrogate.seconds,
            },
        )

    def load_distilled(self, key: str) -> State | None:
        """The weights of the distilled model cached under ``key``, or None."""
        entry = self._load("distilled", key, ("state",))
        return None if entry is None else entry["state"]

    def save_distilled(self, key: str, state: Mapping[str, torch.Tensor]) -> None:
        """Cache a distilled model's weights under ``key``."""
        self._save("distilled", key, {"state": _cpu_copy(state)})
