"""Model sizes: the paper's S and L (Table 9) and a CPU-sized ``tiny``, as plans-ready kwargs.

Encoder values are the paper's. The paper does not give decoder widths; ours are chosen so that
with 1 input channel and 14 classes the parameter counts land within 3 % of the paper's and the
multiply-accumulates at 96^3 within 10 % of its GFLOPs (Table 6): the parameters fix the deep
widths, the GFLOPs the full-resolution width ``decoder_channels[0]`` (see docs/architecture.md).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np

from .arguments import int_list, positive_int, real_number
from .layers import check_norm
from .shapes import Triple, as_triple, isotropic_strides, normalize_strides

__all__ = ["PRESETS", "MODELS", "class_path", "default_decoder_channels", "arch_kwargs_for_preset", "preset", "jsonable",
           "validate_arch", "validate_local_paths"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "dims": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "mlp_ratios": [4, 4, 4, 4],
        # 16 at the three finest resolutions: with 4 or 8 the network cannot leave the
        # all-background solution (docs/training_recipe.md, "Why tiny's decoder is 16 wide")
        "decoder_channels": [16, 16, 16, 16, 24, 32],
        "stem_channels": [4, 4],
    },
    "S": {
        "dims": [64, 128, 256, 512],
        "depths": [3, 4, 6, 3],
        "mlp_ratios": [8, 8, 4, 4],
        # full resolution 16: the paper's 246.96 GFLOPs (32 would do 368 G at the same parameters)
        "decoder_channels": [16, 32, 32, 64, 192, 256],
        "stem_channels": [32, 64],
    },
    "L": {
        "dims": [96, 192, 384, 768],
        "depths": [3, 3, 24, 3],
        "mlp_ratios": [8, 8, 4, 4],
        # full resolution 36: the paper's 487.65 GFLOPs (48 would do 629 G)
        "decoder_channels": [36, 48, 48, 96, 288, 384],
        "stem_channels": [32, 64],
    },
}

#: keywords shared by both models, with their defaults when a preset does not set them
COMMON_DEFAULTS: dict[str, Any] = {"norm": "batch", "drop_path_rate": 0.0, "layer_scale_init": 1e-2}
#: keywords only LoGoNet takes
LOCAL_DEFAULTS: dict[str, Any] = {"local_grid": [2, 2, 2], "local_stages": 2}
MODELS = ("LoGoNet", "ULKANet")
#: the keywords ``validate_arch`` checks (both models take them)
ARCH_KEYWORDS = ("strides", "dims", "depths", "mlp_ratios", "decoder_channels", "stem_channels", "norm",
                 "drop_path_rate", "layer_scale_init")


def class_path(cls: type) -> str:
    """``cls``'s dotted import path: how nnU-Net's plans name a network (``network_class_name``)."""
    return f"{cls.__module__}.{cls.__name__}"


def default_decoder_channels(dims: Sequence[int]) -> list[int]:
    """Decoder widths when none are given, the rule behind the S preset.

    Half the stage width at every resolution (stage-1 half width also at /2), except 3/4 at the
    second-deepest stage: the widths that put S and L within 1 % of the paper's parameter counts;
    a quarter of the stage-1 width at full resolution, which puts S within 3 % of the paper's
    GFLOPs (L's full-resolution width, 36 instead of 24, is fitted to its GFLOPs on its own).
    """
    d = [int(v) for v in dims]
    widths = [max(1, v // 2) for v in d]
    if len(d) >= 2:
        widths[-2] = max(1, 3 * d[-2] // 4)
    return [max(1, d[0] // 4), widths[0], *widths]


def preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def validate_arch(
    *,
    strides: Sequence[Sequence[int]],
    dims: Sequence[int],
    depths: Sequence[int],
    mlp_ratios: Sequence[float],
    decoder_channels: Sequence[int] | None,
    stem_channels: Sequence[int],
    norm: str,
    drop_path_rate: float,
    layer_scale_init: float,
) -> dict[str, Any]:
    """Check the architecture keywords shared by ULKANet and LoGoNet and return them normalised
    (tuples, ints, floats); ``ValueError`` naming the keyword, the value and what is allowed."""
    dims = int_list(dims, "dims")
    num_stages = len(dims)
    depths = int_list(depths, "depths", length=num_stages)
    if isinstance(mlp_ratios, (str, bytes)) or not isinstance(mlp_ratios, (Sequence, np.ndarray)) \
            or len(mlp_ratios) != num_stages:
        raise ValueError(f"mlp_ratios must be a list of {num_stages} numbers (one per stage), got {mlp_ratios!r}")
    ratios = tuple(real_number(r, f"mlp_ratios[{i}]", minimum=0.0, exclusive_minimum=True)
                   for i, r in enumerate(mlp_ratios))
    for i, (dim, ratio) in enumerate(zip(dims, ratios)):
        if int(dim * ratio) < 1:
            raise ValueError(f"mlp_ratios[{i}] = {mlp_ratios[i]!r} gives stage {i} (dims[{i}] = {dim}) an MLP of "
                             f"int({dim} * {ratio}) = 0 channels; it must be at least 1 / {dim}")
    stem = int_list(stem_channels, "stem_channels")
    if decoder_channels is None:
        decoder_channels = default_decoder_channels(dims)
    dec = int_list(decoder_channels, "decoder_channels", length=num_stages + 2)
    return dict(
        strides=normalize_strides(strides, num_stages),
        dims=dims,
        depths=depths,
        mlp_ratios=ratios,
        decoder_channels=dec,
        stem_channels=stem,
        norm=check_norm(norm),
        drop_path_rate=real_number(drop_path_rate, "drop_path_rate", minimum=0.0, maximum=1.0,
                                   exclusive_maximum=True),
        layer_scale_init=real_number(layer_scale_init, "layer_scale_init"),
    )


def validate_local_paths(local_grid: Any, local_stages: Any, num_stages: int) -> tuple[Triple, int]:
    """LoGoNet's own keywords: sub-crops per axis and encoder stages of every local path."""
    grid = as_triple(local_grid, "local_grid")
    stages = positive_int(local_stages, "local_stages")
    if stages > num_stages:
        raise ValueError(f"local_stages must be in [1, {num_stages}] (the encoder's stages), got {stages}")
    return grid, stages


def arch_kwargs_for_preset(
    name: str,
    strides: Sequence[Sequence[int]] | None = None,
    model: str = "LoGoNet",
    **overrides: Any,
) -> dict[str, Any]:
    """JSON-serialisable ``arch_kwargs`` for plans: everything but input_channels, num_classes
    and deep_supervision.

    Args:
        name: 'tiny', 'S' or 'L'.
        strides: nnU-Net per-resolution strides; ``None`` gives the isotropic default.
        model: 'LoGoNet' (adds ``local_grid`` and ``local_stages``) or 'ULKANet'.
        overrides: any constructor keyword of ``model`` replacing the preset's value.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    kwargs: dict[str, Any] = {**preset(name), **COMMON_DEFAULTS}
    if model == "LoGoNet":
        kwargs.update(copy.deepcopy(LOCAL_DEFAULTS))
    unknown = sorted(set(overrides) - set(kwargs))
    if unknown:
        raise ValueError(f"unknown {model} keyword(s) {unknown}; valid: {sorted(set(kwargs) | {'strides'})}")
    kwargs.update(overrides)
    kwargs["strides"] = isotropic_strides(len(int_list(kwargs["dims"], "dims"))) if strides is None else strides
    # checked here, so that a bad override stops before it reaches a plans file, not at training
    checked = validate_arch(**{key: kwargs[key] for key in ARCH_KEYWORDS})
    if model == "LoGoNet":
        validate_local_paths(kwargs["local_grid"], kwargs["local_stages"], len(checked["dims"]))
    kwargs["strides"] = [list(s) for s in checked["strides"]]
    return jsonable(kwargs)


def jsonable(value: Any) -> Any:
    """Tuples -> lists (also inside dicts), so values round-trip through plans.json unchanged."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
