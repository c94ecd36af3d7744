"""FID/IS math, ADM .npz and folder inputs, reference statistics, Inception weights handling.

The Inception weights used here are RANDOM, created by the test itself with the exact key layout of
torch-fidelity's extractor: they exercise the pipeline (loading, batching, statistics), never the
meaning of the numbers. The library has no random-weights mode.
"""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.errors import UserError
from vqtok.eval import fid as fid_mod
from vqtok.eval.fid import (
    covariance_factor,
    fid_from_features,
    evaluate_fid,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    stats_cache_path,
)
from vqtok.eval.image_sources import ImageSet, inspect_npz
from vqtok.eval.inception import INCEPTION_WEIGHTS_FILE, InceptionFeatures, find_inception_weights

from eval_random_inception import random_inception_state_dict, use_small_inception_input


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.manual_seed(0)
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(random_weights) -> InceptionFeatures:
    return InceptionFeatures(random_weights, "cpu")


def write_npz(path: Path, images: np.ndarray, **extra) -> Path:
    np.savez(path, arr_0=images, **extra)
    return path


def random_images(n: int, size: int = 32, seed: int = 0, bright: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = 128 if bright else 0
    return rng.integers(low, 256 if bright else 128, size=(n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- math


def test_frechet_distance_matches_direct_computation_on_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) * 0.7 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_and_singular_covariances():
    # Diagonal Gaussians: FID = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expected = 9.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Fewer samples than dimensions (rank-deficient covariance) stays finite and non-negative.
    rng = np.random.default_rng(1)
    mu_x, s_x = feature_statistics(rng.normal(size=(5, 32)))
    mu_y, s_y = feature_statistics(rng.normal(size=(6, 32)))
    value = frechet_distance(mu_x, s_x, mu_y, s_y)
    assert np.isfinite(value) and value > 0


def test_low_rank_factors_give_the_same_fid():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(7, 40))
    b = rng.normal(size=(9, 40)) * 1.5 + 0.2
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    f1, f2 = covariance_factor(a), covariance_factor(b)
    np.testing.assert_allclose(f1.T @ f1, s1, atol=1e-12)
    # The full d x d path takes sqrt of ~1e-16 rounding eigenvalues of the rank-deficient product,
    # so it carries ~1e-8 relative noise that the factored paths do not.
    full = frechet_distance(mu1, s1, mu2, s2)
    both = frechet_distance(mu1, s1, mu2, s2, f1, f2)
    assert both == pytest.approx(full, rel=1e-7)
    assert frechet_distance(mu1, s1, mu2, s2, f1, None) == pytest.approx(both, rel=1e-7)
    assert frechet_distance(mu1, s1, mu2, s2, None, f2) == pytest.approx(both, rel=1e-7)
    assert fid_from_features(a, b) == pytest.approx(both, rel=1e-12)
    assert covariance_factor(rng.normal(size=(50, 40))) is None  # more images than dimensions: full path


def test_frechet_distance_rejects_bad_statistics():
    with pytest.raises(UserError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.array([np.nan, 0.0]), np.eye(2))
    with pytest.raises(UserError, match="at least 2 images"):
        feature_statistics(np.zeros((1, 4)))


def test_inception_score_extremes():
    # Confident and uniformly spread over k classes -> IS = k; all identical predictions -> IS = 1.
    logits = np.full((40, 10), -50.0)
    logits[np.arange(40), np.arange(40) % 4] = 50.0
    mean, std = inception_score(logits, splits=5)  # 8 per split, 2 of each class
    assert mean == pytest.approx(4.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert inception_score(np.zeros((20, 10)))[0] == pytest.approx(1.0)


def test_precision_recall_on_point_clouds():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 2))
    assert precision_recall(real, real + 1e-9) == pytest.approx((1.0, 1.0))
    far = rng.normal(size=(200, 2)) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # A collapsed generator: precise (inside the real manifold) but low recall.
    collapsed = real[real[:, 0] > 0.8] + 1e-6  # only one side of the real cloud
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.6


# ---------------------------------------------------------------- inputs


def test_npz_streaming_and_folder_reading(tmp_path):
    images = random_images(7, size=16)
    npz = write_npz(tmp_path / "s.npz", images)
    info = inspect_npz(npz)
    assert info.num_images == 7 and info.image_shape == (16, 16, 3) and info.mu is None
    batches = list(ImageSet(npz).batches(3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), torch.from_numpy(images).permute(0, 3, 1, 2))
    # compressed npz streams the same way
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    assert torch.equal(torch.cat(list(ImageSet(tmp_path / "c.npz").batches(4))), torch.cat(batches))

    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(images[:3]):
        Image.fromarray(img).save(folder / f"{i}.png")
    Image.fromarray(images[3]).convert("L").save(folder / "sub" / "gray.jpg")
    Image.fromarray(random_images(1, size=20)[0]).save(folder / "sub" / "z_big.png")
    (folder / "notes.txt").write_text("not an image")
    got = list(ImageSet(folder).batches(8))
    assert [tuple(b.shape) for b in got] == [(4, 3, 16, 16), (1, 3, 20, 20)]  # cut where the size changes
    assert torch.equal(got[0][:3], torch.from_numpy(images[:3]).permute(0, 3, 1, 2))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageSet(tmp_path / "missing.npz")
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        ImageSet(tmp_path / "f.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        ImageSet(tmp_path / "nchw.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(UserError, match="neither images"):
        ImageSet(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable .npz"):
        ImageSet(tmp_path / "junk.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        ImageSet(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="x.png cannot be decoded"):
        list(ImageSet(tmp_path / "bad").batches(4))


def test_reference_mu_sigma_npz_is_used_as_given(tmp_path):
    mu, sigma = np.arange(2048, dtype=np.float64), np.eye(2048)
    ref = ImageSet(write_npz(tmp_path / "ref.npz", random_images(3, 8), mu=mu, sigma=sigma))
    assert ref.has_images and np.array_equal(ref.stats[0], mu) and np.array_equal(ref.stats[1], sigma)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    only = ImageSet(tmp_path / "stats_only.npz")
    assert not only.has_images and only.stats is not None
    np.savez(tmp_path / "bad_stats.npz", mu=mu, sigma=np.eye(3))
    with pytest.raises(UserError, match="covariance"):
        ImageSet(tmp_path / "bad_stats.npz")


# ---------------------------------------------------------------- weights


def test_missing_inception_weights_name_the_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError) as err:
        find_inception_weights(None)
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(UserError, match="does not exist"):
        find_inception_weights(tmp_path / "nope.pth")
    # The hub cache is found when the file is there.
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached


def test_wrong_weights_file_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "w.pth")
    with pytest.raises(UserError, match="not the torch-fidelity Inception-v3 state dict"):
        InceptionFeatures(tmp_path / "w.pth")


# ---------------------------------------------------------------- pipeline with random weights


def test_features_shapes_and_determinism(extractor):
    batch = torch.from_numpy(random_images(2, 24)).permute(0, 3, 1, 2)
    pool, logits = extractor(batch)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.all(np.isfinite(pool)) and not np.allclose(pool[0], pool[1])
    pool_again, _ = extractor(batch[1:])
    np.testing.assert_allclose(pool_again, pool[1:], rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="uint8"):
        extractor(batch.float())


def test_evaluate_fid_end_to_end_with_cache(tmp_path, extractor, monkeypatch):
    use_small_inception_input(monkeypatch)
    samples = write_npz(tmp_path / "samples.npz", random_images(4, 32, seed=1))
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i, img in enumerate(random_images(4, 32, seed=2, bright=True)):
        Image.fromarray(img).save(ref_dir / f"{i:03d}.png")

    first = evaluate_fid(samples, ref_dir, batch_size=4, cache_ref=True, extractor=extractor)
    assert first.fid > 0 and first.num_samples == 4 and first.num_reference == 4
    assert first.inception_score >= 1.0
    cache = stats_cache_path(ref_dir)
    assert cache == tmp_path / "ref.inception-stats.npz" and cache.is_file()
    assert "cached to" in first.reference_stats

    # Second run reuses the cache (Inception is not run on the reference again).
    calls = []
    original = fid_mod.compute_activations

    def counting(ext, images, batch_size, progress=None):
        calls.append(images.path)
        return original(ext, images, batch_size, progress)

    with mock.patch.object(fid_mod, "compute_activations", counting):
        second = evaluate_fid(samples, ref_dir, batch_size=4, cache_ref=True, extractor=extractor)
    assert calls == [samples]
    assert second.fid == pytest.approx(first.fid, rel=1e-9)
    assert second.reference_stats.startswith("cached")

    # The cache file itself is a valid --ref (mu/sigma npz), and identical sets score ~0.
    via_stats = evaluate_fid(samples, cache, batch_size=4, extractor=extractor)
    assert via_stats.fid == pytest.approx(first.fid, rel=1e-6)
    same = evaluate_fid(samples, samples, batch_size=4, extractor=extractor, with_precision_recall=True)
    assert same.fid == pytest.approx(0.0, abs=1e-3 * max(1.0, first.fid))
    assert same.precision == 1.0 and same.recall == 1.0
