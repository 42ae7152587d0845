"""ULKANet's convolutional decoder (paper Fig. 1b), going up through every resolution.

Resolutions are indexed like nnU-Net's strides: 0 = full resolution (stem), 1 = /2 (no encoder
feature lives here), 2 .. S+1 = LKA stages 1 .. S. Every encoder feature first goes through
2 conv units (``skips``). A decoder block is 3 conv units; blocks run from the bottleneck
(resolution S+1, on the deepest skip) up to resolution 1, each after upsampling by that
resolution's stride and concatenating the skip of its resolution (none at resolution 1).
At full resolution the stem output is concatenated and ``final`` (2 conv units) follows.
Concatenations are handed to the next conv unit as their parts (``ConvUnit`` accepts a tuple),
which convolves them without building the concatenated tensor.

``forward_features`` returns the decoder features at resolutions 0 .. S, highest first.
With ``num_classes`` the decoder also owns ``seg_layers`` (1x1x1 classifiers at resolutions
0 .. S) and the runtime flag ``deep_supervision`` that nnU-Net sets.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arguments import int_list, positive_int
from .classifier import Classifier3d
from .layers import ConvUnit, Upsample3d
from .shapes import Triple

__all__ = ["ULKADecoder"]


def _units(in_channels: int, out_channels: int, count: int, norm: str) -> nn.Sequential:
    widths = [in_channels] + [out_channels] * count
    return nn.Sequential(*[ConvUnit(a, b, norm=norm) for a, b in zip(widths[:-1], widths[1:])])


class ULKADecoder(nn.Module):
    """Conv-unit decoder with concatenated skips and a full-resolution stem.

    Args:
        encoder_channels: width of each LKA stage output (S entries).
        stem_channels: width of the full-resolution stem output.
        strides: normalised per-resolution strides (S + 2 entries).
        decoder_channels: decoder width per resolution (S + 2 entries, index 0 = full res).
        num_classes: if given, build ``seg_layers`` (one classifier per resolution 0 .. S).
        deep_supervision: with ``num_classes``, return all S + 1 outputs instead of one.
    """

    def __init__(
        self,
        *,
        encoder_channels: Sequence[int],
        stem_channels: int,
        strides: Sequence[Triple],
        decoder_channels: Sequence[int],
        norm: str = "batch",
        num_classes: int | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(int_list(encoder_channels, "encoder_channels"))
        dc = list(int_list(decoder_channels, "decoder_channels", length=num_stages + 2))
        if len(strides) != num_stages + 2:
            raise ValueError(f"strides must have {num_stages + 2} entries (stem, /2, one per encoder stage), got "
                             f"{len(strides)}: {strides!r}")
        stem_channels = positive_int(stem_channels, "stem_channels")
        self.skips = nn.ModuleList([_units(c, dc[k + 2], 2, norm) for k, c in enumerate(encoder_channels)])
        blocks = [_units(dc[num_stages + 1], dc[num_stages + 1], 3, norm)]
        for res in range(num_stages, 0, -1):
            skip = dc[res] if res >= 2 else 0
            blocks.append(_units(dc[res + 1] + skip, dc[res], 3, norm))
        self.blocks = nn.ModuleList(blocks)
        # upsamples[j] brings the output of blocks[j] to the next resolution up
        self.upsamples = nn.ModuleList([Upsample3d(strides[res]) for res in range(num_stages + 1, 0, -1)])
        self.final = _units(dc[1] + stem_channels, dc[0], 2, norm)
        self.num_stages = num_stages
        self.deep_supervision = bool(deep_supervision)
        if num_classes is not None:
            self.seg_layers = nn.ModuleList(
                [Classifier3d(dc[res], num_classes, kernel_size=1) for res in range(num_stages + 1)]
            )

    def forward_features(self, stem: torch.Tensor, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder features at resolutions 0 .. S (highest first)."""
        coarse = self.forward_coarse(features)
        return [self.forward_final(stem, coarse[0]), *coarse]

    def forward_coarse(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder features at resolutions 1 .. S (highest first): all but the stem's."""
        skips = [unit(f) for unit, f in zip(self.skips, features)]
        x = self.blocks[0](skips[-1])
        outputs = []
        for j, res in enumerate(range(self.num_stages, 0, -1), start=1):
            x = self.upsamples[j - 1](x)
            # concatenations go to the first conv unit as parts (conv.conv3d_concat: no copy)
            x = self.blocks[j]((x, skips[res - 2]) if res >= 2 else x)
            outputs.append(x)
        return outputs[::-1]

    def forward_final(self, stem: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        """Full-resolution features: the features at resolution 1 upsampled, concatenated with the stem's."""
        return self.final((self.upsamples[-1](half), stem))

    def forward(self, stem: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Segmentation logits: one full-resolution tensor, or S + 1 with deep supervision."""
        feats = self.forward_features(stem, features)
        if not self.deep_supervision:
            return self.seg_layers[0](feats[0])
        return [seg(f) for seg, f in zip(self.seg_layers, feats)]
