"""STE speed: steps per second with the warm-started projection against re-solving weight matching
from scratch every step, in the same run, on the same models and data.

    python -m simulations.ste_speed --steps 30 --models mlp resnet20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from fedmerge.data import LabeledImages
from fedmerge.device import default_device
from fedmerge.merge import STEConfig, ste_merge
from fedmerge.models import build_model
from simulations.versions import package_versions

SHAPES = {"mlp": (1, 28, 28), "cnn": (1, 28, 28), "vgg11": (3, 32, 32), "resnet20": (3, 32, 32)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results"))
    return p.parse_args(argv)


def time_ste(name: str, projection: str, steps: int, batch_size: int, device) -> dict:
    """Steps/s (the step loop alone), one-off setup seconds and final loss of STE merging two random models."""
    shape = SHAPES[name]
    torch.manual_seed(0)
    model_a, model_b = build_model(name, shape), build_model(name, shape)
    data = LabeledImages(torch.randn(batch_size, *shape), torch.randint(0, 10, (batch_size,)), 10, "random")
    config = STEConfig(steps=steps, lr=1e-2, batch_size=batch_size, projection=projection)
    start = time.perf_counter()
    result = ste_merge(model_a, model_a.permutation_spec(), model_a.state_dict(), model_b.state_dict(), data, 0.5, config, 0, device)
    total = time.perf_counter() - start
    return {"steps_per_second": round(steps / result.step_seconds, 3), "setup_seconds": round(total - result.step_seconds, 3),
            "final_loss": round(result.losses[-1], 4)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console, device = Console(), default_device()
    rows = []
    for name in args.models:
        for repeat in range(args.repeats):
            for projection in ("warm", "full"):
                row = {"model": name, "projection": projection, "repeat": repeat, "steps": args.steps}
                rows.append(row | time_ste(name, projection, args.steps, args.batch_size, device))
                console.log(f"{name} {projection}: {rows[-1]['steps_per_second']:.2f} steps/s")
    frame = pd.DataFrame(rows).assign(**package_versions())
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "ste_speed.csv", index=False)
    summary = frame.groupby(["model", "projection"])["steps_per_second"].median().unstack()
    summary["speed-up"] = summary["warm"] / summary["full"]
    text = ("# STE speed: warm-started projection vs weight matching from scratch every step\n\n"
            f"Median steps/s over {args.repeats} repeats of {args.steps} steps (batch {args.batch_size}; the one-off "
            f"setup, i.e. the initial weight matching and final projection, excluded), device {frame['device'][0]}, "
            f"torch threads {torch.get_num_threads()}.\n\n" + summary.round(2).to_markdown() + "\n")
    (args.out / "ste_speed.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
