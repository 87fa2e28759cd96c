"""Report of the N-client pipeline (issue: merging that holds up across N clients): the ablation for every client
count and the one-round goals, from the sweep rows whose merged model was distilled from the clients' ensemble.

    python -m simulations.n_client_report results/sweep/runs.csv

Writes ``n_clients.md`` and ``n_clients.png`` next to the CSV. Every such row scores, from one run on the same
clients and surrogates: the merge alone (``merge-only``), the merge followed by distillation (``merged``), the same
distillation from a fresh model (``distilled-fresh``), a fresh model trained on the pooled surrogates with the same
recipe (``pooled-recipe``), the ensemble, and the federation's FedAvg after one and after R rounds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.artist import Artist

from simulations.central import CENTRAL_KEYS, RESULT_COLUMN
from simulations.config import DEFAULT_RUN_CONFIG
from simulations.results_io import read_rows, report_main

matplotlib.use("Agg")  # files only, no display

ABLATION = {
    "acc_merge-only_global": "merge only",
    "acc_merged_global": "merge + distillation",
    "acc_distilled-fresh_global": "distillation, fresh model",
    "acc_pooled-recipe_global": "pooled surrogates, same recipe",
    "acc_surrogate-trained_global": "pooled surrogates, plain 50 epochs",
    "acc_ensemble_global": "ensemble",
    "acc_ensemble-examples_global": "ensemble by sample count",
    "acc_fedavg1_global": "FedAvg, 1 round",
    "acc_fedavgR_global": "FedAvg, R rounds",
}
"""Result columns of the ablation and their names in the tables."""
ENSEMBLES = ("acc_ensemble_global", "acc_ensemble-examples_global")
"""The ensembles a run scores: the distillation teacher, and the sample-weighted one where the teacher is not."""
GOAL_OVER_FEDAVG = 15.0
GOAL_SHARE_OF_GAP = 0.75
GOAL_OVER_POOLED = 1.0
JUDGED_SPLIT = "dirichlet(0.5)"
JUDGED_CLIENTS = (8, 16, 32)
"""Where the one-round goal is judged: Dirichlet(0.5) at these client counts (every surrogate size and dataset)."""


def load_distilled_runs(csv_path: Path) -> pd.DataFrame:
    """The sweep's rows with ensemble distillation after the merge, with ``setting`` (dataset, split, surrogate
    size, and the model where it is not the default MLP: architectures are separate settings, never averaged
    together) and ``pipeline`` (the sweep's method label) added."""
    runs = read_rows(csv_path)
    if "cfg_distill-steps" not in runs:
        raise ValueError(f"{csv_path} has no run with ensemble distillation (no cfg_distill-steps column)")
    runs = runs[runs["cfg_distill-steps"].fillna(0) > 0].copy()
    if runs.empty:
        raise ValueError(f"{csv_path} has no run with ensemble distillation")
    split = runs["cfg_split"].where(
        runs["cfg_split"] != "dirichlet", "dirichlet(" + runs["cfg_alpha"].map("{:g}".format) + ")"
    )
    default_model = str(DEFAULT_RUN_CONFIG["model"])
    model = runs.get("cfg_model", pd.Series(default_model, index=runs.index)).fillna(default_model)
    runs["setting"] = (
        runs["cfg_dataset"]
        + " "
        + split
        + ", "
        + runs["cfg_per-class"].astype(int).astype(str)
        + "/class"
        + (", " + model).where(model != default_model, "")
    )
    runs["pipeline"] = runs["sweep-method"] + runs.apply(_recipe_label, axis=1)
    return runs


CENTRAL = "acc_central_global"
"""The centralised reference (:mod:`simulations.central`) joined onto each run with the same data, model, local
recipe and seed."""


def central_csv_beside(csv_path: Path) -> Path:
    """Where :mod:`simulations.central` writes by default, relative to a sweep's ``runs.csv``:
    ``results/sweep/runs.csv`` -> ``results/central/runs.csv``."""
    return csv_path.parent.parent / "central" / "runs.csv"


def with_central(runs: pd.DataFrame, central_csv: Path) -> pd.DataFrame:
    """``runs`` with :data:`CENTRAL` added: the accuracy of the model trained centrally on all the data with the
    same dataset, model, width, local recipe and seed (NaN where none was trained, or when ``central_csv`` is
    missing)."""
    if not central_csv.exists():
        return runs.assign(**{CENTRAL: float("nan")})
    central = read_rows(central_csv, required=("cfg_dataset", "cfg_seed"))
    keys = [f"cfg_{key}" for key in CENTRAL_KEYS]
    filled = pd.DataFrame(index=runs.index)
    for key in CENTRAL_KEYS:  # keys added to the run config later are absent or empty in old rows: their default
        column = runs[f"cfg_{key}"] if f"cfg_{key}" in runs else pd.Series(index=runs.index, dtype=object)
        filled[f"cfg_{key}"] = _comparable(column.fillna(DEFAULT_RUN_CONFIG[key]), key)
        central[f"cfg_{key}"] = _comparable(central[f"cfg_{key}"], key)
    central = central.groupby(keys)[RESULT_COLUMN].mean().rename(CENTRAL).reset_index()
    joined = filled.merge(central, on=keys, how="left", validate="many_to_one")
    return runs.assign(**{CENTRAL: joined[CENTRAL].to_numpy()})


def _comparable(column: pd.Series, key: str) -> pd.Series:
    """A run-config column in one type whichever CSV it came from (numbers as floats: width 0 and 0.0 match)."""
    default = DEFAULT_RUN_CONFIG[key]
    numeric = isinstance(default, int | float) and not isinstance(default, bool)
    return column.astype(float) if numeric else column.astype(str)


UNUSUAL_RECIPE_KEYS = {
    "distill-weight-decay": "weight decay",
    "distill-temperature": "temperature",
    "distill-mixup": "mixup",
    "distill-lr": "lr",
    "distill-boundary": "boundary share",
    "distill-elastic": "elastic",
}
"""Recipe keys a pipeline's label names after the label weight, where a run sets them off their defaults."""


def _recipe_label(row: pd.Series) -> str:
    """The recipe settings that tell pipelines apart: shift (and affine maps, CutMix), label weight, the
    distillation loss and the :data:`UNUSUAL_RECIPE_KEYS` where they are not the default, teacher bank, alignment
    passes, local epochs and teacher weighting (defaults when absent)."""

    def value(key: str, default: float) -> float:
        found = row.get(key, default)
        return default if pd.isna(found) else float(found)

    weighting = row.get("cfg_ensemble-weights", "examples")
    teacher = "" if pd.isna(weighting) or weighting == "examples" else f", teacher by {weighting}"
    rotate, scale = value("cfg_distill-rotate", 0), value("cfg_distill-scale", 0)
    affine = f", rotate {rotate:g}, scale {scale:g}" if rotate or scale else ""
    cutmix = value("cfg_distill-cutmix", 0)
    cutmix_label = f", cutmix {cutmix:g}" if cutmix else ""
    loss = row.get("cfg_distill-loss", "kl")
    # named only where they are not the default, so older labels stay as they were
    unusual = "" if pd.isna(loss) or loss == "kl" else f", {loss} loss"
    for key, name in UNUSUAL_RECIPE_KEYS.items():
        default = float(DEFAULT_RUN_CONFIG[key])
        if (found := value(f"cfg_{key}", default)) != default:
            unusual += f", {name} {found:g}"
    return (
        f" (shift {value('cfg_distill-shift', 2):g}{affine}{cutmix_label}, "
        f"labels x{value('cfg_distill-label-weight', 1):g}{unusual}, "
        f"bank {value('cfg_distill-bank', 0):g}, alignment passes {value('cfg_alignment-iters', 100):g}, "
        f"{row['cfg_epochs']} epochs{teacher})"
    )


def goal_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The one-round goal per row: merged >= ensemble; merged >= pooled (same recipe) + 3/4 of the gap up to the
    ensemble where that is higher, and >= pooled + 1 point; merged >= one-round FedAvg + 15 points. The ensemble is
    the better of the two the row scored (class-wise weighted teacher, sample-weighted), so a stronger teacher
    raises the bar too; ``goal met, sample-weighted ensemble`` judges against the sample-weighted one alone (the
    issue's ensemble)."""
    ensembles = [c for c in ENSEMBLES if c in frame]
    by_examples = (
        frame["acc_ensemble-examples_global"].fillna(frame["acc_ensemble_global"])
        if "acc_ensemble-examples_global" in frame
        else frame["acc_ensemble_global"]
    )
    out = _goal(frame, frame[ensembles].max(axis=1))
    out["goal met, sample-weighted ensemble"] = _goal(frame, by_examples)["goal met"]
    out["merge helps (vs fresh)"] = frame["acc_merged_global"] - frame["acc_distilled-fresh_global"]
    return out


def _goal(frame: pd.DataFrame, ensemble: pd.Series) -> pd.DataFrame:
    """The three bars, how far the merged model is from the highest, and whether it reaches them all."""
    merged = frame["acc_merged_global"]
    pooled, fedavg = frame["acc_pooled-recipe_global"], frame["acc_fedavg1_global"]
    gap = (ensemble - pooled).clip(lower=0)
    needed_pooled = (pooled + GOAL_SHARE_OF_GAP * gap).combine(pooled + GOAL_OVER_POOLED, max)
    out = pd.DataFrame(index=frame.index)
    out["needed vs ensemble"] = ensemble
    out["needed vs pooled"] = needed_pooled
    out["needed vs FedAvg"] = fedavg + GOAL_OVER_FEDAVG
    needed = out.max(axis=1)
    out["short by"] = (needed - merged).clip(lower=0)
    out["goal met"] = (merged >= needed).map({True: "yes", False: "no"})
    return out


def ablation_table(runs: pd.DataFrame, setting: str) -> str:
    """Markdown: one row per (pipeline, client count), the ablation columns then the goal (means over seeds)."""
    here = runs[runs["setting"] == setting]
    present = [c for c in ABLATION if c in here]
    grouped = here.groupby(["pipeline", "num-clients"])
    table = grouped[present].mean()
    table["seeds"] = grouped.size()
    needed = [c for c in ABLATION if c not in ("acc_ensemble-examples_global", "acc_fedavgR_global")]
    goals = goal_columns(table) if all(c in table for c in needed) else pd.DataFrame(index=table.index)
    table = pd.concat([table.rename(columns=ABLATION), goals], axis=1)
    return table.round(1).reset_index().rename(columns={"num-clients": "clients"}).to_markdown(index=False)


def best_pipeline(runs: pd.DataFrame) -> str | None:
    """The pipeline of ``runs`` (one setting) to judge the goal on: among those run at every judged client count
    and, of these, over the most seeds (the goal is a mean over seeds), the one with the highest mean merged
    accuracy over the judged counts (None when no pipeline was run at every judged count)."""
    judged = runs[runs["num-clients"].isin(JUDGED_CLIENTS)]
    per_count = judged.groupby(["pipeline", "num-clients"])["acc_merged_global"].agg(["mean", "size"])
    pipelines = per_count.groupby(level="pipeline").agg(
        counts=("size", "size"), seeds=("size", "min"), merged=("mean", "mean")
    )
    complete = pipelines[pipelines["counts"] == len(JUDGED_CLIENTS)]
    if complete.empty:
        return None
    return str(complete[complete["seeds"] == complete["seeds"].max()]["merged"].idxmax())


def goal_overview(runs: pd.DataFrame) -> str:
    """Markdown: for every judged setting (Dirichlet(0.5), any dataset and surrogate size), the best pipeline's
    merged accuracy at each judged client count beside the bar it must reach and how far it is short (means over
    its seeds); empty when no setting has a pipeline run at every judged count.

    The pooled-surrogates bar takes the best pooled baseline of any recipe tried on the same clients (same local
    epochs, client count and seed), not only the chosen pipeline's own: a recipe tuned for distillation is not
    always the best one for training on the surrogates alone, and the baseline gets the same care."""
    lines = []
    for setting in sorted(runs["setting"].unique()):
        here = runs[runs["setting"] == setting]
        if JUDGED_SPLIT not in setting or (pipeline := best_pipeline(here)) is None:
            continue
        same_clients = ["cfg_epochs", "num-clients", "cfg_seed"]
        best_pooled = here.groupby(same_clients)["acc_pooled-recipe_global"].transform("max")
        chosen = here.assign(
            **{"acc_pooled-recipe_global": best_pooled, "own pooled": here["acc_pooled-recipe_global"]}
        )
        chosen = chosen[(chosen["pipeline"] == pipeline) & chosen["num-clients"].isin(JUDGED_CLIENTS)]
        grouped = chosen.groupby("num-clients")
        table = grouped[[c for c in [*ABLATION, "own pooled", CENTRAL] if c in chosen]].mean()
        table["seeds"] = grouped.size()
        goals = goal_columns(table)
        needed = goals[["needed vs ensemble", "needed vs pooled", "needed vs FedAvg"]].max(axis=1)
        for n in table.index:
            lines.append(
                {
                    "setting": setting,
                    "clients": n,
                    "seeds": table.loc[n, "seeds"],
                    "merged": table.loc[n, "acc_merged_global"],
                    "ensemble": table.loc[n, [c for c in ENSEMBLES if c in table]].max(),
                    "pooled, same recipe": table.loc[n, "own pooled"],
                    "pooled, best recipe": table.loc[n, "acc_pooled-recipe_global"],
                    "needed": needed[n],
                    "central (all data)": table.loc[n, CENTRAL] if CENTRAL in table else float("nan"),
                    "short by": goals.loc[n, "short by"],
                    "goal met": goals.loc[n, "goal met"],
                    "goal met, sample-weighted ensemble": goals.loc[n, "goal met, sample-weighted ensemble"],
                    "pipeline": pipeline,
                }
            )
    if not lines:
        return ""
    overview = pd.DataFrame(lines).dropna(axis="columns", how="all").round(1)  # no central model anywhere: no column
    if "central (all data)" in overview:
        overview["central (all data)"] = (
            overview["central (all data)"].astype(object).where(overview["central (all data)"].notna(), "")
        )
    return overview.to_markdown(index=False)


def cost_table(runs: pd.DataFrame) -> str:
    """Markdown: merge (alignment + merge + distillation) seconds and server peak memory per setting, pipeline
    and N."""
    columns = {"merge-seconds": "merge + distillation (s)", "server-peak-rss-mb": "process peak RSS (MiB)"}
    present = [c for c in columns if c in runs]
    table = runs.groupby(["setting", "pipeline", "num-clients"])[present].mean().rename(columns=columns)
    return table.round(1).reset_index().rename(columns={"num-clients": "clients"}).to_markdown(index=False)


def plot(runs: pd.DataFrame, path: Path) -> Path:
    """Accuracy against client count: a panel per setting, a line per ablation column, for the setting's best
    pipeline (:func:`best_pipeline`), else the one with the most runs there."""
    settings = sorted(runs["setting"].unique())
    cols = min(2, len(settings))
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, setting in zip(axes.flat, settings, strict=False):
        everything = runs[runs["setting"] == setting]
        main_pipeline = best_pipeline(everything) or everything["pipeline"].value_counts().index[0]
        here = everything[everything["pipeline"] == main_pipeline]
        others = everything[everything["sweep-method"] != here["sweep-method"].iloc[0]]
        for method, other in others.groupby("sweep-method"):  # other merges, before distillation
            line = other.groupby("num-clients")["acc_merge-only_global"].mean()
            ax.plot(line.index, line.values, ":", marker="s", label=f"merge only, {str(method).split('+')[0]}")
        for column, name in ABLATION.items():
            if column not in here or here[column].isna().all():
                continue
            line = here.groupby("num-clients")[column].mean()
            style = "-" if column in ("acc_merged_global", "acc_merge-only_global") else "--"
            ax.plot(line.index, line.values, style, marker="o", label=name)
        ticks = sorted(here["num-clients"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set(title=f"{setting}\n{main_pipeline}", xlabel="clients", ylabel="global test accuracy (%)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(settings) :]:
        ax.set_visible(False)
    legend: dict[str, Artist] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle("One-shot N-client merging: the ablation (solid: our pipeline and its merge alone)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _distinct_values(column: pd.Series) -> list:
    """The values a recipe column takes, sorted, then NaN once where older rows predate the column (NaN does not
    compare, so it is kept out of the sort)."""
    present = column.dropna().unique().tolist()
    missing = [float("nan")] if column.isna().any() else []
    try:
        return sorted(present) + missing
    except TypeError:  # numbers and text in one column
        return sorted(present, key=str) + missing


def summary_markdown(runs: pd.DataFrame, figure: Path) -> str:
    """The page: what ran, an ablation and goal table per setting, the costs."""
    models = sorted(runs["cfg_model"].astype(str).unique()) if "cfg_model" in runs else [DEFAULT_RUN_CONFIG["model"]]
    seeds = sorted(runs["cfg_seed"].unique())
    recipe = ", ".join(
        f"{key[4:]} {_distinct_values(runs[key])}"
        for key in (
            "cfg_distill-steps",
            "cfg_distill-bank",
            "cfg_distill-shift",
            "cfg_distill-mixup",
            "cfg_distill-lr",
            "cfg_distill-temperature",
            "cfg_distill-label-weight",
            "cfg_distill-weight-decay",
            "cfg_distill-cutmix",
            "cfg_distill-boundary",
            "cfg_distill-elastic",
            "cfg_distill-loss",
            "cfg_alignment",
        )
        if key in runs
    )
    lines = [
        "# N-client merging: ablation and one-round goals",
        "",
        f"{len(runs)} runs, seeds {', '.join(map(str, seeds))}; models {', '.join(map(str, models))}; "
        f"server recipe: {recipe}. Accuracy (%) on the global test set, mean over seeds. FedAvg columns come "
        "from the same federation's FedAvg run (same clients' data, local epochs and seed).",
        "",
        "Goal (one round): merged >= ensemble, >= pooled surrogates with the same recipe + 3/4 of the gap up to the "
        f"ensemble (at least + {GOAL_OVER_POOLED:g} point), and >= one-round FedAvg + {GOAL_OVER_FEDAVG:g} points. "
        "The ensemble is the better of the two a run scored: the teacher (weighted class by class by label counts "
        "where the pipeline says 'teacher by labels') and the sample-weighted one; the last goal column judges "
        "against the sample-weighted ensemble alone (the issue's). "
        "'short by' is how far the merged model is from the highest of the three; 'merge helps' is merged minus "
        "the same distillation from a fresh model.",
        "",
        f"![{figure.stem}]({figure.name})",
        "",
    ]
    overview = goal_overview(runs)
    if overview:
        lines += [
            f"## The one-round goal: the best pipeline per setting ({JUDGED_SPLIT}, N = "
            f"{', '.join(map(str, JUDGED_CLIENTS))})",
            "",
            "The pipeline with the highest mean merged accuracy over the judged client counts (of those run over "
            "the most seeds); 'needed' is the highest of the three bars, the pooled one taken from the best pooled "
            "baseline of any recipe tried on the same clients (same local epochs and seed). 'central (all data)' "
            "is the same model trained with the clients' recipe on every training image at once (`../central/`, "
            "mean over those of the same seeds that have one; empty where none was trained): where 'needed' is "
            "above it, the goal asks one merged model for more than centralised training gives.",
            "",
            overview,
            "",
        ]
    for setting in sorted(runs["setting"].unique()):
        lines += [f"## {setting}", "", ablation_table(runs, setting), ""]
    lines += ["## Costs (mean per run, in-process on 2 CPU cores)", "", cost_table(runs), ""]
    return "\n".join(lines)


def write_report(csv_path: Path, out: Path | None = None) -> list[Path]:
    """Write ``n_clients.md`` and ``n_clients.png`` for the distilled runs of ``csv_path`` into ``out``."""
    out = out or csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    runs = with_central(load_distilled_runs(csv_path), central_csv_beside(csv_path))
    figure = plot(runs, out / "n_clients.png")
    page = out / "n_clients.md"
    page.write_text(summary_markdown(runs, figure))
    return [figure, page]


def main(argv: Iterable[str] | None = None) -> int:
    return report_main("simulations.n_client_report", __doc__ or "", Path("results/sweep/runs.csv"), write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
