"""Plots and a markdown summary of a sweep's ``runs.csv``.

    python -m simulations.sweep_report results/sweep/runs.csv

writes, next to the CSV: ``accuracy_vs_clients.png`` (global test accuracy against client count, one panel per
dataset and split, a line per method and the baselines), ``merge_time_vs_clients.png`` and ``summary.md``
(accuracy and timing tables, and the N=8 goal: merged >= one-round FedAvg + 20 points and >= 90 % of the
ensemble). Seeds are averaged (mean, with the standard deviation as error bars and ± in the tables).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.artist import Artist

from simulations.results_io import read_rows

matplotlib.use("Agg")  # files only, no display

BASELINES = {
    "acc_ensemble_global": "ensemble",
    "acc_fedavg1_global": "FedAvg, 1 round",
    "acc_surrogate-trained_global": "trained on surrogates",
    "client-mean_global": "clients (mean)",
}
GOAL_N = 8
GOAL_OVER_FEDAVG = 20.0
GOAL_ENSEMBLE_SHARE = 0.9


def load_runs(csv_path: Path, backend: str = "flower") -> pd.DataFrame:
    """The sweep's rows run by ``backend``, with ``setting`` (dataset and split), ``method`` (with the surrogate when
    several were swept) and ``client-mean_global`` (the mean of the clients' own global accuracies) added."""
    runs = read_rows(csv_path)
    if "sweep-backend" in runs:
        runs = runs[runs["sweep-backend"] == backend].copy()
    if runs.empty:
        raise ValueError(f"{csv_path} has no rows run by backend {backend!r}")
    split = runs["cfg_split"].where(
        runs["cfg_split"] != "dirichlet", "dirichlet(" + runs["cfg_alpha"].map("{:g}".format) + ")"
    )
    runs["setting"] = runs["cfg_dataset"] + " " + split
    surrogate = runs["cfg_surrogate"] + ":" + runs["cfg_per-class"].astype(str)
    several = bool(surrogate[runs["sweep-method"] != "fedavg"].nunique() > 1)
    runs["method"] = runs["sweep-method"] + " " + surrogate if several else runs["sweep-method"]
    runs.loc[runs["sweep-method"] == "fedavg", "method"] = (
        "fedavg-" + runs["fedavg-rounds"].astype(int).astype(str) + "rounds"
    )
    client_columns = runs.filter(regex=r"^acc_client\d+_global$")
    runs["client-mean_global"] = client_columns.mean(axis=1)
    return runs


def mean_and_std(runs: pd.DataFrame, value: str, by: list[str]) -> pd.DataFrame:
    """Mean and standard deviation of ``value`` over seeds, per ``by`` group."""
    return runs.groupby(by)[value].agg(["mean", "std", "count"]).reset_index()


def _merge_rows(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["sweep-method"] != "fedavg"]


def plot_accuracy(runs: pd.DataFrame, path: Path) -> Path:
    """Global accuracy against client count: a panel per setting, a solid line per method, dashed baselines."""
    settings = sorted(runs["setting"].unique())
    columns = min(2, len(settings))
    rows = -(-len(settings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.2 * rows + 0.5), squeeze=False)
    methods = sorted(runs["method"].unique())
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("Dark2")(i) for i in range(8)]
    # one colour per line, the same in every panel
    colors = dict(zip([*methods, *BASELINES.values()], palette, strict=False))
    for ax, setting in zip(axes.flat, settings, strict=True):
        here = runs[runs["setting"] == setting]
        for method in sorted(here["method"].unique()):
            stats = mean_and_std(here[here["method"] == method], "acc_merged_global", ["num-clients"])
            ax.errorbar(
                stats["num-clients"],
                stats["mean"],
                yerr=stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=method,
                color=colors[method],
            )
        merges = _merge_rows(here)
        for column, name in BASELINES.items():
            if column in merges and merges[column].notna().any():
                stats = mean_and_std(
                    merges.drop_duplicates(["num-clients", "cfg_seed", column]), column, ["num-clients"]
                )
                ax.plot(stats["num-clients"], stats["mean"], linestyle="--", marker=".", label=name, color=colors[name])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(here["num-clients"].unique()), [str(n) for n in sorted(here["num-clients"].unique())])
        ax.set(title=setting, xlabel="clients", ylabel="global test accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(settings) :]:
        ax.set_visible(False)
    labels: dict[str, Artist] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels.keys()), loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("Merged model vs client count (solid: merge methods and FedAvg; dashed: baselines)")
    fig.tight_layout(rect=(0, 0.5 / (4.2 * rows + 0.5), 1, 1))  # room for the legend below
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_merge_time(runs: pd.DataFrame, path: Path) -> Path:
    """Server-side merge time against client count per method (mean over settings and seeds), log scale."""
    merges = _merge_rows(runs)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in sorted(merges["method"].unique()):
        stats = mean_and_std(merges[merges["method"] == method], "merge-seconds", ["num-clients"])
        ax.errorbar(
            stats["num-clients"], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=method
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(merges["num-clients"].unique())
    ax.set_xticks(ticks, [str(n) for n in ticks])
    workers = int(merges["cfg_merge-workers"].iloc[0]) if "cfg_merge-workers" in merges else 0
    ax.set(
        title=f"Merge time on the server (tree schedule, {workers} parallel merges)", xlabel="clients", ylabel="seconds"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(mean: float, std: float, digits: int = 1) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) or std == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def accuracy_table(runs: pd.DataFrame, setting: str) -> str:
    """Markdown: global accuracy per client count (rows) for each method and baseline (columns)."""
    here = runs[runs["setting"] == setting]
    table = {}
    for method in sorted(here["method"].unique()):
        stats = mean_and_std(here[here["method"] == method], "acc_merged_global", ["num-clients"]).set_index(
            "num-clients"
        )
        table[method] = {n: _cell(r["mean"], r["std"]) for n, r in stats.iterrows()}
    merges = _merge_rows(here).drop_duplicates(["num-clients", "cfg_seed"])
    for column, name in BASELINES.items():
        if column in merges and merges[column].notna().any():
            stats = mean_and_std(merges, column, ["num-clients"]).set_index("num-clients")
            table[name] = {n: _cell(r["mean"], r["std"]) for n, r in stats.iterrows()}
    frame = pd.DataFrame(table)
    frame.index.name = "clients"
    return frame.to_markdown()


def goal_table(runs: pd.DataFrame, n: int = GOAL_N) -> str:
    """Markdown: at ``n`` clients, each merge method against the goal (>= FedAvg 1 round + 20 points and >= 90 %
    of the ensemble), per setting."""
    merges = _merge_rows(runs)
    merges = merges[merges["num-clients"] == n]
    if merges.empty:
        return f"No run with {n} clients."
    keys = ["setting", "method"]
    grouped = (
        merges.groupby(keys)[["acc_merged_global", "acc_fedavg1_global", "acc_ensemble_global"]].mean().reset_index()
    )
    grouped["FedAvg-1 + 20"] = grouped["acc_fedavg1_global"] + GOAL_OVER_FEDAVG
    grouped["90% of ensemble"] = GOAL_ENSEMBLE_SHARE * grouped["acc_ensemble_global"]
    beats_fedavg = grouped["acc_merged_global"] >= grouped["FedAvg-1 + 20"]
    near_ensemble = grouped["acc_merged_global"] >= grouped["90% of ensemble"]
    grouped["goal met"] = (beats_fedavg & near_ensemble).map({True: "yes", False: "no"})
    grouped = grouped.rename(
        columns={
            "acc_merged_global": "merged",
            "acc_fedavg1_global": "FedAvg 1 round",
            "acc_ensemble_global": "ensemble",
        }
    )
    return grouped.round(1).to_markdown(index=False)


def cost_table(runs: pd.DataFrame) -> str:
    """Markdown: per method and client count, mean seconds of client training, surrogate building, merging and the
    whole ``flwr run``, bytes each client uploaded, and peak memory."""
    columns = {
        "client-mean_train-seconds": "client training (s)",
        "client-mean_surrogate-seconds": "surrogate (s)",
        "merge-seconds": "merge (s)",
        "sweep-seconds": "flwr run (s)",
        "client-mean_weights-bytes": "weights / client (KiB)",
        "client-mean_surrogate-bytes": "surrogate / client (KiB)",
        "server-peak-rss-mb": "server peak RSS (MiB)",
        "client-max_peak-rss-mb": "client peak RSS (MiB)",
    }
    present = [c for c in columns if c in runs]
    table = runs.groupby(["method", "num-clients"])[present].mean()
    for column in ("client-mean_weights-bytes", "client-mean_surrogate-bytes"):
        if column in table:
            table[column] = table[column] / 1024
    return (
        table.rename(columns=columns)
        .round(1)
        .reset_index()
        .rename(columns={"num-clients": "clients"})
        .to_markdown(index=False)
    )


def summary_markdown(runs: pd.DataFrame, figures: Iterable[Path]) -> str:
    """The summary page: what was run, accuracy tables per setting, the N=8 goal and the costs."""
    seeds = sorted(runs["cfg_seed"].unique())
    first = runs.iloc[0]
    lines = [
        "# Sweep summary",
        "",
        f"{len(runs)} runs: datasets {', '.join(sorted(runs['cfg_dataset'].unique()))}; client counts "
        f"{', '.join(str(n) for n in sorted(runs['num-clients'].unique()))}; seeds {', '.join(map(str, seeds))}; "
        f"model {first['cfg_model']}, {first['cfg_epochs']} local epochs, STE {first['cfg_ste-steps']} steps, "
        f"merge schedule {first['cfg_schedule']}. Accuracy is on the global test set (%), mean over seeds.",
        "FedAvg rows are the global model after the last round; "
        "'FedAvg, 1 round' is the same run after its first round.",
        "",
        *(f"![{path.stem}]({path.name})" for path in figures),
        "",
    ]
    for setting in sorted(runs["setting"].unique()):
        lines += [f"## {setting}", "", accuracy_table(runs, setting), ""]
    lines += [
        f"## Goal at N={GOAL_N}",
        "",
        f"Merged >= one-round FedAvg + {GOAL_OVER_FEDAVG:g} points and >= {GOAL_ENSEMBLE_SHARE:.0%} of the ensemble.",
        "",
        goal_table(runs),
        "",
        "## Costs (mean per run)",
        "",
        cost_table(runs),
        "",
    ]
    return "\n".join(lines)


def write_report(csv_path: Path, out: Path | None = None, backend: str = "flower") -> list[Path]:
    """Write the plots and ``summary.md`` for the sweep in ``csv_path`` into ``out`` (default: its folder)."""
    out = out or csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(csv_path, backend)
    figures = [plot_accuracy(runs, out / "accuracy_vs_clients.png")]
    if not _merge_rows(runs).empty:
        figures.append(plot_merge_time(runs, out / "merge_time_vs_clients.png"))
    summary = out / "summary.md"
    summary.write_text(summary_markdown(runs, figures))
    return [*figures, summary]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.sweep_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="a sweep's runs.csv")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the CSV's folder)")
    parser.add_argument("--backend", default="flower", help="which backend's rows to report")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        for path in write_report(args.csv, args.out, args.backend):
            print(f"wrote {path}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
