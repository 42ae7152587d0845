"""LoGoNet's pre-classifier features, read with a forward hook during pre-training.

The pretext head needs the fused full-resolution features right before the segmentation
classifier: the output of ``network.head.act`` (``act(norm(conv(fused)))``, the input of
``head.seg_layers[0]``). A hook reads them without changing the network or its forward, so the
same module (wrapped by DDP or torch.compile, as nnU-Net may do) is trained and later fine-tuned.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PreClassifierFeatures", "unwrap_network"]


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and/or torch.compile (``._orig_mod``) wrappers."""
    module = network
    for _ in range(4):  # DDP(compiled(net)) or compiled(DDP(net)): at most a couple of layers
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            break
    return module


class PreClassifierFeatures:
    """Keeps the last output of ``head.act`` of a LoGoNet (or ULKANet-style head) network.

    Usage::

        tap = PreClassifierFeatures(trainer.network)   # wrappers are looked through
        trainer.network(x)                             # normal forward
        features = tap.pop()                           # (B, C, D, H, W), C = tap.channels

    Raises ``ValueError`` at construction when the network has no ``head.act`` / ``head.conv``.
    """

    def __init__(self, network: nn.Module) -> None:
        module = unwrap_network(network)
        head = getattr(module, "head", None)
        if head is None or not isinstance(getattr(head, "act", None), nn.Module) \
                or not isinstance(getattr(head, "conv", None), nn.Conv3d):
            raise ValueError(
                f"expected a LoGoNet-style network with head.conv -> head.norm -> head.act -> "
                f"head.seg_layers[0], got {type(module).__name__}; plan with a LoGoNet planner "
                f"(e.g. -pl LoGoNetPlanner) and train with -p LoGoNetPlans.")
        self.channels: int = head.conv.out_channels
        self._features: torch.Tensor | None = None
        self._handle = head.act.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._features = output

    def pop(self) -> torch.Tensor:
        """The features of the last forward pass (released, so the next pass cannot reuse them)."""
        if self._features is None:
            raise RuntimeError("no features captured: run the network forward before pop().")
        features, self._features = self._features, None
        return features

    def remove(self) -> None:
        """Detach the hook (e.g. before fine-tuning the same network object)."""
        self._handle.remove()
        self._features = None
