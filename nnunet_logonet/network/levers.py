"""LoGoNet's fast paths by name, and the switch that turns them off (``reference_kernels``).

Every speed-up of docs/speed.md is a lever here; the network code asks ``lever_enabled(name)``
before it takes one, so ``reference_kernels()`` gives the plain-PyTorch reference (the "before" of
the benchmarks and the equivalence tests), and ``reference_kernels(name, ...)`` switches off only
the named ones. Thread-local, so a benchmark thread cannot change another thread's network.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

__all__ = ["LEVERS", "LeverState", "fast_paths_enabled", "lever_enabled", "lever_state", "reference_kernels",
           "using_lever_state"]

_state = threading.local()


#: The fast paths by name (docs/speed.md's lever table), each of which ``reference_kernels(name)``
#: switches off on its own. "onednn" is the base of the convolution levers: without it every
#: convolution is ``F.conv3d``, so the depthwise, dilated, narrowing and post-op levers are off too.
LEVERS: dict[str, str] = {
    "onednn": "every CPU float32 convolution sent to oneDNN directly (no slow_conv3d, layout kept)",
    "depthwise_input_grad": "depthwise input gradient as the forward convolution with the flipped kernel",
    "depthwise_weight_grad": "depthwise weight gradient from 16-channel grouped blocks, 512 channels per call",
    "depthwise_weight_slices": "undilated depthwise weight gradients (a part of depthwise_weight_grad) from "
                               "oneDNN's 2D depthwise kernel over depth slices",
    "dilated_phases": "dilated depthwise convolutions run undilated on the d^3 phases of their input",
    "narrowing_weight_grad": "a narrowing convolution's weight gradient as the widening one's (AVX2 CPUs)",
    "pointwise_gemm": "1x1x1 convolutions as matrix products over channels-last rows: the backward always, "
                      "the forward on small maps",
    "small_map_gemm": "the backward of dense convolutions on maps of at most 64 voxels as matrix products "
                      "over im2col rows",
    "concat_sum": "convolutions over channel concatenations as sums of one convolution per part",
    "post_ops": "activations and concatenation sums inside oneDNN's convolution (inference)",
    "batchnorm_folding": "BatchNorm folded into the preceding convolution in eval mode",
    "lka_folding": "in eval mode the LKA blocks' BatchNorms folded into the 1x1x1 convolutions after them, their "
                   "layer scales into the ones before, the residual sums into one multiply-add and a sum post-op",
    "grouped_local_paths": "the 8 local ULKANets run as one grouped network where that is faster",
    "stitch_in_place": "in inference the local features (grouped, or the loop's, as concurrent_paths runs them) added "
                       "into the global ones in place, no stitched copy",
    "stitch_add": "the local features added into the global ones in one pass, without the stacked and stitched "
                  "copies (training, and wherever stitch_in_place does not apply)",
    "output_buffers": "in CPU inference the large convolution and upsampling outputs written into buffers the "
                      "network keeps from one forward to the next, instead of fresh (page-faulting) memory",
    "training_buffers": "in CPU training the full-resolution conv units (conv -> BatchNorm -> LeakyReLU or GELU) "
                        "as one autograd Function each, and the last upsampling, whose outputs and backward "
                        "temporaries live in buffers the network keeps from one step to the next",
    "channels_first_logits": "the 1x1x1 classifiers write channels-first logits, the layout nnU-Net's loss and "
                             "sliding window read fastest",
    "concurrent_paths": "in CPU inference on 2 threads, LoGoNet's global path and its 8 local paths (the loop) "
                        "run side by side on two worker threads of one OpenMP thread each",
    "concurrent_training": "in CPU training on 2 threads, the forward and the backward of LoGoNet's global path and "
                           "its 8 local paths side by side on the same two workers",
}

#: What ``lever_state()`` returns: (fast paths on, the names switched off).
LeverState = tuple[bool, frozenset]


def fast_paths_enabled() -> bool:
    """Whether LoGoNet's fast kernels are on: they are, unless inside ``reference_kernels()`` or while
    ``torch.jit.trace`` (or ``torch.onnx.export``, which traces) records the network. The tracer cannot record
    oneDNN's fused ops, and it would keep the reused output buffers as constants of the traced graph."""
    return getattr(_state, "enabled", True) and not torch.jit.is_tracing()


def lever_enabled(name: str) -> bool:
    """Whether fast path ``name`` (a key of ``LEVERS``) is on in this thread."""
    return fast_paths_enabled() and name not in getattr(_state, "disabled", frozenset())


def lever_state() -> LeverState:
    """This thread's lever settings, to run work for it in another thread (``using_lever_state``)."""
    return fast_paths_enabled(), getattr(_state, "disabled", frozenset())


@contextlib.contextmanager
def using_lever_state(state: LeverState) -> Iterator[None]:
    """Inside the block this thread has the lever settings ``state`` (from ``lever_state()``)."""
    previous = lever_state()
    _state.enabled, _state.disabled = state
    try:
        yield
    finally:
        _state.enabled, _state.disabled = previous


@contextlib.contextmanager
def reference_kernels(*levers: str) -> Iterator[None]:
    """Run LoGoNet/ULKANet with plain PyTorch ops inside this block (thread-local), for comparison.

    With lever names (keys of ``LEVERS``) only those fast paths are switched off, the others stay on.
    """
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        raise ValueError(f"unknown lever(s) {', '.join(map(repr, unknown))}; valid levers: {', '.join(LEVERS)}")
    enabled, disabled = lever_state()
    with using_lever_state((enabled, disabled | frozenset(levers)) if levers else (False, disabled)):
        yield
