"""Command-line demo: two clients on one dataset split, merged by every method, compared in a table.

Runs offline on the embedded ``digits`` data by default:

    python -m fedmerge.demo                      # or: fedmerge-demo
    python -m fedmerge.demo --dataset mnist --data-root ../shared/data --split dirichlet --alpha 0.3
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedmerge.data import DATASET_NAMES, PARTITION_KINDS, LabeledImages, concat, load_dataset, make_partition
from fedmerge.device import default_device, derive_seed
from fedmerge.experiment import MethodRun, PairComparison, train_client
from fedmerge.merge import MergeConfig, NPConfig, STEConfig
from fedmerge.models import MODEL_NAMES, build_model
from fedmerge.surrogate import SURROGATE_KINDS, SurrogateConfig, build_surrogate
from fedmerge.surrogate.build import require_surrogate
from fedmerge.train import TrainConfig

DEFAULT_RUNS = [
    MethodRun("client A", "model-a", None),
    MethodRun("client B", "model-b", None),
    MethodRun("ensemble", "ensemble", None),
    MethodRun("average", "average", None, correction="none"),
    MethodRun("WM", "wm", None),
    MethodRun("AM", "am"),
    MethodRun("STE", "ste"),
    MethodRun("NP", "np"),
    MethodRun("STE+NP", "ste+np"),
    MethodRun("STE + fine-tune", "ste+finetune"),
    MethodRun("train on surrogate", "scratch"),
]
BASELINES = ("model-a", "model-b", "ensemble")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASET_NAMES)} or rmnist-<deg>")
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset folder (default: $FEDMERGE_DATA, else ./data or ../shared/data); not needed for digits",
    )
    p.add_argument("--split", default="disjoint", choices=PARTITION_KINDS)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (split=dirichlet)")
    p.add_argument("--model", default="mlp", choices=MODEL_NAMES)
    p.add_argument("--width", type=float, default=None, help="hidden units (mlp) or width multiplier")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--surrogate", default="random", choices=[k for k in SURROGATE_KINDS if k != "none"])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--ste-steps", type=int, default=200)
    p.add_argument("--np-steps", type=int, default=200)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=[r.method for r in DEFAULT_RUNS if r.method not in BASELINES],
        help="merge methods and baselines to run besides the clients and their ensemble (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def client_tests(test: LabeledImages, client_data: list[LabeledImages]) -> dict[str, LabeledImages]:
    """The global test set plus, per client, the test images of the classes that client holds."""
    tests = {"global": test}
    for name, data in zip("AB", client_data, strict=True):
        classes = torch.nonzero(data.class_counts() > 0).flatten()
        tests[f"classes of {name}"] = test.subset(torch.nonzero(torch.isin(test.y, classes)).flatten())
    return tests


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    console = Console()
    device = default_device()
    started = time.perf_counter()
    train_data = load_dataset(args.dataset, train=True, root=args.data_root)
    test_data = load_dataset(args.dataset, train=False, root=args.data_root)
    parts = make_partition(args.split, train_data.y, 2, derive_seed(args.seed, "partition"), alpha=args.alpha)
    clients_data = [train_data.subset(idx, name=f"client {n}") for idx, n in zip(parts, "AB", strict=True)]
    console.log(
        f"{args.dataset}: {len(train_data)} train / {len(test_data)} test images, {args.split} split -> "
        f"{[len(d) for d in clients_data]} per client, device {device}"
    )
    kwargs = {} if args.width is None else {"width": args.width}
    template = build_model(args.model, train_data.image_shape, train_data.num_classes, **kwargs)
    config = TrainConfig(epochs=args.epochs, lr=0.05, batch_size=64)
    clients = [
        train_client(template, d, config, derive_seed(args.seed, "client", i), device, d.name)
        for i, d in enumerate(clients_data)
    ]
    surrogate_config = SurrogateConfig(kind=args.surrogate, per_class=args.per_class)
    surrogate = concat(
        [
            require_surrogate(
                build_surrogate(d, surrogate_config, c.model, derive_seed(args.seed, "surrogate", i), device)
            )
            for i, (d, c) in enumerate(zip(clients_data, clients, strict=True))
        ],
        name="surrogate",
    )
    console.log(f"surrogate: {len(surrogate)} {args.surrogate} images from both clients")
    comparison = PairComparison(
        template,
        clients[0],
        clients[1],
        {"coreset": surrogate},
        client_tests(test_data, clients_data),
        merge=MergeConfig(ste=STEConfig(steps=args.ste_steps), np=NPConfig(steps=args.np_steps), seed=args.seed),
        lam=clients[1].num_samples / (clients[0].num_samples + clients[1].num_samples),
        device=device,
    )
    runs = [r for r in DEFAULT_RUNS if args.methods is None or r.method in args.methods or r.method in BASELINES]
    rows = [comparison.run(r) for r in runs]
    table = Table(title=f"{args.dataset}, {args.split} split, {args.model}: test accuracy (%)")
    columns = [k for k in rows[0] if k.startswith("acc_")]
    for heading in ["method", *[c[4:] for c in columns], "seconds"]:
        table.add_column(heading, justify="left" if heading == "method" else "right")
    for row in rows:
        table.add_row(row["label"], *[f"{row[c]:.1f}" for c in columns], f"{row['seconds']:.1f}")
    console.print(table)
    console.log(f"done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
