"""Parameters and multiply-accumulates of a network, counted one way for the benchmark and the demo's report.

Multiply-accumulates are fvcore's ``FlopCountAnalysis`` of one forward pass (fvcore counts one "flop"
per multiply-accumulate, the unit the paper's GFLOPs most likely are), traced with LoGoNet's fast
paths off: the architecture's arithmetic in plain PyTorch ops, which fvcore's tracer knows.
"""
from __future__ import annotations

import warnings

import torch

from nnunet_logonet.network.levers import reference_kernels

__all__ = ["count_parameters", "count_macs"]


def count_parameters(model: torch.nn.Module) -> int:
    """Every parameter of ``model``, trainable or not (the paper's "#Params")."""
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(net: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one forward pass (fvcore) and the ops fvcore does not count."""
    from fvcore.nn import FlopCountAnalysis

    net.eval()
    # the architecture's MACs: plain ops, which fvcore's tracer knows (it does not count oneDNN's op)
    with torch.no_grad(), warnings.catch_warnings(), reference_kernels():
        warnings.simplefilter("ignore")  # tracer warnings from shape checks
        analysis = FlopCountAnalysis(net, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = int(analysis.total())
        uncounted = {str(k): int(v) for k, v in analysis.unsupported_ops().items()}
    return total, uncounted
