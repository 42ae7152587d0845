"""Pseudo-labels for Masked LoGoNet: a bank of N k-means clusterers over raw slices (paper Sec. 3.3.2).

A slice is one plane of a ``(B, C, D, H, W)`` patch along ``slice_axis``, flattened over channels
and the two in-plane axes (optionally average-pooled by ``pool`` first, in fitting and labelling
alike). Each clusterer draws its own k from ``k_range`` and is fitted on its own random subset
(``sample_fraction``) of the slices it is given. Callers pass *unmasked* slices: the bank never
sees the masking, which is applied to the network input only.

Labelling is the hot path of pre-training: all centroids live in one ``(sum k, F)`` tensor on the
caller's device and one matmul gives every distance; a padded index turns the columns into
``(n, N, k_max)`` for one argmin per clusterer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nnunet_logonet.network.arguments import positive_int, real_number
from nnunet_logonet.ssl.masking import check_slice_axis
from nnunet_logonet.workfolders import new_work_file, remove_stale_work_files

__all__ = [
    "ClusterCacheError",
    "CorruptClusterCacheError",
    "StaleClusterCacheError",
    "SliceClusterBank",
    "segment_index",
    "slice_features",
]

CACHE_FORMAT_VERSION = 1
BACKENDS = ("sklearn", "torch")


class ClusterCacheError(Exception):
    """A cached bank cannot be used as it is; the caller should refit and save it again."""


class CorruptClusterCacheError(ClusterCacheError):
    """The cache file is unreadable, truncated, or its checksum or shapes do not match."""


class StaleClusterCacheError(ClusterCacheError):
    """The cache is intact but was built with another configuration or feature size."""


def slice_features(x: torch.Tensor, *, slice_axis: int = 2, pool: int = 1) -> torch.Tensor:
    """Flatten every slice of a ``(B, C, D, H, W)`` batch into a feature row: ``(B, n_slices, F)``.

    ``pool > 1`` averages ``pool x pool`` in-plane blocks first (the last block is partial when
    ``pool`` does not divide the plane), so ``F = C * ceil(h / pool) * ceil(w / pool)``.
    """
    if x.ndim != 5:
        raise ValueError(f"x must be a (B, C, D, H, W) batch, got shape {tuple(x.shape)}.")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be an int >= 1, got {pool!r}.")
    slice_axis = check_slice_axis(slice_axis)
    planes = torch.movedim(x, slice_axis, 1)  # (B, S, C, h, w)
    batch, n_slices, channels, height, width = planes.shape
    planes = planes.reshape(batch * n_slices, channels, height, width)
    if pool > 1:
        planes = F.adaptive_avg_pool2d(planes.float(), (-(-height // pool), -(-width // pool)))
    return planes.reshape(batch, n_slices, -1)


def _row_chunks(rows: np.ndarray | torch.Tensor, size: int):
    return (rows[start:start + size] for start in range(0, rows.shape[0], size))


def segment_index(ks: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, k_max)`` column index of each clusterer's entries in a ``(..., sum k)`` tensor.

    Padding entries point at column ``sum k``, one past the end, which callers fill with a
    neutral value (+inf for distances, -inf for logits) before gathering.
    """
    k_max, total = max(ks), sum(ks)
    offsets = np.concatenate([[0], np.cumsum(ks)[:-1]])
    index = np.full((len(ks), k_max), total, dtype=np.int64)
    for row, (start, k) in enumerate(zip(offsets, ks)):
        index[row, :k] = np.arange(start, start + k)
    return torch.as_tensor(index, device=device)


def _kmeans_torch(x: torch.Tensor, k: int, *, max_iter: int, tol: float, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on x's device; returns ``(k, F)`` centroids."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    chosen = [int(torch.randint(n, (1,), generator=generator, device=x.device))]
    closest = (x_sq - 2 * x @ x[chosen[0]] + x_sq[chosen[0]]).clamp_min_(0)
    for _ in range(1, k):
        weights = closest if float(closest.sum()) > 0 else torch.ones_like(closest)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        closest = torch.minimum(closest, (x_sq - 2 * x @ x[nxt] + x_sq[nxt]).clamp_min_(0))
    centroids = x[chosen].clone()
    threshold = tol * float(x.var(0, unbiased=False).mean())
    for _ in range(max_iter):
        labels = ((centroids * centroids).sum(1) - 2 * x @ centroids.T).argmin(1)
        if x.is_cuda:  # index_add_ adds atomically on CUDA (order varies); accumulating index_put_ sorts first
            sums = torch.zeros_like(centroids).index_put_((labels,), x, accumulate=True)
        else:  # deterministic on CPU (and index_put_'s accumulation is the CPU op that is not)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)[:, None]
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        shift = float(((updated - centroids) ** 2).sum())
        centroids = updated
        if shift <= threshold:
            break
    return centroids


class SliceClusterBank:
    """N k-means clusterers over slices, each with its own k; gives N pseudo-labels per slice.

    Args:
        num_clusterers: N (paper: 80).
        k_range: inclusive (low, high) range k is drawn from, uniformly (paper: 80..500).
        sample_fraction: share of the given slices each clusterer is fitted on (paper: ~10%).
            A subset is never smaller than k; when fewer slices than k are given at all, k is
            reduced to the number of slices, with a warning (see :attr:`ks` after fitting).
        seed: seeds k, the subsets and the k-means initialisation; same seed and device, same bank.
        backend: ``"torch"`` (default: k-means++ then Lloyd, on the device of the slices passed to
            :meth:`fit`; 3-5x faster than sklearn on CPU at equal inertia, see docs/ssl.md) or
            ``"sklearn"`` (MiniBatchKMeans, as the paper; CPU only).
        max_iter: sklearn: passes over the subset (paper: 350); torch: Lloyd iterations.
        batch_size: MiniBatchKMeans batch size (sklearn backend only).
        slice_axis: dim of a ``(B, C, D, H, W)`` patch that slices are taken along.
        pool: in-plane average pooling factor applied to slices before fitting and labelling.
    """

    def __init__(
        self,
        *,
        num_clusterers: int = 80,
        k_range: tuple[int, int] = (80, 500),
        sample_fraction: float = 0.1,
        seed: int = 0,
        backend: str = "torch",
        max_iter: int = 350,
        batch_size: int = 1024,
        slice_axis: int = 2,
        pool: int = 1,
    ) -> None:
        num_clusterers, max_iter, batch_size, pool = (
            positive_int(value, name) for name, value in (("num_clusterers", num_clusterers), ("max_iter", max_iter),
                                                           ("batch_size", batch_size), ("pool", pool)))
        # one cluster would make a constant pseudo-label, which teaches the network nothing
        if (not isinstance(k_range, (list, tuple)) or len(k_range) != 2
                or not all(isinstance(k, Integral) and not isinstance(k, (bool, np.bool_)) for k in k_range)
                or not 2 <= k_range[0] <= k_range[1]):
            raise ValueError(f"k_range must be two ints (low, high) with 2 <= low <= high, got {k_range!r}.")
        k_range = (int(k_range[0]), int(k_range[1]))
        sample_fraction = real_number(sample_fraction, "sample_fraction", minimum=0.0, maximum=1.0,
                                      exclusive_minimum=True)
        seed = positive_int(seed, "seed", minimum=0)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        self.config: dict[str, Any] = {
            "num_clusterers": num_clusterers,
            "k_range": [int(k_range[0]), int(k_range[1])],
            "sample_fraction": float(sample_fraction),
            "seed": seed,
            "backend": backend,
            "max_iter": max_iter,
            "batch_size": batch_size,
            "slice_axis": check_slice_axis(slice_axis),
            "pool": pool,
        }
        drawn = np.random.default_rng(seed).integers(k_range[0], k_range[1] + 1, size=num_clusterers)
        self._ks: tuple[int, ...] = tuple(int(k) for k in drawn)
        self._centroids: torch.Tensor | None = None  # (sum k, F) float32, CPU
        self._on_device: tuple[torch.device, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # --- properties -------------------------------------------------------------------------
    @property
    def ks(self) -> tuple[int, ...]:
        """k of every clusterer (after fitting: the k actually used, possibly reduced)."""
        return self._ks

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each clusterer's columns in a ``sum k`` axis, plus the total at the end."""
        return (0, *np.cumsum(self._ks).tolist())

    @property
    def num_clusterers(self) -> int:
        return len(self._ks)

    @property
    def is_fitted(self) -> bool:
        return self._centroids is not None

    @property
    def feature_dim(self) -> int:
        return self._require_fitted().shape[1]

    @property
    def centroids(self) -> torch.Tensor:
        """All centroids, ``(sum k, F)`` float32 on the CPU, clusterer i in rows offsets[i]:offsets[i+1]."""
        return self._require_fitted()

    def _require_fitted(self) -> torch.Tensor:
        if self._centroids is None:
            raise RuntimeError("SliceClusterBank is not fitted: call fit(slices) or SliceClusterBank.load(path) first.")
        return self._centroids

    def __repr__(self) -> str:
        fitted = f"feature_dim={self.feature_dim}" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({self.config}, {fitted})"

    # --- slices -----------------------------------------------------------------------------
    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` patches -> ``(B, n_slices, F)`` features, with this bank's axis and pooling."""
        return slice_features(x, slice_axis=self.config["slice_axis"], pool=self.config["pool"])

    # --- fitting ----------------------------------------------------------------------------
    def fit(self, slices: np.ndarray | torch.Tensor, *, progress: bool = False) -> SliceClusterBank:
        """Fit every clusterer on its own subset of ``slices`` (n_slices, F), which must be unmasked and finite."""
        if not isinstance(slices, (np.ndarray, torch.Tensor)):
            slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 2 or slices.shape[0] < 1 or slices.shape[1] < 1:
            raise ValueError(f"slices must be a non-empty (n_slices, features) array, got shape {tuple(slices.shape)}.")
        # in chunks: a (n, F) bool mask of the paper's slice pool would take a quarter of its memory again
        finite = np.concatenate([(torch.isfinite(rows).all(1).cpu().numpy() if isinstance(rows, torch.Tensor)
                                  else np.isfinite(rows).all(1)) for rows in _row_chunks(slices, 4096)])
        if not finite.all():
            raise ValueError(f"{int((~finite).sum())} of {len(finite)} slices hold NaN or infinite values (the first: "
                             f"slice {int(np.flatnonzero(~finite)[0])}); k-means would put them in arbitrary clusters. "
                             f"Check the images these patches were cut from.")
        n = int(slices.shape[0])
        cfg = self.config
        drawn = np.random.default_rng(cfg["seed"]).integers(cfg["k_range"][0], cfg["k_range"][1] + 1,
                                                             size=cfg["num_clusterers"])
        ks = [min(int(k), n) for k in drawn]
        reduced = [i for i, k in enumerate(drawn) if k > n]
        if reduced:
            warnings.warn(
                f"Only {n} slices were given but {len(reduced)} of {len(ks)} clusterers drew k > {n} "
                f"(largest k {int(drawn.max())}); their k is reduced to {n}. Give more slices (at least "
                f"{int(drawn.max())}) to keep the drawn k.",
                UserWarning,
                stacklevel=2,
            )
        if cfg["backend"] == "torch":
            data = torch.as_tensor(slices).float()
        else:
            data = slices.detach().cpu().numpy() if isinstance(slices, torch.Tensor) else np.asarray(slices)
            data = data.astype(np.float32, copy=False)
        children = np.random.SeedSequence(cfg["seed"]).spawn(len(ks))
        centroids = []
        for k, child in zip(tqdm(ks, desc="fitting clusterers", disable=not progress), children):
            rng = np.random.default_rng(child)
            size = min(n, max(math.ceil(cfg["sample_fraction"] * n), k))
            subset = np.sort(rng.choice(n, size=size, replace=False))
            state = int(rng.integers(2**31 - 1))
            if cfg["backend"] == "torch":
                generator = torch.Generator(device=data.device).manual_seed(state)
                rows = torch.as_tensor(subset, device=data.device)
                c = _kmeans_torch(data[rows], k, max_iter=cfg["max_iter"], tol=1e-4, generator=generator).cpu()
            else:
                from sklearn.cluster import MiniBatchKMeans  # imported here: only this backend needs it

                km = MiniBatchKMeans(n_clusters=k, max_iter=cfg["max_iter"], batch_size=cfg["batch_size"], n_init=1,
                                     random_state=state, compute_labels=False)
                c = torch.from_numpy(km.fit(data[subset]).cluster_centers_)
            centroids.append(c.float())
        self._ks = tuple(ks)
        self._centroids = torch.cat(centroids).contiguous()
        self._on_device = None
        return self

    # --- labelling --------------------------------------------------------------------------
    def predict(self, slices: np.ndarray | torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
        """Nearest-centroid label of every slice for every clusterer: ``(n_slices, N)`` int64.

        Runs on the device of ``slices`` (numpy: CPU); the centroids are copied there once. Always in
        float32, without gradients, even inside an autocast region of the training loop.
        """
        centroids = self._require_fitted()
        chunk_size = positive_int(chunk_size, "chunk_size")
        x = torch.as_tensor(slices)
        if x.ndim != 2 or x.shape[1] != centroids.shape[1]:
            raise ValueError(
                f"slices must be (n_slices, {centroids.shape[1]}) to match the fitted feature size, got "
                f"{tuple(x.shape)}; refit the bank if the patch size, channels or pooling changed."
            )
        if self._on_device is None or self._on_device[0] != x.device:
            c = centroids.to(x.device)
            # +inf column: padding entries of the segment index never win the argmin
            self._on_device = (x.device, c, torch.cat([(c * c).sum(1), c.new_tensor([math.inf])]),
                               segment_index(self._ks, x.device))
        _, c, c_sq_padded, index = self._on_device
        labels = []
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            for rows in x.float().split(chunk_size):
                distances = F.pad(-2 * rows @ c.T, (0, 1)) + c_sq_padded  # (n, sum k + 1), minus |x|^2
                labels.append(distances[:, index].argmin(-1))
        return torch.cat(labels) if labels else torch.empty(0, len(self._ks), dtype=torch.long, device=x.device)

    def label_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels of every slice of unmasked ``(B, C, D, H, W)`` patches: ``(B, n_slices, N)``."""
        features = self.slice_features(x)
        return self.predict(features.reshape(-1, features.shape[-1])).reshape(*features.shape[:2], -1)

    # --- cache ------------------------------------------------------------------------------
    @staticmethod
    def _checksum(centroids: np.ndarray, ks: np.ndarray, config_json: str) -> str:
        digest = hashlib.sha256()
        for part in (np.ascontiguousarray(centroids).tobytes(), ks.astype("<i8").tobytes(), config_json.encode()):
            digest.update(part)
        return digest.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write centroids, ks, configuration and a sha256 checksum atomically (temp file + os.replace)."""
        path = Path(path)
        centroids = self._require_fitted().numpy().astype("<f4")
        ks = np.asarray(self._ks, dtype="<i8")
        config_json = json.dumps(self.config, sort_keys=True)
        fields = {
            "format_version": np.asarray(CACHE_FORMAT_VERSION),
            "centroids": centroids,
            "ks": ks,
            "feature_dim": np.asarray(centroids.shape[1]),
            "config": np.asarray(config_json),
            "checksum": np.asarray(self._checksum(centroids, ks, config_json)),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_files(path.parent, path.name, "tmp")
        tmp = new_work_file(path.parent, path.name, "tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **fields)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expected_config: Mapping[str, Any] | None = None,
        expected_feature_dim: int | None = None,
    ) -> SliceClusterBank:
        """Read a bank written by :meth:`save`, verifying it.

        Raises:
            FileNotFoundError: no cache at ``path``.
            CorruptClusterCacheError: unreadable/truncated file, checksum or shape mismatch.
            StaleClusterCacheError: intact, but a key of ``expected_config`` (e.g. ``bank.config``
                of the bank the caller would build) or ``expected_feature_dim`` differs.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No cluster cache at {path}.")
        try:
            with np.load(path, allow_pickle=False) as npz:
                fields = {key: npz[key] for key in npz.files}
            version = int(fields["format_version"])
            centroids, ks = fields["centroids"], fields["ks"]
            feature_dim, config_json = int(fields["feature_dim"]), str(fields["config"])
            checksum = str(fields["checksum"])
            config = json.loads(config_json)
        except Exception as error:  # any failure to read it back (bad zip, CRC, missing key, bad JSON) is corruption
            raise CorruptClusterCacheError(f"Cluster cache {path} is unreadable ({type(error).__name__}: {error}); "
                                           "delete it or let the trainer refit.") from error
        problems = []
        if version != CACHE_FORMAT_VERSION:
            problems.append(f"format version {version}, expected {CACHE_FORMAT_VERSION}")
        if ks.ndim != 1 or centroids.ndim != 2 or centroids.shape != (int(ks.sum()), feature_dim):
            problems.append(f"centroids shape {centroids.shape} does not match sum(ks)={int(ks.sum())} x {feature_dim}")
        elif checksum != cls._checksum(centroids, ks, config_json):
            problems.append("checksum mismatch")
        if problems:
            raise CorruptClusterCacheError(f"Cluster cache {path} is corrupt: {'; '.join(problems)}.")
        try:
            bank = cls(**{**config, "k_range": tuple(config["k_range"])})
        except ValueError as error:  # a setting this version refuses (e.g. k_range (1, ...)): refit, as for a stale one
            raise StaleClusterCacheError(f"Cluster cache {path} was built with a setting this version refuses: "
                                         f"{error}") from None
        if len(ks) != bank.config["num_clusterers"]:
            raise CorruptClusterCacheError(f"Cluster cache {path} is corrupt: {len(ks)} clusterers stored, "
                                           f"config says {bank.config['num_clusterers']}.")
        stale = [f"{key}: cache {bank.config.get(key)!r} vs expected {value!r}"
                 for key, value in (expected_config or {}).items()
                 if json.loads(json.dumps(value)) != bank.config.get(key)]
        if expected_feature_dim is not None and expected_feature_dim != feature_dim:
            stale.append(f"feature_dim: cache {feature_dim} vs expected {expected_feature_dim}")
        if stale:
            raise StaleClusterCacheError(f"Cluster cache {path} was built for another setting ({'; '.join(stale)}).")
        bank._ks = tuple(int(k) for k in ks)
        bank._centroids = torch.from_numpy(centroids.astype(np.float32))
        return bank
