"""Command-line options that name one federation (dataset, split, clients, data, client cache, run-config overrides),
the run config they make, and a stable key for the rows a script writes about it. Shared by the scripts that study
one federation in depth (``simulations.robustness``, ``simulations.privacy_report``)."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from simulations.config import DEFAULT_RUN_CONFIG, ConfigValue
from simulations.sweep import parse_assignment

FILE_LOCATIONS: tuple[str, ...] = ("results-dir", "client-cache", "data-root")
"""Run-config keys that say where files are, not what a result is."""
ADDED_LATER: tuple[str, ...] = (
    "ensemble-weights",
    "distill-rotate",
    "distill-scale",
    "distill-weight-decay",
    "distill-cutmix",
    "condense-iterations",
    "distill-boundary",
    "distill-elastic",
    "distill-loss",
)
"""Run-config keys added after the committed rows were keyed: left out of a key while at their default, so those
rows keep their keys (add every new run-config key here)."""


def add_federation_options(
    parser: argparse.ArgumentParser, threads: int = 0, set_help: str | None = None
) -> argparse.ArgumentParser:
    """Add ``--dataset --split --alpha --clients --data-root --cache --set --threads --out`` to ``parser``
    (``threads``: the default of ``--threads``; 0 keeps torch's)."""
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--split", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--cache", type=Path, default=None, help="client cache folder (trained clients are reused)")
    parser.add_argument(
        "--set", dest="overrides", nargs="*", type=parse_assignment, default=[], metavar="KEY=VALUE", help=set_help
    )
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser


def federation_run_config(
    args: argparse.Namespace,
    defaults: Mapping[str, ConfigValue] | None = None,
    extra: Mapping[str, ConfigValue] | None = None,
) -> dict[str, ConfigValue]:
    """The run config of ``args``: the app's defaults, then ``defaults`` (the script's own), then ``--set``, then
    the federation options and ``extra`` (which ``--set`` cannot override)."""
    return (
        DEFAULT_RUN_CONFIG
        | dict(defaults or {})
        | dict(args.overrides)
        | {
            "dataset": args.dataset,
            "split": args.split,
            "alpha": args.alpha,
            "data-root": args.data_root,
            "client-cache": str(args.cache.resolve()) if args.cache else "",
        }
        | dict(extra or {})
    )


def setting_key(run_config: Mapping[str, ConfigValue | None], *parts: object, ignore: tuple[str, ...] = ()) -> str:
    """A stable 16-hex-digit hash of what decides a row: the run config without file locations (nor ``ignore``'s
    keys, nor keys :data:`ADDED_LATER` at their default) and ``parts`` (the client count, ...)."""
    later_at_default = {k for k in ADDED_LATER if run_config.get(k) == DEFAULT_RUN_CONFIG.get(k)}
    kept = {k: v for k, v in run_config.items() if k not in set(FILE_LOCATIONS + ignore) | later_at_default}
    return hashlib.sha256(json.dumps([sorted(kept.items()), *parts]).encode()).hexdigest()[:16]
