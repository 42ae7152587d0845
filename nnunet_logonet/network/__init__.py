"""LoGoNet and ULKANet (Masked LoGoNet, KDD 2024) as nnU-Net-ready 3D segmentation networks."""
from .logonet import LoGoNet
from .presets import PRESETS, arch_kwargs_for_preset
from .shapes import check_patch_size, required_patch_multiple
from .ulkanet import ULKANet

__all__ = ["LoGoNet", "ULKANet", "PRESETS", "arch_kwargs_for_preset", "check_patch_size", "required_patch_multiple"]
