"""Report of multi-round runs: global accuracy and cumulative upload after every round, for each merge pipeline next
to FedAvg on the same federation (same clients' data, local epochs and seed).

    python -m simulations.rounds_report results/multi_round/runs.csv

Writes ``summary.md`` and ``accuracy_per_round.png`` next to the CSV.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from simulations.results_io import read_rows, report_main

matplotlib.use("Agg")  # files only, no display


def per_round(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """One row per run (pipeline, clients, seed), one column per round, from the ``<prefix><r>...`` columns."""
    rounds = {}
    for column in map(str, runs.columns):
        number = column[len(prefix) :].split("_")[0]
        if column.startswith(prefix) and number.isdigit():
            rounds[column] = int(number)
    columns = sorted(rounds, key=rounds.__getitem__)
    table = runs.set_index(["sweep-method", "num-clients", "cfg_seed"])[columns]
    table.columns = pd.Index([rounds[c] for c in columns])
    table.columns.name = "round"
    return table


def mean_accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Accuracy after each round (columns), mean over seeds, per (pipeline, client count)."""
    return per_round(runs, "acc_round").groupby(level=["sweep-method", "num-clients"]).mean()


def margin_over_fedavg(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Each merge pipeline's accuracy minus FedAvg's, round by round (None without FedAvg rows)."""
    accuracy = mean_accuracy(runs)
    if "fedavg" not in accuracy.index.get_level_values(0):
        return None
    fedavg = accuracy.xs("fedavg", level="sweep-method")
    return accuracy.drop(index="fedavg", level="sweep-method").sub(fedavg, level="num-clients")


def rounds_markdown(runs: pd.DataFrame, figure: Path) -> str:
    """The page: accuracy per round, the merge pipelines' margin over FedAvg, cumulative upload per round."""
    accuracy = mean_accuracy(runs)
    uploads = per_round(runs, "bytes-uploaded_round").groupby(level=["sweep-method", "num-clients"]).mean() / 2**20
    lines = [
        "# Multi-round merging against FedAvg",
        "",
        f"{len(runs)} runs; {', '.join(sorted(runs['cfg_dataset'].unique()))}, seeds "
        f"{', '.join(map(str, sorted(runs['cfg_seed'].unique())))}. Global test accuracy (%) after each round, mean "
        "over seeds. From round 2 on, clients start from the last merged model.",
        "",
        f"![{figure.stem}]({figure.name})",
        "",
        "## Accuracy after each round",
        "",
        accuracy.round(2).to_markdown(),
        "",
    ]
    margin = margin_over_fedavg(runs)
    if margin is not None:
        gaps = pd.Series(margin.to_numpy().ravel()).dropna()
        behind = gaps[gaps < 0]
        verdict = (
            "Goal (match or beat FedAvg after every round): met."
            if behind.empty
            else f"Goal (match or beat FedAvg after every round): missed at {len(behind)} round(s), by up to "
            f"{-behind.min():.2f} points."
        )
        lines += ["## Merge pipeline minus FedAvg (points)", "", margin.round(2).to_markdown(), "", verdict, ""]
    lines += ["## Bytes uploaded so far, all clients (MiB)", "", uploads.round(2).to_markdown(), ""]
    return "\n".join(lines)


def plot(runs: pd.DataFrame, path: Path) -> Path:
    """Accuracy against round, one line per pipeline and client count."""
    accuracy = mean_accuracy(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, row in accuracy.iterrows():
        method, clients = key if isinstance(key, tuple) else (key, "")
        ax.plot(
            list(row.index),
            row.to_numpy(dtype=float),
            marker="o",
            linestyle="--" if method == "fedavg" else "-",
            label=f"{method}, {clients} clients",
        )
    ax.set(xlabel="round", ylabel="global test accuracy (%)", title="Accuracy per round")
    ax.set_xticks(list(accuracy.columns))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(csv_path: Path, out: Path | None = None) -> list[Path]:
    """Write ``summary.md`` and ``accuracy_per_round.png`` into ``out`` (default: next to ``csv_path``)."""
    runs = read_rows(csv_path)
    if runs.empty:
        raise ValueError(f"{csv_path} has no rows")
    out = out or csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    figure = plot(runs, out / "accuracy_per_round.png")
    page = out / "summary.md"
    page.write_text(rounds_markdown(runs, figure))
    return [figure, page]


def main(argv: Iterable[str] | None = None) -> int:
    return report_main(
        "simulations.rounds_report", __doc__ or "", Path("results/multi_round/runs.csv"), write_report, argv
    )


if __name__ == "__main__":
    sys.exit(main())
