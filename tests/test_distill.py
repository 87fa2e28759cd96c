"""Server-side distillation (FedDF) and its pooled-surrogates baseline, on the embedded 28x28 "digits" data.

Fixed case: three width-32 MLP "clients" trained on disjoint IID thirds of the digits train split form the
teacher ensemble; the server holds a 2-per-class surrogate (20 images). A fresh student distilled from the
ensemble must agree with it on the held-out test split far more often than the same student trained on the
same surrogate with the same recipe but no teacher.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmerge.data import LabeledImages, load_dataset
from fedmerge.merge import Ensemble
from fedmerge.merge.distill import (
    DistillConfig,
    DistillResult,
    agreement,
    augment,
    cutmix,
    distill,
    mixup,
    toward_boundary,
)
from fedmerge.models import MLP
from fedmerge.train import TrainConfig, evaluate, train

FAST = DistillConfig(steps=300, batch_size=20)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("FEDMERGE_PROGRESS", "0")


@pytest.fixture(scope="module")
def digits() -> tuple[LabeledImages, LabeledImages]:
    return load_dataset("digits", train=True), load_dataset("digits", train=False)


@pytest.fixture(scope="module")
def ensemble(digits) -> Ensemble:
    """Three MLP clients, each trained on its own 300 images."""
    train_set, _ = digits
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    members = []
    for i in range(3):
        torch.manual_seed(i)
        model = MLP(train_set.image_shape, 10, width=32)
        members.append(train(model, train_set.subset(order[i::3][:300]), TrainConfig(epochs=5, batch_size=32), seed=i))
    return Ensemble(members).eval()


@pytest.fixture(scope="module")
def surrogate(digits) -> LabeledImages:
    """The first 2 training images of every class."""
    train_set, _ = digits
    idx = torch.cat([torch.nonzero(train_set.y == c).flatten()[:2] for c in range(10)])
    return train_set.subset(idx, name="surrogate")


def fresh_student(shape=(1, 28, 28), seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(shape, 10, width=32)


# ------------------------------------------------------------------------------------------ fixed case


def test_distillation_beats_pooled_surrogates(digits, ensemble, surrogate):
    _, test_set = digits
    student = fresh_student()
    before = agreement(student, ensemble, test_set)
    distilled = distill(student, surrogate, ensemble, FAST, seed=0)
    pooled = distill(student, surrogate, None, FAST, seed=0)
    after, baseline = agreement(distilled.model, ensemble, test_set), agreement(pooled.model, ensemble, test_set)
    assert evaluate(ensemble, test_set) > 85  # measured 89.4
    assert after > baseline + 5  # measured 87.5 vs 73.3
    assert after > before + 40  # measured 15.0 before
    assert evaluate(distilled.model, test_set) > evaluate(pooled.model, test_set)  # measured 85.0 vs 75.2
    for result in (distilled, pooled):
        assert isinstance(result, DistillResult) and len(result.losses) == FAST.steps and result.seconds > 0
        assert not result.model.training


def test_teacher_sees_the_students_batch(surrogate):
    """Same augmented, mixed inputs for both; the student copy in train mode, the teacher in eval mode."""
    seen: dict[str, list] = {"student": [], "teacher": []}

    def recorder(key):
        return lambda module, inputs, output: seen[key].append((inputs[0].clone(), module.training))

    student, teacher = fresh_student(), fresh_student(seed=6).train()
    student.hidden[0].register_forward_hook(recorder("student"))
    teacher.hidden[0].register_forward_hook(recorder("teacher"))
    distill(student, surrogate, teacher, DistillConfig(steps=3, batch_size=8), seed=0)
    assert len(seen["student"]) == len(seen["teacher"]) == 3
    for (xs, student_mode), (xt, teacher_mode) in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(xs, xt) and student_mode and not teacher_mode
    assert teacher.training  # the caller's mode is restored
    flat = surrogate.x.flatten(1)
    assert not any((flat[:, None] == x[None]).all(-1).any() for x, _ in seen["student"])  # augmented, not raw


def test_deterministic_and_caller_untouched(surrogate, ensemble):
    student = fresh_student()
    original = copy.deepcopy(student.state_dict())
    config = DistillConfig(steps=20, batch_size=8)
    a = distill(student, surrogate, ensemble, config, seed=3)
    b = distill(student, surrogate, ensemble, config, seed=3)
    c = distill(student, surrogate, ensemble, config, seed=4)
    assert a.model is not student
    for key, value in original.items():
        assert torch.equal(student.state_dict()[key], value)
        assert torch.equal(a.model.state_dict()[key], b.model.state_dict()[key])
    assert a.losses == b.losses
    assert any(not torch.equal(a.model.state_dict()[k], c.model.state_dict()[k]) for k in original)
    assert any(not torch.equal(a.model.state_dict()[k], original[k]) for k in original)


def test_agreement(digits, ensemble):
    _, test_set = digits
    student = fresh_student()
    assert agreement(student, student, test_set) == 100.0
    assert agreement(student, ensemble, test_set) == agreement(ensemble, student, test_set)
    assert 0.0 <= agreement(student, ensemble, test_set) < 50.0


# ------------------------------------------------------------------------------------------ augmentation


def test_augment_shape_identity_and_translation():
    x = torch.randn(64, 3, 7, 9)
    assert augment(x, torch.Generator().manual_seed(0), 0) is x
    out = augment(x, torch.Generator().manual_seed(0), 2)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    dy, dx = torch.randint(-2, 3, (2, 64), generator=torch.Generator().manual_seed(0))  # the offsets it drew
    assert set(dy.tolist()) == set(dx.tolist()) == {-2, -1, 0, 1, 2}
    rows, cols = torch.arange(7), torch.arange(9)
    for i in range(64):  # out[h, w] = x[h - dy, w - dx], edges replicated
        src_r, src_c = (rows - dy[i]).clamp(0, 6), (cols - dx[i]).clamp(0, 8)
        assert torch.equal(out[i], x[i][:, src_r][:, :, src_c])
        if dy[i] == 0 and dx[i] == 0:
            assert torch.equal(out[i], x[i])


def test_augment_by_hand():
    """One 4x4 image shifted one pixel down and two pixels left, under a seed chosen to draw those offsets."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    draws = [torch.randint(-2, 3, (2, 1), generator=torch.Generator().manual_seed(s)) for s in range(200)]
    seed = [d.flatten().tolist() for d in draws].index([1, -2])
    out = augment(x, torch.Generator().manual_seed(seed), 2)
    expected = torch.tensor([[2.0, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7], [10, 11, 11, 11]])
    assert torch.equal(out[0, 0], expected)


def test_mixup():
    y = torch.nn.functional.one_hot(torch.arange(10) % 4, 4).float()
    x = y.reshape(10, 1, 1, 4).clone()  # each image carries its own target, so both must mix alike
    gen = torch.Generator().manual_seed(0)
    same_x, same_y = mixup(x, y, gen, 0.0)
    assert same_x is x and same_y is y
    mixed_x, mixed_y = mixup(x, y, gen, 1.0)
    assert mixed_x.shape == x.shape and mixed_y.shape == y.shape
    assert torch.allclose(mixed_y.sum(1), torch.ones(10))
    assert torch.allclose(mixed_x.reshape(10, 4), mixed_y)
    assert not torch.equal(mixed_y, y)
    first, second = (mixup(x, y, torch.Generator().manual_seed(1), 1.0)[1] for _ in range(2))
    assert torch.equal(first, second)  # deterministic given the generator
    with pytest.raises(ValueError, match="alpha"):
        mixup(x, y, gen, -1.0)


def test_cutmix_pastes_one_box_of_another_image_and_mixes_the_targets_by_its_area():
    x = torch.arange(6, dtype=torch.float).reshape(6, 1, 1, 1).expand(6, 1, 8, 8).contiguous()  # image i is all i
    y = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    mixed_x, mixed_y = cutmix(x, y, torch.Generator().manual_seed(3))
    assert mixed_x.shape == x.shape and torch.allclose(mixed_y.sum(1), torch.ones(6))
    for i in range(6):
        values, counts = mixed_x[i].unique(return_counts=True)
        shares = {int(v): int(c) / 64 for v, c in zip(values, counts, strict=True)}
        assert len(shares) <= 2 and (i in shares or len(shares) == 1)  # itself plus at most one other image
        for value, share in shares.items():  # every source image's target weight is the share of pixels it gave
            assert mixed_y[i, value].item() == pytest.approx(share)
        pasted = mixed_x[i] != x[i]
        if pasted.any():  # the pasted pixels form one box
            rows, cols = pasted[0].any(1).nonzero().flatten(), pasted[0].any(0).nonzero().flatten()
            assert pasted[0].sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    assert not torch.equal(mixed_x, x)
    first, second = (cutmix(x, y, torch.Generator().manual_seed(1))[0] for _ in range(2))
    assert torch.equal(first, second)  # deterministic given the generator
    one_x, one_y = cutmix(x[:1], y[:1], torch.Generator())
    assert torch.equal(one_x, x[:1]) and torch.equal(one_y, y[:1])  # a batch of one is left as it is


def assert_changes_the_run_only_when_set(
    surrogate: LabeledImages, teacher: nn.Module | None, base: DistillConfig, field: str, value: float
) -> None:
    """Distilling with ``base``'s ``field`` at 0 is the run of ``base`` itself (no random number is drawn for the
    option when it is off), and at ``value`` it is another run."""
    student = MLP(surrogate.image_shape, 10, width=16)
    runs = {
        setting: distill(student, surrogate, teacher, DistillConfig(**{**base.as_dict(), field: setting}), seed=0)
        for setting in (0.0, value)
    }
    assert runs[0.0].losses == distill(student, surrogate, teacher, base, seed=0).losses  # 0 draws nothing extra
    assert runs[value].losses != runs[0.0].losses


def test_cutmix_share_reaches_the_recipe_and_changes_the_batches_only_when_set(surrogate):
    from simulations.config import settings_from_run_config

    settings = settings_from_run_config({"distill-steps": 10, "distill-cutmix": 0.5}, 2)
    assert settings.recipe().cutmix == 0.5 and settings.recipe(teacher=False).cutmix == 0.5  # baseline too
    assert settings_from_run_config({"distill-steps": 10}, 2).recipe().cutmix == 0.0
    with pytest.raises(ValueError, match="distill-cutmix"):
        settings_from_run_config({"distill-cutmix": 1.5}, 2)
    with pytest.raises(ValueError, match="cutmix"):
        DistillConfig(cutmix=-0.1)
    assert_changes_the_run_only_when_set(surrogate, None, DistillConfig(steps=3, batch_size=8), "cutmix", 1.0)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("steps", 2.5),
        ("lr", 0.0),
        ("batch_size", 0),
        ("temperature", 0.0),
        ("shift", -1),
        ("shift", 1.5),
        ("mixup", -0.1),
        ("kd_weight", -1.0),
        ("label_weight", -1.0),
        ("weight_decay", -1e-4),
        ("lr", float("nan")),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})


def test_config_defaults_and_train_config():
    config = DistillConfig()
    assert (config.steps, config.lr, config.batch_size, config.shift, config.mixup) == (2000, 1e-3, 128, 2, 1.0)
    tc = config.train_config()
    assert (tc.optimizer, tc.lr, tc.batch_size, tc.weight_decay) == ("adam", 1e-3, 128, 5e-4)
    with pytest.raises(ValueError, match="kd_weight"):
        DistillConfig(kd_weight=0.0, label_weight=0.0)


def test_distill_input_errors(surrogate):
    with pytest.raises(ValueError, match="label_weight"):
        distill(fresh_student(), surrogate, None, DistillConfig(steps=1, label_weight=0.0))
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    with pytest.raises(ValueError, match="teacher output"):
        distill(fresh_student(), surrogate, wrong, DistillConfig(steps=1))


def test_affine_augment_keeps_shapes_varies_per_image_and_is_seeded():
    from fedmerge.merge.distill import affine_augment

    x = torch.zeros(6, 1, 12, 12)
    x[:, :, 4:8, 5:7] = 1.0
    assert affine_augment(x, torch.Generator().manual_seed(0), 0, 0.0, 0.0) is x
    out = affine_augment(x, torch.Generator().manual_seed(0), 2, 25.0, 0.2)
    again = affine_augment(x, torch.Generator().manual_seed(0), 2, 25.0, 0.2)
    assert out.shape == x.shape and torch.equal(out, again)
    assert not torch.allclose(out[0], out[1])  # each image its own map
    assert out.min() >= 0 and out.max() <= 1  # bilinear: no value outside the input's range
    # a pure rotation by up to 90 degrees keeps a centred square's mass roughly, moves it never off the image
    turned = affine_augment(x, torch.Generator().manual_seed(1), 0, 90.0, 0.0)
    assert torch.allclose(turned.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.3)
    for bad in ((-1, 0.0, 0.0), (0, -1.0, 0.0), (0, 0.0, 1.0)):
        with pytest.raises(ValueError, match="shift, rotate"):
            affine_augment(x, torch.Generator(), *bad)


def test_rotate_and_scale_reach_the_recipe_and_are_checked():
    from simulations.config import settings_from_run_config

    settings = settings_from_run_config({"distill-steps": 10, "distill-rotate": 20.0, "distill-scale": 0.1}, 2)
    config = settings.distill_config()
    assert config is not None and (config.rotate, config.scale) == (20.0, 0.1)
    assert (settings.recipe(teacher=False).rotate, settings.recipe(teacher=False).scale) == (20.0, 0.1)  # baseline too
    with pytest.raises(ValueError, match="distill-scale"):
        settings_from_run_config({"distill-scale": 1.0}, 2)
    with pytest.raises(ValueError, match="scale"):
        DistillConfig(scale=1.5)


def test_weight_decay_reaches_the_recipe_of_the_student_and_of_the_baseline():
    from simulations.config import settings_from_run_config

    default = settings_from_run_config({"distill-steps": 10}, 2)
    assert default.recipe().weight_decay == DistillConfig().weight_decay  # committed runs keep their recipe
    settings = settings_from_run_config({"distill-steps": 10, "distill-weight-decay": 0.0}, 2)
    assert settings.recipe().weight_decay == 0.0 and settings.recipe(teacher=False).weight_decay == 0.0
    with pytest.raises(ValueError, match="distill-weight-decay"):
        settings_from_run_config({"distill-weight-decay": -1.0}, 2)


def test_without_weight_decay_the_student_keeps_larger_weights():
    torch.manual_seed(0)
    data = LabeledImages(torch.randn(32, 1, 4, 4), torch.arange(32) % 2, 2, "toy")
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    norms = {}
    for decay in (0.0, 0.5):
        config = DistillConfig(steps=60, shift=0, mixup=0.0, weight_decay=decay)
        trained = distill(student, data, None, config, seed=0).model
        norms[decay] = trained[1].weight.norm().item()
    assert norms[0.0] > norms[0.5]


# ------------------------------------------------------------------------------------------ boundary samples


def _two_class_line() -> nn.Module:
    """Logits (x0, -x0): class 0 where x0 > 0, class 1 where x0 < 0, the boundary at x0 = 0."""
    line = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        line.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    return line


def test_boundary_samples_walk_to_the_teachers_boundary_and_stop_just_past_it():
    teacher = _two_class_line()
    x = torch.tensor([[0.1, 1.0], [-0.1, 1.0], [5.0, 0.0]])
    moved = toward_boundary(x, teacher, steps=5, step=0.04)
    assert -0.05 < moved[0, 0] < 0 < moved[1, 0] < 0.05  # each crossed over by less than one step, then stopped
    torch.testing.assert_close(moved[:2, 1], x[:2, 1])  # only along the margin's gradient
    torch.testing.assert_close(moved[2], torch.tensor([4.0, 0.0]))  # far away: five full steps (4 % of its norm)
    assert teacher.weight.grad is None  # the teacher is not trained
    assert toward_boundary(x, teacher, steps=0) is x


def test_boundary_share_moves_bank_images_and_reaches_the_recipe(surrogate, ensemble):
    from simulations.config import settings_from_run_config

    settings = settings_from_run_config({"distill-steps": 10, "distill-bank": 64, "distill-boundary": 0.5}, 2)
    assert settings.recipe().boundary == 0.5 and settings.recipe(teacher=False).boundary == 0.0  # teacher only
    with pytest.raises(ValueError, match="distill-bank"):
        settings_from_run_config({"distill-boundary": 0.5}, 2)
    with pytest.raises(ValueError, match="bank"):
        DistillConfig(boundary=0.5)
    with pytest.raises(ValueError, match="boundary"):
        DistillConfig(bank=64, boundary=1.5)
    grads = [None if p.grad is None else p.grad.clone() for p in ensemble.parameters()]
    plain = DistillConfig(steps=3, batch_size=8, bank=32)
    assert_changes_the_run_only_when_set(surrogate, ensemble, plain, "boundary", 1.0)
    for before, p in zip(grads, ensemble.parameters(), strict=True):  # moving images leaves the teacher's gradients
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)


# ------------------------------------------------------------------------------------------ elastic distortion


def _ramp_displacement(alpha: float, sigma: float, seed: int = 0) -> torch.Tensor:
    """The horizontal displacement (pixels) elastic_augment gives 4 images of a left-to-right ramp: bilinear
    sampling of a linear ramp returns the sampled column, so output minus input is the field (interior only)."""
    from fedmerge.merge.distill import elastic_augment

    ramp = torch.arange(32.0).expand(4, 1, 32, 32).contiguous()
    moved = elastic_augment(ramp, torch.Generator().manual_seed(seed), alpha, sigma)
    return (moved - ramp)[:, 0, 8:-8, 8:-8]


def test_elastic_augment_moves_pixels_along_a_smooth_seeded_field_of_the_given_scale():
    from fedmerge.merge.distill import elastic_augment

    x = torch.rand(4, 1, 32, 32)
    assert elastic_augment(x, torch.Generator().manual_seed(0), 0.0) is x
    out = elastic_augment(x, torch.Generator().manual_seed(0), 34.0)
    assert out.shape == x.shape and torch.equal(out, elastic_augment(x, torch.Generator().manual_seed(0), 34.0))
    assert not torch.allclose(out[0], out[1])  # each image its own field
    assert out.min() >= x.min() and out.max() <= x.max()  # bilinear: no value outside the input's range
    field = _ramp_displacement(34.0, 4.0)
    assert 0.3 < field.abs().mean() < 5.0  # about a pixel or two, as in Simard et al.'s setting
    assert torch.allclose(_ramp_displacement(68.0, 4.0), 2 * field, atol=1e-3)  # alpha scales the field

    # smooth: neighbouring pixels move nearly alike, unlike a field that is hardly smoothed at all
    def roughness(d: torch.Tensor) -> float:
        return float((d[:, :, 1:] - d[:, :, :-1]).abs().mean() / d.abs().mean())

    assert roughness(field) < 0.25 < roughness(_ramp_displacement(34.0, 0.3))
    for alpha, sigma in ((-1.0, 4.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="alpha"):
            elastic_augment(x, torch.Generator(), alpha, sigma)


def test_elastic_reaches_the_recipe_of_the_student_and_of_the_baseline_and_changes_batches_only_when_set(surrogate):
    from simulations.config import settings_from_run_config

    settings = settings_from_run_config({"distill-steps": 10, "distill-elastic": 34.0}, 2)
    assert settings.recipe().elastic == 34.0 and settings.recipe(teacher=False).elastic == 34.0
    assert settings_from_run_config({"distill-steps": 10}, 2).recipe().elastic == 0.0
    with pytest.raises(ValueError, match="distill-elastic"):
        settings_from_run_config({"distill-elastic": -1.0}, 2)
    for field, value in (("elastic", -1.0), ("elastic_sigma", 0.0)):
        with pytest.raises(ValueError, match=field):
            DistillConfig(**{field: value})
    assert_changes_the_run_only_when_set(surrogate, None, DistillConfig(steps=3, batch_size=8), "elastic", 34.0)


# ------------------------------------------------------------------------------------------ logit-matching loss


def test_logit_mse_ignores_a_constant_per_row_and_is_the_mean_squared_difference_otherwise():
    from fedmerge.merge.distill import logit_mse

    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    shifted = logits + torch.tensor([[5.0], [-2.0]])
    assert logit_mse(logits, shifted).item() == 0.0
    assert logit_mse(logits, torch.log_softmax(logits, 1)).item() < 1e-12  # log-probabilities are logits too
    target = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 6.0]])  # row 0 centred differs by (-1, -1, 2)
    assert logit_mse(logits, target).item() == pytest.approx((1 + 1 + 4) / 6)


def test_mse_loss_distils_the_teacher_ignores_the_temperature_and_reaches_the_recipe(digits, ensemble, surrogate):
    from simulations.config import settings_from_run_config

    _, test_set = digits
    student = fresh_student()
    mse = DistillConfig(steps=300, batch_size=20, loss="mse", label_weight=0.0)
    distilled = distill(student, surrogate, ensemble, mse, seed=0)
    pooled = distill(student, surrogate, None, FAST, seed=0)
    assert agreement(distilled.model, ensemble, test_set) > agreement(pooled.model, ensemble, test_set) + 5
    kl = distill(student, surrogate, ensemble, DistillConfig(steps=3, batch_size=8, label_weight=0.0), seed=0)
    short = DistillConfig(steps=3, batch_size=8, loss="mse", label_weight=0.0)
    assert distill(student, surrogate, ensemble, short, seed=0).losses != kl.losses
    hot = distill(student, surrogate, ensemble, DistillConfig(**{**short.as_dict(), "temperature": 4.0}), seed=0)
    assert hot.losses == pytest.approx(distill(student, surrogate, ensemble, short, seed=0).losses, rel=1e-5)

    assert settings_from_run_config({"distill-steps": 10, "distill-loss": "mse"}, 2).recipe().loss == "mse"
    assert settings_from_run_config({"distill-steps": 10}, 2).recipe().loss == "kl"
    with pytest.raises(ValueError, match="distill-loss"):
        settings_from_run_config({"distill-loss": "l1"}, 2)
    with pytest.raises(ValueError, match="loss"):
        DistillConfig(loss="l1")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the teacher bank


def test_teacher_bank_holds_exactly_bank_images_and_reports_progress_off_a_terminal(
    surrogate, ensemble, monkeypatch, caplog
):
    """A bank that is not a whole number of batches ends with a short batch; labelling it logs heartbeat lines
    (``fedmerge.progress``) when progress is on and no terminal shows a bar."""
    import logging
    from types import SimpleNamespace

    import torch.nn.functional as F

    from fedmerge.merge.distill import teacher_bank

    def log_probs(x: torch.Tensor, width: int) -> torch.Tensor:
        return F.log_softmax(ensemble(x), dim=1)

    monkeypatch.setenv("FEDMERGE_PROGRESS", "1")
    monkeypatch.setenv("FEDMERGE_PROGRESS_INTERVAL", "1e-9")
    monkeypatch.setattr("fedmerge.progress.Console", lambda: SimpleNamespace(is_terminal=False))
    caplog.set_level(logging.INFO, logger="fedmerge.progress")
    config = DistillConfig(steps=1, batch_size=8, bank=20)
    bank = teacher_bank(surrogate, log_probs, torch.Generator().manual_seed(0), config, ensemble)
    assert len(bank.images) == len(bank.targets) == len(bank.log_p) == 20
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"teacher bank: {k}/3" for k in (1, 2, 3)]


def test_without_a_teacher_the_teacher_only_fields_change_nothing(surrogate):
    """``TEACHER_ONLY_FIELDS`` (what the reference-distillation cache leaves out of a teacher-free key) are unread."""
    from dataclasses import replace

    from fedmerge.merge.distill import TEACHER_ONLY_FIELDS

    torch.manual_seed(0)
    student = MLP(surrogate.image_shape, 10, width=16)
    plain = DistillConfig(steps=3, batch_size=8)
    changed = replace(plain, kd_weight=2.0, temperature=4.0, loss="mse", bank=64, boundary=0.5)
    assert {f for f in TEACHER_ONLY_FIELDS if getattr(changed, f) != getattr(plain, f)} == set(TEACHER_ONLY_FIELDS)
    first = distill(student, surrogate, None, plain, seed=1).model.state_dict()
    second = distill(student, surrogate, None, changed, seed=1).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
