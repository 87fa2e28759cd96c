"""Benchmark sweeps: many Flower runs over client counts, methods, splits, surrogates and seeds, one CSV row each.

    python -m simulations.sweep --datasets mnist fashion-mnist --splits dirichlet disjoint --clients 2 4 8 16 \\
        --methods ste wm average --set epochs=2 --out results/sweep

Every run is ``flwr run .`` with its own ``--run-config`` (or, with ``--backend in-process``, the same computation
in this process; see :mod:`simulations.in_process`). Rows go to ``<out>/runs.csv`` as soon as a run finishes, via
an atomic rewrite, so a crash loses no finished row; a rerun skips the runs whose key (a hash of the run config,
client count and backend) is already there. Clients are trained once per federation and kept in a cache
(``<out>/client-cache``): every method of a federation merges the same client models. For each federation a FedAvg
run (``--fedavg-rounds`` rounds) gives the one-round and several-round baselines copied into every row.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmerge.federation import global_test_data
from fedmerge.merge import METHODS
from fedmerge.progress import progress_enabled
from fedmerge.surrogate import CONDENSED_INIT, SURROGATE_KINDS
from simulations.config import DEFAULT_RUN_CONFIG, ConfigValue, settings_from_run_config
from simulations.flower_cli import default_client_gpus, flwr_run, stop_superlinks
from simulations.process_tree import Terminated, sigterm_raises
from simulations.results_io import read_rows, save_rows
from strategies.schedule import SCHEDULES

BACKENDS = ("flower", "in-process")
SWEPT_KEYS = (
    "dataset",
    "split",
    "alpha",
    "strategy",
    "method",
    "num-rounds",
    "surrogate",
    "per-class",
    "seed",
    "finetune-epochs",
)
"""Run-config keys the sweep sets itself (``--set`` may not); always part of a run's key."""
VARIANT_KEYS = ("schedule", "distill-steps")
"""Run-config keys the sweep also sets itself, part of a run's key only where they differ from their default (so
rows written before they were swept keep their keys)."""
LOCAL_KEYS = ("results-dir", "client-cache", "data-root")
"""Run-config keys that say where files go; they do not change results and are not part of a run's key."""


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its run config (without file locations), client count, backend, and the CPUs each
    simulated client reserves (with 2 on a 2-core machine, Flower runs the clients one at a time)."""

    items: tuple[tuple[str, ConfigValue], ...]
    num_clients: int
    backend: str = "flower"
    client_cpus: float = 1.0

    @classmethod
    def make(
        cls, run_config: dict[str, ConfigValue], num_clients: int, backend: str, client_cpus: float = 1.0
    ) -> PlannedRun:
        return cls(tuple(sorted(run_config.items())), num_clients, backend, client_cpus)

    @property
    def config(self) -> dict[str, ConfigValue]:
        return dict(self.items)

    @property
    def key(self) -> str:
        """A stable hash of what decides this run's results (and timings): the swept keys and every other key that
        differs from its default, so that a key added to the run config later leaves finished runs' keys alone."""
        items = [(k, v) for k, v in self.items if k in SWEPT_KEYS or v != DEFAULT_RUN_CONFIG.get(k)]
        fields: list = [items, self.num_clients, self.backend]
        if self.backend == "flower" and self.client_cpus != 1.0:
            fields.append(self.client_cpus)
        text = json.dumps(fields)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def is_fedavg(self) -> bool:
        return self.config["strategy"] == "fedavg"

    @property
    def method(self) -> str:
        """``fedavg``, or the merge method, with ``@<schedule>`` unless it is the default tree, ``+ft<epochs>`` when
        the merged model is fine-tuned and ``+kd<steps>`` when the clients' ensemble is distilled into it."""
        if self.is_fedavg:
            return "fedavg"
        c = self.config
        label = str(c["method"])
        if c.get("schedule", "tree") != "tree":
            label += f"@{c['schedule']}"
        if c.get("finetune-epochs", 0):
            label += f"+ft{c['finetune-epochs']}"
        if c.get("distill-steps", 0):
            label += f"+kd{c['distill-steps']}"
        return label

    @property
    def split_label(self) -> str:
        c = self.config
        return f"dirichlet({c['alpha']:g})" if c["split"] == "dirichlet" else str(c["split"])

    @property
    def label(self) -> str:
        c = self.config
        surrogate = "" if self.is_fedavg else f" {c['surrogate']}:{c['per-class']}"
        return f"{c['dataset']} {self.split_label} N={self.num_clients} {self.method}{surrogate} seed {c['seed']}"


@dataclass
class SweepGrid:
    """What a sweep varies, plus run-config ``overrides`` shared by every run."""

    datasets: Sequence[str] = ("mnist",)
    splits: Sequence[str] = ("dirichlet",)
    alphas: Sequence[float] = (0.5,)
    clients: Sequence[int] = (2, 4, 8, 16, 32)
    methods: Sequence[str] = ("ste", "wm", "average")
    surrogates: Sequence[tuple[str, int]] = (("random", 10),)
    seeds: Sequence[int] = (0,)
    fedavg_rounds: int = 5
    overrides: dict[str, ConfigValue] = field(default_factory=dict)
    backend: str = "flower"
    data_root: str = ""  # where the datasets are ("" : the default search); not part of run keys
    client_cpus: float = 1.0
    finetune_epochs: Sequence[int] = (0,)
    schedules: Sequence[str] = ("tree",)
    distill_steps: Sequence[int] = (0,)
    merge_rounds: int = 1

    def __post_init__(self) -> None:
        bad = sorted(set(self.overrides) & set(SWEPT_KEYS + VARIANT_KEYS + LOCAL_KEYS))
        if bad:
            raise ValueError(f"--set cannot change {bad}: the sweep sets them (use its own options)")
        unknown_methods = sorted(set(self.methods) - set(METHODS))
        if unknown_methods:
            raise ValueError(f"unknown methods {unknown_methods}; choose from {', '.join(METHODS)}")
        for kind, per_class in self.surrogates:
            if kind not in SURROGATE_KINDS or per_class < 1:
                raise ValueError(f"bad surrogate {kind}:{per_class}; kinds: {', '.join(SURROGATE_KINDS)}, size >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.fedavg_rounds < 0 or any(n < 2 for n in self.clients) or any(e < 0 for e in self.finetune_epochs):
            raise ValueError("need --fedavg-rounds >= 0, client counts >= 2 and --finetune-epochs >= 0")
        if self.merge_rounds < 1:
            raise ValueError("need --merge-rounds >= 1")
        if any(s not in SCHEDULES for s in self.schedules) or any(k < 0 for k in self.distill_steps):
            raise ValueError(f"schedules must be among {', '.join(SCHEDULES)} and --distill-steps >= 0")
        settings_from_run_config(self.overrides, 2)  # unknown keys and bad values fail here, before any run


def _defaults_of(*prefixes: str) -> dict[str, ConfigValue]:
    """The default value of every run-config key that starts with one of ``prefixes``."""
    return {key: value for key, value in DEFAULT_RUN_CONFIG.items() if key.startswith(prefixes)}


def fedavg_counterpart(run: PlannedRun, rounds: int) -> PlannedRun:
    """The FedAvg run over the same federation as ``run`` (same data, clients, model and training)."""
    config = run.config | {"strategy": "fedavg", "num-rounds": rounds}
    config |= {
        key: DEFAULT_RUN_CONFIG[key] for key in ("method", "surrogate", "per-class", "finetune-epochs", "schedule")
    } | _defaults_of("distill-", "alignment", "condense-")  # unused by FedAvg: one FedAvg run per federation
    return PlannedRun.make(config, run.num_clients, run.backend, run.client_cpus)


def _split_problem(config: dict[str, ConfigValue], num_clients: int) -> str | None:
    """Why this federation cannot be built (e.g. more disjoint clients than classes), or None."""
    try:
        spec = settings_from_run_config(config, num_clients).federation
        num_classes = global_test_data(spec).num_classes if spec.split == "disjoint" else num_clients
        if num_clients > num_classes:
            return f"a disjoint split needs a class per client, {spec.dataset} has {num_classes}"
    except ValueError as err:
        return str(err)
    return None


def plan(grid: SweepGrid) -> tuple[list[PlannedRun], list[tuple[str, str]]]:
    """The runs of ``grid`` in order (per federation: FedAvg first, then each method) and the skipped combinations
    with the reason. Dataset errors (e.g. files not found) propagate."""
    runs: list[PlannedRun] = []
    skipped: list[tuple[str, str]] = []
    for seed in grid.seeds:
        for dataset in grid.datasets:
            for split in grid.splits:
                for alpha in grid.alphas if split == "dirichlet" else grid.alphas[:1]:
                    for num_clients in grid.clients:
                        base = (
                            DEFAULT_RUN_CONFIG
                            | grid.overrides
                            | {"dataset": dataset, "split": split, "alpha": float(alpha), "seed": seed}
                        )
                        for key in LOCAL_KEYS:
                            base.pop(key)
                        problem = _split_problem(base | {"data-root": grid.data_root}, num_clients)
                        if problem:
                            skipped.append((f"{dataset} {split} N={num_clients}", problem))
                            continue
                        for kind, per_class in grid.surrogates:
                            variants = itertools.product(
                                grid.methods, grid.schedules, grid.finetune_epochs, grid.distill_steps
                            )
                            for method, schedule, epochs, distill_steps in variants:
                                config = base | {
                                    "strategy": "merge",
                                    "method": method,
                                    "num-rounds": grid.merge_rounds,
                                    "surrogate": kind,
                                    "per-class": per_class,
                                    "finetune-epochs": epochs,
                                    "schedule": schedule,
                                    "distill-steps": distill_steps,
                                }
                                if kind not in CONDENSED_INIT:  # condensation knobs change nothing here
                                    config |= _defaults_of("condense-")
                                run = PlannedRun.make(config, num_clients, grid.backend, grid.client_cpus)
                                if grid.fedavg_rounds:
                                    runs.append(fedavg_counterpart(run, grid.fedavg_rounds))
                                runs.append(run)
    return list(dict.fromkeys(runs)), skipped  # drop repeats (one FedAvg run per federation), keep order


@dataclass
class SweepOptions:
    """Where and how a sweep runs."""

    out: Path
    cache: Path | None = None  # default <out>/client-cache
    timeout: float = 3600.0
    threads: int = 1
    client_gpus: float = field(default_factory=default_client_gpus)
    fedavg_rounds: int = 5
    data_root: str = ""  # "" : the default search (./data, ../shared/data) from the working directory

    @property
    def csv_path(self) -> Path:
        return self.out / "runs.csv"

    @property
    def cache_dir(self) -> Path:
        return (self.cache or self.out / "client-cache").resolve()


def finished_rows(csv_path: Path) -> pd.DataFrame:
    """The rows already in the sweep's CSV (empty when none)."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return pd.DataFrame(columns=["run-key"])
    rows = read_rows(csv_path, dtype={"run-key": str})
    return rows if "run-key" in rows else pd.DataFrame(columns=["run-key"])


def _run_flower(run: PlannedRun, config: dict, options: SweepOptions) -> dict:
    results_dir = Path(str(config["results-dir"]))
    log_path = options.out / "logs" / f"{run.key}.log"
    completed = flwr_run(
        config,
        run.num_clients,
        options.out.resolve() / "flwr-home",
        log_path,
        options.timeout,
        client_cpus=run.client_cpus,
        client_gpus=options.client_gpus,
    )
    csv_path = results_dir / "runs.csv"
    if not completed or not csv_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]) if log_path.exists() else ""
        raise RuntimeError(f"flwr run left no results row (log: {log_path}):\n{tail}")
    rows = read_rows(csv_path)
    if rows.empty:
        raise RuntimeError(f"flwr run left no readable results row in {csv_path} (log: {log_path})")
    return rows.iloc[-1].to_dict()


def _run_in_process(run: PlannedRun, config: dict, options: SweepOptions) -> dict:
    from simulations.in_process import run_in_process  # imports the Flower apps; only this backend needs them here

    torch.set_num_threads(options.threads)
    return run_in_process(config, run.num_clients)


def execute(run: PlannedRun, options: SweepOptions) -> dict:
    """Run ``run`` and return its results row with the sweep's columns (key, backend, seconds) added."""
    results_dir = (options.out / "runs" / run.key).resolve()
    shutil.rmtree(results_dir, ignore_errors=True)  # what a crashed earlier attempt left
    config = run.config | {
        "results-dir": str(results_dir),
        "client-cache": str(options.cache_dir),
        "data-root": options.data_root,
    }
    started = time.perf_counter()
    row = (_run_flower if run.backend == "flower" else _run_in_process)(run, config, options)
    return row | {
        "run-key": run.key,
        "sweep-backend": run.backend,
        "sweep-client-cpus": run.client_cpus,
        "host-cpus": os.cpu_count(),
        "sweep-method": run.method,
        "sweep-seconds": round(time.perf_counter() - started, 3),
    }


def with_fedavg_baselines(row: dict, run: PlannedRun, finished: pd.DataFrame, rounds: int) -> dict:
    """``row`` plus the one-round and ``rounds``-round FedAvg accuracies of the same federation (NaN when that
    FedAvg run is not finished)."""
    key = run.key if run.is_fedavg else fedavg_counterpart(run, rounds).key
    found = finished[finished["run-key"] == key] if rounds else finished.iloc[0:0]
    source = row if run.is_fedavg else (found.iloc[-1].to_dict() if len(found) else {})
    return row | {
        "fedavg-rounds": rounds,
        "acc_fedavg1_global": source.get("acc_round1_global", float("nan")),
        "acc_fedavgR_global": source.get(f"acc_round{rounds}_global", float("nan")),
    }


def run_sweep(
    runs: Sequence[PlannedRun], options: SweepOptions, console: Console | None = None
) -> list[tuple[PlannedRun, str]]:
    """Run every planned run whose key is not yet in ``<out>/runs.csv``, appending each row when it finishes;
    return the failed runs with their error (they are retried by the next sweep)."""
    console = console or Console(stderr=True)
    options.out.mkdir(parents=True, exist_ok=True)
    finished = finished_rows(options.csv_path)
    todo = [run for run in runs if run.key not in set(finished["run-key"])]
    console.log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already in {options.csv_path}, {len(todo)} to run")
    failures: list[tuple[PlannedRun, str]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=not progress_enabled()) as bar:
            task = bar.add_task("sweep", total=len(runs), completed=len(runs) - len(todo))
            for number, run in enumerate(todo, 1):
                bar.update(task, description=run.label)
                try:
                    row = with_fedavg_baselines(execute(run, options), run, finished, options.fedavg_rounds)
                except Exception as err:  # one failed run must not stop the sweep; it is retried next time
                    failures.append((run, str(err)))
                    console.log(f"[red]failed[/red] {run.label}: {err}")
                else:
                    save_rows(options.csv_path, [row])
                    finished = finished_rows(options.csv_path)
                    console.log(
                        f"[{number}/{len(todo)}] {run.label}: global accuracy {row['acc_merged_global']:.1f}%, "
                        f"merge {row['merge-seconds']:.1f} s, run {row['sweep-seconds']:.0f} s"
                    )
                bar.advance(task)
    finally:
        if any(run.backend == "flower" for run in todo):
            stop_superlinks(options.out.resolve() / "flwr-home")
    return failures


def parse_surrogate(text: str) -> tuple[str, int]:
    """``KIND:PER_CLASS`` (or ``KIND``, with the default size) as an argparse type."""
    kind, _, size = text.partition(":")
    try:
        return kind, int(size or DEFAULT_RUN_CONFIG["per-class"])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"surrogate must be KIND or KIND:PER_CLASS (e.g. random:10), got {text!r}"
        ) from None


def parse_assignment(text: str) -> tuple[str, ConfigValue]:
    """``KEY=VALUE`` with a TOML value (a bare word is a string) as an argparse type."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (a TOML value, e.g. epochs=2), got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value  # a bare word: a string


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--datasets", nargs="+", default=["mnist"], help="dataset names (see fedmerge.data)")
    parser.add_argument("--splits", nargs="+", default=["dirichlet"], help="iid, dirichlet, disjoint or domain")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.5], help="Dirichlet concentrations")
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8, 16, 32], help="client counts")
    parser.add_argument(
        "--methods", nargs="+", default=["ste", "wm", "average"], help=f"merge methods: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--surrogates",
        nargs="+",
        type=parse_surrogate,
        default=[("random", 10)],
        help=f"surrogates as KIND:PER_CLASS; kinds: {', '.join(SURROGATE_KINDS)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--finetune-epochs",
        nargs="+",
        type=int,
        default=[0],
        help="epochs of fine-tuning the merged model on the surrogates (0: none); each value is a variant",
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        choices=SCHEDULES,
        default=["tree"],
        help="merge schedules; each is a variant (universe: all clients at once in one shared frame)",
    )
    parser.add_argument(
        "--distill-steps",
        nargs="+",
        type=int,
        default=[0],
        help="steps of distilling the clients' ensemble into the merged model (0: none); each value is a variant",
    )
    parser.add_argument(
        "--merge-rounds",
        type=int,
        default=1,
        help="rounds of every merge run (from round 2 on, clients start from the last merged model)",
    )
    parser.add_argument("--fedavg-rounds", type=int, default=5, help="rounds of the FedAvg baseline (0: none)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        type=parse_assignment,
        default=[],
        metavar="KEY=VALUE",
        help="run-config values for every run, e.g. epochs=2 ste-steps=100 (see pyproject.toml)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="flower",
        help="flwr run (Flower simulation on Ray) or the same computation in this process",
    )
    parser.add_argument("--out", type=Path, default=Path("results/sweep"), help="folder of runs.csv, logs and plots")
    parser.add_argument("--data-root", default="", help="folder of the datasets (default: ./data, ../shared/data)")
    parser.add_argument("--cache", type=Path, default=None, help="client model cache (default: <out>/client-cache)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="CPUs each simulated client reserves (Flower runs cores / this many clients at once)",
    )
    parser.add_argument(
        "--client-gpus", type=float, default=default_client_gpus(), help="GPU share per simulated client"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of an in-process run (1 keeps results bit-identical)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.add_argument("--no-report", action="store_true", help="skip the plots and summary at the end")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        data_root = str(Path(args.data_root).resolve()) if args.data_root else ""
        grid = SweepGrid(
            datasets=args.datasets,
            splits=args.splits,
            alphas=args.alphas,
            clients=args.clients,
            methods=args.methods,
            surrogates=args.surrogates,
            seeds=args.seeds,
            fedavg_rounds=args.fedavg_rounds,
            overrides=dict(args.overrides),
            backend=args.backend,
            data_root=data_root,
            client_cpus=args.client_cpus,
            finetune_epochs=args.finetune_epochs,
            schedules=args.schedules,
            distill_steps=args.distill_steps,
            merge_rounds=args.merge_rounds,
        )
        runs, skipped = plan(grid)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    for what, why in skipped:
        console.log(f"skipped {what}: {why}")
    if args.dry_run:
        for run in runs:
            console.print(f"{run.key}  {run.label}")
        return 0
    options = SweepOptions(
        args.out,
        args.cache,
        args.timeout,
        threads=args.threads,
        client_gpus=args.client_gpus,
        fedavg_rounds=args.fedavg_rounds,
        data_root=data_root,
    )
    try:
        with sigterm_raises():  # SIGTERM cleans up as Ctrl-C does: flwr_run stops every process the run started
            failures = run_sweep(runs, options, console)
    except (KeyboardInterrupt, Terminated) as stop:
        console.print(
            f"[red]interrupted[/red] ({type(stop).__name__}): the run in progress and every process it started are "
            "stopped; finished rows are kept and a rerun continues"
        )
        return 130
    if not args.no_report and options.csv_path.exists():
        from simulations.sweep_report import write_report

        for path in write_report(options.csv_path, options.out, args.backend):
            console.log(f"wrote {path}")
    for run, error in failures:
        console.print(f"[red]failed:[/red] {run.label} ({run.key}): {error.splitlines()[0] if error else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
