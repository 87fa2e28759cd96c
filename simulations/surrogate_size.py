"""Yamada et al. (ACML 2024) Table 3: accuracy against the surrogate's size (random coreset, images per class per
client), on MNIST-FMNIST and on the SPLIT-CIFAR10 subset (MLP, lambda = 0.5).

Rows: STE on the coreset; a fresh model trained on the union of the coresets with the server's recipe (the fair
"Coreset AB", ``pooled-recipe``); and the clients' ensemble distilled into a fresh model on the union of the coresets
with that recipe (``distilled-fresh``, the N-client work's surrogate-trained-then-distilled baseline). The clients
and the coresets are seeded as in ``simulations.table2``, so the 10-per-class rows match its coreset rows. Writes
``surrogate_size.csv`` (one row per pair, seed, size and method, with settings, wall times and package versions),
``surrogate_size.md`` and ``surrogate_size.png``; re-running computes only the missing rows.

    python -m simulations.surrogate_size --data-root ../shared/data --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from rich.console import Console

from fedmerge.device import default_device
from fedmerge.experiment import MethodRun
from simulations.results_io import read_rows, save_rows
from simulations.table2 import PAIRS, SPLIT_CIFAR, build_surrogates, comparison, setup_pair
from simulations.versions import package_versions

SIZES = (1, 10, 50, 100)
"""Images per class per client; the paper's 500 does not fit the CIFAR-10 subset (about 400 images per class)."""

RUNS = [
    MethodRun("STE (coreset)", "ste", "coreset", correction="none"),
    MethodRun("Coreset AB", "pooled-recipe", "coreset"),
    MethodRun("Ensemble distilled on the coreset", "distilled-fresh", "coreset"),
]

# Yamada et al. Table 3 (SPLIT-CIFAR10, per class 1 / 10 / 50 / 100 / 500).
PAPER: dict[str, dict[int, float]] = {
    "STE (coreset)": {1: 61.15, 10: 75.13, 50: 82.77, 100: 84.85, 500: 88.62},
    "Coreset AB": {1: 19.32, 10: 25.53, 50: 41.61, 100: 49.31, 500: 76.47},
}

DEFAULT_PAIRS = ("MNIST-FMNIST", SPLIT_CIFAR)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), choices=list(PAIRS))
    parser.add_argument("--per-class", nargs="+", type=int, default=list(SIZES), help="coreset sizes to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3, help="local training epochs per client")
    parser.add_argument("--ste-steps", type=int, default=500)
    parser.add_argument("--ste-lr", type=float, default=1e-2)
    parser.add_argument("--recipe-steps", type=int, default=2000, help="steps of the server's recipe")
    parser.add_argument(
        "--max-train", type=int, default=None, help="first N training images per client only (smoke runs)"
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    args.np_steps, args.condense_iterations = 0, None  # read by table2.comparison / build_surrogates, unused here
    return args


def run_config(args: argparse.Namespace) -> dict:
    """The settings that shape a row's numbers; rows are resumed only under the same settings."""
    return {
        "epochs": args.epochs,
        "ste_steps": args.ste_steps,
        "ste_lr": args.ste_lr,
        "recipe_steps": args.recipe_steps,
        "max_train": args.max_train if args.max_train is not None else 0,
    }


def finished_rows(csv_path: Path, config: dict) -> pd.DataFrame:
    """Rows of ``csv_path`` made with ``config`` (empty when there are none)."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return pd.DataFrame(columns=["pair", "seed", "per_class", "label"])
    frame = read_rows(csv_path, required=("pair", "seed", "per_class", "label"))
    same = pd.Series(True, index=frame.index)
    for key, value in config.items():
        same &= frame[key] == value if key in frame else False
    return frame[same]


def run_pair(
    pair: str, seed: int, todo: dict[int, list[MethodRun]], args: argparse.Namespace, device, console: Console
) -> list[dict]:
    """Every size and method of ``todo`` on one pair and seed (the clients are trained once)."""
    setup = setup_pair(pair, seed, args.epochs, args.data_root, device, console, args.max_train)
    rows = []
    for per_class, runs in todo.items():
        sized = argparse.Namespace(**{**vars(args), "per_class": per_class})
        surrogates, seconds = build_surrogates(
            setup.train_sets, setup.clients, sized, {"coreset"}, seed, device, console
        )
        compare = comparison(setup, surrogates, args, seed, device)
        for method in runs:
            row = compare.run(method)
            console.log(f"{pair} seed {seed} {per_class}/class {method.label}: {row['acc_mixed']:.2f}%")
            rows.append(
                {
                    "pair": pair,
                    "seed": seed,
                    "per_class": per_class,
                    **row,
                    "surrogate_images": len(surrogates["coreset"]),
                    "train_seconds": setup.train_seconds,
                    "surrogate_seconds": round(seconds["coreset"], 2),
                    **run_config(args),
                }
            )
    return rows


def markdown_tables(frame: pd.DataFrame) -> str:
    """Per pair: methods x images per class, our mean (± std over seeds); the paper's Table 3 under the CIFAR one."""
    text = ""
    for pair in [p for p in PAIRS if p in set(frame["pair"])]:
        part = frame[frame["pair"] == pair]
        sizes = sorted(part["per_class"].unique().tolist())
        stats = part.groupby(["label", "per_class"])["acc_mixed"].agg(["mean", "std", "count"])
        text += f"\n## {pair}\n\n| method | " + " | ".join(f"{k}/class" for k in sizes) + " |\n"
        text += "|" + "---|" * (1 + len(sizes)) + "\n"
        for run in RUNS:
            cells = []
            for k in sizes:
                if (run.label, k) not in stats.index:
                    cells.append("–")
                    continue
                s = stats.loc[(run.label, k)]
                cells.append(f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["count"] > 1 else ""))
            text += f"| {run.label} | " + " | ".join(cells) + " |\n"
            if pair == SPLIT_CIFAR and run.label in PAPER:
                paper = [f"{PAPER[run.label][k]:.1f}" if k in PAPER[run.label] else "–" for k in sizes]
                text += f"| {run.label} (paper, full CIFAR-10) | " + " | ".join(paper) + " |\n"
    return text


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Accuracy against images per class (log scale), one panel per pair; the paper's Table 3 dashed (CIFAR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in PAIRS if p in set(frame["pair"])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        part = frame[frame["pair"] == pair]
        for i, run in enumerate(RUNS):
            stats = part[part["label"] == run.label].groupby("per_class")["acc_mixed"].agg(["mean", "std"])
            color = f"C{i}"
            if len(stats):
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", color=color)
                ax.plot([], [], color=color, marker="o", label=run.label)
            if pair == SPLIT_CIFAR and run.label in PAPER:
                sizes, accs = zip(*sorted(PAPER[run.label].items()), strict=True)
                ax.plot(sizes, accs, "--", color=color, alpha=0.7, label=f"{run.label} (paper)")
        ax.set_xscale("log")
        ax.set_xlabel("images per class per client")
        ax.set_ylabel("accuracy on mixed test set (%)")
        ax.set_title(pair)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOTES = """
Accuracy (%) on the mixed test set, lambda = 0.5, MLP 3x512, {epochs} local epochs, STE {ste_steps} steps (Adam, lr
{ste_lr}), the recipe {recipe_steps} Adam steps (random shifts up to 2 pixels, mixup); random coresets of k images per
class per client; seeds {seeds}.

- **STE (coreset)**: STE merge on the union of the two coresets.
- **Coreset AB**: a fresh MLP trained on the union of the coresets with the server's recipe (`pooled-recipe`).
- **Ensemble distilled on the coreset**: the clients' ensemble distilled into a fresh MLP on the union of the coresets
  with the same recipe (`distilled-fresh` of the N-client work: trained on the surrogates, with a teacher).
- The paper's 500 per class does not fit the CIFAR-10 subset of `../shared/data` (4,000 training images, about 400
  per class); our SPLIT-CIFAR10 clients also train on ~2,000 images instead of 25,000, so the CIFAR figures sit far
  below the paper's (shown for reference only).
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    device = default_device()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "surrogate_size.csv"
    versions, config = package_versions(), run_config(args)
    done = set(
        finished_rows(csv_path, config)[["pair", "seed", "per_class", "label"]].itertuples(index=False, name=None)
    )
    for seed in args.seeds:
        for pair in args.pairs:
            todo = {k: [m for m in RUNS if (pair, seed, k, m.label) not in done] for k in args.per_class}
            todo = {k: runs for k, runs in todo.items() if runs}
            if not todo:
                console.log(f"{pair} seed {seed}: already in {csv_path} with these settings, skipped")
                continue
            save_rows(csv_path, [{**r, **versions} for r in run_pair(pair, seed, todo, args, device, console)])
    frame = finished_rows(csv_path, config)
    if frame.empty:
        console.print(f"no rows with these settings in {csv_path}")
        return
    plot(frame, args.out / "surrogate_size.png")
    seeds = sorted(frame["seed"].unique().tolist())
    text = "# Accuracy against the surrogate's size (Yamada et al. Table 3)\n"
    text += NOTES.format(**config, seeds=seeds) + markdown_tables(frame)
    text += "\nPer-row figures, settings, wall times and package versions: `surrogate_size.csv`. Plot: "
    text += "`surrogate_size.png`.\n"
    (args.out / "surrogate_size.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
