"""nnU-Net experiment planners that configure LoGoNet instead of nnU-Net's U-Net.

They reuse everything of nnU-Net's ``ExperimentPlanner`` that is not about the network (target
spacing, transpose, normalisation, resampling, 3d_lowres/cascade decision, plans file layout) and
replace ``get_plans_for_configuration`` for 3D: the patch starts from nnU-Net's spacing-aware
initial patch, strides follow the anisotropy (:mod:`.topology`), and the patch is shrunk (the axis
largest relative to the median image first, by the multiple the smaller patch needs, as nnU-Net
does) until the estimated training memory
fits ``gpu_memory_target_in_gb``. LoGoNet is 3D only: the 2D configuration is dropped.

The 3d_fullres data identifier is nnU-Net's own (``nnUNetPlans_3d_fullres``) so the preprocessed
data is shared with the default plans, as nnU-Net's ResEnc planners do; unless nnUNetPlans already
preprocess 3d_fullres differently (e.g. planned with ``-overwrite_target_spacing``), when LoGoNet's
data gets its own folder rather than replacing nnU-Net's.
"""

from __future__ import annotations

import json
import os
from copy import deepcopy
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch

from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as nnunet_planner
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnunet_logonet.network import LoGoNet, ULKANet, required_patch_multiple
from nnunet_logonet.network.presets import arch_kwargs_for_preset, class_path
from nnunet_logonet.planning.topology import consistent_topology
from nnunet_logonet.workfolders import read_json_if_whole, write_json_whole

DEFAULT_DATA_IDENTIFIER_PLANS = "nnUNetPlans"
#: what makes two plans' preprocessed data of a configuration the same: plans-level keys ...
COMPARED_PLAN_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel")
#: ... and the configuration's own
COMPARED_CONFIG_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                        "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs",
                        "preprocessor_name")


def preprocessing_differences(plans: dict, config: dict, other_plans: dict, other_config: dict) -> list[str]:
    """Keys whose values make the two configurations' preprocessed data differ (empty: the same data)."""
    def same(a, b) -> bool:
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # tuples vs lists, as in a JSON file

    return ([k for k in COMPARED_PLAN_KEYS if not same(plans.get(k), other_plans.get(k))]
            + [k for k in COMPARED_CONFIG_KEYS if not same(config.get(k), other_config.get(k))])


class PlanningError(RuntimeError):
    """Planning cannot produce a LoGoNet configuration; the message says what to do instead."""


@lru_cache(maxsize=256)
def _network_costs(class_name: str, arch_kwargs_json: str, input_channels: int, num_classes: int
                   ) -> tuple[float, int]:
    """(feature-map elements per input voxel, parameter count) for one architecture.

    For a fixed stride list and local grid every feature map has ``channels x voxels / stride``
    elements, so ``compute_conv_feature_map_size`` is exactly linear in the patch volume over
    valid patches: one count at the smallest valid patch serves every patch size. The network is
    built on the meta device, so even the L preset costs no memory.
    """
    network_class = PLANNED_NETWORKS[class_name]
    arch_kwargs = json.loads(arch_kwargs_json)
    with torch.device("meta"):
        net = network_class(input_channels=input_channels, num_classes=num_classes, deep_supervision=True,
                            **arch_kwargs)
    local = (arch_kwargs.get("local_grid", (1, 1, 1)), arch_kwargs.get("local_stages", 2))
    smallest = required_patch_multiple(arch_kwargs["strides"], *local)
    per_voxel = net.compute_conv_feature_map_size(tuple(smallest)) / float(np.prod(smallest))
    return per_voxel, sum(p.numel() for p in net.parameters())


def estimate_training_memory_gb(network_class: type, arch_kwargs: dict, patch_size, input_channels: int,
                                num_classes: int, batch_size: int, bytes_per_feature_element: float) -> float:
    """Training memory estimate: activations (feature-map elements x calibrated bytes) for the batch
    plus fp32 weights, gradients and two AdamW moments."""
    per_voxel, n_params = _network_costs(class_path(network_class), json.dumps(arch_kwargs, sort_keys=True),
                                         input_channels, num_classes)
    feature_elements = per_voxel * float(np.prod(patch_size))
    return (feature_elements * batch_size * bytes_per_feature_element + n_params * 16) / 1024 ** 3


class LoGoNetPlanner(ExperimentPlanner):
    """Plans LoGoNet-S (paper Table 9) for 3d_fullres and, where nnU-Net would, 3d_lowres/cascade."""

    preset: str = "S"
    network_class: type = LoGoNet
    default_plans_name: str = "LoGoNetPlans"
    default_gpu_memory_target_in_gb: float = 8.0
    #: Activation bytes per element counted by ``compute_conv_feature_map_size`` under mixed
    #: precision: nnU-Net's GPU reference scaled by measured saved-tensor bytes (docs/planning.md),
    #: one per network: ``python -m nnunet_logonet.planning.memory --preset S`` gives 5.73 (tested)
    bytes_per_feature_element: float = 5.73
    #: Upper bound on patch voxels (None = memory decides alone). The tiny planner sets one so CPU
    #: iterations stay short.
    max_patch_voxels: int | None = None
    #: The paper trains with batch 2 per GPU; nnU-Net's minimum is also 2.
    min_batch_size: int = 2
    max_batch_size: int = 2

    def __init__(self, dataset_name_or_id: Union[str, int],
                 gpu_memory_target_in_gb: float | None = None,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        gpu_memory_target_in_gb = (self.default_gpu_memory_target_in_gb if gpu_memory_target_in_gb is None
                                   else gpu_memory_target_in_gb)
        if gpu_memory_target_in_gb <= 0:
            raise PlanningError(f"-gpu_memory_target must be positive, got {gpu_memory_target_in_gb}")
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)
        self.memory_estimates: dict[str, float] = {}

    # ----------------------------------------------------------------------------------- ids
    def generate_data_identifier(self, configuration_name: str) -> str:
        """Share nnU-Net's 3d_fullres data unless the target spacing was overridden."""
        if configuration_name == "3d_fullres" and self.overwrite_target_spacing is None:
            return f"{DEFAULT_DATA_IDENTIFIER_PLANS}_{configuration_name}"
        return f"{self.plans_identifier}_{configuration_name}"

    # ---------------------------------------------------------------------------- planning
    def plan_experiment(self):
        shapes = np.asarray(self.dataset_fingerprint["shapes_after_crop"])
        if shapes.ndim != 2 or shapes.shape[1] != 3 or np.any(np.median(shapes, 0) <= 1):
            raise PlanningError(
                f"{self.dataset_name} is not a 3D dataset (median shape {np.median(shapes, 0).tolist()}); "
                f"LoGoNet is 3D only. Plan it with nnU-Net's default planner instead: "
                f"nnUNetv2_plan_and_preprocess -d {self.dataset_name} -c 2d")
        return super().plan_experiment()

    def save_plans(self, plans):
        if "2d" in plans["configurations"]:
            del plans["configurations"]["2d"]
            print("LoGoNet is a 3D network: the 2d configuration is skipped (use nnUNetPlans for 2d).")
        recursive_fix_for_json_export(plans)
        self._refuse_to_replace_another_networks_plans(plans)
        self._unshare_data_that_differs(plans)
        self._set_aside_unreadable_plans()
        self._write_plans_whole(plans)

    def _refuse_to_replace_another_networks_plans(self, plans: dict) -> None:
        """Plans of this name that describe another network (nnU-Net's own, a ResEnc, a user's) are not
        replaced: their trainer would build LoGoNet from them under its own name, and their results would
        no longer be a baseline."""
        plans_file = self._plans_file()
        old = read_json_if_whole(plans_file) or {}
        ours = {class_path(LoGoNet), class_path(ULKANet)}
        for name in plans["configurations"]:
            config = old.get("configurations", {}).get(name)
            found = config.get("architecture", {}).get("network_class_name") if isinstance(config, dict) else None
            if found is not None and found not in ours:
                raise PlanningError(
                    f"{plans_file} already holds plans for {found} ({name}); writing {self.network_class.__name__}'s "
                    f"plans under that name would replace them. Give these plans another name "
                    f"(-overwrite_plans_name {self.plans_identifier}_logonet), or move that file away if it is no "
                    f"longer used.")

    def _plans_file(self) -> Path:
        """Where nnU-Net's ``save_plans`` puts the plans (its module's ``nnUNet_preprocessed``)."""
        return Path(nnunet_planner.nnUNet_preprocessed) / self.dataset_name / f"{self.plans_identifier}.json"

    def _write_plans_whole(self, plans: dict) -> None:
        """nnU-Net 2.8's ``save_plans`` (configurations only the existing file holds are kept, as
        nnU-Net keeps a user's own ones), with the file written whole: nnU-Net writes it in place, and
        an interrupted planning left a file that ``nnUNetv2_train`` stopped on with a bare JSON error."""
        plans_file = self._plans_file()
        old_plans = read_json_if_whole(plans_file)  # None: no file (or one set aside as unreadable)
        if old_plans is not None:
            kept = {name: config for name, config in old_plans.get("configurations", {}).items()
                    if name not in plans["configurations"]}
            plans["configurations"].update(kept)
        write_json_whole(plans_file, plans, indent=4)
        print(f"Plans were saved to {plans_file}")

    def _set_aside_unreadable_plans(self) -> None:
        """nnU-Net's ``save_plans`` reads the existing plans file to keep its other configurations, and
        writes in place: a file cut short by an interrupted run stopped every later planning with a bare
        JSON error. It is kept beside, renamed, and the plans are written anew."""
        plans_file = self._plans_file()
        if plans_file.is_file() and read_json_if_whole(plans_file) is None:
            aside = plans_file.with_name(plans_file.name + ".unreadable")
            os.replace(plans_file, aside)
            print(f"{plans_file} is not valid JSON (cut short by an interrupted run?): kept as {aside.name}, "
                  f"written anew (configurations only it held are not carried over).")

    def _unshare_data_that_differs(self, plans: dict) -> None:
        """nnUNetPlans already planned 3d_fullres with other preprocessing (another target spacing, ...):
        sharing its folder would replace nnU-Net's data with LoGoNet's, silently wrong for its plans."""
        shared = f"{DEFAULT_DATA_IDENTIFIER_PLANS}_3d_fullres"
        config = plans["configurations"].get("3d_fullres")
        # the folder nnU-Net's save_plans writes to (its module's nnUNet_preprocessed)
        default_file = (Path(nnunet_planner.nnUNet_preprocessed) / self.dataset_name
                        / f"{DEFAULT_DATA_IDENTIFIER_PLANS}.json")
        if (config is None or config.get("data_identifier") != shared
                or self.plans_identifier == DEFAULT_DATA_IDENTIFIER_PLANS or not default_file.is_file()):
            return
        default = read_json_if_whole(default_file)
        if default is None:
            differences = [f"{default_file.name} unreadable"]
        else:
            default_config = (default.get("configurations") or {}).get("3d_fullres")
            if not default_config or default_config.get("data_identifier") != shared:
                return
            differences = preprocessing_differences(plans, config, default, default_config)
        if differences:
            config["data_identifier"] = own = f"{self.plans_identifier}_3d_fullres"
            print(f"{default_file} preprocesses 3d_fullres differently ({', '.join(differences)}): "
                  f"{self.plans_identifier} gets its own data folder {own}; nnU-Net's {shared} is left as it is.")

    def network_arch_kwargs(self, strides, local_grid) -> dict:
        model = "LoGoNet" if self.network_class is LoGoNet else "ULKANet"
        overrides = {"local_grid": local_grid} if model == "LoGoNet" else {}
        return arch_kwargs_for_preset(self.preset, strides, model=model, **overrides)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        if len(spacing) == 2:
            # nnU-Net asks for a 2D plan unconditionally; LoGoNet has none (dropped in save_plans).
            return {"logonet": "no 2d configuration: LoGoNet is a 3D network"}
        spacing = np.asarray(spacing, dtype=float)
        median_shape = np.asarray(median_shape, dtype=float)[:3]
        num_input_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        num_classes = len(self.dataset_json["labels"])
        use_local = self.network_class is LoGoNet

        # nnU-Net's initial patch: aspect ratio from the spacing, volume of 256^3, clipped to the median shape
        tmp = 1 / spacing
        initial = tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)
        initial = np.minimum(initial, median_shape)
        if self.max_patch_voxels is not None and np.prod(initial) > self.max_patch_voxels:
            initial = initial * (self.max_patch_voxels / np.prod(initial)) ** (1 / 3)
        patch, strides, grid = consistent_topology(spacing, np.round(initial).astype(int), upper=median_shape,
                                                   use_local=use_local)

        def estimate(p, s, g, batch):
            key = f"{p}_{s}_{g}_{batch}"
            if key not in _cache:
                _cache[key] = estimate_training_memory_gb(self.network_class, self.network_arch_kwargs(s, g), p,
                                                          num_input_channels, num_classes, batch,
                                                          self.bytes_per_feature_element)
            return _cache[key]

        target = self.UNet_vram_target_GB
        while (estimate(patch, strides, grid, self.min_batch_size) > target
               or (self.max_patch_voxels is not None and np.prod(patch) > self.max_patch_voxels)):
            multiple = required_patch_multiple(strides, grid, 2)
            shrinkable = [a for a in range(3) if patch[a] - multiple[a] >= multiple[a]]
            if not shrinkable:
                smallest = estimate(patch, strides, grid, self.min_batch_size)
                smaller = (" or a smaller preset (-pl LoGoNetTinyPlanner)" if self.preset != "tiny" else
                           " (tiny is the smallest preset)")
                raise PlanningError(
                    f"-gpu_memory_target {target:g} GB is too small for {self.network_class.__name__}-{self.preset}: "
                    f"it would not fit even a patch of {patch} voxels, the smallest the network takes, which needs "
                    f"about {smallest:.2f} GB at batch size {self.min_batch_size}. Use -gpu_memory_target "
                    f"{np.ceil(smallest * 10) / 10:g} or more{smaller}; a useful patch needs far more.")
            # nnU-Net's rule: the axis largest relative to the median shape, ties to the last (its
            # argsort()[-1]); the step is the multiple the smaller patch needs, so that a valid size
            # (z 16 -> 12 where the strides allow it) is not skipped
            axis = max(shrinkable, key=lambda a: (patch[a] / median_shape[a], a))
            tentative = list(patch)
            tentative[axis] -= multiple[axis]
            _, tentative_strides, tentative_grid = consistent_topology(spacing, tentative, upper=median_shape,
                                                                       use_local=use_local)
            reduced = list(patch)
            reduced[axis] -= min(multiple[axis], required_patch_multiple(tentative_strides, tentative_grid, 2)[axis])
            shrunk = consistent_topology(spacing, reduced, upper=median_shape, use_local=use_local)
            if np.prod(shrunk[0], dtype=np.float64) >= np.prod(patch, dtype=np.float64):  # rounded back up
                shrunk = consistent_topology(spacing, tentative, upper=median_shape, use_local=use_local)
            patch, strides, grid = shrunk

        # batch size: as large as memory allows, within the planner's bounds and nnU-Net's 5% rule
        batch_size = self.min_batch_size
        while (batch_size < self.max_batch_size
               and estimate(patch, strides, grid, batch_size + 1) <= target):
            batch_size += 1
        five_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch, dtype=np.float64))
        batch_size = int(max(min(batch_size, five_percent), self.min_batch_size))
        memory = estimate(patch, strides, grid, batch_size)
        self.memory_estimates[data_identifier] = memory

        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, mask_is_used_for_norm = \
            self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        where = f", local grid {grid}" if use_local else ""
        print(f"{self.network_class.__name__}-{self.preset}: patch {patch}, strides {strides[1:]}{where}, batch "
              f"{batch_size}, estimated training memory {memory:.2f} GB of {target:g} GB")
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": batch_size,
            "patch_size": [int(p) for p in patch],
            "median_image_size_in_voxels": median_shape,
            "spacing": spacing,
            "normalization_schemes": normalization_schemes,
            "use_mask_for_norm": mask_is_used_for_norm,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": resampling_softmax_kwargs,
            "architecture": {
                "network_class_name": class_path(self.network_class),
                "arch_kwargs": deepcopy(self.network_arch_kwargs(strides, grid)),
                "_kw_requires_import": [],
            },
            "logonet": {"preset": self.preset, "estimated_memory_gb": round(float(memory), 3),
                        "gpu_memory_target_gb": float(target)},
        }


class LoGoNetLPlanner(LoGoNetPlanner):
    """LoGoNet-L (paper Table 9)."""

    preset = "L"
    default_plans_name = "LoGoNetLPlans"
    default_gpu_memory_target_in_gb = 24.0
    bytes_per_feature_element = 6.60  # ... memory --preset L


class LoGoNetTinyPlanner(LoGoNetPlanner):
    """LoGoNet-tiny for CPU runs: small widths and at most 64^3 voxels per patch."""

    preset = "tiny"
    default_plans_name = "LoGoNetTinyPlans"
    max_patch_voxels = 64 ** 3
    bytes_per_feature_element = 4.08  # ... memory --preset tiny


class ULKANetPlanner(LoGoNetPlanner):
    """ULKANet-S alone (the paper's single-path ablation), for ``ULKANetTrainer``."""

    network_class = ULKANet
    default_plans_name = "ULKANetPlans"
    bytes_per_feature_element = 5.95  # ... memory --preset S --model ULKANet


PLANNED_NETWORKS = {class_path(c): c for c in (LoGoNet, ULKANet)}
PLANNERS = {cls.__name__: cls for cls in (LoGoNetPlanner, LoGoNetLPlanner, LoGoNetTinyPlanner, ULKANetPlanner)}
