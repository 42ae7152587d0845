"""Tensors derived from parameters and buffers (folded weights, concatenations), cached for inference.

A cache entry is valid while every source tensor is the same object, with the same storage and
in-place version counter, and no write that bypasses version counters may have happened since.
Such writes are ordinary: PyTorch's fused optimizers (``SGD(fused=True)``, our CPU recipe) and a
BatchNorm's running statistics in a training forward update tensors in place without bumping
their version counters. So the whole networks call :func:`note_unversioned_writes` in every
training forward and on every ``train()`` / ``eval()``, which bumps one process-wide generation
that every key includes: nnU-Net's validation after a training epoch, or ``nnUNetv2_predict``
after ``load_state_dict``, never sees weights folded before the last change. Edits through
``.data`` outside those (``p.data.mul_()`` between two inference forwards) are not seen; switching
the network's mode (``net.eval()``) rebuilds everything.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

__all__ = ["version_key", "derived_tensors", "note_unversioned_writes"]

T = TypeVar("T")

_generation = 0


def note_unversioned_writes() -> None:
    """Parameters or buffers may have changed without their version counters: every cached
    derived tensor (any network in this process) is rebuilt at its next use."""
    global _generation
    _generation += 1


def version_key(tensors: Sequence[torch.Tensor], *, generation: bool = True) -> tuple | None:
    """Each tensor's identity, storage, in-place version counter, device and dtype (and, with
    ``generation``, the count of :func:`note_unversioned_writes`): a key that changes when any of
    them is replaced or edited in place. The caller keeps the tensors alive with the entry, so an
    identity is never reused by a fresh tensor (a parametrized weight is made anew at each access).
    None where that cannot be followed: under torch.compile (the compiler should see plain ops) or
    for inference tensors (no version counter)."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return None
    key = tuple((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
    return (_generation, key) if generation else key


def derived_tensors(owner: object, name: str, sources: Sequence[torch.Tensor | None], make: Callable[[], T]) -> T:
    """``make()``, cached on ``owner`` under ``name`` while no autograd is recording.

    The cache is keyed on every source tensor (:func:`version_key`), so it is rebuilt after
    ``load_state_dict`` (nnUNetv2_predict switching folds), an optimizer step, a training forward,
    a change of mode or ``.to(device)``. With autograd on (training) or under ``torch.compile`` it is
    not used, so gradients reach the original parameters and the compiler sees plain ops.
    """
    present = [t for t in sources if t is not None]
    key = None if torch.is_grad_enabled() else version_key(present)
    if key is None:
        return make()
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, make(), present)  # the sources kept alive: their identities stay unique
        owner.__dict__[name] = cached
    return cached[1]
