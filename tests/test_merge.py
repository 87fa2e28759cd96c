"""Merging: interpolation, merge_pair (WM / AM / STE / NP Merge), BN reset and REPAIR, and the baselines.

Everything runs on tiny synthetic data: four Gaussian classes of 1x8x8 "images". The two "clients"
of the federated setting see disjoint classes (A: 0 and 1, B: 2 and 3, the SPLIT setting), so each
specialist alone scores about 50% on the union test set, and the server holds a 10-per-class
surrogate of the union.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align import activation_matching, apply_permutation, invert, random_perms, weight_matching
from fedmerge.data.images import LabeledImages, concat
from fedmerge.merge import (
    CORRECTIONS,
    METHODS,
    Ensemble,
    MergeConfig,
    NPConfig,
    STEConfig,
    fine_tune,
    interpolate_states,
    merge_pair,
    np_merge,
    repair,
    reset_batchnorm,
    ste_merge,
    train_from_scratch,
    weighted_average,
)
from fedmerge.merge import ste as ste_module
from fedmerge.merge.repair import repair_points, unit_statistics
from fedmerge.models import build_model
from fedmerge.train import TrainConfig, evaluate, train
from tests.helpers import randomize_parameters

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


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch):
    """No progress bars; one intra-op thread."""
    monkeypatch.setenv("FEDMERGE_PROGRESS", "0")
    with one_thread():
        yield


# ------------------------------------------------------------------------------------------ helpers


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


@pytest.fixture(scope="module")
def split_pairs() -> dict[int, SplitPair]:
    with one_thread():
        return {seed: SplitPair(seed) for seed in SPLIT_SEEDS}


# -------------------------------------------------------------------------------- interpolation


def toy_state(seed: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(steps),
    }


def test_interpolate_states_endpoints_and_integer_buffers():
    a, b = toy_state(0, 5), toy_state(1, 9)
    at_a = interpolate_states(a, b, 0.0)
    at_b = interpolate_states(a, b, 1.0)
    assert_states_equal(at_a, a)
    for key in ("w", "b"):
        assert torch.equal(at_b[key], b[key]), key
    assert at_b["bn.num_batches_tracked"].item() == 5  # integer buffers come from A, at any lambda
    assert at_b["bn.num_batches_tracked"].dtype == torch.int64
    quarter = interpolate_states(a, b, 0.25)
    for key in ("w", "b"):
        torch.testing.assert_close(quarter[key], 0.75 * a[key] + 0.25 * b[key])
    assert quarter["bn.num_batches_tracked"].item() == 5
    at_a["w"].add_(1.0)  # a new state dict, not views of the inputs
    at_a["bn.num_batches_tracked"].add_(1)
    assert_states_equal(a, toy_state(0, 5))


@pytest.mark.parametrize("lam", [-0.1, 1.01, math.nan])
def test_interpolate_states_rejects_bad_lambda(lam):
    with pytest.raises(ValueError, match="lambda"):
        interpolate_states(toy_state(0, 1), toy_state(1, 1), lam)


def test_interpolate_states_rejects_mismatched_keys_or_shapes():
    a = toy_state(0, 1)
    with pytest.raises(ValueError, match="keys"):
        interpolate_states(a, {k: v for k, v in a.items() if k != "b"}, 0.5)
    with pytest.raises(ValueError, match="keys"):
        interpolate_states(a, {**a, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_states(a, {**a, "w": torch.zeros(4, 3)}, 0.5)


def test_weighted_average_normalises_weights():
    states = [toy_state(s, s + 1) for s in range(3)]
    merged = weighted_average(states, [1.0, 2.0, 5.0])
    for key in ("w", "b"):
        expected = (states[0][key] + 2 * states[1][key] + 5 * states[2][key]) / 8
        torch.testing.assert_close(merged[key], expected)
    assert merged["bn.num_batches_tracked"].item() == 1  # from the first state dict
    assert_states_equal(weighted_average(states, [10.0, 20.0, 50.0]), merged)
    # Two states with weights (1 - lam, lam) are interpolation.
    pair = weighted_average(states[:2], [3.0, 1.0])
    for key in ("w", "b"):
        torch.testing.assert_close(pair[key], interpolate_states(states[0], states[1], 0.25)[key])
    single = weighted_average(states[:1], [0.3])
    for key in ("w", "b"):
        torch.testing.assert_close(single[key], states[0][key])


def test_weighted_average_rejects_bad_weights():
    states = [toy_state(0, 1), toy_state(1, 1)]
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average(states, [1.0])
    with pytest.raises(ValueError, match="positive"):
        weighted_average(states, [0.0, 0.0])


# ------------------------------------------------------------------ merging a model with its permuted copy


@pytest.fixture(scope="module")
def permuted_copy():
    """A trained MLP and a randomly permuted copy of it (same function, scrambled units)."""
    with one_thread():
        data = blobs(range(NUM_CLASSES), 50, seed=20)
        model = trained_mlp(data, seed=21)
    spec = model.permutation_spec()
    hidden = random_perms(spec, model.state_dict(), torch.Generator().manual_seed(22))
    state_b = apply_permutation(spec, hidden, model.state_dict())
    return model, state_b, hidden, data


@pytest.mark.parametrize("method", ["wm", "am", "ste", "np", "ste+np"])
def test_merging_a_permuted_copy_recovers_the_model(permuted_copy, method):
    model, state_b, hidden, data = permuted_copy
    spec = model.permutation_spec()
    config = MergeConfig(method=method, ste=STEConfig(steps=20, batch_size=50), np=NPConfig(steps=20, batch_size=50))
    result = merge_pair(mlp(), model.state_dict(), state_b, data, config=config)
    assert result.method == method
    assert result.seconds >= 0
    assert_valid_perms(result.perms, spec, state_b)
    for p in spec.perm_names:  # the permutation that undoes the scrambling was found
        assert torch.equal(result.perms[p], invert(hidden)[p]), p
    merged = load(mlp(), result.state)
    with torch.no_grad():
        torch.testing.assert_close(merged(data.x), model(data.x), atol=1e-5, rtol=1e-5)
    if method in ("ste", "np", "ste+np"):
        expected_steps = {"ste": 20, "np": 20, "ste+np": 40}[method]
        assert len(result.losses) == expected_steps


def test_averaging_a_permuted_copy_without_alignment_changes_the_model(permuted_copy):
    model, state_b, _, data = permuted_copy
    result = merge_pair(mlp(), model.state_dict(), state_b, data, config=MergeConfig(method="average"))
    assert all(torch.equal(perm, torch.arange(len(perm))) for perm in result.perms.values())
    merged = load(mlp(), result.state)
    with torch.no_grad():
        gap = (merged(data.x) - model(data.x)).abs().max().item()
    assert gap > 0.1
    assert evaluate(merged, data) < evaluate(model, data)


def test_merging_a_permuted_batchnorm_resnet_recovers_it():
    """The BN path: STE and NP train with batch statistics, buffers are permuted/interpolated, not reset."""
    model = randomized_bn_model("resnet20", (3, 8, 8), 0.25, seed=3, blocks_per_stage=1)
    spec = model.permutation_spec()
    state_b = apply_permutation(
        spec, random_perms(spec, model.state_dict(), torch.Generator().manual_seed(4)), model.state_dict()
    )
    gen = torch.Generator().manual_seed(5)
    data = LabeledImages(
        torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (32,), generator=gen), NUM_CLASSES
    )
    template = copy.deepcopy(model)
    config = MergeConfig(
        method="ste+np", correction="none", ste=STEConfig(steps=5, batch_size=32), np=NPConfig(steps=5, batch_size=32)
    )
    result = merge_pair(template, model.state_dict(), state_b, data, config=config)
    merged = load(template, result.state)
    with torch.no_grad():
        torch.testing.assert_close(merged(data.x), model(data.x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.state["bn1.running_var"], model.state_dict()["bn1.running_var"])

    # correction="auto" on a BN model is a BatchNorm reset on the surrogate.
    auto = merge_pair(template, model.state_dict(), state_b, data, config=MergeConfig(method="wm"))
    plain = merge_pair(template, model.state_dict(), state_b, data, config=MergeConfig(method="wm", correction="none"))
    expected = reset_batchnorm(load(template, plain.state), data).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(auto.state[key], value, msg=key)
    assert not torch.allclose(auto.state["bn1.running_mean"], plain.state["bn1.running_mean"])


# ------------------------------------------------------------- STE and NP Merge on two different clients


def test_specialists_are_specialists(split_pairs):
    for pair in split_pairs.values():
        for model in (pair.model_a, pair.model_b):
            assert 40 <= evaluate(model, pair.test) <= 55


def test_ste_beats_weight_matching_on_split_clients(split_pairs):
    wm_loss, wm_acc, ste_loss, ste_acc = [], [], [], []
    for pair in split_pairs.values():
        wm = pair.merge("wm")
        ste = pair.merge("ste", ste=STE_FAST)
        assert ste.method == "ste"
        assert_valid_perms(ste.perms, pair.spec, pair.model_b.state_dict())
        # The returned state is exactly A interpolated with B under the returned permutations.
        aligned = apply_permutation(pair.spec, ste.perms, pair.model_b.state_dict())
        assert_states_equal(ste.state, interpolate_states(pair.model_a.state_dict(), aligned, 0.5))
        assert len(ste.losses) == STE_FAST.steps
        assert all(math.isfinite(x) for x in ste.losses)
        assert sum(ste.losses[-10:]) / 10 < sum(ste.losses[:10]) / 10 - 0.01
        for losses, accs, state in ((wm_loss, wm_acc, wm.state), (ste_loss, ste_acc, ste.state)):
            loss, acc = pair.quality(state)
            losses.append(loss)
            accs.append(acc)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(ste_loss) < mean(wm_loss) - 0.02, (ste_loss, wm_loss)
    assert mean(ste_acc) > mean(wm_acc) + 3.0, (ste_acc, wm_acc)


def test_np_merge_beats_weight_matching_and_stays_between_the_endpoints(split_pairs):
    for pair in split_pairs.values():
        wm, npm = pair.merge("wm"), pair.merge("np", np=NP_FAST)
        assert npm.method == "np"
        assert len(npm.losses) == NP_FAST.steps
        assert sum(npm.losses[-10:]) / 10 < sum(npm.losses[:10]) / 10 - 0.1
        for p in pair.spec.perm_names:  # NP Merge aligns with weight matching
            assert torch.equal(npm.perms[p], wm.perms[p])
        (wm_loss, wm_acc), (np_loss, np_acc) = pair.quality(wm.state), pair.quality(npm.state)
        assert np_loss < wm_loss - 0.1
        assert np_acc >= wm_acc
        # Every merged weight is a convex combination of A's and aligned B's.
        a = pair.model_a.state_dict()
        b = apply_permutation(pair.spec, npm.perms, pair.model_b.state_dict())
        for key in a:
            low, high = torch.minimum(a[key], b[key]), torch.maximum(a[key], b[key])
            assert (npm.state[key] >= low - 1e-6).all() and (npm.state[key] <= high + 1e-6).all(), key
            assert not torch.allclose(npm.state[key], wm.state[key]), f"{key}: coefficients never moved"


def test_ste_then_np_beats_ste_alone(split_pairs):
    for pair in split_pairs.values():
        ste, both = pair.merge("ste", ste=STE_FAST), pair.merge("ste+np", ste=STE_FAST, np=NP_FAST)
        assert len(both.losses) == STE_FAST.steps + NP_FAST.steps
        assert both.losses[: STE_FAST.steps] == ste.losses
        for p in pair.spec.perm_names:
            assert torch.equal(both.perms[p], ste.perms[p])
        assert pair.quality(both.state)[0] < pair.quality(ste.state)[0] - 0.1


def test_np_merge_initialises_at_lambda_and_rejects_bad_input(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    # With no optimisation steps NP Merge is plain interpolation at lambda.
    state, losses = np_merge(pair.template, a, b, pair.surrogate, lam=0.3, config=NPConfig(steps=0))
    assert losses == []
    for key, value in interpolate_states(a, b, 0.3).items():
        torch.testing.assert_close(state[key], value, msg=key)
    for lam in (0.0, 1.0):
        with pytest.raises(ValueError, match="lambda"):
            np_merge(pair.template, a, b, pair.surrogate, lam=lam)
    empty = LabeledImages(torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long), NUM_CLASSES)
    with pytest.raises(ValueError, match="non-empty"):
        np_merge(pair.template, a, b, empty)


@pytest.mark.parametrize("lam", [0.25, 0.75])
def test_ste_respects_lambda(split_pairs, lam):
    pair = split_pairs[SPLIT_SEEDS[0]]
    result = merge_pair(
        pair.template,
        pair.model_a.state_dict(),
        pair.model_b.state_dict(),
        pair.surrogate,
        lam=lam,
        config=MergeConfig(method="ste", ste=STEConfig(steps=10, lr=1e-2, batch_size=40)),
    )
    aligned = apply_permutation(pair.spec, result.perms, pair.model_b.state_dict())
    for key, value in interpolate_states(pair.model_a.state_dict(), aligned, lam).items():
        torch.testing.assert_close(result.state[key], value, msg=key)


@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_ste_first_step_loss_is_that_of_the_lambda_weighted_weight_matching_merge(split_pairs, lam):
    # The soft weights start at A, so the first straight-through forward pass is exactly the WM merge at lam.
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    config = STEConfig(steps=1, batch_size=len(pair.surrogate))
    result = ste_merge(pair.template, pair.spec, a, b, pair.surrogate, lam, config)
    wm = merge_pair(pair.template, a, b, lam=lam, config=MergeConfig(method="wm"))
    assert result.losses[0] == pytest.approx(data_loss(load(pair.template, wm.state), pair.surrogate), rel=1e-4)


def test_ste_with_default_settings_improves_on_weight_matching(split_pairs):
    changed, gains = [], []
    for pair in split_pairs.values():
        wm, ste = pair.merge("wm"), pair.merge("ste", ste=STEConfig())
        changed.append(any(not torch.equal(wm.perms[p], ste.perms[p]) for p in pair.spec.perm_names))
        gains.append(pair.quality(wm.state)[0] - pair.quality(ste.state)[0])
    assert all(changed), changed
    assert sum(gains) / len(gains) > 0.02, gains


def test_ste_warm_and_full_projection_reach_similar_quality(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    wm_loss, wm_acc = pair.quality(pair.merge("wm").state)
    results = {}
    for projection in ("warm", "full"):
        config = STEConfig(steps=STE_FAST.steps, lr=STE_FAST.lr, batch_size=STE_FAST.batch_size, projection=projection)
        result = pair.merge("ste", ste=config)
        assert_valid_perms(result.perms, pair.spec, pair.model_b.state_dict())
        assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10
        results[projection] = pair.quality(result.state)
    (warm_loss, warm_acc), (full_loss, full_acc) = results["warm"], results["full"]
    assert warm_loss < wm_loss and full_loss < wm_loss, (results, wm_loss)
    assert abs(warm_loss - full_loss) < 0.1, results
    assert abs(warm_acc - full_acc) < 10.0, results
    assert min(warm_acc, full_acc) >= wm_acc, (results, wm_acc)


def test_ste_config_validation():
    with pytest.raises(ValueError, match="projection"):
        STEConfig(projection="exact")
    with pytest.raises(ValueError, match="steps"):
        STEConfig(steps=-1)


def test_activation_matching_merge_aligns_on_the_surrogate(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    result = pair.merge("am")
    expected = activation_matching(pair.model_a, pair.model_b, pair.surrogate)
    assert result.method == "am" and result.losses == []
    for p in pair.spec.perm_names:
        assert torch.equal(result.perms[p], expected[p]), p
    aligned = apply_permutation(pair.spec, expected, pair.model_b.state_dict())
    assert_states_equal(result.state, interpolate_states(pair.model_a.state_dict(), aligned, 0.5))


def test_merges_are_deterministic(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[1]]
    config = MergeConfig(
        method="ste+np", seed=3, ste=STEConfig(steps=30, lr=1e-2, batch_size=16), np=NPConfig(steps=30, batch_size=16)
    )
    runs = [
        merge_pair(pair.template, pair.model_a.state_dict(), pair.model_b.state_dict(), pair.surrogate, config=config)
        for _ in range(2)
    ]
    assert_states_equal(runs[0].state, runs[1].state)
    assert runs[0].losses == runs[1].losses
    for p in pair.spec.perm_names:
        assert torch.equal(runs[0].perms[p], runs[1].perms[p])


# ------------------------------------------------------------------------ merge_pair: fallbacks, validation


@pytest.mark.parametrize("method", ["am", "ste", "np", "ste+np"])
@pytest.mark.parametrize("surrogate", ["none", "empty"])
def test_merge_pair_falls_back_to_weight_matching_without_data(split_pairs, caplog, method, surrogate):
    pair = split_pairs[SPLIT_SEEDS[0]]
    data = (
        None
        if surrogate == "none"
        else LabeledImages(torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long), NUM_CLASSES)
    )
    with caplog.at_level(logging.WARNING, logger="fedmerge.merge.pairwise"):
        result = merge_pair(
            pair.template, pair.model_a.state_dict(), pair.model_b.state_dict(), data, config=MergeConfig(method=method)
        )
    assert result.method == "wm"
    assert result.losses == []
    assert any(
        r.levelno == logging.WARNING and method in r.getMessage() and "weight matching" in r.getMessage()
        for r in caplog.records
    )
    assert_states_equal(result.state, pair.merge("wm").state)


def test_merge_pair_skips_a_correction_that_needs_missing_data(split_pairs, caplog):
    pair = split_pairs[SPLIT_SEEDS[0]]
    with caplog.at_level(logging.WARNING, logger="fedmerge.merge.pairwise"):
        result = merge_pair(
            pair.template,
            pair.model_a.state_dict(),
            pair.model_b.state_dict(),
            None,
            config=MergeConfig(method="wm", correction="repair"),
        )
    assert any("repair" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert_states_equal(result.state, pair.merge("wm").state)


def test_merge_config_rejects_unknown_method_or_correction():
    assert set(METHODS) >= {"average", "wm", "am", "ste", "np", "ste+np"}
    assert set(CORRECTIONS) >= {"auto", "none", "bn-reset", "repair"}
    with pytest.raises(ValueError, match="method"):
        MergeConfig(method="fedavg")
    with pytest.raises(ValueError, match="correction"):
        MergeConfig(correction="renorm")


def test_merge_pair_rejects_state_dicts_that_do_not_match_the_spec(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    deeper = mlp(depth=3).state_dict()
    config = MergeConfig(method="wm")
    with pytest.raises(ValueError, match="spec"):
        merge_pair(pair.template, a, deeper, config=config)
    with pytest.raises(ValueError, match="spec"):
        merge_pair(pair.template, {k: v for k, v in a.items() if k != "head.bias"}, b, config=config)
    with pytest.raises(ValueError, match="axes"):
        merge_pair(pair.template, a, {**b, "head.bias": b["head.bias"].unsqueeze(0)}, config=config)
    with pytest.raises(ValueError):  # a CNN's weights for an MLP template
        cnn = build_model("cnn", SHAPE, num_classes=NUM_CLASSES, width=0.25)
        merge_pair(pair.template, cnn.state_dict(), cnn.state_dict(), config=config)


@pytest.mark.parametrize("method", ["average", "wm", "ste"])
def test_merge_pair_rejects_models_of_different_widths(split_pairs, method):
    pair = split_pairs[SPLIT_SEEDS[0]]
    with pytest.raises(ValueError):
        merge_pair(
            pair.template, pair.model_a.state_dict(), mlp(width=16).state_dict(), config=MergeConfig(method=method)
        )


# ------------------------------------------------------------------------------- BatchNorm reset, REPAIR


@torch.no_grad()
def per_batch_bn_input_stats(model: nn.Module, data: LabeledImages, batch_size: int) -> dict:
    """Average over batches of every BN input's per-channel batch mean and unbiased variance (train-mode forward)."""
    probe = copy.deepcopy(model).train()
    bns = {name: m for name, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list] = {name: [] for name in bns}
    handles = [
        m.register_forward_hook(lambda _m, inputs, _o, name=name: seen[name].append(inputs[0]))
        for name, m in bns.items()
    ]
    for start in range(0, len(data), batch_size):
        probe(data.x[start : start + batch_size])
    for h in handles:
        h.remove()
    stats = {}
    for name, inputs in seen.items():
        means = torch.stack([x.mean((0, 2, 3)) for x in inputs])
        variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs])
        stats[name] = (means.mean(0), variances.mean(0))
    return stats


@pytest.mark.parametrize(
    ("name", "in_shape", "width", "kwargs"),
    [("vgg11", (3, 32, 32), 0.125, {}), ("resnet20", (1, 28, 28), 0.25, {})],
    ids=["vgg11-3x32x32", "resnet20-1x28x28"],
)
def test_reset_batchnorm_sets_running_stats_to_the_data_statistics(name, in_shape, width, kwargs):
    model = randomized_bn_model(name, in_shape, width, seed=1, **kwargs)
    gen = torch.Generator().manual_seed(2)
    data = LabeledImages(
        torch.randn(48, *in_shape, generator=gen) * 1.5 + 0.3, torch.zeros(48, dtype=torch.long), NUM_CLASSES
    )
    expected = per_batch_bn_input_stats(model, data, batch_size=16)
    before = snapshot(model)
    returned = reset_batchnorm(model, data, batch_size=16)
    assert returned is model and not model.training
    modules = dict(model.named_modules())
    assert expected
    for bn_name, (mean, var) in expected.items():
        bn = modules[bn_name]
        assert bn.momentum == 0.1  # restored after the cumulative-average pass
        assert bn.num_batches_tracked.item() == 3
        torch.testing.assert_close(bn.running_mean, mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bn.running_var, var, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(bn.running_mean, before[f"{bn_name}.running_mean"], atol=1e-2)
    for key, value in before.items():  # learned parameters are untouched
        if not any(key.endswith(s) for s in ("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(model.state_dict()[key], value), key
    # One batch holding all the data: running stats are the dataset's statistics (and eval == train outputs, up to
    # the biased/unbiased variance difference).
    reset_batchnorm(model, data, batch_size=len(data))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(data.x), copy.deepcopy(model).train()(data.x), atol=0.05, rtol=0.05)


def test_reset_batchnorm_edge_cases():
    plain = mlp()
    before = snapshot(plain)
    empty = LabeledImages(torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long), NUM_CLASSES)
    assert reset_batchnorm(plain, empty) is plain  # nothing to reset: no data needed
    assert_states_equal(plain.state_dict(), before)
    bn_model = randomized_bn_model("resnet20", (3, 8, 8), 0.25, blocks_per_stage=1)
    with pytest.raises(ValueError, match="non-empty"):
        reset_batchnorm(bn_model, LabeledImages(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long), NUM_CLASSES))


def assert_repaired_stats(
    repaired: nn.Module, model_a: nn.Module, model_b: nn.Module, data: LabeledImages, lam: float, names: list[str]
):
    got = unit_statistics(repaired, names, data)
    stats_a, stats_b = unit_statistics(model_a, names, data), unit_statistics(model_b, names, data)
    for name in names:
        for i, what in enumerate(("mean", "std")):
            target = torch.lerp(stats_a[name][i], stats_b[name][i], lam)
            scale = target.abs().max().item()
            torch.testing.assert_close(got[name][i], target, atol=1e-3 * scale, rtol=1e-3, msg=f"{name} {what}")


def test_repair_matches_interpolated_unit_statistics_mlp(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    lam = 0.3
    data = concat([pair.surrogate, pair.test])
    perms = weight_matching(pair.spec, pair.model_a.state_dict(), pair.model_b.state_dict())
    aligned_b = load(pair.template, apply_permutation(pair.spec, perms, pair.model_b.state_dict()))
    merged = load(pair.template, interpolate_states(pair.model_a.state_dict(), aligned_b.state_dict(), lam))
    names = repair_points(merged)
    assert names == ["hidden.0", "hidden.1"]
    before = snapshot(merged)
    repaired = repair(merged, pair.model_a, aligned_b, data, lam=lam)
    assert repaired is not merged
    assert_states_equal(merged.state_dict(), before)
    assert_repaired_stats(repaired, pair.model_a, aligned_b, data, lam, names)
    # ... which the plain merge does not do (variance collapse): the check above can fail.
    with pytest.raises(AssertionError):
        assert_repaired_stats(merged, pair.model_a, aligned_b, data, lam, names)


def test_repair_matches_interpolated_unit_statistics_batchnorm():
    in_shape, lam = (3, 32, 32), 0.5
    model_a = randomized_bn_model("vgg11", in_shape, 0.125, seed=1)
    model_b = randomized_bn_model("vgg11", in_shape, 0.125, seed=2)
    data = LabeledImages(
        torch.randn(40, *in_shape, generator=torch.Generator().manual_seed(3)),
        torch.zeros(40, dtype=torch.long),
        NUM_CLASSES,
    )
    merged = load(model_a, interpolate_states(model_a.state_dict(), model_b.state_dict(), lam))
    names = repair_points(merged)
    assert names and all(isinstance(dict(merged.named_modules())[n], nn.BatchNorm2d) for n in names)
    repaired = repair(merged, model_a, model_b, data, lam=lam)
    assert not repaired.training
    assert_repaired_stats(repaired, model_a, model_b, data, lam, names)
    with pytest.raises(AssertionError):
        assert_repaired_stats(merged, model_a, model_b, data, lam, names)


def test_repair_undoes_variance_collapse():
    """Averaging two unaligned deep MLPs collapses hidden variance and accuracy; REPAIR restores most of it."""
    gains = []
    for seed in (0, 1):
        data = blobs(range(NUM_CLASSES), 150, seed * 10 + 1)
        test = blobs(range(NUM_CLASSES), 100, seed * 10 + 3)
        surrogate = blobs(range(NUM_CLASSES), 10, seed * 10 + 4)
        model_a = trained_mlp(data, seed * 10 + 5, width=64, depth=4)
        model_b = trained_mlp(data, seed * 10 + 6, width=64, depth=4)
        template = mlp(width=64, depth=4)
        args = (template, model_a.state_dict(), model_b.state_dict(), surrogate)
        plain = load(template, merge_pair(*args, config=MergeConfig(method="average", correction="none")).state)
        fixed = load(template, merge_pair(*args, config=MergeConfig(method="average", correction="repair")).state)
        assert data_loss(fixed, test) < data_loss(plain, test) - 0.2
        gains.append(evaluate(fixed, test) - evaluate(plain, test))
    assert min(gains) > 3.0 and sum(gains) / len(gains) > 10.0, gains


# ------------------------------------------------------------------------------------------ baselines


def test_ensemble_validates_weights():
    members = [mlp(seed=0), mlp(seed=1)]
    with pytest.raises(ValueError, match="member"):
        Ensemble([])
    for bad in ([1.0], [1.0, 2.0, 3.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            Ensemble(members, bad)
    torch.testing.assert_close(Ensemble(members).weights, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(Ensemble(members, [1.0, 3.0]).weights, torch.tensor([0.25, 0.75]))


def test_ensemble_output_is_log_of_weighted_mean_probabilities(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    ensemble = Ensemble([pair.model_a, pair.model_b], [1.0, 3.0]).eval()
    x = pair.test.x[:64]
    with torch.no_grad():
        expected = torch.log(0.25 * torch.softmax(pair.model_a(x), 1) + 0.75 * torch.softmax(pair.model_b(x), 1))
        out = ensemble(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(len(x)))
    one = Ensemble([pair.model_a]).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(x), torch.log_softmax(pair.model_a(x), 1), atol=1e-5, rtol=1e-5)


def test_ensemble_of_specialists_beats_each_specialist(split_pairs):
    for pair in split_pairs.values():
        ensemble = Ensemble([pair.model_a, pair.model_b])
        acc = evaluate(ensemble, pair.test)
        assert acc > max(evaluate(pair.model_a, pair.test), evaluate(pair.model_b, pair.test)) + 25.0


def test_fine_tune_returns_a_new_model_that_fits_the_surrogate(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    merged = load(pair.template, pair.merge("wm").state)
    before = snapshot(merged)
    config = TrainConfig(epochs=30, lr=0.05, batch_size=20)
    tuned = fine_tune(merged, pair.surrogate, config, seed=0)
    assert tuned is not merged
    assert_states_equal(merged.state_dict(), before)
    assert evaluate(tuned, pair.surrogate) == 100.0
    assert data_loss(tuned, pair.surrogate) < data_loss(merged, pair.surrogate) / 2
    assert_states_equal(fine_tune(merged, pair.surrogate, config, seed=0).state_dict(), tuned.state_dict())


def test_train_from_scratch_forgets_the_weights_and_fits_the_surrogate(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    before = snapshot(pair.model_a)
    fresh = train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=0), seed=4)
    assert fresh is not pair.model_a
    assert_states_equal(pair.model_a.state_dict(), before)
    for key, value in fresh.state_dict().items():
        assert not torch.allclose(value, before[key]), f"{key} kept the original weights"
    assert_states_equal(
        train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=0), seed=4).state_dict(), fresh.state_dict()
    )
    assert not torch.equal(
        train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=0), seed=5).state_dict()["head.weight"],
        fresh.state_dict()["head.weight"],
    )

    trained = train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=30, lr=0.05, batch_size=20), seed=4)
    assert_states_equal(pair.model_a.state_dict(), before)
    assert evaluate(trained, pair.surrogate) == 100.0
    assert data_loss(trained, pair.surrogate) < data_loss(fresh, pair.surrogate) / 2
    assert evaluate(trained, pair.test) > 60.0  # it learned all four classes, not only A's two


@pytest.mark.parametrize("method", ["ste", "np", "ste+np"])
def test_merging_leaves_the_callers_models_as_they_were(split_pairs, method):
    pair = split_pairs[SPLIT_SEEDS[0]]
    template, model_a = pair.template.train(), pair.model_a.train()
    before = snapshot(template), snapshot(model_a)
    config = MergeConfig(method=method, correction="repair", ste=STEConfig(steps=3), np=NPConfig(steps=3))
    merge_pair(template, model_a.state_dict(), pair.model_b.state_dict(), pair.surrogate, config=config)
    assert template.training and model_a.training
    for old, model in zip(before, (template, model_a), strict=True):
        assert all(torch.equal(old[k], v) for k, v in model.state_dict().items())
    template.eval(), model_a.eval()


def test_ste_keeps_its_weight_matching_start_when_it_ends_worse(split_pairs, monkeypatch):
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    wm = merge_pair(pair.template, a, b, config=MergeConfig(method="wm"))
    real_weight_matching = ste_module.weight_matching

    def scrambled_after_start(spec, target, source, init=None, **kwargs):
        # The start (no init) is real weight matching; every later projection lands on a random permutation.
        if init is None:
            return real_weight_matching(spec, target, source, **kwargs)
        return random_perms(spec, source, torch.Generator().manual_seed(7))

    monkeypatch.setattr(ste_module, "weight_matching", scrambled_after_start)
    result = ste_merge(pair.template, pair.spec, a, b, pair.surrogate, 0.5, STEConfig(steps=2, batch_size=40))
    assert result.kept_start
    assert all(torch.equal(result.perms[p], wm.perms[p]) for p in pair.spec.perm_names)
    torch.testing.assert_close(result.state, wm.state)
