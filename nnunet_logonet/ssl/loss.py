"""Multi-clusterer pseudo-label loss of Masked LoGoNet (paper Eq. 4-5) and its accuracy.

Logits come as one ``(B, n_slices, sum k)`` tensor (clusterer i in columns offsets[i]:offsets[i+1]).
They are gathered into a ``(n_masked, N, k_max)`` tensor padded with -inf, so one tempered
log-softmax covers all clusterers at once; the padding gets probability 0 and no gradient.

The paper sums the NLL over masked slices and clusterers. By default we average instead
(``reduction="mean"``): the value is then ~log k at start whatever N and the number of masked
slices, which keeps gradient clipping and learning rates from nnU-Net meaningful.
``reduction="sum"`` gives the paper's form.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nnunet_logonet.network.arguments import int_list, real_number
from nnunet_logonet.ssl.clusterers import segment_index

__all__ = ["multi_cluster_nll", "pseudo_label_accuracy"]

REDUCTIONS = ("mean", "sum")


@functools.lru_cache(maxsize=8)
def _cached_index(ks: tuple[int, ...], device: str) -> torch.Tensor:
    return segment_index(ks, device)


def _masked_segments(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int], slice_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and return the masked slices' logits ``(M, N, k_max)`` (-inf padded) and targets ``(M, N)``."""
    ks = int_list(ks, "ks (clusters per clusterer)")
    if logits.ndim != 3 or logits.shape[-1] != sum(ks):
        raise ValueError(f"logits must be (B, n_slices, sum(ks)={sum(ks)}), got shape {tuple(logits.shape)}.")
    if targets.shape != (*logits.shape[:2], len(ks)):
        raise ValueError(f"targets must be (B, n_slices, N) = {(*logits.shape[:2], len(ks))}, "
                         f"got {tuple(targets.shape)}.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer cluster indices (SliceClusterBank.label_patches), got {targets.dtype}.")
    if slice_mask.dtype != torch.bool or slice_mask.shape != logits.shape[:2]:
        raise ValueError(f"slice_mask must be bool of shape {tuple(logits.shape[:2])}, "
                         f"got {slice_mask.dtype} {tuple(slice_mask.shape)}.")
    selected, labels = logits[slice_mask], targets[slice_mask].long()
    if labels.numel() and bool(((labels < 0) | (labels >= torch.tensor(ks, device=labels.device))).any()):
        raise ValueError(f"targets must lie in [0, k_i) for clusterer i (ks={ks[:5]}...); got a label out of range.")
    index = _cached_index(ks, str(logits.device))
    # index_select (backward: index_add) is ~2x faster than advanced indexing on CPU
    padded = F.pad(selected, (0, 1), value=-torch.inf).index_select(1, index.flatten()).view(-1, *index.shape)
    return padded, labels


def multi_cluster_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int],
    slice_mask: torch.Tensor,
    *,
    tau: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Tempered-softmax NLL of the pseudo-labels over masked slices x clusterers.

    Args:
        logits: ``(B, n_slices, sum(ks))`` head output.
        targets: ``(B, n_slices, N)`` pseudo-labels of the unmasked input (``SliceClusterBank.label_patches``).
        ks: number of clusters per clusterer.
        slice_mask: ``(B, n_slices)`` bool, the masked slices (``SliceMask.slices``); others are ignored.
        tau: softmax temperature, p = softmax(logits / tau) (paper: 0.1).
        reduction: ``"mean"`` over masked slices and clusterers, or ``"sum"`` (paper's Eq. 5).

    Returns a scalar. With no masked slice it is 0, finite and still attached to the graph.
    """
    tau = real_number(tau, "tau", minimum=0.0, exclusive_minimum=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    padded, labels = _masked_segments(logits, targets, ks, slice_mask)
    if labels.shape[0] == 0:
        return logits.sum() * 0.0
    log_probs = F.log_softmax(padded.float() / tau, dim=-1)
    nll = -log_probs.gather(-1, labels[..., None])[..., 0]
    return nll.mean() if reduction == "mean" else nll.sum()


@torch.no_grad()
def pseudo_label_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int], slice_mask: torch.Tensor
) -> torch.Tensor:
    """Top-1 accuracy over masked slices x clusterers, a scalar in [0, 1]; NaN when no slice is masked."""
    padded, labels = _masked_segments(logits, targets, ks, slice_mask)
    if labels.shape[0] == 0:
        return torch.tensor(float("nan"), device=logits.device)
    return (padded.argmax(-1) == labels).float().mean()
