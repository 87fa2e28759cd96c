"""Flower Message-API strategies: permutation-aligned merging of client models (WM, STE, NP Merge) and a FedAvg
baseline, importable into any ServerApp."""

from strategies.fedavg import SortedFedAvg
from strategies.merge_strategy import PermutationMerge
from strategies.messages import ClientUpdate, InvalidReply, client_reply, read_reply
from strategies.parallel import RayRunner, SequentialRunner, make_runner
from strategies.schedule import SCHEDULES, MergeNode, MergeStep, run_schedule

__all__ = [
    "SCHEDULES",
    "ClientUpdate",
    "InvalidReply",
    "MergeNode",
    "MergeStep",
    "PermutationMerge",
    "RayRunner",
    "SequentialRunner",
    "SortedFedAvg",
    "client_reply",
    "make_runner",
    "read_reply",
    "run_schedule",
]
