"""What surrogates reveal: nearest-neighbour distance and SSIM, noise-initialised condensation, the report script."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedmerge.data import load_dataset
from fedmerge.models import MLP
from fedmerge.surrogate import CondenseConfig, SurrogateConfig, build_surrogate, random_coreset
from fedmerge.surrogate.privacy import exposure, nearest_images, reference_distances, ssim, to_pixels
from simulations import privacy_report


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    data = load_dataset("digits", train=True)
    return data.subset(torch.arange(400), "digits")


def test_ssim_is_one_for_identical_images_and_low_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 28, 28, generator=g)
    assert torch.allclose(ssim(a, a), torch.ones(4))
    assert (ssim(a, torch.rand(4, 1, 28, 28, generator=g)) < 0.2).all()
    assert (ssim(a, (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1)) > 0.9).all()
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, a[:2])


def test_nearest_images_finds_copies_and_can_leave_an_image_out_of_its_own_neighbours():
    train = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    distances, indices = nearest_images(train[[3, 7]], train)
    assert indices[:, 0].tolist() == [3, 7] and distances.max() < 1e-5
    distances, indices = nearest_images(train[[3, 7]], train, own_rows=torch.tensor([3, 7]))
    assert 3 not in indices[0].tolist() and 7 not in indices[1].tolist() and distances.min() > 0.1


def test_a_random_coreset_is_all_exact_copies(digits):
    train = to_pixels(digits.x, "digits")
    sent = to_pixels(random_coreset(digits, 2, seed=0).x, "digits")
    found = exposure(sent, train)
    assert found.exact.all() and found.near.all() and found.singled_out.all()
    assert torch.allclose(found.similarity, torch.ones(len(sent)))


def test_noise_initialised_condensation_sends_no_image_near_a_training_image(digits):
    """Condensed from noise, no sent image is a copy or near copy of a training image (while condensing from real
    images with the same short schedule still sends images next to the ones it started from)."""
    model = MLP((1, 28, 28), 10, width=32, depth=2)
    condense = CondenseConfig(iterations=10, batch_real=32)
    train = to_pixels(digits.x, "digits")
    reference = reference_distances(train)
    results = {}
    for kind in ("condensed-noise", "condensed"):
        sent = build_surrogate(digits, SurrogateConfig(kind, 2, condense), model, seed=0)
        assert sent is not None and len(sent) == 20
        results[kind] = exposure(to_pixels(sent.x, "digits"), train, reference=reference)
    noise = results["condensed-noise"]
    assert not noise.exact.any() and not noise.near.any()
    assert noise.distance.min() > 2 * reference[:, 0].median()  # farther from any training image than neighbours are
    assert noise.similarity.max() < 0.5 and not noise.singled_out.any()
    assert results["condensed"].near.all() and results["condensed"].singled_out.all()


@pytest.mark.slow
def test_privacy_report_tiny_run(tmp_path):
    argv = ["--dataset", "digits", "--clients", "3", "--per-class", "2", "--kinds", "random", "condensed-noise"]
    argv += ["--data-root", "", "--out", str(tmp_path), "--set", "epochs=1", "width=16", "np-steps=5"]
    argv += ["alignment-iters=1", "--condense-iterations", "5", "--condense-batch", "32"]
    assert privacy_report.main(argv) == 0
    rows = pd.read_csv(tmp_path / "privacy.csv")
    assert set(rows["kind"]) == {"random", "condensed-noise", privacy_report.REFERENCE}
    by_kind = rows.set_index("kind")
    assert by_kind.loc["random", "exact-copies"] == 1.0
    assert by_kind.loc["condensed-noise", "exact-copies"] == 0.0 and by_kind.loc["condensed-noise", "near-copies"] == 0
    assert rows["acc_merged_global"].notna().sum() == 2 and rows["version_torch"].notna().all()
    text = (tmp_path / "privacy.md").read_text()
    assert "condensed-noise" in text and "reference" in text
    assert (tmp_path / "privacy.png").stat().st_size > 0
    assert privacy_report.main(argv) == 0  # a rerun replaces the rows of the kinds it measures
    assert len(pd.read_csv(tmp_path / "privacy.csv")) == 3
