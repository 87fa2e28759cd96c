"""Dataset condensation by gradient matching (Zhao, Mopuri & Bilen, ICLR 2021).

A few learnable synthetic images per class are optimised so that, on many freshly initialised
networks and along their training trajectory, the gradient of the classification loss on the
synthetic images of class ``c`` matches the gradient on a batch of real images of class ``c``.

The distance is the paper's layer-wise one: for each parameter tensor, the gradient is split into
one group per output node (a row of a linear weight, an output channel of a conv kernel) and the
distance sums ``1 - cos`` over the groups. One-dimensional parameters (biases, normalisation
affine terms) contribute nothing, as in the authors' reference implementation; set
``CondenseConfig.match_bias`` to count each of them as a single group instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.device import derive_seed
from fedmerge.progress import progress
from fedmerge.train import batches

log = logging.getLogger(__name__)

# Paper schedule (official code): images-per-class -> (outer_loop, inner_loop).
PAPER_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}
DEFAULT_IMAGE_UPDATES = 100  # image updates in all when ``iterations`` is None
BN_IMAGES_PER_CLASS = 16  # real images per class used to set BatchNorm statistics (as in the paper's code)


@dataclass(frozen=True)
class CondenseConfig:
    """Knobs of gradient-matching condensation.

    ``iterations``: freshly initialised networks to match on (1000 in the paper). ``None`` gives
    ``DEFAULT_IMAGE_UPDATES // outer_loop`` networks, i.e. about 100 image updates in all, so a
    10-class MNIST client condenses to IPC 10 with a 3x512 MLP in a couple of CPU minutes.
    ``outer_loop``: synthetic-image updates per network; ``inner_loop``: training epochs of the
    network on the synthetic set between two image updates. ``None`` takes the paper's schedule for
    the IPC (1/1 for IPC 1, 10/50 for IPC 10, ...). ``lr_img``/``momentum_img``: SGD on the images
    (0.1 / 0.5 as in the paper); ``lr_net``: SGD on the network (0.01). ``batch_real``: real images
    per class for each real gradient; ``batch_train``: batch size of the network's inner training.
    ``init``: "real" (random real images of the class) or "noise" (standard normal).
    """

    iterations: int | None = None
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_img: float = 0.1
    momentum_img: float = 0.5
    lr_net: float = 0.01
    batch_real: int = 256
    batch_train: int = 256
    init: str = "real"
    match_bias: bool = False

    def __post_init__(self) -> None:
        if self.init not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {self.init!r}")
        if (self.iterations is not None and self.iterations < 0) or min(self.batch_real, self.batch_train) < 1:
            raise ValueError(f"invalid condensation config: {self}")
        if any(v is not None and v < 1 for v in (self.outer_loop, self.inner_loop)):
            raise ValueError(f"outer_loop and inner_loop must be at least 1: {self}")
        if self.lr_img <= 0 or self.lr_net <= 0 or not 0 <= self.momentum_img < 1:
            raise ValueError(f"invalid learning rates / momentum: {self}")

    def schedule(self, ipc: int) -> tuple[int, int, int]:
        """(iterations, outer_loop, inner_loop) for ``ipc``: explicit values, else the defaults above."""
        key = max((k for k in PAPER_LOOPS if k <= ipc), default=1)
        outer = self.outer_loop or PAPER_LOOPS[key][0]
        inner = self.inner_loop or PAPER_LOOPS[key][1]
        iterations = self.iterations if self.iterations is not None else max(1, DEFAULT_IMAGE_UPDATES // outer)
        return iterations, outer, inner


def layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor, match_bias: bool = False) -> torch.Tensor:
    """Sum over output-node groups of ``1 - cos(g_syn_i, g_real_i)`` for one parameter tensor."""
    if g_syn.ndim <= 1:
        if not match_bias:
            return g_syn.new_zeros(())
        g_syn, g_real = g_syn.reshape(1, -1), g_real.reshape(1, -1)
    else:
        g_syn, g_real = g_syn.reshape(len(g_syn), -1), g_real.reshape(len(g_real), -1)
    cosine = (g_syn * g_real).sum(-1) / (g_syn.norm(dim=-1) * g_real.norm(dim=-1) + 1e-6)
    return (1 - cosine).sum()


def gradient_distance(
    grads_syn: Sequence[torch.Tensor], grads_real: Sequence[torch.Tensor], match_bias: bool = False
) -> torch.Tensor:
    """The paper's matching distance summed over all parameter tensors."""
    return torch.stack([layer_distance(s, r, match_bias) for s, r in zip(grads_syn, grads_real, strict=True)]).sum()


def class_matching_distance(
    net: nn.Module,
    x_real: torch.Tensor,
    y_real: torch.Tensor,
    x_syn: torch.Tensor,
    y_syn: torch.Tensor,
    match_bias: bool = False,
) -> torch.Tensor:
    """Distance between the loss gradients of ``net`` on a real and a synthetic batch (one class).

    Differentiable w.r.t. ``x_syn`` when it requires grad (second-order through the synthetic branch).
    """
    params = [p for p in net.parameters() if p.requires_grad]
    g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)]
    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=x_syn.requires_grad)
    return gradient_distance(g_syn, g_real, match_bias)


def condense_gradient_matching(
    data: LabeledImages,
    ipc: int,
    model_fn: Callable[[], nn.Module],
    config: CondenseConfig = CondenseConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LabeledImages:
    """Condense ``data`` to ``ipc`` synthetic images per present class by gradient matching.

    ``model_fn`` returns a freshly initialised network (called once per iteration, under a seed
    derived from ``seed``). A class with fewer than ``ipc`` real images gets as many synthetic
    images as it has real ones. Returns detached images (on ``data``'s device) labelled by class id.
    """
    if ipc < 1:
        raise ValueError(f"ipc must be at least 1, got {ipc}")
    if len(data) == 0:
        raise ValueError(f"cannot condense an empty dataset ({data.name or 'unnamed'})")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    real = data.to(device)
    members = class_members(data)
    syn_x, syn_y = init_synthetic(real, members, ipc, config.init, generator)
    syn_x.requires_grad_(True)
    image_optimizer = torch.optim.SGD([syn_x], lr=config.lr_img, momentum=config.momentum_img)
    iterations, outer_loop, inner_loop = config.schedule(ipc)
    for iteration in progress(range(iterations), f"condensing {data.name or 'data'} (IPC {ipc})"):
        net = _fresh_network(model_fn, derive_seed(seed, "condense-net", iteration), device)
        net_optimizer = torch.optim.SGD(net.parameters(), lr=config.lr_net)
        total = 0.0
        for step in range(outer_loop):
            if _batchnorms(net):
                _freeze_batchnorm(net, _real_batches(real, members, BN_IMAGES_PER_CLASS, generator)[0])
            loss = _matching_loss(net, real, members, syn_x, syn_y, config, generator)
            image_optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=[syn_x])
            image_optimizer.step()
            total += loss.item()
            if step < outer_loop - 1:
                train_steps(net, net_optimizer, syn_x.detach(), syn_y, inner_loop, config.batch_train, generator)
        log.debug("condense iteration %d: mean matching loss %.4f", iteration, total / outer_loop)
    name = f"{data.name}:condensed{ipc}" if data.name else f"condensed{ipc}"
    return LabeledImages(syn_x.detach().clone().to(data.x.device), syn_y.to(data.y.device), data.num_classes, name)


def class_members(data: LabeledImages) -> dict[int, torch.Tensor]:
    """Indices (CPU) of the images of every class present, by class id in ascending order."""
    labels = data.y.cpu()
    return {c: torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()}


def init_synthetic(
    data: LabeledImages, members: dict[int, torch.Tensor], ipc: int, init: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial synthetic images (``min(ipc, class size)`` per class, grouped by class) and labels."""
    xs, ys = [], []
    for c, idx in members.items():
        n = min(ipc, len(idx))
        if init == "real":
            xs.append(data.x[idx[torch.randperm(len(idx), generator=generator)[:n]].to(data.x.device)].clone())
        else:
            xs.append(torch.randn((n, *data.image_shape), generator=generator).to(data.x.device))
        ys.append(torch.full((n,), c, dtype=torch.long, device=data.x.device))
    return torch.cat(xs).float(), torch.cat(ys)


def train_steps(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Train ``net`` for ``epochs`` passes of cross-entropy over the in-memory batch ``(x, y)``."""
    net.train()
    data = LabeledImages(x, y, int(y.max()) + 1)
    for _ in range(epochs):
        for xb, yb in batches(data, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()


def _matching_loss(
    net: nn.Module,
    real: LabeledImages,
    members: dict[int, torch.Tensor],
    syn_x: torch.Tensor,
    syn_y: torch.Tensor,
    config: CondenseConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Matching distance summed over classes, on a fresh real batch per class."""
    _, per_class = _real_batches(real, members, config.batch_real, generator)
    loss = syn_x.new_zeros(())
    for c, (x_real, y_real) in per_class.items():
        mask = syn_y == c
        loss = loss + class_matching_distance(net, x_real, y_real, syn_x[mask], syn_y[mask], config.match_bias)
    return loss


def _real_batches(
    real: LabeledImages, members: dict[int, torch.Tensor], per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Up to ``per_class`` random real images of every class: all of them stacked, and by class."""
    by_class = {}
    for c, idx in members.items():
        pick = idx[torch.randperm(len(idx), generator=generator)[:per_class]].to(real.x.device)
        by_class[c] = (real.x[pick], real.y[pick])
    return torch.cat([x for x, _ in by_class.values()]), by_class


def _fresh_network(model_fn: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """``model_fn()`` initialised under ``seed`` without disturbing the global CPU generator."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        net = model_fn()
    return net.to(device).train()


def _batchnorms(net: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``net``."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _freeze_batchnorm(net: nn.Module, x_real: torch.Tensor) -> None:
    """Set BatchNorm statistics from a real batch of all classes, then keep them fixed (paper's code)."""
    net.train()
    with torch.no_grad():
        net(x_real)
    for m in _batchnorms(net):
        m.eval()
