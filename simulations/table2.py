"""Reproduce Yamada et al. (ACML 2024) Table 2 columns on the real datasets (MLP, lambda = 0.5).

For each domain pair, model A trains on dataset A and model B on dataset B (shared label ids);
every method is scored on the mixed test set of A and B. Writes ``table2.csv`` (one row per
pair, seed and method, with wall times and package versions, appended as each pair finishes)
and ``table2.md`` (our mean accuracy next to the paper's figure).

    python -m simulations.table2 --data-root ../shared/data --seeds 0 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from rich.console import Console

from fedmerge.data import concat, domain_split
from fedmerge.device import default_device, derive_seed
from fedmerge.experiment import MethodRun, PairComparison, train_client
from fedmerge.merge import MergeConfig, NPConfig, STEConfig
from fedmerge.models import build_model
from fedmerge.surrogate import CondenseConfig, SurrogateConfig, build_surrogate
from fedmerge.surrogate.build import require_surrogate
from fedmerge.train import TrainConfig
from simulations.results_io import read_rows, save_rows
from simulations.versions import package_versions

PAIRS = {
    "MNIST-RMNIST90": ("mnist", "rmnist-90"),
    "USPS-MNIST": ("usps", "mnist"),
    "MNIST-FMNIST": ("mnist", "fashion-mnist"),
}

# Yamada et al. Table 2 (MLP; % on the mixed test set). NP and STE+NP are not in the paper's table.
PAPER = {
    "Model A": (55.6, 76.0, 53.2),
    "Model B": (57.6, 63.0, 51.8),
    "Ensemble": (84.5, 93.5, 75.9),
    "Naive": (56.1, 68.9, 45.8),
    "WM": (70.9, 84.2, 55.6),
    "STE (full)": (93.5, 95.5, 83.8),
    "STE (coreset 10/class)": (88.8, 93.3, 77.8),
    "STE (condensed 10/class)": (88.8, 92.5, 80.9),
}

METHOD_RUNS = [
    MethodRun("Model A", "model-a", None),
    MethodRun("Model B", "model-b", None),
    MethodRun("Ensemble", "ensemble", None),
    MethodRun("Naive", "average", None, correction="none"),
    MethodRun("WM", "wm", None, correction="none"),
    MethodRun("STE (full)", "ste", "full", correction="none"),
    MethodRun("STE (coreset 10/class)", "ste", "coreset", correction="none"),
    MethodRun("STE (condensed 10/class)", "ste", "condensed", correction="none"),
    MethodRun("NP (coreset 10/class)", "np", "coreset", correction="none"),
    MethodRun("STE+NP (coreset 10/class)", "ste+np", "coreset", correction="none"),
    MethodRun("WM+REPAIR (coreset 10/class)", "wm", "coreset", correction="repair"),
    MethodRun("Coreset AB (scratch)", "scratch", "coreset"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-root", default="../shared/data", help="folder with the datasets (torchvision or shared layout)"
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3, help="local training epochs per client")
    parser.add_argument("--ste-steps", type=int, default=500)
    parser.add_argument("--ste-lr", type=float, default=1e-2)
    parser.add_argument("--np-steps", type=int, default=500)
    parser.add_argument("--per-class", type=int, default=10, help="coreset / condensed images per class per client")
    parser.add_argument(
        "--condense-iterations", type=int, default=None, help="networks to match gradients on (default: the library's)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=[m.label for m in METHOD_RUNS],
        metavar="LABEL",
        help="labels of the methods to run, e.g. 'STE (coreset 10/class)' (default: all)",
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace) -> dict:
    """The settings that shape a row's numbers; rows are resumed only under the same settings."""
    iterations, _, _ = CondenseConfig(iterations=args.condense_iterations).schedule(args.per_class)
    return {
        "epochs": args.epochs,
        "ste_steps": args.ste_steps,
        "ste_lr": args.ste_lr,
        "np_steps": args.np_steps,
        "per_class": args.per_class,
        "condense_iterations": iterations,
    }


def build_surrogates(
    pair_train, clients, args: argparse.Namespace, keys: set[str], seed: int, device, console: Console
) -> tuple[dict, dict[str, float]]:
    """The surrogates named in ``keys`` and their seconds.

    Keys: the full union, a random coreset, the condensed set of both clients.
    """
    surrogates, seconds = {"full": concat(pair_train, name="full")}, {}
    condense = CondenseConfig(iterations=args.condense_iterations)
    for kind, key in (("random", "coreset"), ("condensed", "condensed")):
        if key not in keys:
            continue
        start = time.perf_counter()
        config = SurrogateConfig(kind=kind, per_class=args.per_class, condense=condense)
        parts = [
            require_surrogate(
                build_surrogate(data, config, model=client.model, seed=derive_seed(seed, kind, i), device=device)
            )
            for i, (data, client) in enumerate(zip(pair_train, clients, strict=True))
        ]
        surrogates[key] = concat(parts, name=key)
        seconds[key] = time.perf_counter() - start
        console.log(f"{key}: {len(surrogates[key])} images in {seconds[key]:.1f}s")
    return surrogates, seconds


def run_pair(
    pair: str, seed: int, runs: list[MethodRun], args: argparse.Namespace, device, console: Console
) -> list[dict]:
    """The given methods on one domain pair and seed."""
    names = PAIRS[pair]
    train_sets = domain_split(list(names), train=True, root=args.data_root)
    test_sets = domain_split(list(names), train=False, root=args.data_root)
    tests = {"mixed": concat(test_sets), "A": test_sets[0], "B": test_sets[1]}
    template = build_model("mlp", train_sets[0].image_shape, 10)
    config = TrainConfig(epochs=args.epochs, lr=0.05, batch_size=128)
    clients = [
        train_client(template, d, config, derive_seed(seed, pair, i), device, n)
        for i, (d, n) in enumerate(zip(train_sets, names, strict=True))
    ]
    console.log(f"{pair} seed {seed}: trained clients in {sum(c.seconds for c in clients):.1f}s")
    keys = {m.surrogate for m in runs if m.surrogate}
    surrogates, surrogate_seconds = build_surrogates(train_sets, clients, args, keys, seed, device, console)
    comparison = PairComparison(
        template,
        clients[0],
        clients[1],
        surrogates,
        tests,
        merge=MergeConfig(
            ste=STEConfig(steps=args.ste_steps, lr=args.ste_lr), np=NPConfig(steps=args.np_steps), seed=seed
        ),
        device=device,
    )
    rows = []
    for method in runs:
        row = comparison.run(method)
        console.log(f"{pair} seed {seed} {method.label}: {row['acc_mixed']:.2f}% ({row['seconds']:.1f}s)")
        rows.append(
            {
                "pair": pair,
                "seed": seed,
                **row,
                "train_seconds": round(sum(c.seconds for c in clients), 1),
                "surrogate_seconds": round(surrogate_seconds.get(method.surrogate or "", 0.0), 1),
                **run_config(args),
            }
        )
    return rows


def finished_rows(csv_path: Path, config: dict) -> pd.DataFrame:
    """Rows already in ``csv_path`` that were made with ``config`` (empty when there are none)."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return pd.DataFrame(columns=["pair", "seed", "label"])
    frame = read_rows(csv_path, required=("pair", "seed", "label"))
    same = pd.Series(True, index=frame.index)
    for key, value in config.items():
        same &= frame[key] == value if key in frame else False
    return frame[same]


def markdown_table(frame: pd.DataFrame, pairs: list[str]) -> str:
    """Methods x pairs: our mean (and std over seeds) next to the paper's number."""
    stats = frame.groupby(["label", "pair"], sort=False)["acc_mixed"].agg(["mean", "std", "count"])
    labels = list(dict.fromkeys(frame["label"]))
    header = "| method | " + " | ".join(f"{p} (ours) | {p} (paper)" for p in pairs) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(pairs))]
    for label in labels:
        cells = []
        for p in pairs:
            if (label, p) in stats.index:
                s = stats.loc[(label, p)]
                ours = f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["count"] > 1 else "")
            else:
                ours = "–"
            paper = PAPER.get(label, (None,) * 3)[list(PAIRS).index(p)]
            cells += [ours, "–" if paper is None else f"{paper:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wall_time_table(frame: pd.DataFrame, pairs: list[str]) -> str:
    """Methods x pairs: mean wall seconds of each method, plus client training and surrogate building."""
    seconds = frame.groupby(["label", "pair"], sort=False)["seconds"].mean().unstack()[pairs]
    setup = frame.groupby("pair")[["train_seconds"]].mean().T.rename(index={"train_seconds": "(training both clients)"})
    condensed = frame[frame["surrogate"] == "condensed"].groupby("pair")[["surrogate_seconds"]].mean().T
    condensed = condensed.rename(index={"surrogate_seconds": "(condensing both clients)"})
    table = pd.concat([seconds, setup.reindex(columns=pairs), condensed.reindex(columns=pairs)])
    return table.round(1).to_markdown()


def plot_table2(frame: pd.DataFrame, path: Path) -> None:
    """Bars per pair: our mean accuracy per method (std over seeds as error bars), the paper's figure as a red tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in PAIRS if p in set(frame["pair"])]
    labels = list(dict.fromkeys(frame["label"]))
    stats = frame.groupby(["label", "pair"])["acc_mixed"].agg(["mean", "std"]).fillna(0.0)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 5), sharey=True, squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        rows = [
            stats.loc[(label, pair)] if (label, pair) in stats.index else pd.Series({"mean": float("nan"), "std": 0.0})
            for label in labels
        ]
        ax.barh(
            range(len(labels)),
            [r["mean"] for r in rows],
            xerr=[r["std"] for r in rows],
            color="tab:blue",
            ecolor="0.35",
            label="ours (± std over seeds)",
        )
        for i, label in enumerate(labels):
            if label in PAPER:
                ax.plot(
                    PAPER[label][list(PAIRS).index(pair)],
                    i,
                    "|",
                    color="tab:red",
                    markersize=16,
                    markeredgewidth=2.5,
                    label="paper" if i == 0 else None,
                )
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy on mixed test set (%)")
        ax.set_title(pair)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    device = default_device()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "table2.csv"
    versions, config = package_versions(), run_config(args)
    selected = [m for m in METHOD_RUNS if args.methods is None or m.label in args.methods]
    done = set(finished_rows(csv_path, config)[["pair", "seed", "label"]].itertuples(index=False, name=None))
    for seed in args.seeds:
        for pair in args.pairs:
            runs = [m for m in selected if (pair, seed, m.label) not in done]
            if not runs:
                console.log(f"{pair} seed {seed}: already in {csv_path} with these settings, skipped")
                continue
            rows = [{**r, **versions} for r in run_pair(pair, seed, runs, args, device, console)]
            save_rows(csv_path, rows)
    frame = finished_rows(csv_path, config)
    if frame.empty:
        console.print(f"no rows with these settings in {csv_path}")
        return
    plot_table2(frame, args.out / "table2.png")
    settings = (
        f"MLP 3x512, {args.epochs} local epochs, STE {args.ste_steps} steps (Adam, lr {args.ste_lr}), "
        f"NP {args.np_steps} steps, "
        f"{args.per_class} images/class/client, "
        f"condensation by gradient matching on {config['condense_iterations']} networks "
        f"(the paper: 1000), seeds {sorted(frame['seed'].unique().tolist())}"
    )
    text = "# Yamada et al. Table 2 reproduction\n\n"
    text += f"Accuracy (%) on the mixed test set of A and B, lambda = 0.5. {settings}.\n\n"
    pairs = [p for p in PAIRS if p in set(frame["pair"])]
    text += markdown_table(frame, pairs) + "\n"
    text += f"\n## Wall time (s, mean over seeds, {versions['device']})\n\n" + wall_time_table(frame, pairs) + "\n"
    text += "\nPer-row figures, seeds and package versions: `table2.csv`. Plot: `table2.png`.\n"
    (args.out / "table2.md").write_text(text)
    console.print(text)


if __name__ == "__main__":
    main()
