"""Privacy report: how close each surrogate kind's images are to the client's training images, next to the merged
accuracy that kind gives.

    python -m simulations.privacy_report --dataset mnist --clients 8 --data-root ../shared/data \\
        --cache results/sweep/client-cache --out results

For each surrogate kind (``--kinds``), every client of the federation (trained once, or loaded from ``--cache``)
builds its surrogate; for every sent image the report measures, in [0, 1] pixel units, the L2 distance to the
nearest image of that client's training set and the highest SSIM with one of its 5 nearest
(:mod:`fedmerge.surrogate.privacy`), and counts exact copies (distance ~0) and near copies (closer to a training
image than 95 % of the training images are to their own nearest other training image). The server strategy of the
run config (with its defences) then merges the clients, and the merged model's global test accuracy is reported.
A reference row measures training images against the rest of their own training set.

One row per kind goes to ``<out>/privacy.csv`` (in place of that kind's row of the same setting from an earlier run)
with the run config, seed, package versions and wall times; ``<out>/privacy.md`` tables them and
``<out>/privacy.png`` shows, per kind, some sent images above their nearest training images.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fedmerge.device import default_device, seed_everything
from fedmerge.federation import client_train_data, global_test_data
from fedmerge.merge.functional import load_state
from fedmerge.surrogate import RAW_IMAGE_KINDS, CondenseConfig
from fedmerge.surrogate.privacy import exposure, nearest_images, reference_distances, to_pixels
from fedmerge.train import evaluate
from simulations.config import ConfigValue, RunSettings, settings_from_run_config
from simulations.federation_options import add_federation_options, federation_run_config, setting_key
from simulations.in_process import client_updates
from simulations.results_io import read_rows, save_rows
from simulations.server_app import make_strategy, template_model
from simulations.versions import version_columns, versions_text

KINDS = ("random", "herding", "kcenter", "condensed", "condensed-noise")
REFERENCE = "training images (reference)"
ORDER = {kind: i for i, kind in enumerate((*KINDS, REFERENCE))}
MERGE_DEFAULTS: dict[str, ConfigValue] = {
    "method": "np",
    "schedule": "universe",
    "alignment-iters": 3,
    "np-steps": 100,
    "epochs": 2,
    "merge-workers": 0,
}
"""The merge the report scores each kind with (``--set`` overrides): the N-model NP merge in one shared frame."""
SENT = {
    "random": "random training images, unchanged, with labels",
    "herding": "training images chosen by herding (features near the class mean), unchanged, with labels",
    "kcenter": "training images chosen by k-center (spread over feature space), unchanged, with labels",
    "condensed": "synthetic images optimised from random training images, with labels",
    "condensed-noise": "synthetic images optimised from noise, with labels",
}


@dataclass
class KindResult:
    """One kind's measured row and some sent images (pixels) with their nearest training images, for the plot."""

    row: dict[str, object]
    examples: torch.Tensor
    neighbours: torch.Tensor


def _dataset(settings: RunSettings, partition_id: int) -> str:
    """The dataset client ``partition_id`` trains on (one per client in a domain split)."""
    names = settings.federation.datasets
    return names[partition_id] if settings.federation.split == "domain" else names[0]


def _seconds(metrics: Mapping[str, object]) -> float:
    return float(str(metrics.get("surrogate-seconds", 0.0)))


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    return {
        f"{prefix}-min": round(float(v.min()), 4),
        f"{prefix}-median": round(float(v.median()), 4),
        f"{prefix}-mean": round(float(v.mean()), 4),
        f"{prefix}-max": round(float(v.max()), 4),
    }


def _examples(sent: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """Up to ``count`` sent images of distinct classes (then any) and their nearest training images."""
    firsts = [int(torch.nonzero(labels == c)[0]) for c in torch.unique(labels).tolist()]
    rest = [i for i in range(len(labels)) if i not in firsts]
    pick = torch.tensor((firsts + rest)[:count], dtype=torch.long)
    _, nearest = nearest_images(sent[pick], train)
    return sent[pick], train[nearest[:, 0]]


def measure_kind(settings: RunSettings, num_clients: int, kind: str, examples: int = 8) -> KindResult:
    """Build every client's surrogate of ``kind``, measure how close it is to the client's training set, merge."""
    started = time.perf_counter()
    updates = client_updates(settings, num_clients, 1, None, want_surrogate=True)
    distances, similarity, exact, near, thresholds, singled = [], [], [], [], [], []
    shown: tuple[torch.Tensor, ...] = ()
    for update in updates:
        if update.surrogate is None:
            continue
        dataset = _dataset(settings, update.partition_id)
        train = to_pixels(client_train_data(settings.federation, update.partition_id).x, dataset)
        sent = to_pixels(update.surrogate.x, dataset)
        found = exposure(sent, train, reference=reference_distances(train, seed=settings.seed))
        distances.append(found.distance)
        similarity.append(found.similarity)
        exact.append(found.exact)
        near.append(found.near)
        singled.append(found.singled_out)
        thresholds.append(found.near_threshold)
        if not shown:
            shown = _examples(sent, update.surrogate.y, train, examples)
    measured = time.perf_counter() - started
    template = template_model(settings)
    strategy = make_strategy(settings, template, num_clients)
    began = time.perf_counter()
    kept = strategy.defend(updates)
    state = strategy.combine(kept)
    merge_seconds = time.perf_counter() - began
    accuracy = evaluate(load_state(template, state), global_test_data(settings.federation), device=default_device())
    distance, ssim_ = torch.cat(distances), torch.cat(similarity)
    row: dict[str, object] = {
        "kind": kind,
        "sent": SENT.get(kind, kind),
        "raw-images": int(kind in RAW_IMAGE_KINDS),
        "images": len(distance),
        **_stats("l2", distance),
        **_stats("ssim", ssim_),
        "exact-copies": round(float(torch.cat(exact).double().mean()), 4),
        "near-copies": round(float(torch.cat(near).double().mean()), 4),
        "near-threshold-l2": round(statistics.mean(thresholds), 4),
        "singles-out": round(float(torch.cat(singled).double().mean()), 4),
        "acc_merged_global": round(accuracy, 2),
        "clients-merged": len(kept),
        "left-out": "; ".join(who for who, _ in strategy.left_out),
        "surrogate-seconds": round(statistics.mean(_seconds(u.metrics) for u in updates), 2),
        "merge-seconds": round(merge_seconds, 2),
        "wall-seconds": round(time.perf_counter() - started, 2),
        "measure-seconds": round(measured, 2),
    }
    return KindResult(row, *shown)


def measure_reference(settings: RunSettings, num_clients: int, sample: int = 200) -> dict[str, object]:
    """Training images against the rest of their own client's training set (the scale of 'near')."""
    started = time.perf_counter()
    distances, similarity = [], []
    for k in range(num_clients):
        train = to_pixels(client_train_data(settings.federation, k).x, _dataset(settings, k))
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed + k))[:sample]
        found = exposure(train[pick], train, reference=torch.ones(1, 2), own_rows=pick)
        distances.append(found.distance)
        similarity.append(found.similarity)
    distance, ssim_ = torch.cat(distances), torch.cat(similarity)
    return {
        "kind": REFERENCE,
        "sent": f"{sample} training images per client against the rest of that client's training set",
        "raw-images": 1,
        "images": len(distance),
        **_stats("l2", distance),
        **_stats("ssim", ssim_),
        "wall-seconds": round(time.perf_counter() - started, 2),
    }


def _pct(value: float) -> str:
    return "" if value != value else f"{100 * value:.1f} %"


def write_report(rows: pd.DataFrame, path: Path) -> Path:
    """``privacy.md``: per setting, one line per kind."""
    lines = [
        "# Privacy: how close the sent surrogate images are to the client's training images",
        "",
        "For each surrogate kind: every image the clients sent, against its own client's training set, in [0, 1] "
        "pixel units: the L2 distance to the nearest training image and the highest SSIM with one of its 5 nearest "
        "(1 = identical); exact copies (L2 ~0) and near copies (closer than 95 % of the training images are to their "
        "own nearest other training image: the L2 threshold is shown); and the merged model's global test accuracy. "
        "Singles out: the nearest training image is much closer than the second nearest (their distance ratio is "
        "below its 5th percentile among the training images themselves): the sent image is made from that one image "
        "(a copy, or a blurred or perturbed copy), not a class-typical picture. "
        "The reference row is training images against the rest of their own training set. "
        "Written by `python -m simulations.privacy_report`.",
    ]
    for setting, group in rows.groupby("setting", sort=False):
        first = group.iloc[0]
        lines += [
            "",
            f"## {first['dataset']} {first['split']} ({first['num-clients']} clients), {first['per-class']} images "
            f"per class, merged by {first['method']} / {first['schedule']}",
            "",
            f"Setting `{setting}`, seed {first['seed']}; config: `{first['cfg']}`; versions: {first['versions']}.",
            "",
            "| surrogate | what is sent | images | L2 to nearest: min / median / mean | SSIM: median / max | "
            "exact copies | near copies | singles out one training image | merged accuracy | clients merged | "
            "build s / client |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for _, row in group.sort_values("kind", key=lambda s: s.map(ORDER.get)).iterrows():
            reference = row["kind"] == REFERENCE
            threshold = "" if reference else f" (L2 < {float(row['near-threshold-l2']):.2f})"
            near = "" if reference else _pct(float(row["near-copies"])) + threshold
            lines.append(
                f"| {row['kind']} | {row['sent']} | {row['images']} | {float(row['l2-min']):.2f} / "
                f"{float(row['l2-median']):.2f} / {float(row['l2-mean']):.2f} | {float(row['ssim-median']):.2f} / "
                f"{float(row['ssim-max']):.2f} | {'' if reference else _pct(float(row['exact-copies']))} | {near} | "
                + ("" if reference else _pct(float(row.get("singles-out", float("nan")))))
                + (
                    " | | | |"
                    if reference
                    else f" | {float(row['acc_merged_global']):.1f} | {int(float(row['clients-merged']))} | "
                )
                + ("" if reference else f"{float(row['surrogate-seconds']):.1f} |")
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(results: Sequence[KindResult], path: Path) -> Path:
    """Per kind, some sent images (top) above their nearest training images (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(r.examples) for r in results)
    fig, axes = plt.subplots(2 * len(results), columns, figsize=(columns * 0.9, len(results) * 2.0), squeeze=False)
    for i, result in enumerate(results):
        for j in range(columns):
            for row, images in ((2 * i, result.examples), (2 * i + 1, result.neighbours)):
                ax = axes[row][j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(images):
                    image = images[j].clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
                    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        axes[2 * i][0].set_ylabel(f"{result.row['kind']}\nsent", fontsize=7)
        axes[2 * i + 1][0].set_ylabel("nearest\ntraining", fontsize=7)
    fig.suptitle("Sent surrogate images (client 0) above their nearest training image", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_results(csv_path: Path) -> pd.DataFrame:
    if not csv_path.exists():
        return pd.DataFrame(columns=["setting", "kind"])
    return read_rows(csv_path, required=("setting", "kind"), dtype={"setting": str})


def replace_rows(csv_path: Path, setting: str, rows: list[dict]) -> None:
    """Add ``rows`` to the CSV in place of the rows of the same setting and kind (a rerun measures again)."""
    old = read_results(csv_path)
    kinds = {row["kind"] for row in rows}
    stale = (old["setting"] == setting) & old["kind"].isin(kinds)
    if stale.any():
        tmp = csv_path.with_suffix(".csv.tmp")
        old[~stale].to_csv(tmp, index=False)
        tmp.replace(csv_path)
    save_rows(csv_path, rows)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.privacy_report", description=__doc__.split("\n\n")[0])
    add_federation_options(
        parser,
        threads=1,
        set_help=f"run-config values (defaults here: {' '.join(f'{k}={v}' for k, v in MERGE_DEFAULTS.items())})",
    )
    parser.add_argument("--per-class", type=int, default=10, help="surrogate images per class")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument(
        "--condense-iterations",
        type=int,
        default=None,
        help="networks the condensed kinds match gradients on (default: the library's, about 100 image updates)",
    )
    parser.add_argument(
        "--condense-batch", type=int, default=256, help="real images per class for each real gradient of condensation"
    )
    args = parser.parse_args(None if argv is None else list(argv))
    console_log = print
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = MERGE_DEFAULTS | dict(args.overrides)
    run_config = federation_run_config(args, defaults=MERGE_DEFAULTS, extra={"per-class": args.per_class})
    condensation = {"condense-iterations": args.condense_iterations, "condense-batch": args.condense_batch}
    key = setting_key(run_config | condensation, args.clients, ignore=("surrogate",))
    cfg = " ".join(f"{k}={v}" for k, v in sorted((overrides | condensation).items()))
    common = {
        "setting": key,
        "dataset": args.dataset,
        "split": args.split,
        "alpha": args.alpha,
        "num-clients": args.clients,
        "per-class": args.per_class,
        "method": run_config["method"],
        "schedule": run_config["schedule"],
        "seed": run_config["seed"],
        "cfg": cfg,
        "versions": versions_text(),
        **version_columns(),
    }
    csv_path, md_path, png_path = args.out / "privacy.csv", args.out / "privacy.md", args.out / "privacy.png"
    results: list[KindResult] = []
    condense = CondenseConfig(iterations=args.condense_iterations, batch_real=args.condense_batch)
    for kind in args.kinds:
        settings = settings_from_run_config(run_config | {"surrogate": kind}, args.clients)
        settings = dataclasses.replace(settings, surrogate=dataclasses.replace(settings.surrogate, condense=condense))
        seed_everything(settings.seed)
        result = measure_kind(settings, args.clients, kind)
        results.append(result)
        replace_rows(csv_path, key, [common | result.row])
        r = result.row
        console_log(
            f"{kind}: L2 to nearest median {r['l2-median']}, SSIM median {r['ssim-median']}, exact copies "
            f"{r['exact-copies']}, near copies {r['near-copies']}, merged {r['acc_merged_global']}% "
            f"({r['wall-seconds']} s)",
            flush=True,
        )
    settings = settings_from_run_config(run_config, args.clients)
    replace_rows(csv_path, key, [common | measure_reference(settings, args.clients)])
    console_log(f"wrote {write_report(read_results(csv_path), md_path)} and {csv_path}", flush=True)
    if results:
        console_log(f"wrote {write_plot(results, png_path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
