"""The performance report: merge-time scaling, what the Flower simulation adds, and peak memory.

    python -m simulations.performance_report

reads ``results/merge_scaling.csv`` (from :mod:`simulations.merge_scaling`), ``results/overhead/runs.csv`` (the same
runs made by ``simulations.sweep`` with ``--backend flower`` and ``--backend in-process``) and
``results/sweep/runs.csv`` (peak memory), and writes ``results/performance.md`` and ``results/overhead.png``. A
missing input only leaves its section out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from simulations.results_io import read_rows

matplotlib.use("Agg")  # files only, no display

PARTS = {"train": "client training", "surrogate": "surrogates", "merge": "merge", "other": "everything else"}


def scaling_section(scaling: pd.DataFrame) -> list[str]:
    """Merge seconds per client count and way, and the speed-up of the parallel tree over the sequential one."""
    lines = ["## Merge time against client count", ""]
    for (dataset, split, cfg, method), here in scaling.fillna({"cfg": ""}).groupby(
        ["dataset", "split", "cfg", "method"]
    ):
        table = here.pivot_table(index="num-clients", columns="way", values="merge-seconds", aggfunc="mean")
        if {"tree, parallel", "tree, sequential"} <= set(table.columns):
            table["parallel speed-up"] = table["tree, sequential"] / table["tree, parallel"]
        accuracy = here.pivot_table(index="num-clients", columns="way", values="acc_merged_global", aggfunc="mean")
        lines += [
            f"### {method}, {dataset} {split} {cfg} (seconds; merged accuracy % in the second table)",
            "",
            table.round(2).to_markdown(),
            "",
            accuracy.round(1).to_markdown(),
            "",
        ]
    lines += ["![merge scaling](merge_scaling.png)", ""]
    return lines


def universe_section(scaling: pd.DataFrame) -> list[str]:
    """Merge seconds, the merging process's peak memory and the merged accuracy of the universe schedule (all clients
    at once) per method and client count, each measured alone in a fresh process."""
    lines = [
        "## Merging all clients at once (universe schedule)",
        "",
        "Each merge ran alone in a fresh process (one torch thread) on the cached clients of the sweep's federation: "
        "the universe alignment (MergeMany) and the method's N-model merge, without distillation (its cost is in "
        "`sweep/n_clients.md`). Peak RSS is the whole process's (Python, torch, the N loaded clients and the merge).",
        "",
    ]
    values = {"merge-seconds": "merge (s)", "merge-peak-rss-mb": "peak RSS (MiB)", "acc_merged_global": "merged (%)"}
    for (dataset, split, cfg), here in scaling.fillna({"cfg": ""}).groupby(["dataset", "split", "cfg"]):
        table = here.pivot_table(index="num-clients", columns="method", values=list(values), aggfunc="mean")
        table = table.rename(columns=values, level=0)
        table.columns = pd.Index([f"{pair[1]} {pair[0]}" for pair in table.columns])
        lines += [f"### {dataset} {split} {cfg}", "", table.round(1).to_markdown(), ""]
    lines += ["![universe scaling](universe_scaling.png)", ""]
    return lines


def wall_time_parts(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: wall seconds split into client training and surrogate building on the critical path (the clients'
    sums divided by how many ran at once), merging, and everything else (start-up, messaging, scoring)."""
    at_once = clients_at_once(runs).where(runs["sweep-backend"] == "flower", 1).clip(upper=runs["num-clients"])
    parts = pd.DataFrame(
        {
            "train": runs["client-mean_train-seconds"] * runs["num-clients"] / at_once,
            "surrogate": runs["client-mean_surrogate-seconds"] * runs["num-clients"] / at_once,
            "merge": runs["merge-seconds"],
        }
    )
    parts["other"] = (runs["sweep-seconds"] - parts.sum(axis=1)).clip(lower=0)
    return parts


def clients_at_once(runs: pd.DataFrame) -> pd.Series:
    """How many simulated clients Flower ran at once: the host's CPUs (2 when not recorded) over each client's."""
    host = runs["host-cpus"].fillna(2) if "host-cpus" in runs else pd.Series(2, index=runs.index)
    return (host // runs["sweep-client-cpus"].fillna(1.0)).clip(lower=1).astype(int)


def backend_label(runs: pd.DataFrame) -> pd.Series:
    """ "in-process", or "Flower, k client(s) at once"."""
    return ("Flower, " + clients_at_once(runs).astype(str) + " client(s) at once").where(
        runs["sweep-backend"] == "flower", "in-process"
    )


def overhead_section(runs: pd.DataFrame, figure: Path) -> list[str]:
    """Wall time of the same runs through Flower + Ray and in-process, split into parts, plus a stacked-bar plot."""
    runs = runs.copy().assign(backend=backend_label(runs))  # copy: one block, not one per column read
    parts = wall_time_parts(runs)
    table = pd.concat([runs[["num-clients", "backend", "sweep-seconds"]], parts], axis=1)
    table = table.groupby(["num-clients", "backend"]).mean().rename(columns={"sweep-seconds": "wall (s)", **PARTS})
    fig, ax = plt.subplots(figsize=(10, 4.8))
    labels = [f"N={n}\n" + b.replace(" client(s) at once", " at once").replace(", ", "\n") for n, b in table.index]
    bottom = pd.Series(0.0, index=table.index)
    for part in PARTS.values():
        ax.bar(labels, table[part], bottom=bottom, label=part)
        bottom += table[part]
    ax.set(ylabel="seconds", title="Wall time of one run: Flower simulation vs in-process")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return [
        "## Flower + Ray overhead",
        "",
        "The same runs (same config, no client cache) through `flwr run` and in one process "
        "(`--backend in-process`). 'Everything else' is the wall time not spent training clients, building "
        "surrogates or merging: process and Ray start-up, messaging, scoring and writing results.",
        "",
        table.round(1).reset_index().to_markdown(index=False),
        "",
        f"![overhead]({figure.name})",
        "",
    ]


def memory_section(runs: pd.DataFrame) -> list[str]:
    """Peak resident memory of the server process and of the largest client process, per client count."""
    columns = {
        "server-peak-rss-mb": "server peak RSS (MiB)",
        "client-max_peak-rss-mb": "client peak RSS (MiB)",
        "server-peak-gpu-mb": "server peak GPU (MiB)",
    }
    if "sweep-backend" in runs:
        runs = runs[runs["sweep-backend"] == "flower"]
    present = [c for c in columns if c in runs]
    table = runs.groupby(["sweep-method", "num-clients"])[present].max().rename(columns=columns)
    return [
        "## Peak memory (Flower sweep runs, maximum over datasets and splits)",
        "",
        "The server process holds Flower's simulation engine, Ray's driver and every client model; a client "
        "process is one Ray actor.",
        "",
        table.round(0).reset_index().to_markdown(index=False),
        "",
    ]


def write_performance_report(results: Path) -> Path:
    """Write ``results/performance.md`` (and ``overhead.png``) from whichever inputs exist."""
    lines = ["# Performance", ""]
    scaling, overhead, sweep = (
        results / "merge_scaling.csv",
        results / "overhead" / "runs.csv",
        results / "sweep" / "runs.csv",
    )
    if scaling.exists():
        lines += scaling_section(read_rows(scaling))
    universe = results / "universe_scaling.csv"
    if universe.exists():
        lines += universe_section(read_rows(universe))
    if overhead.exists():
        lines += overhead_section(read_rows(overhead), results / "overhead.png")
    if sweep.exists():
        lines += memory_section(read_rows(sweep))
    if len(lines) == 2:
        raise FileNotFoundError(f"none of {scaling}, {overhead}, {sweep} exists: run the benchmarks first")
    path = results / "performance.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.performance_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        print(f"wrote {write_performance_report(args.results)}")
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
