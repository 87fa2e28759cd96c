"""Report of the DENSE one-shot protocol (Zhang et al., NeurIPS 2022, Table 1): 5 clients, Dirichlet(alpha) for
alpha = 0.1 / 0.3 / 0.5, a CNN, MNIST and Fashion-MNIST, one round. Our rows (from the sweep's distilled runs)
sit beside the published FedAvg, DENSE and ensemble figures.

    python -m simulations.one_shot_report results/one_shot/runs.csv

Writes ``summary.md`` and ``one_shot.png`` next to the CSV.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from fedmerge.surrogate import CONDENSED_INIT
from simulations.n_client_report import load_distilled_runs
from simulations.results_io import report_main

matplotlib.use("Agg")  # files only, no display

DENSE_TABLE1: dict[tuple[str, str], dict[float, float]] = {
    ("mnist", "FedAvg (1 round)"): {0.1: 48.2, 0.3: 72.9, 0.5: 90.6},
    ("mnist", "DENSE"): {0.1: 66.6, 0.3: 76.5, 0.5: 95.8},
    ("mnist", "ensemble"): {0.1: 86.8, 0.3: 96.8, 0.5: 97.2},
    ("fashion-mnist", "FedAvg (1 round)"): {0.1: 41.7, 0.3: 83.0, 0.5: 83.7},
    ("fashion-mnist", "DENSE"): {0.1: 50.3, 0.3: 84.0, 0.5: 85.9},
    ("fashion-mnist", "ensemble"): {0.1: 67.7, 0.3: 87.3, 0.5: 89.4},
}
"""Zhang et al. (2022), Table 1: accuracy (%) per (dataset, method) and Dirichlet alpha."""

OURS = {
    "acc_fedavg1_global": "FedAvg (1 round)",
    "acc_ensemble_global": "ensemble",
    "acc_ensemble-examples_global": "ensemble by sample count",
    "acc_merge-only_global": "merge only",
    "acc_merged_global": "merge + distillation",
    "acc_distilled-fresh_global": "distillation, fresh model",
    "acc_pooled-recipe_global": "pooled surrogates, same recipe",
}
"""Our result columns, in table order, and their names."""


def surrogate_label(row: pd.Series) -> str:
    """What the clients sent, e.g. ``random 10/class`` or ``condensed-noise 1/class, 300 networks`` (condensed for
    longer than the library's default)."""
    label = f"{row['cfg_surrogate']} {int(row['cfg_per-class'])}/class"
    networks = row.get("cfg_condense-iterations", 0)
    if row["cfg_surrogate"] in CONDENSED_INIT and pd.notna(networks) and networks:
        label += f", {int(networks)} networks"
    return label


def load_one_shot_runs(csv_path: Path) -> pd.DataFrame:
    """The distilled runs of ``csv_path`` (:func:`load_distilled_runs`) with ``surrogate`` (:func:`surrogate_label`)
    added: the table, the per-seed verdict and the plot all group by it."""
    runs = load_distilled_runs(csv_path)
    return runs.assign(surrogate=runs.apply(surrogate_label, axis=1))


def our_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of every ablation column, indexed by (dataset, pipeline, surrogate, column name), one column
    per alpha (``runs`` as :func:`load_one_shot_runs` gives them)."""
    long = runs.melt(
        id_vars=["cfg_dataset", "pipeline", "surrogate", "cfg_alpha", "cfg_seed"],
        value_vars=[c for c in OURS if c in runs],
        var_name="column",
        value_name="accuracy",
    )
    long["row"] = long["column"].map(OURS)
    table = long.pivot_table(
        index=["cfg_dataset", "pipeline", "surrogate", "row"],
        columns="cfg_alpha",
        values="accuracy",
        aggfunc="mean",
    )
    order = {name: i for i, name in enumerate(OURS.values())}
    return table.sort_index(key=lambda level: level.map(order) if level.name == "row" else level)


def merged_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Merge + distillation accuracy of every seed, indexed by (dataset, pipeline, surrogate, seed), one column per
    alpha (NaN where that seed did not run that alpha; ``runs`` as :func:`load_one_shot_runs` gives them)."""
    return runs.pivot_table(
        index=["cfg_dataset", "pipeline", "surrogate", "cfg_seed"],
        columns="cfg_alpha",
        values="acc_merged_global",
        aggfunc="mean",
    )


def seeds_of(per_seed: pd.DataFrame, dataset: str, pipeline: str, surrogate: str) -> pd.DataFrame:
    """The rows of :func:`merged_per_seed` for one (dataset, pipeline, surrogate), indexed by seed."""
    return cast(
        pd.DataFrame, per_seed.xs((dataset, pipeline, surrogate), level=["cfg_dataset", "pipeline", "surrogate"])
    )


def seeds_label(per_seed: pd.DataFrame) -> str:
    """How many seeds each alpha's mean is over: ``3`` when the same for every alpha run, else ``1 / 3 / 1``."""
    counts = per_seed.notna().sum()
    counts = counts[counts > 0]
    return str(counts.iloc[0]) if counts.nunique() == 1 else " / ".join(map(str, counts))


def _seed_note(per_seed: pd.DataFrame, dense: dict[float, float]) -> str:
    """Where several seeds ran: whether every single seed also matches DENSE, or which fall short and by how much."""
    alphas = [float(alpha) for alpha in per_seed.columns]
    several = [alpha for alpha in alphas if alpha in dense and per_seed[alpha].notna().sum() > 1]
    if not several:
        return ""
    short = [
        f"seed {seed} at alpha {alpha:g} by {dense[alpha] - value:.1f}"
        for alpha in several
        for seed, value in per_seed[alpha].dropna().items()
        if value < dense[alpha]
    ]
    alone = "every seed alone matches or beats DENSE" if not short else "short alone: " + ", ".join(short)
    label = seeds_label(per_seed)
    seeds = f"{label} seeds" if "/" not in label else f"seeds per alpha {label}"
    return f"{seeds}, {alone}"


def verdict(ours: pd.DataFrame, dataset: str, per_seed: pd.DataFrame) -> list[str]:
    """One line per (pipeline, surrogate): does merge + distillation (mean over seeds) match or beat DENSE at every
    alpha, and by how much it is short where it is not; and, from ``per_seed`` (:func:`merged_per_seed`), how each
    seed alone does where more than one ran."""
    dense = DENSE_TABLE1[(dataset, "DENSE")]
    lines = []
    here = ours.xs(dataset, level="cfg_dataset")
    for key, block in here.groupby(level=["pipeline", "surrogate"]):
        pipeline, surrogate = cast(tuple[str, str], key)
        if "merge + distillation" not in block.index.get_level_values("row"):
            continue
        merged = block.xs("merge + distillation", level="row").iloc[0].dropna()
        gaps = {alpha: merged[alpha] - dense[alpha] for alpha in merged.index if alpha in dense}
        short = {a: -g for a, g in gaps.items() if g < 0}
        status = (
            "matches or beats DENSE at every alpha run"
            if not short
            else "short of DENSE at " + ", ".join(f"alpha {a:g} by {s:.1f}" for a, s in short.items())
        )
        missing = sorted(set(dense) - set(gaps))
        notes = [f"alpha {', '.join(f'{a:g}' for a in missing)} not run"] if missing else []
        if seed_note := _seed_note(seeds_of(per_seed, dataset, pipeline, surrogate), dense):
            notes.append(seed_note)
        if notes:
            status += f" ({'; '.join(notes)})"
        lines.append(f"- {pipeline}, {surrogate}: {status}.")
    return lines


def dataset_table(ours: pd.DataFrame, dataset: str, per_seed: pd.DataFrame) -> str:
    """Markdown: the published rows, then ours (pipeline, surrogate, ablation column), one column per alpha, and a
    last column with the number of seeds of each of our rows (from ``per_seed``, :func:`merged_per_seed`)."""
    alphas = sorted({a for (d, _), row in DENSE_TABLE1.items() if d == dataset for a in row})
    rows = []
    for (d, method), values in DENSE_TABLE1.items():
        if d == dataset:
            published = {f"alpha {a:g}": values[a] for a in alphas}
            rows.append({"source": "Zhang et al. 2022", "row": method, **published, "seeds": ""})
    here = ours.xs(dataset, level="cfg_dataset") if dataset in ours.index.get_level_values(0) else ours.iloc[:0]
    for key, accuracy in here.iterrows():
        pipeline, surrogate, row = cast(tuple[str, str, str], key)
        rows.append(
            {
                "source": f"ours: {pipeline}, {surrogate}",
                "row": row,
                **{f"alpha {a:g}": accuracy.get(a, float("nan")) for a in alphas},
                "seeds": seeds_label(seeds_of(per_seed, dataset, pipeline, surrogate)),
            }
        )
    return pd.DataFrame(rows).round(1).to_markdown(index=False)


def plot(ours: pd.DataFrame, path: Path) -> Path:
    """A panel per dataset: DENSE's published curve and ours (merge + distillation, per surrogate) against alpha."""
    datasets = [d for d in ("mnist", "fashion-mnist") if d in ours.index.get_level_values(0)]
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(6 * max(1, len(datasets)), 4.2), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        for method, style in (("DENSE", "k-"), ("ensemble", "k:"), ("FedAvg (1 round)", "k--")):
            published = DENSE_TABLE1[(dataset, method)]
            ax.plot(list(published), list(published.values()), style, marker="x", label=f"{method} (published)")
        here = ours.xs(dataset, level="cfg_dataset")
        for key, accuracy in here.iterrows():
            pipeline, surrogate, row = cast(tuple[str, str, str], key)
            if row in ("merge + distillation", "ensemble"):
                style = "-" if row == "merge + distillation" else ":"
                accuracy = accuracy.dropna()
                label = f"ours {row}: {pipeline}, {surrogate}"
                ax.plot(accuracy.index, accuracy.values, style, marker="o", label=label)
        ax.set(title=dataset, xlabel="Dirichlet alpha", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("DENSE one-shot protocol: 5 clients, CNN, one round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_markdown(runs: pd.DataFrame, figure: Path) -> str:
    """The page: what ran, and per dataset the published rows beside ours and the verdict against DENSE."""
    ours, per_seed = our_rows(runs), merged_per_seed(runs)
    first = runs.iloc[0]
    seeds = ", ".join(map(str, sorted(runs["cfg_seed"].unique())))
    lines = [
        "# One-shot protocol of DENSE (Zhang et al., NeurIPS 2022, Table 1)",
        "",
        f"{len(runs)} runs, seeds {seeds}; {int(first['num-clients'])} clients, Dirichlet(alpha) split, model "
        f"{first['cfg_model']}, local epochs {', '.join(map(str, sorted(runs['cfg_epochs'].unique())))} (each "
        "pipeline's label says which), one round. Accuracy (%) on the global test set, mean over seeds (the "
        "`seeds` column says how many; several numbers: per alpha). Every one of our rows comes from the same run "
        "on the same clients: the merge alone, the merge then ensemble distillation on the surrogates the clients "
        "sent, the same distillation from a fresh model, a fresh model trained on the pooled surrogates with the "
        "same recipe, and the ensemble; FedAvg (1 round) is the same federation's FedAvg run.",
        "",
        "DENSE sends no client data to the server; our pipeline receives each client's surrogate. The 1/class rows "
        "and the noise-initialised condensed rows (no raw image leaves a client; see `../privacy.md`) are the "
        "closest to its setting. Our clients were trained for the epochs above, not with DENSE's local recipe, so "
        "the two ensembles differ: compare each pipeline with the ensemble and FedAvg of its own row block first.",
        "",
        f"![{figure.stem}]({figure.name})",
        "",
    ]
    for dataset in ("mnist", "fashion-mnist"):
        if dataset not in ours.index.get_level_values(0):
            continue
        table = dataset_table(ours, dataset, per_seed)
        lines += [f"## {dataset}", "", table, "", *verdict(ours, dataset, per_seed), ""]
    costs = runs.groupby(["cfg_dataset", "cfg_alpha", "pipeline"])[["merge-seconds"]].mean().round(1)
    costs = costs.reset_index().rename(columns={"cfg_dataset": "dataset", "cfg_alpha": "alpha"})
    lines += ["## Server time (merge + distillation, s, mean per run, 2 CPU cores)", "", costs.to_markdown(index=False)]
    return "\n".join(lines)


def write_report(csv_path: Path, out: Path | None = None) -> list[Path]:
    """Write ``summary.md`` and ``one_shot.png`` for the distilled runs of ``csv_path`` into ``out``."""
    out = out or csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    runs = load_one_shot_runs(csv_path)
    figure = plot(our_rows(runs), out / "one_shot.png")
    page = out / "summary.md"
    page.write_text(summary_markdown(runs, figure))
    return [figure, page]


def main(argv: Iterable[str] | None = None) -> int:
    return report_main(
        "simulations.one_shot_report", __doc__ or "", Path("results/one_shot/runs.csv"), write_report, argv
    )


if __name__ == "__main__":
    sys.exit(main())
