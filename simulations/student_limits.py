"""Where the distilled student stops, and why: the N-client pipeline's distillation into a fresh student (the
sweep's ``distilled-fresh``: the clients' teacher, the run's server recipe, the pooled surrogates as transfer set)
beside two changes the server cannot make, each alone:

* ``real-images``: the same student and recipe with real training images (``--real-images`` of them, drawn from
  the whole training split, labels unused: distillation loss only) as the transfer set instead of the surrogates;
* ``wide-student``: the surrogates again, into a student ``--width-factor`` times as wide.

If the student reaches its teacher with real images but not with a wider model, the transfer set limits it; if the
other way round, the student's capacity does. The teacher is the clients' ensemble weighted as the run config says,
built from the clients' replies as they are (the server's defences, which may cap a client's counts, are not
applied). Clients come from the sweep's client cache (trained once)::

    python -m simulations.student_limits --dataset fashion-mnist --clients 8 --cache results/sweep/client-cache \\
        --set epochs=10 surrogate=random per-class=1 distill-steps=6000 ...

Rows go to ``<out>/runs.csv`` (default ``results/student_limits``): the run config, the transfer set and student,
the student's and the teacher's test accuracy, their agreement on the test set, the wall time and the versions; a
rerun computes only the missing rows. ``summary.md`` beside it has one table per federation.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Collection, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from torch import nn

from fedmerge.data.images import LabeledImages, concat
from fedmerge.device import default_device, derive_seed, seed_everything
from fedmerge.federation import FederationSpec, client_train_data, global_test_data
from fedmerge.merge.distill import agreement, distill
from fedmerge.models import build_model, reinitialized_copy
from fedmerge.models.registry import MLP_DEFAULT_WIDTH
from fedmerge.train import evaluate
from simulations.config import ConfigValue, RunSettings, settings_from_run_config
from simulations.federation_options import add_federation_options, federation_run_config, setting_key
from simulations.in_process import client_updates
from simulations.results_io import finished_keys, read_rows, save_rows
from simulations.server_app import template_model
from simulations.versions import version_columns
from strategies.merge_strategy import client_ensemble

VARIANTS = ("surrogates", "real-images", "wide-student")
"""The transfer set and student of each row: the pipeline's own, real training images, a wider student."""


def real_transfer_images(settings: RunSettings, count: int, seed: int) -> LabeledImages:
    """``count`` training images drawn without replacement from the whole training split of the run's dataset (the
    labels travel along but the distillation that uses them gives them weight 0)."""
    spec = FederationSpec(
        dataset=settings.federation.dataset,
        split="iid",
        num_clients=1,
        seed=seed,
        data_root=settings.federation.data_root,
    )
    everything = client_train_data(spec, 0)
    if not 0 < count <= len(everything):
        raise ValueError(f"--real-images must be between 1 and {len(everything)}, got {count}")
    index = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))[:count]
    return LabeledImages(everything.x[index], everything.y[index], everything.num_classes, "real training images")


def wider(settings: RunSettings, factor: float, seed: int) -> nn.Module:
    """A fresh model of the run's architecture with ``factor`` times its width (MLP hidden units, CNN channels)."""
    base = settings.width or (MLP_DEFAULT_WIDTH if settings.model == "mlp" else 1.0)
    width = base * factor
    test = global_test_data(settings.federation)
    model = build_model(
        settings.model, test.image_shape, test.num_classes, int(width) if settings.model == "mlp" else width
    )
    return reinitialized_copy(model, seed)


def limit_rows(
    run_config: Mapping[str, ConfigValue],
    num_clients: int,
    variants: Iterable[str],
    real_images: int,
    width_factor: float,
    done: Collection[str] = (),
) -> Iterable[dict]:
    """One row per variant not in ``done`` (their keys), for the federation of ``run_config`` with ``num_clients``
    clients; the clients are built (or loaded from the run config's client cache) once."""
    settings = settings_from_run_config(run_config, num_clients)
    if not settings.distill_steps:
        raise ValueError("the run config distils nothing: set distill-steps > 0 (the recipe under study)")
    if width_factor < 1:
        raise ValueError(f"--width-factor must be at least 1, got {width_factor}")
    keys = {v: setting_key(run_config, num_clients, v, real_images, width_factor) for v in variants}
    todo = [v for v in variants if keys[v] not in done]
    if not todo:
        return
    seed_everything(settings.seed)
    device = default_device()
    updates = client_updates(settings, num_clients, 1, None, want_surrogate=True)
    template = template_model(settings)
    teacher = client_ensemble(template, updates, settings.ensemble_weights)
    surrogates = concat([u.surrogate for u in updates if u.surrogate is not None], "surrogate union")
    test = global_test_data(settings.federation)
    teacher_accuracy = evaluate(teacher, test, device=device)
    seed = derive_seed(settings.seed, "recipe")  # as the sweep's distilled-fresh baseline
    fresh = reinitialized_copy(template, derive_seed(settings.seed, "recipe-init"))
    for variant in todo:
        recipe, student, transfer = settings.recipe(), fresh, surrogates
        if variant == "real-images":
            transfer = real_transfer_images(settings, real_images, derive_seed(settings.seed, "real-images"))
            recipe = dataclasses.replace(recipe, label_weight=0.0)
        elif variant == "wide-student":
            student = wider(settings, width_factor, derive_seed(settings.seed, "recipe-init"))
        start = time.perf_counter()
        model = distill(student, transfer, teacher, recipe, seed, device).model
        yield {
            "run-key": keys[variant],
            **{f"cfg_{key}": value for key, value in run_config.items()},
            "num-clients": num_clients,
            "variant": variant,
            "transfer-images": len(transfer),
            "student-parameters": sum(p.numel() for p in model.parameters()),
            "acc_student_global": evaluate(model, test, device=device),
            "acc_teacher_global": teacher_accuracy,
            "agreement_test": agreement(model, teacher, test, device=device),
            "distill-seconds": round(time.perf_counter() - start, 1),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **version_columns(),
        }


SUMMARY_COLUMNS = {
    "variant": "variant",
    "cfg_distill-steps": "distillation steps",
    "cfg_distill-bank": "teacher bank",
    "transfer-images": "transfer images",
    "student-parameters": "student parameters",
    "acc_student_global": "student",
    "acc_teacher_global": "teacher",
    "agreement_test": "agreement",
    "distill-seconds": "seconds",
}
"""The summary's columns: each CSV column and its heading."""


def _budget_then_variant_order(column: pd.Series) -> pd.Series:
    """Sort key of the summary's rows: the budget as it is, the variants in the order of ``VARIANTS``."""
    return column.map({v: i for i, v in enumerate(VARIANTS)}) if column.name == "variant" else column


def summary_markdown(runs: pd.DataFrame) -> str:
    """One table per federation (dataset, split, clients, surrogate size, model, seed): each variant's student
    against the teacher."""
    sections = [
        "# Where the distilled student stops",
        "",
        "The clients' teacher distilled into a fresh student with the run's server recipe, three ways: on the pooled "
        "surrogates (the pipeline's `distilled-fresh`), on real training images (labels unused) instead, and on the "
        "surrogates into a wider student. Accuracy on the global test set (%); 'agreement' is the share of test "
        "images where student and teacher predict the same class; 'distillation steps' and 'teacher bank' give each "
        "row's budget (Adam steps, teacher-labelled augmented images). If real images close the gap and the wider "
        "student does not, the transfer set is what limits the student; a variant that gains at a larger budget was "
        "held back by its budget.",
        "",
    ]
    setting = ["cfg_dataset", "cfg_split", "cfg_alpha", "num-clients", "cfg_per-class", "cfg_model", "cfg_seed"]
    for values, group in runs.groupby(setting, sort=True):
        dataset, split, alpha, clients, per_class, model, seed = values
        title = f"{dataset} {split}({alpha:g}), {clients} clients, {per_class}/class, {model}, seed {seed}"
        sections += [f"## {title}", ""]
        table = group.sort_values(["cfg_distill-steps", "variant"], key=_budget_then_variant_order)
        table = table[list(SUMMARY_COLUMNS)].rename(columns=SUMMARY_COLUMNS)
        table["short of teacher"] = table["teacher"] - table["student"]
        table = table.round(2)
        sections += [table.to_markdown(index=False), ""]
    return "\n".join(sections)


def write_report(csv_path: Path, out: Path | None = None) -> list[Path]:
    """Write ``summary.md`` for the rows of ``csv_path`` into ``out`` (default: beside the CSV)."""
    runs = read_rows(csv_path, required=("run-key", "variant"))
    if runs.empty:
        raise ValueError(f"{csv_path} has no rows")
    page = (out or csv_path.parent) / "summary.md"
    page.write_text(summary_markdown(runs))
    return [page]


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.student_limits",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_federation_options(parser, threads=1, set_help="run-config keys: the clients' and the server's recipe")
    parser.set_defaults(out=Path("results/student_limits"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--real-images", type=int, default=6000, help="real training images of 'real-images'")
    parser.add_argument("--width-factor", type=float, default=4.0, help="how many times wider 'wide-student' is")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    csv_path = args.out / "runs.csv"
    done = finished_keys(csv_path)
    for seed in args.seeds:
        run_config = federation_run_config(args, extra={"seed": seed})
        for row in limit_rows(run_config, args.clients, args.variants, args.real_images, args.width_factor, done):
            save_rows(csv_path, [row])
            console.print(
                f"{row['cfg_dataset']} N={args.clients} seed {seed} {row['variant']}: student "
                f"{row['acc_student_global']:.2f} %, teacher {row['acc_teacher_global']:.2f} % "
                f"({row['distill-seconds']} s)"
            )
    for path in write_report(csv_path, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
