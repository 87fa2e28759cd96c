"""Server-side distillation on the pooled client surrogates (FedDF, Lin et al. 2020), and its fair baseline.

``distill`` trains a copy of a student (a merged model, or a fresh one) on the union of the clients' tiny
surrogates with random translations and mixup, against

* ``teacher`` given: ``kd_weight * T^2 * KL(teacher_T || student_T) + label_weight * CE(student, labels)``
  (or, with ``loss="mse"``, ``kd_weight`` times the mean squared error between centred logits instead of the KL),
  where the teacher (e.g. the clients' ``Ensemble``) is evaluated under ``no_grad`` on exactly the augmented,
  mixed batch the student sees (so the surrogate images become an endless stream of new transfer points);
* ``teacher=None``: ``label_weight * CE(student, labels)`` only -- the "pooled surrogates" baseline with the
  same augmentation, mixup and step budget, so the comparison isolates the value of the teacher.

Labels are mixed like the images (soft one-hot targets), so CE and KL are both soft-target cross-entropies.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from fedmerge.data.images import LabeledImages
from fedmerge.progress import progress
from fedmerge.train import TrainConfig, fit, predict_logits

DistillLoss = Literal["kl", "mse"]
DISTILL_LOSSES: tuple[str, ...] = get_args(DistillLoss)

TEACHER_ONLY_FIELDS = ("kd_weight", "temperature", "loss", "bank", "boundary")
"""The :class:`DistillConfig` fields :func:`distill` reads only when it is given a teacher."""


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of ``distill`` (Adam with a cosine schedule, run through ``fedmerge.train.fit``).

    ``temperature`` softens teacher and student alike (the KL term is scaled by ``T^2`` so its gradient size
    does not depend on ``T``); the default 1.0 is FedDF's choice and keeps the ensemble's calibrated
    probabilities -- with mixup the teacher's targets on mixed images are already soft. ``shift`` is the
    largest random translation in pixels (0 disables), ``mixup`` the Beta(a, a) parameter (0 disables).
    ``kd_weight`` and ``label_weight`` weight the distillation and the label cross-entropy; without a
    teacher only the label term is used. ``weight_decay`` is Adam's (coupled) L2 penalty. ``bank`` > 0 runs the
    teacher once on that many augmented, mixed images and trains the student on them (sampled in batches), instead
    of running the teacher on every batch: the teacher's cost (N client models per image) falls by the ratio of
    ``steps * batch_size`` to ``bank``. ``rotate`` (degrees) and ``scale`` > 0 replace the integer shifts by random
    affine maps (rotation by up to ``rotate`` degrees, scaling by ``1 +- scale``, translation by up to ``shift``
    pixels; :func:`affine_augment`): with one image per class the student then sees far more of the teacher.
    ``cutmix`` is the probability that a batch is mixed by :func:`cutmix` (a box of another image pasted in)
    instead of mixup; 0 (the default) always uses mixup. ``boundary`` is the share of the teacher bank moved toward
    the teacher's decision boundaries before the teacher labels it (:func:`toward_boundary`, boundary-supporting
    samples); it needs a bank. ``elastic`` > 0 adds an elastic distortion after the shifts or affine maps
    (:func:`elastic_augment`, Simard et al. 2003): every pixel moves along its own random field, smoothed by a
    Gaussian of ``elastic_sigma`` pixels and scaled by ``elastic`` (pixels), so strokes bend as well as move.
    ``loss`` is the distillation term: ``"kl"`` (the default, FedDF's) or ``"mse"``, the mean squared error between
    the student's logits and the teacher's log-probabilities, each centred per image (:func:`logit_mse`; Kim et al.,
    IJCAI 2021, found logit matching distils better than KL at any temperature; it ignores ``temperature``).
    """

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 128
    temperature: float = 1.0
    shift: int = 2
    mixup: float = 1.0
    kd_weight: float = 1.0
    label_weight: float = 1.0
    weight_decay: float = 5e-4
    bank: int = 0
    rotate: float = 0.0
    scale: float = 0.0
    cutmix: float = 0.0
    boundary: float = 0.0
    elastic: float = 0.0
    elastic_sigma: float = 4.0
    loss: DistillLoss = "kl"

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "temperature": self.temperature}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"DistillConfig.{name} must be positive, got {value!r}")
        non_negative = (
            "shift",
            "mixup",
            "kd_weight",
            "label_weight",
            "weight_decay",
            "bank",
            "rotate",
            "scale",
            "elastic",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"DistillConfig.{name} must be non-negative, got {value!r}")
        for name in ("steps", "batch_size", "shift", "bank"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"DistillConfig.{name} must be an integer, got {value!r}")
        for name in ("cutmix", "boundary"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"DistillConfig.{name} is a share (0 to 1), got {getattr(self, name)!r}")
        if not self.elastic_sigma > 0:
            raise ValueError(f"DistillConfig.elastic_sigma must be positive, got {self.elastic_sigma!r}")
        if self.boundary and not self.bank:
            raise ValueError("DistillConfig.boundary moves teacher-bank images: it needs bank > 0")
        if self.scale >= 1:
            raise ValueError(f"DistillConfig.scale must be below 1 (images scaled by 1 +- scale), got {self.scale!r}")
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"DistillConfig.loss must be one of {DISTILL_LOSSES}, got {self.loss!r}")
        if self.kd_weight == 0 and self.label_weight == 0:
            raise ValueError("DistillConfig.kd_weight and DistillConfig.label_weight cannot both be 0")

    def train_config(self) -> TrainConfig:
        """The ``TrainConfig`` for ``fit`` (Adam; the number of steps is passed to ``fit`` separately)."""
        return TrainConfig(
            epochs=1, lr=self.lr, batch_size=self.batch_size, optimizer="adam", weight_decay=self.weight_decay
        )

    def as_dict(self) -> dict[str, float | str]:
        """The fields as a plain dict (for reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class DistillResult:
    """The trained copy of the student (eval mode), the loss of every step and the wall-clock time."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def augment(x: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Translate every image of ``x`` (N x C x H x W) by its own random integer offset in ``[-shift, shift]``
    along each axis, filling the uncovered border by replicating the edge pixels (the background of normalised
    images, whatever value normalisation gave it). ``shift=0`` returns ``x`` itself. Offsets are drawn on the
    CPU from ``generator``; the gather runs on ``x``'s device with no per-image loop."""
    if shift < 0:
        raise ValueError(f"shift must be non-negative, got {shift}")
    if shift == 0 or len(x) == 0:
        return x
    n, _, h, w = x.shape
    offsets = torch.randint(-shift, shift + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate").permute(0, 2, 3, 1)  # N x H' x W' x C
    rows = torch.arange(h, device=x.device)[None, :] + shift - offsets[0][:, None]  # N x H: source row
    cols = torch.arange(w, device=x.device)[None, :] + shift - offsets[1][:, None]  # N x W: source column
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()


def affine_augment(
    x: torch.Tensor, generator: torch.Generator, shift: float, rotate: float, scale: float
) -> torch.Tensor:
    """Map every image of ``x`` (N x C x H x W) by its own random affine map: a rotation by up to ``rotate``
    degrees, a scaling by a factor in ``[1 - scale, 1 + scale]`` and a translation by up to ``shift`` pixels along
    each axis (bilinear sampling, the border replicated as in :func:`augment`). The parameters are drawn on the CPU
    from ``generator``; all zero returns ``x`` itself."""
    if min(shift, rotate, scale) < 0 or scale >= 1:
        raise ValueError(f"need shift, rotate >= 0 and 0 <= scale < 1, got {shift}, {rotate}, {scale}")
    if (shift == 0 and rotate == 0 and scale == 0) or len(x) == 0:
        return x
    n, _, h, w = x.shape
    u = torch.rand(4, n, generator=generator, dtype=torch.float64) * 2 - 1  # uniform in [-1, 1]
    angle, factor = u[0] * math.radians(rotate), 1 + u[1] * scale
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor  # the grid maps output to input coordinates
    tx, ty = u[2] * shift * 2 / w, u[3] * shift * 2 / h  # in the grid's [-1, 1] units
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def elastic_augment(x: torch.Tensor, generator: torch.Generator, alpha: float, sigma: float = 4.0) -> torch.Tensor:
    """Distort every image of ``x`` (N x C x H x W) by its own random elastic field (Simard et al., ICDAR 2003):
    a uniform [-1, 1] displacement per pixel and axis, smoothed by a Gaussian of ``sigma`` pixels
    (``torchvision``'s ``gaussian_blur``) and scaled by ``alpha`` pixels, then bilinear sampling with the border
    replicated as in :func:`affine_augment`. The fields are drawn on the CPU from ``generator``; ``alpha=0`` returns
    ``x`` itself."""
    if alpha < 0 or not sigma > 0:
        raise ValueError(f"need alpha >= 0 and sigma > 0, got {alpha}, {sigma}")
    if alpha == 0 or len(x) == 0:
        return x
    n, _, h, w = x.shape
    noise = torch.rand(n, 2, h, w, generator=generator) * 2 - 1
    size = 2 * math.ceil(3 * sigma) + 1
    field = gaussian_blur(noise, [size, size], [sigma, sigma]) * alpha  # pixels; channel 0 along x, 1 along y
    scale = torch.tensor([2 / w, 2 / h]).view(1, 2, 1, 1)  # pixels to the grid's [-1, 1] units
    identity = torch.eye(2, 3).expand(n, 2, 3)
    grid = F.affine_grid(identity, [n, 1, h, w], align_corners=False) + (field * scale).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="border", align_corners=False)


def _augment(x: torch.Tensor, generator: torch.Generator, config: DistillConfig) -> torch.Tensor:
    """The recipe's augmentation: integer shifts, or affine maps when ``rotate`` or ``scale`` is set, then an
    elastic distortion when ``elastic`` is set (no random number is drawn for it otherwise, so recipes without it
    make the same images as before it existed)."""
    if config.rotate or config.scale:
        x = affine_augment(x, generator, config.shift, config.rotate, config.scale)
    else:
        x = augment(x, generator, config.shift)
    return elastic_augment(x, generator, config.elastic, config.elastic_sigma) if config.elastic else x


def mixup(
    x: torch.Tensor, y_soft: torch.Tensor, generator: torch.Generator, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): ``lam * x + (1 - lam) * x[perm]`` with one ``lam ~ Beta(alpha, alpha)`` per
    batch and a random permutation ``perm`` of it; the soft targets ``y_soft`` (N x K) are mixed alike, so rows
    that sum to 1 still do. ``alpha=0`` (or a batch of one) returns the inputs unchanged."""
    if alpha < 0:
        raise ValueError(f"mixup alpha must be non-negative, got {alpha}")
    if alpha == 0 or len(x) < 2:
        return x, y_soft
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y_soft + (1 - lam) * y_soft[perm]


def cutmix(x: torch.Tensor, y_soft: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019): paste one random box of ``x[perm]`` into every image of ``x`` (N x C x H x W), for
    a random permutation ``perm`` of the batch. The box covers a share ``1 - lam`` of the image, ``lam ~ Beta(1, 1)``
    (clipped at the border), and the soft targets ``y_soft`` (N x K) are mixed by the share the box really covers.
    A batch of one is returned unchanged."""
    if len(x) < 2:
        return x, y_soft
    n, _, h, w = x.shape
    lam = float(torch.rand(1, generator=generator, dtype=torch.float64))  # Beta(1, 1) is uniform
    box_h, box_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    centre_y, centre_x = (int(torch.randint(0, size, (1,), generator=generator)) for size in (h, w))
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h - box_h // 2, h)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w - box_w // 2, w)
    perm = torch.randperm(n, generator=generator).to(x.device)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    pasted = (bottom - top) * (right - left) / (h * w)
    return mixed, (1 - pasted) * y_soft + pasted * y_soft[perm]


def _mix(
    x: torch.Tensor, y_soft: torch.Tensor, generator: torch.Generator, config: DistillConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's mixing of a batch: CutMix with probability ``config.cutmix``, else mixup. No random number is
    drawn for the choice when ``cutmix`` is 0, so recipes without it make the same batches as before it existed."""
    if config.cutmix > 0 and float(torch.rand(1, generator=generator)) < config.cutmix:
        return cutmix(x, y_soft, generator)
    return mixup(x, y_soft, generator, config.mixup)


BOUNDARY_STEPS = 5
"""Gradient steps :func:`toward_boundary` takes at most per image."""
BOUNDARY_STEP = 0.04
"""Length of one :func:`toward_boundary` step, as a share of the image's own L2 norm (at most 20 % in all)."""


def toward_boundary(
    x: torch.Tensor, teacher: nn.Module, steps: int = BOUNDARY_STEPS, step: float = BOUNDARY_STEP
) -> torch.Tensor:
    """Boundary-supporting samples (after Heo et al., AAAI 2019): move every image of ``x`` toward the teacher's
    decision boundary between its top class and its runner-up, by steps of L2 length ``step`` times the image's
    norm along the normalised gradient of the teacher's margin (top minus runner-up output). An image stops once
    the runner-up has overtaken, or after ``steps`` steps. Where the teacher hesitates its soft targets say most
    about where its classes meet, which the few surrogate images rarely show. Returns new images; the teacher's
    parameters get no gradient."""
    if steps < 0 or step < 0:
        raise ValueError(f"need steps, step >= 0, got {steps}, {step}")
    if len(x) == 0 or steps == 0:
        return x
    with torch.no_grad():
        top, runner_up = teacher(x).topk(2, dim=1).indices.unbind(1)
    rows = torch.arange(len(x), device=x.device)
    per_image = (-1,) + (1,) * (x.dim() - 1)  # a per-image number broadcast over the image's own axes
    size = step * x.flatten(1).norm(dim=1).clamp_min(1e-12)
    moved, active = x.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        probe = moved.detach().requires_grad_(True)
        out = teacher(probe)
        margin = out[rows, top] - out[rows, runner_up]
        active &= margin.detach() > 0
        if not active.any():
            break
        (grad,) = torch.autograd.grad(margin.sum(), probe)
        direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(per_image)
        shift = (size * active).view(per_image) * direction
        moved = (moved - shift).detach()
    return moved


def distill(
    student: nn.Module,
    data: LabeledImages,
    teacher: nn.Module | None = None,
    config: DistillConfig = DistillConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DistillResult:
    """Train a copy of ``student`` for ``config.steps`` Adam steps on augmented, mixed batches of ``data``.

    With ``teacher`` (any module returning logits or log-probabilities, e.g. ``Ensemble``) the loss adds the
    temperature-scaled KL divergence from the teacher's prediction on the same batch; with ``teacher=None``
    it is the pooled-surrogates baseline (labels only, same budget). The student copy trains in train mode;
    the teacher runs in eval mode under ``no_grad`` (it is moved to ``device`` and its mode restored after).
    Deterministic given ``seed``. The caller's ``student`` is left untouched.
    """
    if teacher is None and config.label_weight == 0:
        raise ValueError("without a teacher, DistillConfig.label_weight must be positive (nothing to learn from)")
    start = time.perf_counter()
    model = copy.deepcopy(student).to(device).train()
    data = data.to(device)
    generator = torch.Generator().manual_seed(seed + 1_000_003)  # augmentation stream; fit seeds batch order
    t = config.temperature
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(device).eval()

    def check_width(logits: torch.Tensor) -> None:
        if logits.shape[1] != data.num_classes:
            raise ValueError(f"student predicts {logits.shape[1]} classes but the data has {data.num_classes}")

    def teacher_log_probs(x: torch.Tensor, width: int) -> torch.Tensor:
        assert teacher is not None
        with torch.no_grad():
            out = teacher(x)
        if out.shape[1] != width:
            raise ValueError(f"teacher output {tuple(out.shape)} has not the student's {width} classes")
        return F.log_softmax(out / t, dim=1)

    def objective(logits: torch.Tensor, targets: torch.Tensor, log_p: torch.Tensor | None) -> torch.Tensor:
        loss = logits.new_zeros(())
        if config.label_weight > 0:
            loss = loss + config.label_weight * soft_cross_entropy(logits, targets)
        if log_p is not None and config.kd_weight > 0:
            if config.loss == "mse":
                loss = loss + config.kd_weight * logit_mse(logits, t * log_p)  # t * log_p: the teacher's logits
            else:
                log_q = F.log_softmax(logits / t, dim=1)
                kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
                loss = loss + config.kd_weight * t * t * kl
        return loss

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        targets = F.one_hot(y, data.num_classes).to(x.dtype)
        x, targets = _mix(_augment(x, generator, config), targets, generator, config)
        logits = model(x)
        check_width(logits)
        use_teacher = teacher is not None and config.kd_weight > 0
        return objective(logits, targets, teacher_log_probs(x, logits.shape[1]) if use_teacher else None)

    try:
        name = "distill" if teacher is not None else "pooled surrogates"
        if config.bank and teacher is not None:
            bank = teacher_bank(data, teacher_log_probs, generator, config, teacher)

            def bank_loss(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                logits = model(x)
                check_width(logits)
                return objective(logits, bank.targets[index], bank.log_p[index])

            losses = fit(
                model.parameters(),
                bank_loss,
                bank.images,
                config.train_config(),
                seed=seed,
                steps=config.steps,
                description=name,
            )
        else:
            losses = fit(
                model.parameters(),
                loss_fn,
                data,
                config.train_config(),
                seed=seed,
                steps=config.steps,
                description=name,
            )
    finally:
        if teacher is not None:
            teacher.train(teacher_was_training)
    return DistillResult(model.eval(), losses, time.perf_counter() - start)


@dataclass
class TeacherBank:
    """Augmented, mixed images (labelled by their index, so batches can look their targets up), their mixed
    one-hot label targets and the teacher's log-probabilities on them."""

    images: LabeledImages
    targets: torch.Tensor
    log_p: torch.Tensor


def teacher_bank(
    data: LabeledImages,
    teacher_log_probs: Callable[[torch.Tensor, int], torch.Tensor],
    generator: torch.Generator,
    config: DistillConfig,
    teacher: nn.Module | None = None,
) -> TeacherBank:
    """``config.bank`` images made from ``data`` as the per-batch recipe makes them (shifts, then mixup or CutMix
    within a batch; then, with ``config.boundary``, that share of each batch moved toward the ``teacher``'s
    decision boundaries), with the teacher's log-probabilities computed once."""
    xs, ys, log_ps = [], [], []
    sizes = [min(config.batch_size, config.bank - start) for start in range(0, config.bank, config.batch_size)]
    for size in progress(sizes, "teacher bank", total=len(sizes)):
        index = torch.randint(0, len(data), (size,), generator=generator)
        x, y = data.x[index], data.y[index.to(data.y.device)]
        targets = F.one_hot(y, data.num_classes).to(x.dtype)
        x, targets = _mix(_augment(x, generator, config), targets, generator, config)
        if teacher is not None and config.boundary:
            moving = int(round(config.boundary * len(x)))  # the first ones: the batch is already in random order
            x = torch.cat([toward_boundary(x[:moving], teacher), x[moving:]])
        xs.append(x)
        ys.append(targets)
        log_ps.append(teacher_log_probs(x, data.num_classes))
    images = torch.cat(xs)
    labels = torch.arange(len(images), device=images.device)
    return TeacherBank(LabeledImages(images, labels, len(images), "teacher bank"), torch.cat(ys), torch.cat(log_ps))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (N x K) against probability rows ``targets`` (N x K)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between two N x K logit tables after centring each row (logits, or
    log-probabilities, that differ by a constant per image give the same softmax, so they count as equal)."""
    centred = student_logits - student_logits.mean(1, keepdim=True)
    target = teacher_logits - teacher_logits.mean(1, keepdim=True)
    return (centred - target).pow(2).mean()


def agreement(model_a: nn.Module, model_b: nn.Module, data: LabeledImages, device: torch.device | str = "cpu") -> float:
    """Percentage of the images of ``data`` on which the two models' top-1 predictions agree (both run in eval
    mode on ``device``, like ``predict_logits``)."""
    if len(data) == 0:
        return float("nan")
    a = predict_logits(model_a, data, device=device).argmax(1)
    b = predict_logits(model_b, data, device=device).argmax(1)
    return 100.0 * (a == b).float().mean().item()
