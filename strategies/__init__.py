"""Flower Message-API strategies: permutation-aligned merging of client models (WM, STE, NP Merge) and a FedAvg
baseline, importable into any ServerApp, and :func:`merge_reply` for any ClientApp to answer them.

Importing this package routes the library's logs into Flower's log output (:func:`send_logs_to_flower`).
"""

from strategies.client_helper import merge_reply
from strategies.fedavg import SortedFedAvg, send_logs_to_flower
from strategies.merge_strategy import PermutationMerge
from strategies.messages import ClientUpdate, InvalidReply, client_reply, read_reply
from strategies.parallel import RayRunner, SequentialRunner, make_runner
from strategies.schedule import SCHEDULES, MergeNode, MergeStep, run_schedule

send_logs_to_flower()

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
    "merge_reply",
    "read_reply",
    "run_schedule",
    "send_logs_to_flower",
]
