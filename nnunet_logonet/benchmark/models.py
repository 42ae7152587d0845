"""The networks ``logonet_benchmark`` compares, each configured the way its planner would for one patch.

Every model is described like an nnU-Net plans entry (network class path, ``arch_kwargs``, the
keys needing import) and built with nnU-Net's own ``get_network_from_plans``, so the benchmark
times the networks training and ``nnUNetv2_predict`` would run (the training step without deep
supervision, for both: its extra heads add under 0.1 % of the MACs):

* ``nnunet``: nnU-Net's default ``PlainConvUNet``, topology from nnU-Net's
  ``get_pool_and_conv_props`` with the kwargs of ``ExperimentPlanner.get_plans_for_configuration``
  (or, with a dataset, the 3d_fullres entry of its ``nnUNetPlans.json`` unchanged).
* ``resenc_m``: nnU-Net's ``ResidualEncoderUNet`` as ``nnUNetPlannerResEncM`` configures it for
  the same patch and spacing (its topology does not depend on the memory target; only the patch
  search does, and here the patch is given).
* ``ulkanet_s``, ``logonet_tiny``, ``logonet_s``, ``logonet_l``: our presets with strides and
  local grid from :func:`~nnunet_logonet.planning.topology.consistent_topology`, i.e. what the
  LoGoNet planners write for that patch and spacing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_logonet.network import LoGoNet, ULKANet, arch_kwargs_for_preset, check_patch_size
from nnunet_logonet.network.presets import class_path
from nnunet_logonet.planning.topology import choose_local_grid, consistent_topology, plan_strides

__all__ = [
    "MODELS",
    "REFERENCE_MODEL",
    "ModelSpec",
    "DatasetPlans",
    "PlansNotFoundError",
    "load_dataset_plans",
    "resolve_model",
    "nnunet_arch",
]

#: nnU-Net's default-planner constants (default_experiment_planner.py / residual_encoder_unet_planners.py)
_BASE_FEATURES = 32
_MAX_FEATURES_3D = 320
_FEATUREMAP_MIN_EDGE = 4
_PLAIN_CONV_PER_STAGE = (2,) * 14
_RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
_RESENC_DECODER_PER_STAGE = (1,) * 12
_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


class PlansNotFoundError(FileNotFoundError):
    """A dataset ID was given but nnU-Net's plans for it do not exist yet."""


@dataclass(frozen=True)
class DatasetPlans:
    """What the benchmark takes from ``nnUNetPlans.json`` (3d_fullres) and ``dataset.json``."""

    name: str
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    input_channels: int
    num_classes: int
    network_class_name: str
    arch_kwargs: dict[str, Any]
    kw_requires_import: tuple[str, ...]
    plans_file: str


@dataclass
class ModelSpec:
    """One benchmarked network as a plans-style description; ``build`` instantiates it."""

    name: str
    description: str
    network_class_name: str
    arch_kwargs: dict[str, Any]
    kw_requires_import: tuple[str, ...]
    patch_size: tuple[int, int, int]
    input_channels: int
    num_classes: int
    #: LoGoNet/ULKANet are written for channels_last_3d; nnU-Net's networks run in nnU-Net's default layout
    prefers_channels_last: bool = False
    #: the nnU-Net trainer that trains this network; its optimizer is the one the benchmark steps
    trainer: str = "nnUNetTrainer"
    notes: list[str] = field(default_factory=list)
    #: fast paths of LoGoNet/ULKANet switched off for this row (``network.levers.LEVERS``; ``--without``)
    without_levers: tuple[str, ...] = ()

    def build(self, *, deep_supervision: bool = False, init: bool = True) -> nn.Module:
        """The network, built as nnU-Net's trainer builds it (``get_network_from_plans``); ``init=False``
        skips its weight initialisation (for ``meta`` tensors)."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        return get_network_from_plans(self.network_class_name, self.arch_kwargs, self.kw_requires_import,
                                      self.input_channels, self.num_classes, allow_init=init,
                                      deep_supervision=deep_supervision)

    def to_json(self) -> dict[str, Any]:
        """This model's description as the benchmark's JSON reports record it."""
        return {
            "description": self.description,
            "network_class_name": self.network_class_name,
            "arch_kwargs": self.arch_kwargs,
            "patch_size": list(self.patch_size),
            "notes": list(self.notes),
            "without_levers": list(self.without_levers),
        }


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and tuples -> plain JSON types, recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def nnunet_arch(patch_size: Sequence[int], spacing: Sequence[float], residual_encoder: bool = False
                ) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """(class path, arch_kwargs, keys to import) of nnU-Net's 3D U-Net for this patch and spacing.

    Mirrors ``ExperimentPlanner.get_plans_for_configuration`` (``residual_encoder=False``) and
    ``ResEncUNetPlanner.get_plans_for_configuration`` (``True``) for a patch that is already
    chosen. Raises ``ValueError`` if nnU-Net's topology would pad the patch.
    """
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    patch = [int(p) for p in patch_size]
    _, strides, kernels, padded, divisible_by = get_pool_and_conv_props(
        [float(s) for s in spacing], patch, _FEATUREMAP_MIN_EDGE, 999999)
    if [int(p) for p in padded] != patch:
        raise ValueError(
            f"patch size {patch} is not valid for nnU-Net's U-Net at spacing {list(spacing)}: every axis must be "
            f"a multiple of {[int(d) for d in divisible_by]}; nnU-Net's planner would use {[int(p) for p in padded]}")
    n_stages = len(strides)
    network_class = ResidualEncoderUNet if residual_encoder else PlainConvUNet
    arch_kwargs: dict[str, Any] = {
        "n_stages": n_stages,
        "features_per_stage": [min(_MAX_FEATURES_3D, _BASE_FEATURES * 2 ** i) for i in range(n_stages)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": kernels,
        "strides": strides,
    }
    if residual_encoder:
        arch_kwargs["n_blocks_per_stage"] = _RESENC_BLOCKS_PER_STAGE[:n_stages]
        arch_kwargs["n_conv_per_stage_decoder"] = _RESENC_DECODER_PER_STAGE[:n_stages - 1]
    else:
        arch_kwargs["n_conv_per_stage"] = _PLAIN_CONV_PER_STAGE[:n_stages]
        arch_kwargs["n_conv_per_stage_decoder"] = _PLAIN_CONV_PER_STAGE[:n_stages - 1]
    arch_kwargs.update({
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    })
    return class_path(network_class), _jsonable(arch_kwargs), _REQUIRES_IMPORT


def load_dataset_plans(dataset: str | int, preprocessed_root: str | Path | None = None) -> DatasetPlans:
    """The 3d_fullres configuration of ``nnUNetPlans.json`` for a dataset ID or name.

    Raises :class:`PlansNotFoundError` naming the command to run when there is none.
    """
    import os

    root = preprocessed_root if preprocessed_root is not None else os.environ.get("nnUNet_preprocessed")
    if not root:
        raise PlansNotFoundError(
            "nnUNet_preprocessed is not set, so the plans of dataset "
            f"{dataset} cannot be found; export nnUNet_preprocessed=/path/to/nnUNet_preprocessed")
    root = Path(root)
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    try:
        name = convert_id_to_dataset_name(int(dataset)) if str(dataset).isdigit() else str(dataset)
    except RuntimeError:
        name = None
    # nnU-Net looks the ID up in raw/preprocessed/results; look in preprocessed ourselves as a fallback
    if name is None or not (root / name).is_dir():
        matches = sorted(p.name for p in root.glob(f"Dataset{int(dataset):03d}_*")) if str(dataset).isdigit() else []
        name = matches[0] if matches else name
    plans_file = root / (name or f"Dataset{dataset}") / "nnUNetPlans.json"
    if name is None or not plans_file.is_file():
        raise PlansNotFoundError(
            f"no nnU-Net plans for dataset {dataset} ({plans_file} does not exist). Plan it first: "
            f"nnUNetv2_plan_and_preprocess -d {dataset} -c 3d_fullres (or nnUNetv2_plan_experiment -d {dataset})")
    plans = json.loads(plans_file.read_text())
    dataset_json_file = plans_file.parent / "dataset.json"
    if "3d_fullres" not in plans.get("configurations", {}):
        raise PlansNotFoundError(f"{plans_file} has no 3d_fullres configuration (2D dataset?); "
                                 f"the benchmark compares 3D networks only")
    if not dataset_json_file.is_file():
        raise PlansNotFoundError(f"{dataset_json_file} is missing; rerun nnUNetv2_plan_and_preprocess -d {dataset}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = PlansManager(plans).get_configuration("3d_fullres")
    dataset_json = json.loads(dataset_json_file.read_text())
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return DatasetPlans(
        name=name,
        patch_size=tuple(int(p) for p in config.patch_size),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in config.spacing),  # type: ignore[arg-type]
        input_channels=len(channels),
        num_classes=len(dataset_json["labels"]),
        network_class_name=config.network_arch_class_name,
        arch_kwargs=_jsonable(config.network_arch_init_kwargs),
        kw_requires_import=tuple(config.network_arch_init_kwargs_req_import),
        plans_file=str(plans_file),
    )


@dataclass(frozen=True)
class _Context:
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    input_channels: int
    num_classes: int
    plans: DatasetPlans | None


def _nnunet(ctx: _Context) -> ModelSpec:
    if ctx.plans is not None:
        p = ctx.plans
        return ModelSpec("nnunet", f"nnU-Net default network from {p.name}/nnUNetPlans.json 3d_fullres",
                         p.network_class_name, p.arch_kwargs, p.kw_requires_import, p.patch_size,
                         ctx.input_channels, ctx.num_classes)
    cls, kwargs, imports = nnunet_arch(ctx.patch_size, ctx.spacing)
    return ModelSpec("nnunet", "nnU-Net default PlainConvUNet (ExperimentPlanner topology)", cls, kwargs, imports,
                     ctx.patch_size, ctx.input_channels, ctx.num_classes)


def _resenc_m(ctx: _Context) -> ModelSpec:
    cls, kwargs, imports = nnunet_arch(ctx.patch_size, ctx.spacing, residual_encoder=True)
    return ModelSpec("resenc_m", "nnU-Net ResEnc M ResidualEncoderUNet (nnUNetPlannerResEncM topology)", cls, kwargs,
                     imports, ctx.patch_size, ctx.input_channels, ctx.num_classes)


def _ours(network: type, preset: str) -> Callable[[_Context], ModelSpec]:
    use_local = network is LoGoNet
    label = f"{network.__name__}-{preset}"

    def make(ctx: _Context) -> ModelSpec:
        notes: list[str] = []
        patch, strides, grid = consistent_topology(ctx.spacing, ctx.patch_size, use_local=use_local)
        patch = tuple(int(p) for p in patch)
        if patch != tuple(ctx.patch_size):
            requested = [int(p) for p in ctx.patch_size]
            if ctx.plans is None:
                # the user chose this patch: say which multiples the network needs
                own_strides = plan_strides(ctx.spacing, requested)
                own_grid = choose_local_grid(requested, own_strides) if use_local else [1, 1, 1]
                check_patch_size(requested, own_strides, own_grid, 2)
                raise ValueError(f"patch size {requested} is not valid for {label}; "
                                 f"its planner would use {list(patch)}")
            notes.append(f"patch {list(patch)}: {label} cannot take nnU-Net's {requested}")
        overrides = {"local_grid": grid} if use_local else {}
        kwargs = arch_kwargs_for_preset(preset, strides, model=network.__name__, **overrides)
        check_patch_size(patch, kwargs["strides"], *((kwargs["local_grid"], kwargs["local_stages"]) if use_local else ()))
        return ModelSpec(label.lower().replace("-", "_"), f"{label} (LoGoNet planner topology)", class_path(network),
                         kwargs, (), patch, ctx.input_channels, ctx.num_classes, prefers_channels_last=True,
                         trainer="LoGoNetTrainer", notes=notes)

    return make


#: name -> builder, in the default order of the table (reference first)
MODELS: dict[str, Callable[[_Context], ModelSpec]] = {
    "nnunet": _nnunet,
    "resenc_m": _resenc_m,
    "ulkanet_s": _ours(ULKANet, "S"),
    "logonet_tiny": _ours(LoGoNet, "tiny"),
    "logonet_s": _ours(LoGoNet, "S"),
    "logonet_l": _ours(LoGoNet, "L"),
}
REFERENCE_MODEL = "nnunet"


def resolve_model(name: str, *, patch_size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  input_channels: int = 1, num_classes: int = 14, plans: DatasetPlans | None = None) -> ModelSpec:
    """The plans-style description of model ``name`` for this patch (no weights allocated).

    Raises ``ValueError`` for an unknown name (listing the valid ones) or a patch the model cannot take
    (the network's message, with the required multiples).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    ctx = _Context(tuple(int(p) for p in patch_size), tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                   int(input_channels), int(num_classes), plans)
    return MODELS[name](ctx)


def feature_map_elements(spec: ModelSpec) -> int:
    """nnU-Net's planner measure (``compute_conv_feature_map_size``) for one sample, built on ``meta``."""
    with torch.device("meta"):
        net = spec.build(init=False)
    return int(net.compute_conv_feature_map_size(tuple(spec.patch_size)))
