"""Peak memory of this process, recorded in results rows."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """The largest resident set size this process has had so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def peak_gpu_mb() -> float:
    """The most GPU memory torch has held at once in this process, in MiB (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
