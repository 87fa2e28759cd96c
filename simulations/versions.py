"""Package versions recorded in every results row."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "flwr", "ray")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, plus Python and the compute device."""
    found = {
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def version_columns() -> dict[str, str]:
    """:func:`package_versions` as results-row columns, each name prefixed with ``version_``."""
    return {f"version_{name}": value for name, value in package_versions().items()}


def versions_text() -> str:
    """:func:`package_versions` as one line of text ("torch 2.14.1, numpy ..."), for a report's caption."""
    return ", ".join(f"{name} {value}" for name, value in package_versions().items())
