"""How close the images a client sends are to its training images: nearest-neighbour L2 distance and SSIM.

Work in pixel space ([0, 1] values; :func:`to_pixels` undoes a dataset's normalisation). For each sent image,
:func:`nearest_images` finds its ``k`` nearest training images by L2 distance; :func:`exposure` adds the SSIM
(:func:`ssim`, a Gaussian-window SSIM of Wang et al. 2004) with those neighbours and flags exact copies (L2 below
``exact_tol``), near copies: images closer to a training image than ``near_quantile`` of the training images are to
their own nearest other training image (the training set's "distance to closest record" scale), and images that
single out one training image: whose nearest training image is much closer than the second nearest (the ratio of the
two distances below its ``near_quantile`` among the training images themselves). An image made from one training
image (a blurred or perturbed copy) singles it out even when it is not near in L2; a class-typical image does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedmerge.data.datasets import NORMALIZATION


def to_pixels(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Normalised images of ``dataset`` (N x C x H x W) back in [0, 1] pixel units (not clamped)."""
    mean, std = NORMALIZATION["mnist" if dataset.startswith("rmnist") else dataset]
    shape = (1, len(mean), 1, 1)
    return x.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM of each pair ``(a[i], b[i])`` (N x C x H x W each, values clamped to ``[0, data_range]``): a
    ``window`` x ``window`` Gaussian window (``sigma``), no padding, averaged over positions and channels."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two N x C x H x W batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    window = min(window, a.shape[-1], a.shape[-2])
    a, b = a.float().clamp(0, data_range), b.float().clamp(0, data_range)
    channels = a.shape[1]
    kernel = _gaussian_window(window, sigma, channels).to(a.device)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)


def nearest_images(
    sent: torch.Tensor, train: torch.Tensor, k: int = 1, chunk: int = 256, own_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distances (N x k, ascending) from each sent image to its ``k`` nearest training images, and their indices.

    ``own_rows``: ``sent[i]`` is ``train[own_rows[i]]``, which is then not its neighbour (a training image against
    the rest of its set).
    """
    flat_train = train.flatten(1).double()
    k = min(k, len(train) - int(own_rows is not None))
    distances, indices = [], []
    for start in range(0, len(sent), chunk):
        block = sent[start : start + chunk].flatten(1).double()
        d = torch.cdist(block, flat_train)
        if own_rows is not None:
            d[torch.arange(len(block)), own_rows[start : start + chunk]] = math.inf
        best = d.topk(k, dim=1, largest=False)
        distances.append(best.values.float())
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


@dataclass(frozen=True)
class Exposure:
    """Per sent image: L2 distance to the nearest training image, the highest SSIM with one of its ``k`` nearest,
    whether it is an exact or a near copy, and whether it singles out one training image (see the module docstring);
    ``near_threshold`` and ``ratio_threshold`` are the L2 distance and the distance ratio below which an image counts
    as a near copy and as singling out its nearest training image."""

    distance: torch.Tensor
    similarity: torch.Tensor
    exact: torch.Tensor
    near: torch.Tensor
    near_threshold: float
    ratio: torch.Tensor
    """Distance to the nearest training image over distance to the second nearest."""
    singled_out: torch.Tensor
    ratio_threshold: float


def reference_distances(train: torch.Tensor, sample: int = 500, seed: int = 0) -> torch.Tensor:
    """Distances (n x 2) from up to ``sample`` random training images to their two nearest *other* training
    images."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:sample]
    distances, _ = nearest_images(train[pick], train, k=2, own_rows=pick)
    return distances


def exposure(
    sent: torch.Tensor,
    train: torch.Tensor,
    k: int = 5,
    near_quantile: float = 0.05,
    exact_tol: float = 1e-3,
    reference: torch.Tensor | None = None,
    own_rows: torch.Tensor | None = None,
) -> Exposure:
    """How exposed ``train`` is by ``sent`` (both in pixel units, N x C x H x W). ``reference``: the training set's
    own distances to the two nearest neighbours (:func:`reference_distances`, computed when None); ``own_rows``:
    ``sent`` are these rows of ``train``, each compared with the rest (see :func:`nearest_images`)."""
    reference = reference if reference is not None else reference_distances(train)
    distances, indices = nearest_images(sent, train, max(k, 2), own_rows=own_rows)
    similarity = torch.stack(
        [ssim(sent, train[indices[:, j]]) for j in range(indices.shape[1])],
        dim=1,
    ).amax(1)
    threshold = float(torch.quantile(reference[:, 0].double(), near_quantile))
    ratio_threshold = float(torch.quantile(_ratio(reference).double(), near_quantile))
    nearest, ratio = distances[:, 0], _ratio(distances)
    return Exposure(
        nearest,
        similarity,
        nearest <= exact_tol,
        nearest < threshold,
        threshold,
        ratio,
        ratio < ratio_threshold,
        ratio_threshold,
    )


def _ratio(distances: torch.Tensor) -> torch.Tensor:
    """Nearest over second-nearest distance, per row (0 when both are 0: an exact copy of duplicated images)."""
    return distances[:, 0] / distances[:, 1].clamp_min(1e-12)
