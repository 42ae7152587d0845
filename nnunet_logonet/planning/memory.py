"""Calibrating the planner's memory estimate against nnU-Net's own reference.

nnU-Net's planner says: a PlainConvUNet whose ``compute_conv_feature_map_size`` is 560e6 trains at
batch 2 in 8 GB (mixed precision, measured by its authors on GPUs). LoGoNet's blocks keep more
tensors for backward per counted feature-map element (GELU inputs, the LKA product, layer scale),
so we measure, on any device, the bytes autograd saves per counted element for both networks
(``saved_activation_bytes``) and scale nnU-Net's GPU figure by the ratio.

Run ``python -m nnunet_logonet.planning.memory --preset S`` (``--model ULKANet``, ``--preset L``, ...) to
recompute the constant of the planner of that network (``LoGoNetPlanner.bytes_per_feature_element`` and
its subclasses'; ``tests/test_planning.py`` checks that each equals its calibration).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from nnunet_logonet.network.presets import MODELS

#: nnU-Net's reference: 560e6 counted elements <-> 8 GB at batch 2 (default_experiment_planner.py).
NNUNET_BYTES_PER_ELEMENT = 8 * 1024 ** 3 / (2 * 560e6)


def saved_activation_bytes(network: nn.Module, patch_size, input_channels: int = 1, batch_size: int = 1,
                           dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward pass under
    autocast (what dominates training memory)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    x = torch.zeros(batch_size, input_channels, *patch_size)
    network.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype):
            out = network(x)
    del out
    return int(sum(seen.values()))


def bytes_per_feature_element(network: nn.Module, patch_size, input_channels: int = 1) -> float:
    """Bytes autograd saves per element of nnU-Net's count (``compute_conv_feature_map_size``), for
    one sample of ``patch_size``."""
    return saved_activation_bytes(network, patch_size, input_channels) / network.compute_conv_feature_map_size(
        tuple(patch_size))


def calibrate(patch_size=(64, 64, 64), preset: str = "tiny", model: str = "LoGoNet") -> dict:
    """The network's bytes per counted element, scaled to nnU-Net's GPU reference."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_logonet.network import LoGoNet, ULKANet

    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")

    unet = PlainConvUNet(1, 5, (32, 64, 128, 256, 320), nn.Conv3d, 3, (1, 2, 2, 2, 2), (2, 2, 2, 2, 2), 14,
                         (2, 2, 2, 2), conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)
    network = {"LoGoNet": LoGoNet, "ULKANet": ULKANet}[model].from_preset(preset, 1, 14, patch_size,
                                                                         deep_supervision=True)
    unet_ratio = bytes_per_feature_element(unet, patch_size)
    logonet_ratio = bytes_per_feature_element(network, patch_size)
    return {"patch_size": list(patch_size), "preset": preset, "model": model,
            "unet_saved_bytes_per_element": unet_ratio, "logonet_saved_bytes_per_element": logonet_ratio,
            "logonet_gpu_bytes_per_element": NNUNET_BYTES_PER_ELEMENT * logonet_ratio / unet_ratio}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.planning.memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--patch-size", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"),
                        help="training patch the bytes are measured at (default 64 64 64)")
    parser.add_argument("--preset", default="tiny", help="tiny, S or L (default: tiny)")
    parser.add_argument("--model", default="LoGoNet", choices=MODELS, help="default: LoGoNet")
    args = parser.parse_args(argv)
    try:
        calibration = calibrate(tuple(args.patch_size), args.preset, args.model)
    except ValueError as error:  # an unknown preset or a patch the network cannot take: the message names the fix
        parser.error(str(error))
    for k, v in calibration.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
