"""Time the pseudo-label clusterers: fitting and labelling, per backend and slice pooling.

Not a test: it picks the default backend of :class:`~nnunet_logonet.ssl.clusterers.SliceClusterBank`
and gives the figures quoted in docs/ssl.md. Slices come from smooth random volumes (Gaussian-
filtered noise, a stand-in for CT with correlated neighbouring slices). Every clusterer is fitted
on all ``--n-slices`` slices (``sample_fraction=1``), i.e. as if they were the ~10% subset of ten
times as many. Labelling is timed for one training iteration's worth of slices (``--label-slices``,
e.g. batch 2 x 64 slices). Inertia (mean squared distance of a slice to its centroid, averaged over
clusterers) tells whether the faster backend clusters as well; compare it within one pooling.

    python -m nnunet_logonet.benchmark.clustering --n-slices 2000 --size 64 --pools 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from nnunet_logonet.ssl.clusterers import BACKENDS, SliceClusterBank
from nnunet_logonet.workfolders import output_file_argument, write_json_whole


def synthetic_patches(n_slices: int, size: int, seed: int) -> torch.Tensor:
    """``(n_volumes, 1, size, size, size)`` smooth volumes holding at least ``n_slices`` slices."""
    rng = np.random.default_rng(seed)
    n_volumes = -(-n_slices // size)
    volumes = [gaussian_filter(rng.standard_normal((size,) * 3).astype(np.float32), sigma=3) for _ in range(n_volumes)]
    data = np.stack(volumes)[:, None]
    return torch.from_numpy(data / data.std())


def mean_inertia(bank: SliceClusterBank, slices: torch.Tensor) -> float:
    """Mean over clusterers of the mean squared distance of each slice to its nearest centroid."""
    rows = bank.predict(slices) + torch.tensor(bank.offsets[:-1])
    per_clusterer = [((slices - bank.centroids[rows[:, i]]) ** 2).sum(-1).mean() for i in range(rows.shape[1])]
    return float(torch.stack(per_clusterer).mean())


def run(
    *,
    n_slices: int,
    size: int,
    num_clusterers: int,
    k_range: tuple[int, int],
    backends: Sequence[str],
    pools: Sequence[int],
    max_iter: int,
    label_slices: int,
    device: str,
    seed: int,
) -> list[dict]:
    """Fit and time a cluster bank per pooling and backend on synthetic slices; one row each (fit
    seconds, labelling ms per batch, inertia), also printed as JSON."""
    patches = synthetic_patches(n_slices, size, seed)
    results = []
    for pool in pools:
        for backend in backends:
            bank = SliceClusterBank(num_clusterers=num_clusterers, k_range=k_range, sample_fraction=1.0, seed=seed,
                                    backend=backend, max_iter=max_iter, pool=pool)
            features = bank.slice_features(patches)
            slices = features.reshape(-1, features.shape[-1])[:n_slices].contiguous()
            fit_input = slices.to(device) if backend == "torch" else slices.numpy()
            start = time.perf_counter()
            bank.fit(fit_input, progress=True)
            fit_s = time.perf_counter() - start
            batch = slices[:label_slices].to(device)
            bank.predict(batch)  # warm-up: copies the centroids to the device
            repeats = 10
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                bank.predict(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            label_ms = (time.perf_counter() - start) / repeats * 1000
            row = {"backend": backend, "pool": pool, "features": slices.shape[1], "n_slices": slices.shape[0],
                   "num_clusterers": num_clusterers, "sum_k": sum(bank.ks), "fit_s": round(fit_s, 1),
                   "label_ms_per_batch": round(label_ms, 1), "label_slices": batch.shape[0],
                   "inertia": round(mean_inertia(bank, slices), 2), "device": device,
                   "threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.clustering", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-slices", type=int, default=2000, help="slices every clusterer is fitted on")
    parser.add_argument("--size", type=int, default=64, help="slices are size x size (one channel)")
    parser.add_argument("--num-clusterers", type=int, default=80)
    parser.add_argument("--k-range", type=int, nargs=2, default=(80, 500))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--pools", type=int, nargs="+", default=(1, 2), help="in-plane pooling factors to compare")
    parser.add_argument("--max-iter", type=int, default=350)
    parser.add_argument("--label-slices", type=int, default=128, help="slices labelled per call (batch x depth)")
    parser.add_argument("-device", "--device", default="cpu", help="device for the torch backend and for labelling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=output_file_argument, help="also write the rows to this file")
    args = parser.parse_args(argv)
    results = run(n_slices=args.n_slices, size=args.size, num_clusterers=args.num_clusterers,
                  k_range=tuple(args.k_range), backends=args.backends, pools=args.pools, max_iter=args.max_iter,
                  label_slices=args.label_slices, device=args.device, seed=args.seed)
    if args.json:
        write_json_whole(args.json, results)


if __name__ == "__main__":
    main()
