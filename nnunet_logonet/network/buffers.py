"""Output tensors that LoGoNet's CPU inference reuses from one forward to the next (lever ``output_buffers``).

Why: a forward of LoGoNet-S on a 64^3 patch writes ~270 MB of fresh full-resolution outputs (the
stems' convolutions, global and local, and the decoder's last upsampling). glibc serves every block
above 32 MiB (and many smaller ones) as fresh ``mmap`` pages, which the kernel faults in and zeroes
4 KiB at a time on first touch: ~20 ms per 67 MB on the 2-core AMD EPYC, 10-15 % of the forward
(docs/speed.md, "The allocator"). PyTorch's CUDA allocator caches such blocks; its CPU allocator does
not. nnU-Net's sliding window calls the network hundreds of times with one tile shape, so the network
keeps its large outputs in an :class:`OutputPool` and writes the next ones into them: oneDNN's
convolution adds into a given tensor (its sum post-op; on a zeroed buffer that is ``conv + 0``, the
same floats), the trilinear upsampling has an ``out=`` variant.

Only where no autograd records (inference), on CPU float32 channels-last tensors of at least
:data:`MIN_BYTES`, and only while a network's forward runs (:func:`pooled_outputs`, thread-local). A
buffer is handed out again only when nothing outside the pool refers to it (no tensor, view or Python
reference), so an output a caller keeps (a forward hook, returned features) is never overwritten.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
from typing import Iterator, Sequence

import torch

from .derived import note_unversioned_writes
from .levers import lever_enabled

__all__ = ["MIN_BYTES", "OutputPool", "ReusesOutputBuffers", "active_pool", "active_training_pool", "current_pool",
           "current_training_pool", "pooled_outputs", "release_output_buffers", "using_pool", "using_training_pool"]

#: Smallest output (bytes) taken from the pool. Below it glibc mostly serves blocks from memory it
#: already holds, and zeroing a buffer plus oneDNN reading it back would cost more than a fresh block.
MIN_BYTES = 8 * 2 ** 20

#: Blocks kept per size: the most a forward needs at once (LoGoNet-S: 3); beyond it outputs are fresh.
MAX_PER_SIZE = 4

#: The same for training (``training_buffers``), where a unit's outputs live until its backward: LoGoNet-S
#: holds up to 7 blocks of one size at once at 64^3, and 16 at 96^3 (its 8 local paths' 32 -> 64 units).
MAX_PER_SIZE_TRAINING = 32

_CL = torch.channels_last_3d
_state = threading.local()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class OutputPool:
    """Flat float32 CPU blocks by size, handed out as channels-last tensors of any shape of that size
    while nothing else refers to them (so a [1, 32, 64^3] and a [1, 256, 32^3] output share one)."""

    def __init__(self, max_per_size: int = MAX_PER_SIZE) -> None:
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._max_per_size = max_per_size
        self._lock = threading.Lock()  # two threads running one network never get the same buffer

    def take(self, shape: Sequence[int]) -> torch.Tensor:
        """A channels-last tensor of ``shape`` (contents undefined) on a free kept block, or on a new one."""
        n, c, *spatial = (int(size) for size in shape)
        numel = n * c * math.prod(spatial)
        # inference tensors (torch.inference_mode, nnUNetv2_predict) cannot be written outside it
        key = (numel, torch.is_inference_mode_enabled())
        with self._lock:
            kept = self._buffers.setdefault(key, [])
            block = next((kept[i] for i in range(len(kept)) if _is_free(kept, i)), None)
            if block is None:
                block = torch.empty(numel, dtype=torch.float32)
                if len(kept) < self._max_per_size:
                    kept.append(block)
            return block.view(n, *spatial, c).permute(0, 4, 1, 2, 3)  # channels-last (N, C, D, H, W)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self._buffers.values() for t in kept)

    def clear(self) -> None:
        self._buffers.clear()

    def __deepcopy__(self, memo: dict) -> "OutputPool":
        return OutputPool(self._max_per_size)  # a copied network starts with no buffers (nor shares the original's)

    def __getstate__(self) -> dict:
        return {"max_per_size": self._max_per_size}  # pickled (torch.save of a whole network) without buffers

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("max_per_size", MAX_PER_SIZE))

    def __repr__(self) -> str:
        return f"OutputPool({sum(map(len, self._buffers.values()))} blocks, {self.nbytes / 2 ** 20:.0f} MiB)"


def _is_free(kept: list[torch.Tensor], i: int) -> bool:
    # references while checking: the pool's list and getrefcount's argument; storage users: the
    # block and the temporary storage object (every tensor handed out on it, and every view of
    # those, adds one while it lives)
    return sys.getrefcount(kept[i]) == 2 and _storage_use_count(kept[i].untyped_storage()._cdata) == 2


def pool_of(module: torch.nn.Module, training: bool = False) -> OutputPool:
    """The pool a network keeps its inference outputs in, or with ``training`` the one its training
    steps use (``training_buffers``); made on first use."""
    name = "_training_pool" if training else "_output_pool"
    pool = module.__dict__.get(name)
    if pool is None:
        pool = module.__dict__[name] = OutputPool(MAX_PER_SIZE_TRAINING if training else MAX_PER_SIZE)
    return pool


def release_output_buffers(module: torch.nn.Module, training: bool = False) -> None:
    """Free the buffers a network kept for inference (its ``train()`` does this: training never uses
    them), or with ``training`` those of its training steps (its ``eval()`` does this)."""
    pool = module.__dict__.get("_training_pool" if training else "_output_pool")
    if pool is not None:
        pool.clear()


@contextlib.contextmanager
def pooled_outputs(module: torch.nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """While the body runs (``module``'s forward on ``x``), inference outputs may come from ``module``'s
    pool. Yields the input to use: ``x`` channels-last where the pool may take the first convolution's
    output (a tile of nnU-Net's sliding window is a strided view, from which oneDNN would write that
    output channels-first; the copy of a one-channel tile is ~1 MB).

    In training (autograd on, ``module.training``) the full-resolution conv units may run in
    ``module``'s training pool instead (``training_buffers``).

    Nested networks (LoGoNet's local paths) use the outermost network's pool.
    """
    training = torch.is_grad_enabled()
    slot, lever = ("training_pool", "training_buffers") if training else ("pool", "output_buffers")
    if (torch.compiler.is_compiling() or getattr(_state, "pool", None) is not None
            or getattr(_state, "training_pool", None) is not None or (training and not module.training)):
        yield x  # compiled: inductor plans the memory itself (and the pool's lock would break the graph)
        return
    setattr(_state, slot, pool_of(module, training=training))
    try:
        cpu_float = x.device.type == "cpu" and x.dtype == torch.float32 and lever_enabled(lever)
        yield x.contiguous(memory_format=_CL) if cpu_float and x.dim() == 5 else x
    finally:
        setattr(_state, slot, None)


def current_pool() -> OutputPool | None:
    """The inference pool of the network whose forward is running in this thread, else None."""
    return getattr(_state, "pool", None)


def using_pool(pool: OutputPool | None) -> contextlib.AbstractContextManager[None]:
    """Inside the block this thread writes inference outputs into ``pool`` (from ``current_pool()`` of the
    thread whose forward hands it work: LoGoNet's concurrent paths); the pool's lock keeps them apart."""
    return _this_thread_uses("pool", pool)


def current_training_pool() -> OutputPool | None:
    """The training pool of the network whose training forward is running in this thread, else None."""
    return getattr(_state, "training_pool", None)


def using_training_pool(pool: OutputPool | None) -> contextlib.AbstractContextManager[None]:
    """Inside the block this thread's training conv units use ``pool`` (from ``current_training_pool()`` of
    the thread whose training forward hands it work: LoGoNet's concurrent paths, ``concurrent_training``)."""
    return _this_thread_uses("training_pool", pool)


@contextlib.contextmanager
def _this_thread_uses(slot: str, pool: OutputPool | None) -> Iterator[None]:
    previous = getattr(_state, slot, None)
    setattr(_state, slot, pool)
    try:
        yield
    finally:
        setattr(_state, slot, previous)


def active_pool(x: torch.Tensor, out_shape: Sequence[int]) -> OutputPool | None:
    """The pool an output of ``out_shape`` computed from ``x`` should be written into, else None."""
    pool = getattr(_state, "pool", None)
    if (pool is None or _storage_use_count is None or torch.is_grad_enabled()
            or x.device.type != "cpu" or x.dtype != torch.float32
            or not x.is_contiguous(memory_format=_CL) or torch.compiler.is_compiling()
            or not lever_enabled("output_buffers")):
        return None
    return pool if 4 * math.prod(out_shape) >= MIN_BYTES else None


def active_training_pool() -> OutputPool | None:
    """The training pool of the network whose forward is running in this thread, else None."""
    if torch.compiler.is_compiling() or _storage_use_count is None:
        return None
    return getattr(_state, "training_pool", None)


class ReusesOutputBuffers(torch.nn.Module):
    """Base of a whole network (LoGoNet, ULKANet) whose forward runs in :func:`pooled_outputs`: its
    ``train()`` frees the inference buffers, which training never uses (nnU-Net calls it every epoch,
    after the validation forwards that filled them), and its ``eval()`` those of the training steps.
    Both also drop the inference caches of derived tensors (``derived.note_unversioned_writes``):
    a fused optimizer's steps since the last switch changed no version counter."""

    def train(self, mode: bool = True):
        release_output_buffers(self, training=not mode)
        note_unversioned_writes()
        return super().train(mode)
