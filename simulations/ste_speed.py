"""STE speed: steps per second with the warm-started projection against re-solving weight matching
from scratch every step, in the same run, on the same models and data.

The two models are trained (offline, on the embedded ``digits`` data split by labels between two
clients) so that weight matching faces the structure it meets in practice; the surrogate is a
random coreset of both clients.

    python -m simulations.ste_speed --steps 30 --models mlp resnet20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from torch import nn

from fedmerge.data import LabeledImages, concat, disjoint_label_partition, load_dataset
from fedmerge.device import default_device
from fedmerge.experiment import train_client
from fedmerge.merge import STEConfig, ste_merge
from fedmerge.merge.ste import Projection
from fedmerge.models import build_model, model_spec
from fedmerge.surrogate import random_coreset
from fedmerge.train import TrainConfig
from simulations.versions import package_versions

MODELS = ("mlp", "cnn", "vgg11", "resnet20")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=MODELS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--epochs", type=int, default=10, help="training epochs of the two client models")
    p.add_argument("--per-class", type=int, default=10, help="coreset images per class per client")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results"))
    return p.parse_args(argv)


def trained_pair(name: str, epochs: int, per_class: int, device) -> tuple[nn.Module, nn.Module, LabeledImages]:
    """Two models of ``name`` trained on label-disjoint halves of ``digits``, and their joint coreset."""
    data = load_dataset("digits")
    parts = [data.subset(idx) for idx in disjoint_label_partition(data.y, 2, seed=0)]
    template = build_model(name, data.image_shape)
    config = TrainConfig(epochs=epochs, lr=0.05, batch_size=64)
    clients = [
        train_client(template, part, config, seed, device, f"client {seed}").model for seed, part in enumerate(parts)
    ]
    coreset = concat([random_coreset(part, per_class, seed) for seed, part in enumerate(parts)])
    return clients[0], clients[1], coreset


PROJECTIONS: tuple[Projection, ...] = ("warm", "full")


def time_ste(
    model_a: nn.Module,
    model_b: nn.Module,
    data: LabeledImages,
    projection: Projection,
    steps: int,
    device: torch.device | str,
) -> dict:
    """Steps/s (the step loop alone), one-off setup seconds and final loss of STE merging B into A."""
    config = STEConfig(steps=steps, batch_size=len(data), projection=projection)
    start = time.perf_counter()
    result = ste_merge(
        model_a, model_spec(model_a), model_a.state_dict(), model_b.state_dict(), data, 0.5, config, 0, device
    )
    total = time.perf_counter() - start
    return {
        "steps_per_second": round(steps / result.step_seconds, 3),
        "setup_seconds": round(total - result.step_seconds, 3),
        "final_loss": round(result.losses[-1], 4),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console, device = Console(), default_device()
    rows = []
    for name in args.models:
        model_a, model_b, data = trained_pair(name, args.epochs, args.per_class, device)
        for repeat in range(args.repeats):
            for projection in PROJECTIONS:
                row = {"model": name, "projection": projection, "repeat": repeat, "steps": args.steps}
                rows.append(row | time_ste(model_a, model_b, data, projection, args.steps, device))
                console.log(f"{name} {projection}: {rows[-1]['steps_per_second']:.2f} steps/s")
    frame = pd.DataFrame(rows).assign(**package_versions())
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "ste_speed.csv", index=False)
    summary = frame.groupby(["model", "projection"])["steps_per_second"].median().unstack()
    summary["speed-up"] = summary["warm"] / summary["full"]
    text = (
        "# STE speed: warm-started projection vs weight matching from scratch every step\n\n"
        f"Median steps/s over {args.repeats} repeats of {args.steps} steps "
        f"(full-batch on a {len(data)}-image coreset; the one-off "
        f"setup, i.e. the initial weight matching and final projection, excluded), device {frame['device'][0]}, "
        f"torch threads {torch.get_num_threads()}.\n\n" + summary.round(2).to_markdown() + "\n"
    )
    (args.out / "ste_speed.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
