"""Helpers shared by several test modules: randomised models, the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedmerge.models import build_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")

# The argument names of the (name, input shape, width, extra constructor arguments) model tables.
CASE_FIELDS = ("name", "in_shape", "width", "kwargs")


def randomize_parameters(model: nn.Module, running_stats: bool = False) -> None:
    """Random BN affine parameters (and running stats far from any data's, when ``running_stats``),
    Kaiming-normal weights (keeps signals alive with depth) and small random biases, in place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
                if running_stats:
                    module.running_mean.normal_(0.0, 1.0)
                    module.running_var.uniform_(0.5, 3.0)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)


def randomized_model(name: str, in_shape, width, kwargs, seed: int = 0, spread_stats: bool = False) -> nn.Module:
    """A model with live signals, random biases / BN affine parameters and random running stats, in eval mode.

    ``spread_stats`` also spreads the running stats further apart between channels.
    """
    torch.manual_seed(seed)
    model = build_model(name, in_shape, width=width, **kwargs)
    randomize_parameters(model)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, *in_shape) * 2 + 0.5)
        if spread_stats:
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.add_(torch.randn_like(module.running_mean) * 0.2)
                    module.running_var.mul_(torch.empty_like(module.running_var).uniform_(0.5, 2.0))
    return model.eval()


def flower_message(message_type: str = "train", dst_node_id: int = 1, content=None):
    """A Flower ``Message`` as the server would send it, built outside a running Flower app (for unit tests)."""
    import time

    from flwr.app import Message, Metadata, RecordDict
    from flwr.app.message.message import make_message

    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    message: Message = make_message(metadata, content if content is not None else RecordDict())
    return message
