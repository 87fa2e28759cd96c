"""Benchmark: how the server's merge time grows with the number of clients, per schedule and runner.

    python -m simulations.merge_scaling --clients 2 4 8 16 --methods ste wm --set epochs=2 ste-steps=100

Client models come from the client cache (``--cache``, by default the one ``simulations.sweep`` filled), so the
models are those of a sweep's federation; missing ones are trained first. For each client count it times the whole
merge along the ways named by ``--ways``: the tree with each level's pairs in parallel Ray tasks (``--workers``), the
same tree one pair after another in this process, all-to-one (always sequential), and the universe schedule (all
clients at once in one shared frame, optionally followed by ensemble distillation: ``--set distill-steps=1000``).
``peak-rss-mb`` is this process's peak so far; with ``--isolate`` every measurement runs in a fresh process and
``merge-peak-rss-mb`` is that process's own peak (the merge's memory, plus the loaded clients and Python).
Ray is started, and its workers warmed up
with an untimed merge, before timing. Rows go to
``results/merge_scaling.csv`` (resumable, like the sweep) and a plot to ``results/merge_scaling.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import torch
from rich.console import Console

from fedmerge.device import default_device
from fedmerge.federation import global_test_data
from fedmerge.merge.functional import load_state
from fedmerge.train import evaluate
from simulations.config import DEFAULT_RUN_CONFIG, RunSettings, settings_from_run_config
from simulations.in_process import client_updates
from simulations.memory import peak_rss_mb
from simulations.results_io import read_rows as read_csv_rows
from simulations.results_io import save_rows
from simulations.server_app import template_model
from simulations.sweep import parse_assignment
from simulations.versions import version_columns
from strategies import RayRunner, SequentialRunner
from strategies.schedule import MergeNode, Schedule, run_schedule

matplotlib.use("Agg")  # files only, no display

WAYS: dict[str, tuple[Schedule, str]] = {
    "tree, parallel": ("tree", "ray"),
    "tree, sequential": ("tree", "sequential"),
    "all-to-one": ("all-to-one", "sequential"),
    "universe": ("universe", "sequential"),
}
DEFAULT_WAYS = ["tree, parallel", "tree, sequential", "all-to-one"]


def client_nodes(settings: RunSettings, num_clients: int) -> list[MergeNode]:
    """The federation's trained clients (from the cache when there) as merge-tree leaves."""
    return [MergeNode.from_update(u) for u in client_updates(settings, num_clients, 1, None, want_surrogate=True)]


def time_merge(settings: RunSettings, nodes: list[MergeNode], way: str, ray_runner: RayRunner) -> tuple[float, float]:
    """Seconds to merge ``nodes`` the given ``way``, and the merged model's global test accuracy (%)."""
    schedule, runner_kind = WAYS[way]
    runner = ray_runner if runner_kind == "ray" else SequentialRunner()
    template = template_model(settings)
    started = time.perf_counter()
    merged, _ = run_schedule(schedule, template, nodes, settings.merge_config(), runner)
    seconds = time.perf_counter() - started
    return seconds, evaluate(
        load_state(template, merged.state), global_test_data(settings.federation), device=default_device()
    )


def _isolated(run_config: dict, num_clients: int, way: str) -> tuple[float, float, float]:
    torch.set_num_threads(1)
    settings = settings_from_run_config(run_config, num_clients)
    nodes = client_nodes(settings, num_clients)
    seconds, accuracy = time_merge(settings, nodes, way, RayRunner(1))
    return seconds, accuracy, peak_rss_mb()


def isolated_time_merge(run_config: dict, num_clients: int, way: str) -> tuple[float, float, float]:
    """:func:`time_merge` in a fresh process (no Ray ways): seconds, accuracy and that process's peak RSS (MB)."""
    if WAYS[way][1] == "ray":
        raise ValueError("--isolate times in-process ways only")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_isolated, run_config, num_clients, way).result()


def read_rows(csv_path: Path) -> pd.DataFrame:
    """Finished measurements (``cfg`` as text: an empty one stays "", not NaN)."""
    if not csv_path.exists():
        return pd.DataFrame(columns=["num-clients", "method", "way", "cfg"])
    return read_csv_rows(
        csv_path,
        required=("num-clients", "method", "way"),
        dtype={"cfg": str},
        keep_default_na=False,
        na_values={"merge-seconds": [""]},
    )


def warm_up(settings: RunSettings, nodes: list[MergeNode], ray_runner: RayRunner) -> None:
    """One untimed data-free parallel level, so that every Ray worker has imported torch and this project."""
    pairs = [
        MergeNode(n.state, (i,), n.num_examples, n.surrogate)
        for i, n in enumerate((nodes * ray_runner.workers * 2)[: 2 * ray_runner.workers])
    ]
    run_schedule(
        "tree", template_model(settings), pairs, dataclasses.replace(settings.merge_config(), method="wm"), ray_runner
    )


def plot(rows: pd.DataFrame, path: Path) -> Path:
    """Merge seconds against client count, one line per way, a panel per method."""
    methods = sorted(rows["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        here = rows[rows["method"] == method]
        for way in sorted(here["way"].unique()):
            line = here[here["way"] == way].groupby("num-clients")["merge-seconds"].mean()
            ax.plot(line.index, line.values, marker="o", label=way)
        ticks = sorted(here["num-clients"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set(title=f"{method}: merge time", xlabel="clients", ylabel="seconds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.merge_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--split", default="dirichlet")
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["ste", "wm"])
    parser.add_argument("--set", dest="overrides", nargs="*", type=parse_assignment, default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, default=2, help="parallel Ray tasks per tree level")
    parser.add_argument("--cache", type=Path, default=Path("results/sweep/client-cache"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=DEFAULT_WAYS, help="schedules to time")
    parser.add_argument("--isolate", action="store_true", help="time each merge in a fresh process (its own peak)")
    parser.add_argument("--name", default="merge_scaling", help="file stem of the CSV and plot under --out")
    args = parser.parse_args(None if argv is None else list(argv))
    console = Console(stderr=True)
    torch.set_num_threads(1)  # one thread per merge, as in the Ray tasks: the comparison is about the schedule
    csv_path = args.out / f"{args.name}.csv"
    done = read_rows(csv_path)
    ray_runner = RayRunner(args.workers)
    if any(WAYS[way][1] == "ray" for way in args.ways):
        ray_runner.start()  # start Ray before any timing
    warmed = False
    for num_clients in args.clients:
        for method in args.methods:
            run_config = (
                DEFAULT_RUN_CONFIG
                | dict(args.overrides)
                | {
                    "dataset": args.dataset,
                    "split": args.split,
                    "method": method,
                    "client-cache": str(args.cache.resolve()),
                }
            )
            cfg = " ".join(f"{k}={v}" for k, v in sorted(dict(args.overrides).items()))
            settings = settings_from_run_config(run_config, num_clients)
            nodes = None
            for way in args.ways:
                finished = done[
                    (done["num-clients"] == num_clients)
                    & (done["method"] == method)
                    & (done["way"] == way)
                    & (done["cfg"] == cfg)
                ]
                if len(finished):
                    continue
                merge_peak = float("nan")
                if args.isolate:
                    seconds, accuracy, merge_peak = isolated_time_merge(run_config, num_clients, way)
                else:
                    if nodes is None:
                        nodes = client_nodes(settings, num_clients)
                    if not warmed and WAYS[way][1] == "ray":
                        warm_up(settings, nodes, ray_runner)
                        warmed = True
                    seconds, accuracy = time_merge(settings, nodes, way, ray_runner)
                row = {
                    "dataset": args.dataset,
                    "split": args.split,
                    "num-clients": num_clients,
                    "method": method,
                    "way": way,
                    "workers": args.workers if WAYS[way][1] == "ray" else 1,
                    "merge-seconds": round(seconds, 2),
                    "acc_merged_global": round(accuracy, 2),
                    "peak-rss-mb": round(peak_rss_mb(), 1),
                    "merge-peak-rss-mb": round(merge_peak, 1),
                    "cfg": cfg,
                }
                save_rows(csv_path, [row | version_columns()])
                done = read_rows(csv_path)
                console.log(f"N={num_clients} {method} {way}: {seconds:.1f} s, merged {accuracy:.1f}%")
    console.log(f"wrote {plot(read_csv_rows(csv_path), args.out / f'{args.name}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
