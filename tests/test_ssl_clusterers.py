"""Slice clusterer bank: seeding, k reduction, labelling vs scikit-learn, cache integrity, provenance."""

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, pairwise_distances_argmin

from nnunet_logonet.ssl.clusterers import (
    CorruptClusterCacheError,
    SliceClusterBank,
    StaleClusterCacheError,
    slice_features,
)
from nnunet_logonet.ssl.masking import SliceSequenceMasker

SMALL = {"num_clusterers": 4, "k_range": (3, 9), "sample_fraction": 0.5, "max_iter": 20}


def blobs(n=300, features=24, centers=5, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 10, size=(centers, features))
    truth = rng.integers(centers, size=n)
    return (means[truth] + rng.normal(size=(n, features))).astype(np.float32), truth


@pytest.fixture(scope="module")
def fitted():
    data, _ = blobs()
    return SliceClusterBank(**SMALL, seed=3).fit(data), data


def test_ks_are_drawn_in_range_per_clusterer():
    bank = SliceClusterBank(num_clusterers=80, k_range=(80, 500), seed=0)
    assert len(bank.ks) == 80 and all(80 <= k <= 500 for k in bank.ks)
    assert len(set(bank.ks)) > 20, "k is not drawn per clusterer"
    assert bank.offsets[-1] == sum(bank.ks) and len(bank.offsets) == 81
    # both ends are drawn: the range is inclusive ("k in 80..500")
    assert set(SliceClusterBank(num_clusterers=60, k_range=(2, 4), seed=0).ks) == {2, 3, 4}


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_same_seed_same_bank_other_seed_other_bank(backend):
    data, _ = blobs()
    a, b = (SliceClusterBank(**SMALL, seed=11, backend=backend).fit(data) for _ in range(2))
    assert a.ks == b.ks
    assert torch.equal(a.centroids, b.centroids)
    c = SliceClusterBank(**SMALL, seed=12, backend=backend).fit(data)
    assert c.ks != a.ks or not torch.equal(c.centroids, a.centroids)


def test_labels_equal_sklearn_nearest_centroid_per_clusterer(fitted):
    bank, data = fitted
    labels = bank.predict(torch.from_numpy(data))
    assert labels.shape == (len(data), bank.num_clusterers) and labels.dtype == torch.long
    for i, (start, stop) in enumerate(zip(bank.offsets[:-1], bank.offsets[1:])):
        expected = pairwise_distances_argmin(data, bank.centroids[start:stop].numpy())
        np.testing.assert_array_equal(labels[:, i].numpy(), expected)
    # numpy input, small chunks and a bf16 autocast region (as in training) give the same labels
    assert torch.equal(bank.predict(data, chunk_size=7), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(bank.predict(torch.from_numpy(data)), labels)


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_backends_recover_separated_clusters(backend):
    data, truth = blobs(centers=5)
    bank = SliceClusterBank(num_clusterers=2, k_range=(5, 5), sample_fraction=0.5, seed=0, backend=backend,
                            max_iter=50).fit(data)
    for i in range(2):
        assert adjusted_rand_score(truth, bank.predict(data)[:, i].numpy()) > 0.95


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_centroids_are_cluster_means_not_seeds(backend):
    """k-means moves its k-means++ seeds (data points, ~sqrt(24) = 4.9 from their cluster's mean here) to the
    cluster means (~1 away with 30 points per cluster); the separation test above passes with the seeds too."""
    data, truth = blobs(centers=5)
    means = np.stack([data[truth == c].mean(0) for c in range(5)])
    bank = SliceClusterBank(num_clusterers=2, k_range=(5, 5), sample_fraction=0.5, seed=0, backend=backend,
                            max_iter=50).fit(data)
    distances = np.linalg.norm(bank.centroids.numpy()[:, None, :] - means[None], axis=-1).min(1)
    assert distances.max() < 2.0, distances


def test_ks_reach_both_ends_of_their_range():
    bank = SliceClusterBank(num_clusterers=200, k_range=(3, 5), seed=0)
    assert set(bank.ks) == {3, 4, 5}


def test_fewer_slices_than_k_reduces_k_with_a_warning():
    data, _ = blobs(n=10)
    bank = SliceClusterBank(num_clusterers=3, k_range=(12, 20), seed=0)
    with pytest.warns(UserWarning, match="reduced to 10"):
        bank.fit(data)
    assert bank.ks == (10, 10, 10)
    assert bank.predict(data).max() < 10
    exactly_k = SliceClusterBank(num_clusterers=3, k_range=(10, 10), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as many slices as k: nothing to reduce, nothing to warn about
        exactly_k.fit(data)
    assert exactly_k.ks == (10, 10, 10)


def test_subset_is_never_smaller_than_k():
    data, _ = blobs(n=100)
    bank = SliceClusterBank(num_clusterers=2, k_range=(30, 30), sample_fraction=0.05, seed=0).fit(data)
    assert bank.ks == (30, 30)  # 5% of 100 = 5 slices would be fewer than k = 30
    for centroids in bank.centroids.split(30):  # 5 slices would give 30 centroids with at most 5 distinct
        assert len(torch.unique(centroids, dim=0)) == 30


def test_a_cluster_left_empty_keeps_its_centroid():
    """Three distinct slices and k = 4: k-means++ must seed a duplicate, whose cluster stays empty. Its
    centroid stays where it was (a data slice), not at the zero vector, which would pull masked slices."""
    data = (torch.tensor([[10.0, 10.0], [11.0, 10.0], [10.0, 11.0]]).repeat_interleave(5, 0))
    bank = SliceClusterBank(num_clusterers=1, k_range=(4, 4), sample_fraction=1.0, seed=0).fit(data)
    assert all(bool((data == centroid).all(1).any()) for centroid in bank.centroids), bank.centroids


def test_torch_kmeans_runs_lloyd_to_its_fixed_point():
    """Each centroid is the mean of the slices it labels (Lloyd converged), not a seed moved once."""
    data = torch.rand(2000, 8, generator=torch.Generator().manual_seed(0))
    bank = SliceClusterBank(num_clusterers=1, k_range=(16, 16), sample_fraction=1.0, seed=0, max_iter=300).fit(data)
    labels = bank.predict(data)[:, 0]
    means = torch.stack([data[labels == c].mean(0) for c in range(16)])
    assert (bank.centroids - means).abs().max() < 1e-2


def test_refit_after_predict_labels_with_the_new_centroids():
    """``predict`` keeps the centroids on the slices' device; a refit must drop that copy."""
    first, _ = blobs(seed=0)
    second, _ = blobs(seed=1)
    bank = SliceClusterBank(**SMALL, seed=3).fit(first)
    bank.predict(first)
    bank.fit(second)
    fresh = SliceClusterBank(**SMALL, seed=3).fit(second)
    assert torch.equal(bank.predict(second), fresh.predict(second))


def test_save_load_round_trip(fitted, tmp_path):
    bank, data = fitted
    path = tmp_path / "clusters.npz"
    bank.save(path)
    loaded = SliceClusterBank.load(path, expected_config=bank.config, expected_feature_dim=data.shape[1])
    assert loaded.ks == bank.ks and loaded.config == bank.config
    assert torch.equal(loaded.centroids, bank.centroids)
    assert torch.equal(loaded.predict(data), bank.predict(data))
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.npz"], "temporary file left behind"


@pytest.mark.parametrize("damage", ["flip_start", "flip_middle", "flip_end", "truncate", "empty", "garbage"])
def test_corrupt_cache_is_detected(fitted, tmp_path, damage):
    bank, _ = fitted
    path = tmp_path / "clusters.npz"
    bank.save(path)
    raw = bytearray(path.read_bytes())
    if damage.startswith("flip"):
        at = {"flip_start": 70, "flip_middle": len(raw) // 2, "flip_end": len(raw) - 300}[damage]
        for i in range(at, at + 8):
            raw[i] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    else:
        raw = bytearray() if damage == "empty" else bytearray(b"not a cache" * 50)
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptClusterCacheError, match=str(path.name)):
        SliceClusterBank.load(path)


def test_cache_with_tampered_centroids_fails_the_checksum(fitted, tmp_path):
    bank, _ = fitted
    path = tmp_path / "clusters.npz"
    bank.save(path)
    with np.load(path) as npz:
        fields = {key: npz[key] for key in npz.files}
    fields["centroids"] = fields["centroids"] + 1  # a valid archive, but not what was saved
    with open(path, "wb") as f:
        np.savez(f, **fields)
    with pytest.raises(CorruptClusterCacheError, match="checksum"):
        SliceClusterBank.load(path)


def _rewrite_cache(path, **changes):
    with np.load(path) as npz:
        fields = {key: npz[key] for key in npz.files}
    fields.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **fields)
    return fields


def test_cache_with_a_tampered_configuration_fails_the_checksum(fitted, tmp_path):
    """Loaded without an expected configuration, the stored one is what the bank reports: it is checksummed too."""
    bank, _ = fitted
    path = tmp_path / "clusters.npz"
    bank.save(path)
    config = json.dumps({**bank.config, "seed": 99}, sort_keys=True)
    _rewrite_cache(path, config=np.asarray(config))
    with pytest.raises(CorruptClusterCacheError, match="checksum"):
        SliceClusterBank.load(path)


def test_cache_whose_clusterer_count_disagrees_with_its_configuration_is_corrupt(fitted, tmp_path):
    bank, _ = fitted
    path = tmp_path / "clusters.npz"
    bank.save(path)
    ks = np.asarray(bank.ks[:2], dtype="<i8")
    centroids = bank.centroids.numpy()[: int(ks.sum())].astype("<f4")
    config = json.dumps(bank.config, sort_keys=True)  # says 4 clusterers
    _rewrite_cache(path, ks=ks, centroids=centroids,
                   checksum=np.asarray(SliceClusterBank._checksum(centroids, ks, config)))
    with pytest.raises(CorruptClusterCacheError, match="2 clusterers stored, config says 4"):
        SliceClusterBank.load(path)


def test_stale_cache_is_reported(fitted, tmp_path):
    bank, data = fitted
    path = tmp_path / "clusters.npz"
    bank.save(path)
    with pytest.raises(StaleClusterCacheError, match="num_clusterers"):
        SliceClusterBank.load(path, expected_config={**bank.config, "num_clusterers": 80})
    with pytest.raises(StaleClusterCacheError, match="feature_dim"):
        SliceClusterBank.load(path, expected_feature_dim=data.shape[1] + 1)
    with pytest.raises(FileNotFoundError):
        SliceClusterBank.load(tmp_path / "missing.npz")


def test_cache_of_a_setting_now_refused_is_stale_so_the_trainer_refits(fitted, tmp_path):
    """k_range (1, ...) was accepted before one cluster was refused: such a cache is stale, not a crash."""
    import copy

    old = copy.deepcopy(fitted[0])
    old.config["k_range"] = [1, 9]
    old.save(tmp_path / "old.npz")
    with pytest.raises(StaleClusterCacheError, match=r"a setting this version refuses: k_range must be .* 2 <= low"):
        SliceClusterBank.load(tmp_path / "old.npz")


def test_labels_come_from_the_unmasked_input():
    """The bank is fitted on unmasked slices; labels follow the input, so the trainer must pass unmasked patches."""
    rng = torch.Generator().manual_seed(0)
    patches = 10 + torch.randn(6, 1, 16, 8, 8, generator=rng)  # every slice far from the zero slice
    bank = SliceClusterBank(**SMALL, seed=0)
    features = bank.slice_features(patches)
    bank.fit(features.reshape(-1, features.shape[-1]))
    # fitted on unmasked slices only: no centroid sits at a zeroed slice
    nearest_to_zero = bank.centroids.norm(dim=1).min()
    assert nearest_to_zero > 5 * torch.cdist(features.reshape(-1, 64), bank.centroids).min(1).values.mean()

    masked, mask = SliceSequenceMasker(phi1=0.3, patch_sizes=("full",), phi2=1.0)(patches, generator=rng)
    clean, corrupted = bank.label_patches(patches), bank.label_patches(masked)
    assert clean.shape == (6, 16, bank.num_clusterers)
    assert torch.equal(clean[~mask.slices], corrupted[~mask.slices])
    assert not torch.equal(clean[mask.slices], corrupted[mask.slices])
    # all zeroed slices look alike to the bank: their labels carry no information about the slice
    assert (corrupted[mask.slices] == corrupted[mask.slices][0]).all()


@pytest.mark.parametrize("slice_axis, pool, expected", [(2, 1, (2, 5, 3 * 6 * 7)), (3, 1, (2, 6, 3 * 5 * 7)),
                                                        (4, 2, (2, 7, 3 * 3 * 3)), (2, 4, (2, 5, 3 * 2 * 2))])
def test_slice_features_shape_and_content(slice_axis, pool, expected):
    x = torch.randn(2, 3, 5, 6, 7)
    features = slice_features(x, slice_axis=slice_axis, pool=pool)
    assert features.shape == expected
    if pool == 1:
        plane = torch.movedim(x, slice_axis, 1)[1, 2]
        assert torch.equal(features[1, 2], plane.flatten())


def test_predict_checks_feature_size_and_fitting(fitted):
    bank, data = fitted
    with pytest.raises(ValueError, match="refit"):
        bank.predict(data[:, :-1])
    with pytest.raises(RuntimeError, match="not fitted"):
        SliceClusterBank(**SMALL).predict(data)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_clusterers": 0}, {"k_range": (5, 2)}, {"k_range": (0, 5)}, {"k_range": (5,)}, {"sample_fraction": 0},
     {"sample_fraction": 1.5}, {"backend": "faiss"}, {"seed": -1}, {"pool": 0}, {"slice_axis": 0},
     {"max_iter": 0}, {"k_range": (1, 1)}, {"k_range": 5}, {"sample_fraction": True},
     {"sample_fraction": float("nan")}],
)
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        SliceClusterBank(**kwargs)


def test_one_cluster_is_refused_as_a_pretext_that_teaches_nothing():
    with pytest.raises(ValueError, match=r"k_range must be two ints \(low, high\) with 2 <= low <= high, got \(1, 1\)"):
        SliceClusterBank(k_range=(1, 1))


def test_defaults_are_the_papers_bank():
    """N = 80 clusterers, k drawn in 80..500, each fitted on 10 % of the slices for 350 iterations."""
    config = SliceClusterBank().config
    assert (config["num_clusterers"], config["k_range"], config["sample_fraction"], config["max_iter"]) == \
        (80, [80, 500], 0.1, 350)
    assert config["pool"] == 1  # raw C*H*W slice features


def test_numpy_settings_and_list_slices_are_taken_as_the_numbers_they_hold():
    data, _ = blobs(n=60)
    bank = SliceClusterBank(num_clusterers=np.int64(2), k_range=(np.int32(3), 4), sample_fraction=np.float32(0.5),
                            max_iter=5).fit(data.tolist())
    assert bank.config["num_clusterers"] == 2 and bank.predict(data).shape == (60, 2)


def test_slices_with_nan_or_inf_are_refused_before_fitting():
    data, _ = blobs(n=60)
    data[7, 3], data[9, 0] = np.nan, np.inf
    for slices in (data, torch.from_numpy(data)):
        with pytest.raises(ValueError, match=r"2 of 60 slices hold NaN or infinite values \(the first: slice 7\)"):
            SliceClusterBank(**SMALL).fit(slices)


def test_predict_chunk_size_must_be_positive(fitted):
    bank, data = fitted
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        bank.predict(data, chunk_size=0)
