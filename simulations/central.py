"""The centralised reference: the clients' model trained with their local recipe on all of a dataset's training
images at once, as if every client had handed over its data: the usual upper reference of federated learning,
which the N-client one-round goals are read against.

    python -m simulations.central --datasets mnist fashion-mnist --seeds 0 1 2 --set epochs=10 \\
        --data-root ../shared/data

Rows go to ``<out>/runs.csv`` (default ``results/central``), one per dataset, model and seed, with the settings that
shape the number, the wall time and the package versions; a rerun computes only the missing rows. ``summary.md``
beside it has the mean over seeds per dataset, model and recipe.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from fedmerge.device import default_device, derive_seed
from fedmerge.federation import FederationSpec, client_train_data, global_test_data
from fedmerge.models import build_model, reinitialized_copy
from fedmerge.train import evaluate, train
from simulations.config import DEFAULT_RUN_CONFIG, ConfigValue, settings_from_run_config
from simulations.federation_options import setting_key
from simulations.results_io import finished_keys, read_rows, save_rows
from simulations.sweep import parse_assignment
from simulations.versions import version_columns

CENTRAL_KEYS = ("dataset", "model", "width", "epochs", "lr", "batch-size", "optimizer", "seed")
"""The run-config keys that shape a central model (the data, the architecture, the local recipe, the seed)."""

RESULT_COLUMN = "acc_central_global"


def central_config(overrides: Mapping[str, ConfigValue], dataset: str, seed: int) -> dict[str, ConfigValue]:
    """The :data:`CENTRAL_KEYS` of the run config ``overrides`` (checked, with the defaults filled in) for one
    dataset and seed. Keys that do not shape the central model (surrogates, merging, distillation) are ignored."""
    config = DEFAULT_RUN_CONFIG | dict(overrides) | {"dataset": dataset, "seed": seed}
    settings_from_run_config(config, num_clients=1)  # unknown keys and bad values fail here, with their names
    return {key: config[key] for key in CENTRAL_KEYS}


def train_central(config: Mapping[str, ConfigValue], data_root: str | None, device: str = "cpu") -> dict:
    """Train the model of ``config`` on the whole training split of its dataset with the clients' local recipe and
    score it on the global test set; the results row (config, accuracy, images, wall time, versions)."""
    settings = settings_from_run_config(dict(config) | {"data-root": data_root or ""}, num_clients=1)
    seed = int(config["seed"])
    spec = FederationSpec(dataset=str(config["dataset"]), split="iid", num_clients=1, seed=seed, data_root=data_root)
    data = client_train_data(spec, 0)  # one client of an iid split holds every training image
    model = build_model(settings.model, data.image_shape, data.num_classes, settings.width)
    model = reinitialized_copy(model, derive_seed(seed, "central-init"))
    start = time.perf_counter()
    train(model, data, settings.train, seed=derive_seed(seed, "central-train"), device=device, description="central")
    seconds = time.perf_counter() - start
    return {
        "run-key": setting_key(config),  # resumed rows are matched by it
        **{f"cfg_{key}": value for key, value in config.items()},
        "train-images": len(data),
        RESULT_COLUMN: evaluate(model, global_test_data(spec), device=device),
        "train-seconds": round(seconds, 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **version_columns(),
    }


def summary_markdown(runs: pd.DataFrame) -> str:
    """Mean, lowest and highest accuracy over seeds per dataset, model and recipe."""
    recipe = [f"cfg_{key}" for key in CENTRAL_KEYS if key != "seed"]
    table = (
        runs.groupby(recipe)
        .agg(
            seeds=("cfg_seed", "nunique"),
            mean=(RESULT_COLUMN, "mean"),
            lowest=(RESULT_COLUMN, "min"),
            highest=(RESULT_COLUMN, "max"),
            images=("train-images", "first"),
            seconds=("train-seconds", "mean"),
        )
        .round(2)
        .reset_index()
    )
    table.columns = [c.removeprefix("cfg_") for c in table.columns]
    return "\n".join(
        [
            "# Centralised reference",
            "",
            "The clients' model trained with their local recipe (SGD with momentum and a cosine schedule, the epochs "
            "below) on every training image of the dataset at once, scored on the global test set (%): what one model "
            "of this architecture reaches when it sees all the data, the usual upper reference of federated "
            "learning. The one-round goals of `../sweep/n_clients.md` are read against it. Width 0 is the model's "
            "default; `seconds` is the training wall time per seed (the CSV's `version_device` names the device).",
            "",
            table.to_markdown(index=False),
            "",
        ]
    )


def write_report(csv_path: Path, out: Path | None = None) -> list[Path]:
    """Write ``summary.md`` for the rows of ``csv_path`` into ``out`` (default: beside the CSV)."""
    out = out or csv_path.parent
    runs = read_rows(csv_path, required=("cfg_dataset", "cfg_seed"))
    if runs.empty:
        raise ValueError(f"{csv_path} has no central runs")
    page = out / "summary.md"
    page.write_text(summary_markdown(runs))
    return [page]


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.central",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--datasets", nargs="+", default=["mnist"], help="dataset names (see fedmerge.data)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--set", nargs="*", type=parse_assignment, default=[], metavar="KEY=VALUE", help="run-config keys"
    )
    parser.add_argument("--data-root", default="", help="folder of the datasets (default: ./data, ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("results/central"), help="folder of runs.csv and summary")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    csv_path = args.out / "runs.csv"
    overrides = dict(args.set)
    configs = [central_config(overrides, dataset, seed) for seed in args.seeds for dataset in args.datasets]
    done = finished_keys(csv_path)
    device = str(default_device())
    for config in configs:
        label = f"{config['dataset']} {config['model']} seed {config['seed']}"
        if setting_key(config) in done:
            console.print(f"{label}: already in {csv_path}")
            continue
        row = train_central(config, args.data_root or None, device)
        save_rows(csv_path, [row])
        console.print(f"{label}: {row[RESULT_COLUMN]:.2f} % in {row['train-seconds']} s")
    for path in write_report(csv_path, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
