"""Benchmark: what one hostile client does to the merged model, with the server's defences off and on.

    python -m simulations.robustness --dataset mnist --split dirichlet --alpha 0.5 --clients 8 \\
        --data-root ../shared/data --cache results/sweep/client-cache --set epochs=2 ste-steps=100

The federation's clients are trained once (or loaded from the client cache, ``--cache``: the sweep's cache holds
MNIST clients trained with ``epochs=2``); then, for each attack, client ``--hostile`` sends a hostile reply in place
of its honest one and the server strategy of the run config (:func:`simulations.server_app.make_strategy`, merging
in this process) reads, checks and merges all replies through its ``aggregate_train``, once with
``defences`` off and once with the run config's defences. The attacks:

- ``clean``: every client honest (with defences on, every client left out or clipped is a false positive);
- ``shifted-labels``: its surrogate's labels shifted by one class (``y -> y + 1 mod classes``);
- ``noise-surrogate``: its surrogate's images replaced by N(0, 1) noise (labels kept);
- ``weights-x100``: every floating-point weight multiplied by 100;
- ``random-weights``: a freshly initialised model of the architecture (norms like a trained model's);
- ``gaussian-weights``: every floating-point weight drawn from N(0, 1);
- ``claims-1e9``: its honest weights and surrogate, but a claim of 10^9 training examples (the merge weight);
- ``duplicate-id``: its honest weights, but the partition id of the next client (both are left out by the reply
  checks, whether the defences are on or not).

One row per attack and defence setting goes to ``<out>/robustness.csv`` (resumable: a rerun skips the rows of the
same setting already there): the merged model's global test accuracy, its difference to the clean run without
defences, the clients merged, left out (with reasons), clipped and with a dropped surrogate, the honest clients
wrongly left out or clipped (``false-positives``), the run config, seed, package versions and wall time.
``<out>/robustness.md`` tables every setting in the CSV.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import torch
from flwr.app import Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from rich.console import Console

from fedmerge.data.images import LabeledImages
from fedmerge.device import default_device, derive_seed, seed_everything
from fedmerge.federation import global_test_data
from fedmerge.merge.functional import load_state
from fedmerge.models import reinitialized_copy
from fedmerge.train import evaluate
from simulations.config import RunSettings, settings_from_run_config
from simulations.federation_options import add_federation_options, federation_run_config, setting_key
from simulations.in_process import client_updates
from simulations.results_io import read_rows, save_rows
from simulations.server_app import make_strategy, template_model
from simulations.versions import version_columns, versions_text
from strategies.defences import Defences, describe_defences
from strategies.messages import ClientUpdate, client_reply

State = dict[str, torch.Tensor]
Attack = Callable[[ClientUpdate, int, torch.nn.Module, int], ClientUpdate]
GOAL_MAX_COST = 3.0
"""The issue's goal: with the defences on, one hostile client costs at most this many points."""
NODE_BASE = 1000
"""Client k's replies come from node ``NODE_BASE + k`` (a duplicate claimant from another node)."""


def _floats(state: State, change: Callable[[torch.Tensor], torch.Tensor]) -> State:
    return {k: change(v) if v.is_floating_point() else v for k, v in state.items()}


def _surrogate(update: ClientUpdate) -> LabeledImages:
    if update.surrogate is None:
        raise ValueError(
            f"{update.name} sent no surrogate: this attack needs one (use a surrogate kind other than none)"
        )
    return update.surrogate


def shifted_labels(update: ClientUpdate, num_classes: int, template: torch.nn.Module, seed: int) -> ClientUpdate:
    data = _surrogate(update)
    return dataclasses.replace(update, surrogate=LabeledImages(data.x, (data.y + 1) % num_classes, num_classes))


def noise_surrogate(update: ClientUpdate, num_classes: int, template: torch.nn.Module, seed: int) -> ClientUpdate:
    data = _surrogate(update)
    noise = torch.randn(data.x.shape, generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(update, surrogate=LabeledImages(noise, data.y, num_classes))


def weights_x100(update: ClientUpdate, num_classes: int, template: torch.nn.Module, seed: int) -> ClientUpdate:
    return dataclasses.replace(update, state=_floats(update.state, lambda v: v * 100))


def random_weights(update: ClientUpdate, num_classes: int, template: torch.nn.Module, seed: int) -> ClientUpdate:
    return dataclasses.replace(update, state=reinitialized_copy(template, seed).state_dict())


def gaussian_weights(update: ClientUpdate, num_classes: int, template: torch.nn.Module, seed: int) -> ClientUpdate:
    generator = torch.Generator().manual_seed(seed)
    return dataclasses.replace(update, state=_floats(update.state, lambda v: torch.randn(v.shape, generator=generator)))


def claims_1e9(update: ClientUpdate, num_classes: int, template: torch.nn.Module, seed: int) -> ClientUpdate:
    return dataclasses.replace(update, num_examples=10**9)


ATTACKS: dict[str, Attack | None] = {
    "clean": None,
    "shifted-labels": shifted_labels,
    "noise-surrogate": noise_surrogate,
    "weights-x100": weights_x100,
    "random-weights": random_weights,
    "gaussian-weights": gaussian_weights,
    "claims-1e9": claims_1e9,
    "duplicate-id": None,  # handled in hostile_replies: another partition id
}


def train_message(node_id: int) -> Message:
    """A ``train`` message as the server would have sent it to ``node_id`` (what a reply answers)."""
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return make_message(metadata, RecordDict())


def reply(update: ClientUpdate, node_id: int, partition_id: int) -> Message:
    return client_reply(
        train_message(node_id), update.state, update.num_examples, partition_id, update.surrogate, update.metrics
    )


def hostile_replies(
    updates: list[ClientUpdate], attack: str, hostile: int, template: torch.nn.Module, seed: int
) -> tuple[list[Message], int | None]:
    """Every client's reply, client ``hostile``'s replaced by the attack's; and the victim of a duplicate id."""
    num_classes = next(u.surrogate.num_classes for u in updates if u.surrogate is not None) if updates else 10
    replies, victim = [], None
    for update in updates:
        partition_id = update.partition_id
        if update.partition_id == hostile:
            change = ATTACKS[attack]
            if change is not None:
                update = change(update, num_classes, template, derive_seed(seed, "robustness", attack))
            if attack == "duplicate-id":
                victim = partition_id = (hostile + 1) % len(updates)
        replies.append(reply(update, NODE_BASE + update.partition_id, partition_id))
    return replies, victim


def _client_id(who: str) -> int | None:
    """The client whose node sent a reply, from its log name ("client 3 (node 1003)" or "node 1003"): the claimed
    partition id may be another's."""
    match = re.search(r"node (\d+)", who)
    return int(match.group(1)) - NODE_BASE if match else None


def run_attack(
    settings: RunSettings, updates: list[ClientUpdate], attack: str, hostile: int, defences_on: bool
) -> tuple[float, dict[str, object]]:
    """Merge the federation's replies with client ``hostile`` attacking; the merged model's global test accuracy
    (%) and the row's other measured columns."""
    started = time.perf_counter()
    template = template_model(settings)
    defences = settings.defences if defences_on else Defences.off()
    run = dataclasses.replace(settings, defences=defences)
    strategy = make_strategy(run, template, len(updates))
    replies, victim = hostile_replies(updates, attack, hostile, template, settings.seed)
    arrays, metrics = strategy.aggregate_train(1, replies)
    if arrays is None or not strategy.client_updates:
        accuracy = float("nan")
    else:
        model = load_state(template, arrays.to_torch_state_dict())
        accuracy = evaluate(model, global_test_data(settings.federation), device=default_device())
    report = strategy.defence_report
    expected = set() if attack == "clean" else {hostile}
    if victim is not None:
        expected.add(victim)
    judged = [who for who, _ in strategy.left_out] + [who for who, _ in report.clipped]
    judged += [who for who, _ in report.surrogates_dropped]
    wrong = sorted({who for who in judged if _client_id(who) not in expected})
    return accuracy, {
        "clients-merged": len(strategy.client_updates),
        "left-out": "; ".join(who for who, _ in strategy.left_out),
        "clipped": "; ".join(who for who, _ in report.clipped),
        "clipped-reasons": " | ".join(f"{who}: {why}" for who, why in report.clipped),
        "surrogates-dropped": "; ".join(who for who, _ in report.surrogates_dropped),
        "false-positives": len(wrong),
        "false-positive-clients": "; ".join(wrong),
        "hostile-caught": int(attack != "clean" and any(_client_id(who) == hostile for who in judged)),
        "reasons": " | ".join(f"{who}: {why}" for who, why in strategy.left_out),
        "merge-seconds": round(strategy.merge_seconds, 2),
        "wall-seconds": round(time.perf_counter() - started, 2),
    }


def read_results(csv_path: Path) -> pd.DataFrame:
    if not csv_path.exists():
        return pd.DataFrame(columns=["setting", "attack", "defences"])
    return read_rows(csv_path, required=("setting", "attack", "defences"), dtype={"setting": str})


def write_report(rows: pd.DataFrame, path: Path) -> Path:
    """``robustness.md``: per setting, merged accuracy per attack with defences off and on, and who was judged."""
    lines = [
        "# Robustness: one hostile client, defences off and on",
        "",
        "Merged global test accuracy (%) with one hostile client, the change against the clean run without "
        "defences, and what the defences did. Written by `python -m simulations.robustness`.",
    ]
    text = ["left-out", "clipped", "surrogates-dropped", "false-positive-clients", "cfg", "clipped-reasons", "reasons"]
    for column in text:
        if column in rows:
            rows[column] = rows[column].astype(object).where(rows[column].notna(), "").astype(str)
    for setting, group in rows.groupby("setting", sort=False):
        first = group.iloc[0]
        on_rows = group[group["defences"] == "on"]
        defended = on_rows.iloc[-1]["defences-config"] if not on_rows.empty else "(not run)"
        lines += [
            "",
            f"## {first['dataset']} {first['split']} ({first['num-clients']} clients, hostile client "
            f"{first['hostile']}), {first['method']} / {first['schedule']}",
            "",
            f"Setting `{setting}`, seed {first['seed']}; defences on: {defended}; "
            f"config: `{first['cfg']}`; versions: {first['versions']}.",
            "",
            "| attack | defences off | defences on | change off | change on | merged (off / on) | "
            "hostile caught | honest clients wrongly judged | left out / clipped (on) |",
            "|---|---:|---:|---:|---:|---:|:---:|---:|---|",
        ]
        for attack in ATTACKS:
            off = group[(group["attack"] == attack) & (group["defences"] == "off")]
            on = group[(group["attack"] == attack) & (group["defences"] == "on")]
            if off.empty and on.empty:
                continue

            def cell(frame: pd.DataFrame, column: str, fmt: str = "{}") -> str:
                return fmt.format(frame.iloc[-1][column]) if not frame.empty else ""

            parts = [cell(on, "left-out"), "clipped: " + cell(on, "clipped") if cell(on, "clipped") else ""]
            parts.append(
                "surrogate dropped: " + cell(on, "surrogates-dropped") if cell(on, "surrogates-dropped") else ""
            )
            judged = "; ".join(p for p in parts if p)
            lines.append(
                f"| {attack} | {cell(off, 'acc_merged_global', '{:.1f}')} | {cell(on, 'acc_merged_global', '{:.1f}')}"
                f" | {cell(off, 'change-vs-clean', '{:+.1f}')} | {cell(on, 'change-vs-clean', '{:+.1f}')}"
                f" | {cell(off, 'clients-merged')} / {cell(on, 'clients-merged')}"
                f" | {'yes' if cell(on, 'hostile-caught') == '1' else ('-' if attack == 'clean' else 'no')}"
                f" | {cell(on, 'false-positives')} | {judged.replace('|', '/')} |"
            )
        clean_on = group[(group["attack"] == "clean") & (group["defences"] == "on")]
        if not clean_on.empty:
            fp = int(clean_on.iloc[-1]["false-positives"])
            lines += ["", f"False positives on the clean run (honest clients left out or clipped): {fp}."]
        attacked_on = group[(group["attack"] != "clean") & (group["defences"] == "on")]
        if not attacked_on.empty:
            worst = attacked_on.sort_values("change-vs-clean").iloc[0]
            met = worst["change-vs-clean"] >= -GOAL_MAX_COST
            lines += [
                "",
                f"Goal (defences on: no single hostile client costs more than {GOAL_MAX_COST:g} points): "
                + ("met" if met else f"missed by {-worst['change-vs-clean'] - GOAL_MAX_COST:.1f} points")
                + f"; the costliest attack is {worst['attack']} ({worst['change-vs-clean']:+.1f}).",
            ]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.robustness", description=__doc__.split("\n\n")[0])
    add_federation_options(parser)
    parser.add_argument("--hostile", type=int, default=1, help="the partition id of the hostile client")
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    args = parser.parse_args(None if argv is None else list(argv))
    if not 0 <= args.hostile < args.clients:
        parser.error(f"--hostile must be a partition id in 0..{args.clients - 1}")
    console = Console(stderr=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_config = federation_run_config(args, defaults={"merge-workers": 0})
    settings = settings_from_run_config(run_config, args.clients)
    key = setting_key(run_config, args.clients, args.hostile)
    cfg = " ".join(f"{k}={v}" for k, v in sorted(dict(args.overrides).items()))
    csv_path, md_path = args.out / "robustness.csv", args.out / "robustness.md"
    done = read_results(csv_path)
    done = done[done["setting"] == key]
    attacks = ["clean"] + [a for a in args.attacks if a != "clean"]
    todo = [
        (a, d) for a in attacks for d in ("off", "on") if done[(done["attack"] == a) & (done["defences"] == d)].empty
    ]
    updates: list[ClientUpdate] = []
    if todo:
        seed_everything(settings.seed)
        started = time.perf_counter()
        updates = client_updates(settings, args.clients, 1, None, want_surrogate=True)
        console.log(f"{args.clients} clients ready in {time.perf_counter() - started:.1f} s")
    versions = versions_text()
    for attack, defences in todo:
        accuracy, measured = run_attack(settings, updates, attack, args.hostile, defences == "on")
        clean = read_results(csv_path)
        clean = clean[(clean["setting"] == key) & (clean["attack"] == "clean") & (clean["defences"] == "off")]
        reference = float(clean.iloc[-1]["acc_merged_global"]) if not clean.empty else accuracy
        row = {
            "setting": key,
            "attack": attack,
            "defences": defences,
            "dataset": args.dataset,
            "split": args.split,
            "alpha": args.alpha,
            "num-clients": args.clients,
            "hostile": args.hostile,
            "method": settings.method,
            "schedule": settings.schedule,
            "strategy": settings.strategy,
            "acc_merged_global": round(accuracy, 2),
            "acc_clean_off": round(reference, 2),
            "change-vs-clean": round(accuracy - reference, 2) + 0.0,  # no -0.0
            **measured,
            "defences-config": describe_defences(settings.defences) if defences == "on" else "off",
            "seed": settings.seed,
            "cfg": cfg,
            "versions": versions,
        }
        save_rows(csv_path, [row | version_columns()])
        console.log(
            f"{attack}, defences {defences}: merged {row['acc_merged_global']}% ({row['change-vs-clean']:+.1f}), "
            f"left out [{row['left-out']}], clipped [{row['clipped']}], {row['wall-seconds']} s"
        )
    console.log(f"wrote {write_report(read_results(csv_path), md_path)} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
