"""Helpers shared by several test modules: randomised models, the shared data folder, Flower messages and the
tiny synthetic two-client set-up of the merge tests."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.merge import MergeConfig, NPConfig, STEConfig, merge_pair
from fedmerge.models import build_model
from fedmerge.train import TrainConfig, evaluate, train

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


# ------------------------------------------------------------------ tiny synthetic merging set-up
#
# Four Gaussian classes of 1x8x8 "images". The two "clients" of the federated setting see disjoint classes
# (A: 0 and 1, B: 2 and 3, the SPLIT setting), so each specialist alone scores about 50% on the union test set,
# and the server holds a 10-per-class surrogate of the union. Used by the merge tests (test_interpolate,
# test_pairwise, test_ste, test_np_merge, test_repair, test_baselines, test_methods).

SHAPE = (1, 8, 8)
NUM_CLASSES = 4
SPLIT_SEEDS = (0, 1)


# Full-batch (40-image surrogate) settings that are cheap yet move the merge away from plain WM.
STE_FAST = STEConfig(steps=100, lr=1e-2, batch_size=40)
NP_FAST = NPConfig(steps=100, lr=1e-2, batch_size=40)


@contextmanager
def one_thread():
    """One intra-op thread (tiny tensors on a busy 2-core machine), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def blobs(classes, per_class: int, seed: int, spread: float = 0.5, means_seed: int = 7) -> LabeledImages:
    """``per_class`` images of each of ``classes``: class c ~ N(spread * mean_c, I).

    The means are fixed by ``means_seed``.
    """
    means = torch.randn(NUM_CLASSES, *SHAPE, generator=torch.Generator().manual_seed(means_seed)) * spread
    y = torch.tensor(list(classes)).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), *SHAPE, generator=torch.Generator().manual_seed(seed))
    return LabeledImages(x, y, NUM_CLASSES, "blobs")


def mlp(width: int = 32, depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, num_classes=NUM_CLASSES, width=width, depth=depth)


def trained_mlp(data: LabeledImages, seed: int, width: int = 32, depth: int = 2, epochs: int = 5) -> nn.Module:
    return train(mlp(width, depth, seed), data, TrainConfig(epochs=epochs, lr=0.05, batch_size=32), seed=seed)


def load(template: nn.Module, state: dict) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def data_loss(model: nn.Module, data: LabeledImages) -> float:
    return F.cross_entropy(model.eval()(data.x), data.y).item()


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


def assert_valid_perms(perms: dict, spec, state: dict) -> None:
    sizes = spec.perm_sizes(state)
    assert perms.keys() == sizes.keys()
    for p, perm in perms.items():
        assert perm.dtype == torch.long
        assert torch.equal(torch.sort(perm).values, torch.arange(sizes[p])), f"{p} is not a permutation"


def randomized_bn_model(name: str, in_shape, width, seed: int = 0, **kwargs) -> nn.Module:
    """A BatchNorm model with random affine parameters and running stats far from any data's, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, in_shape, num_classes=NUM_CLASSES, width=width, **kwargs)
    randomize_parameters(model, running_stats=True)
    return model.eval()


class SplitPair:
    """Two specialists trained on disjoint classes, the union surrogate and the union test set."""

    def __init__(self, seed: int):
        self.data_a = blobs([0, 1], 100, seed * 10 + 1)
        self.data_b = blobs([2, 3], 100, seed * 10 + 2)
        self.test = blobs(range(NUM_CLASSES), 100, seed * 10 + 3)
        self.surrogate = blobs(range(NUM_CLASSES), 10, seed * 10 + 4)
        self.model_a = trained_mlp(self.data_a, seed * 10 + 5)
        self.model_b = trained_mlp(self.data_b, seed * 10 + 6)
        self.template = mlp()
        self.spec = self.template.permutation_spec()
        self._cache: dict = {}

    def merge(self, method: str, **kwargs):
        """``merge_pair`` of B into A (memoised per configuration)."""
        key = (method, tuple(sorted(kwargs.items())))
        if key not in self._cache:
            config = MergeConfig(method=method, **kwargs)
            self._cache[key] = merge_pair(
                self.template, self.model_a.state_dict(), self.model_b.state_dict(), self.surrogate, config=config
            )
        return self._cache[key]

    def quality(self, state: dict) -> tuple[float, float]:
        """(surrogate loss, union test accuracy) of a merged state."""
        model = load(self.template, state)
        return data_loss(model, self.surrogate), evaluate(model, self.test)
