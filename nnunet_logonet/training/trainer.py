"""nnU-Net trainers for LoGoNet and ULKANet.

The network comes from the plans (``architecture.network_class_name`` = our class), so the
trainers only add what LoGoNet needs on top of ``nnUNetTrainer``: a check that the plans really
describe our network (else a message naming the planning command), the training recipe, a
torch.compile policy, channels-last memory layout and atomic checkpoints.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_logonet.network import LoGoNet, ULKANet
from nnunet_logonet.network.arguments import positive_int
from nnunet_logonet.network.presets import class_path
from nnunet_logonet.network.shapes import (
    check_patch_size,
    deepest_map_divisors,
    deepest_map_voxels,
    required_patch_multiple,
)
from nnunet_logonet.training.checkpoints import AtomicCheckpoints
from nnunet_logonet.training.recipes import configure_recipe

PLANNER_FOR = {"LoGoNet": "LoGoNetPlanner (or LoGoNetTinyPlanner on CPU, LoGoNetLPlanner for L)",
               "ULKANet": "ULKANetPlanner"}


class PlansMismatchError(RuntimeError):
    """The plans do not describe the network this trainer trains."""


class MissingPreprocessedDataError(RuntimeError):
    """Cases of the fold to train have no (or no whole) preprocessed data."""


class ImageOnlyDatasetError(RuntimeError):
    """A supervised trainer was given a pre-training dataset, whose labels are placeholders."""


class UndeclaredLabelError(RuntimeError):
    """The preprocessed segmentations hold a value the dataset's dataset.json does not declare."""


#: PyTorch's words when a target value has no output channel (the loss's one-hot encoding, on CPU)
_ONE_HOT_OUT_OF_BOUNDS = re.compile(r"index (-?\d+) is out of bounds for dimension 1 with size (\d+)")


def dataset_id_of(plans_manager: PlansManager) -> str:
    """The ID that every command of nnU-Net and ours takes for ``-d`` (611 of Dataset611_Phantom); the plans name
    the dataset by its folder, which ``nnUNetv2_preprocess -d`` and ``logonet_plan_and_preprocess -d`` refuse."""
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    try:
        return str(convert_dataset_name_to_id(plans_manager.dataset_name))
    except (AssertionError, ValueError):  # not nnU-Net's DatasetNNN_Name
        return plans_manager.dataset_name


def first_five(items: list[str]) -> str:
    """``items`` for a message: the first five, then how many more."""
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


def planner_of(plans_manager: PlansManager) -> str:
    """The ``-pl`` of ``logonet_plan_and_preprocess`` that made these plans (nnU-Net records it), else a
    placeholder naming the plans."""
    from nnunet_logonet.planning.planners import PLANNERS

    used = plans_manager.plans.get("experiment_planner_used")
    return used if used in PLANNERS else f"<planner of {plans_manager.plans_name}>"


def check_plans_network(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                        expected: type, configuration: str = "") -> None:
    """Stop early, with the command to run, when plans were made for another network."""
    found = configuration_manager.network_arch_class_name
    if found == class_path(expected):
        return
    dataset, planner = plans_manager.dataset_name, PLANNER_FOR[expected.__name__].split(" ")[0]
    raise PlansMismatchError(
        f"Plans '{plans_manager.plans_name}' ({configuration}) of {dataset} describe {found}, not "
        f"{expected.__name__}. Plan for {expected.__name__} first:\n"
        f"    logonet_plan_and_preprocess -d {dataset_id_of(plans_manager)} -pl {planner}\n"
        f"then train with the plans it prints (e.g. -p {expected.__name__}Plans; planners: "
        f"{PLANNER_FOR[expected.__name__]}).")


def check_plans_patch(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                      configuration: str) -> None:
    """Stop before the data loaders start when the plans' patch cannot train the planned network: a size
    its strides do not divide (the first forward would fail, naming neither the plans nor the fix), or a
    deepest feature map of one voxel, which the norms cannot normalise in training."""
    kwargs = configuration_manager.network_arch_init_kwargs
    patch = configuration_manager.patch_size
    batch_size = configuration_manager.configuration.get("batch_size", 2)  # nnU-Net's own checks name a missing one
    local = {key: kwargs[key] for key in ("local_grid", "local_stages") if key in kwargs}
    where = (f"Plans '{plans_manager.plans_name}' ({configuration}) of {plans_manager.dataset_name} "
             f"($nnUNet_preprocessed/{plans_manager.dataset_name}/{plans_manager.plans_name}.json)")
    replan = "plan again with logonet_plan_and_preprocess (its planners choose valid sizes)"
    if "strides" not in kwargs:
        raise PlansMismatchError(f"{where}: the configuration's architecture has no 'strides' in its arch_kwargs; "
                                 f"{replan}.")
    try:
        multiple = required_patch_multiple(kwargs["strides"], **local)
    except ValueError as error:  # the architecture itself, not the patch
        raise PlansMismatchError(f"{where}: {error}; {replan}.") from None
    try:
        check_patch_size(patch, kwargs["strides"], **local)
    except ValueError as error:
        raise PlansMismatchError(f"{where}: {error} Set the configuration's patch_size to one of them (every axis a "
                                 f"multiple of {list(multiple)}), or {replan}.") from None
    voxels = deepest_map_voxels(patch, deepest_map_divisors(kwargs["strides"], **local))
    norm = kwargs.get("norm", "batch")
    if (voxels if norm == "instance" else batch_size * voxels) <= 1:
        raise PlansMismatchError(
            f"{where}: patch_size {list(patch)} leaves the network's deepest feature map a single voxel, so its "
            f"{norm} norms would normalise one value per channel{'' if norm == 'instance' else ' at batch size 1'}, "
            f"which {'neither training nor inference can do' if norm == 'instance' else 'training cannot do'}. "
            f"Double the patch size on one axis"
            f"{'' if norm == 'instance' else ' or raise batch_size to 2'}.")


def _is_3d(plans_manager: PlansManager, configuration: str) -> bool:
    patch_size = plans_manager.get_configuration(configuration).configuration.get("patch_size")
    return patch_size is None or len(patch_size) == 3  # no patch size: nnU-Net's own checks speak later


def check_plans_configuration(plans_manager: PlansManager, configuration: str, trainer: str = "LoGoNetTrainer") -> None:
    """Stop before nnU-Net writes anything when the plans lack ``configuration`` or it is 2D: nnU-Net's own
    lookup only raises a bare RuntimeError, and LoGoNet's planners write 3d_fullres alone."""
    available = plans_manager.available_configurations
    three_d = [c for c in available if _is_3d(plans_manager, c)]
    if configuration in three_d:
        return
    dataset, plans_name = plans_manager.dataset_name, plans_manager.plans_name
    dataset_id = dataset_id_of(plans_manager)
    two_d = configuration in available
    if configuration == "2d" or two_d:
        fix = (f"LoGoNet is a 3D network; for a 2D model use nnU-Net's own trainer and plans "
               f"(nnUNetv2_plan_and_preprocess -d {dataset_id} -c 2d, "
               f"then nnUNetv2_train {dataset_id} {configuration} FOLD).")
    else:
        fix = ("LoGoNet's planners write 3d_lowres and 3d_cascade_fullres only where nnU-Net's would (the "
               "full-resolution patch covers too little of the median image); these plans have none.")
    what = f"'{configuration}' is a 2D configuration" if two_d else f"no configuration '{configuration}'"
    use = (f"Train LoGoNet with: nnUNetv2_train {dataset_id} {three_d[0]} FOLD -tr {trainer} -p {plans_name}"
           if three_d else f"Plan for LoGoNet first: logonet_plan_and_preprocess -d {dataset_id} -pl LoGoNetPlanner")
    raise PlansMismatchError(f"Plans '{plans_name}' of {dataset}: {what} (available: "
                             f"{', '.join(available) or 'none'}). {fix}\n{use}")


class LoGoNetTrainer(AtomicCheckpoints, nnUNetTrainer):
    """Trains LoGoNet in nnU-Net's pipeline (augmentation, folds, validation, export unchanged)."""

    network_class: type = LoGoNet
    #: ``'nnunet'`` (SGD, poly, deep supervision) or ``'paper'`` (AdamW 1e-4, warm-up + cosine).
    #: Chosen by the comparison in docs/training_recipe.md.
    recipe: str = "nnunet"
    #: False for pre-training, which reads no labels; the others refuse the image-only datasets of
    #: logonet_prepare_unlabeled, whose labels are placeholder body masks.
    learns_from_labels: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        plans_manager = PlansManager({k: v for k, v in plans.items() if k != "continue_training"})
        check_plans_configuration(plans_manager, configuration, type(self).__name__)
        check_plans_network(plans_manager, plans_manager.get_configuration(configuration), self.network_class,
                            configuration)
        check_plans_patch(plans_manager, plans_manager.get_configuration(configuration), configuration)
        if self.learns_from_labels and dataset_json.get("logonet_image_only"):
            dataset = plans_manager.dataset_name
            raise ImageOnlyDatasetError(
                f"{dataset} is an image-only dataset for self-supervised pre-training ($nnUNet_preprocessed/{dataset}/"
                f"dataset.json says \"logonet_image_only\": true): its labels are placeholder body masks made by "
                f"logonet_prepare_unlabeled, so {type(self).__name__} would learn to outline the body. Train on your "
                f"labeled dataset's ID, or pre-train on this one with -tr LoGoNetSSLTrainer (LoGoNetSSLTrainerCPU on "
                f"a CPU) and fine-tune with -pretrained_weights (docs/ssl.md).")
        super().__init__(plans, configuration, fold, dataset_json, device)
        configure_recipe(self, self.recipe)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        if configuration_manager.network_arch_class_name not in (class_path(LoGoNet), class_path(ULKANet)):
            check_plans_network(plans_manager, configuration_manager, LoGoNet)
        # channels-last weights already: LoGoNet and ULKANet convert themselves when built
        return get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision)

    def initialize(self):
        self.check_preprocessed_data()
        super().initialize()
        self.check_pretrained_weights(sys.argv)

    def check_preprocessed_data(self) -> None:
        """Refuse data another set of plans wrote into this configuration's folder (same data_identifier):
        nnU-Net would train on it at a spacing these plans do not have, without a word; then a fold whose
        cases are not all there (:meth:`check_fold_cases_are_preprocessed`)."""
        from nnunet_logonet.planning.data_check import data_spacing_mismatch

        problem = data_spacing_mismatch(self.preprocessed_dataset_folder, self.plans_manager.plans,
                                        self.configuration_name)
        if problem:
            plans, planner = self.plans_manager.plans_name, planner_of(self.plans_manager)
            dataset = dataset_id_of(self.plans_manager)
            raise PlansMismatchError(
                f"{problem}. Training would use it at the wrong spacing. Give these plans their own data: for "
                f"plans of logonet_plan_and_preprocess, run it again (logonet_plan_and_preprocess -d {dataset} -pl "
                f"{planner}; it gives LoGoNet plans their own folder where nnUNetPlans preprocess "
                f"differently); for plans moved from another dataset, move them under a name of their own "
                f"(nnUNetv2_move_plans_between_datasets -s SOURCE -t {dataset} -sp {plans} -tp {plans}_fromSOURCE) "
                f"and run nnUNetv2_preprocess -d {dataset} -plans_name {plans}_fromSOURCE -c {self.configuration_name}.")
        self.check_every_case_is_preprocessed()
        self.check_fold_cases_are_preprocessed()

    def _preprocess_again(self) -> str:
        """The commands that preprocess these plans' configuration again."""
        dataset = dataset_id_of(self.plans_manager)
        return (f"logonet_plan_and_preprocess -d {dataset} -pl {planner_of(self.plans_manager)}, or nnUNetv2_preprocess "
                f"-d {dataset} -plans_name {self.plans_manager.plans_name} -c {self.configuration_name}")

    def _missing_label_copies(self, cases: list[str]) -> dict[str, str]:
        """Case -> its label copy, for the cases of ``cases`` whose label ``gt_segmentations/`` lacks: nnU-Net's
        validation, at the end of training, reads each validation case's label there and stops on a missing one."""
        from pathlib import Path

        gt_folder = Path(self.preprocessed_dataset_folder_base) / "gt_segmentations"
        copies = {case: gt_folder / f"{case}{self.dataset_json.get('file_ending', '')}" for case in cases}
        return {case: str(copy) for case, copy in copies.items() if not copy.is_file()}

    def check_every_case_is_preprocessed(self) -> None:
        """Refuse plans never preprocessed, and a preprocessing cut short (interrupted, or its folder rebuilt by
        another preprocessing of the dataset at the same time) where nnU-Net is about to split the cases: with no
        ``splits_final.json`` yet, it splits the cases the data folder holds and keeps that split, the others in
        no fold for good (fold ``all`` trains on them alone). Every case of the raw dataset (or, without it, of
        ``gt_segmentations``) must be whole there, with its label copy. Where a split exists, cases the folder
        holds that it leaves out are only logged: a split may leave cases out on purpose."""
        from pathlib import Path

        from nnunetv2.paths import nnUNet_raw

        from nnunet_logonet.planning.data_check import missing_case_files, raw_case_files
        from nnunet_logonet.workfolders import read_json_if_whole

        folder = Path(self.preprocessed_dataset_folder)
        plans, dataset = self.plans_manager.plans_name, dataset_id_of(self.plans_manager)
        if not folder.is_dir():
            raise MissingPreprocessedDataError(
                f"{folder} does not exist: plans {plans} were planned but never preprocessed for "
                f"{self.configuration_name} (logonet_plan_and_preprocess --no_pp, or nnU-Net's "
                f"nnUNetv2_plan_experiment, stop before preprocessing). Preprocess them: nnUNetv2_preprocess -d "
                f"{dataset} -plans_name {plans} -c {self.configuration_name} (or logonet_plan_and_preprocess -d "
                f"{dataset} -pl {planner_of(self.plans_manager)} without --no_pp).")
        base = Path(self.preprocessed_dataset_folder_base)
        splits_file = base / "splits_final.json"
        if isinstance(self.fold, int) and isinstance(splits := read_json_if_whole(splits_file), list):
            in_splits = {case for split in splits if isinstance(split, dict)
                         for case in (*split.get("train", []), *split.get("val", []))}
            held = {p.name[: -len(".pkl")] for p in folder.glob("*.pkl")}
            left_out = sorted(held - in_splits)
            if in_splits and left_out:
                self.print_to_log_file(
                    f"WARNING: {splits_file} puts {len(left_out)} of the {len(held)} cases in {folder} in no fold: "
                    f"{first_five(left_out)}. If that split was made while the data were incomplete (a preprocessing cut short), "
                    f"delete it before training any fold, so that nnU-Net splits every case.")
            return
        raw = Path(nnUNet_raw) / self.plans_manager.dataset_name if nnUNet_raw else None
        try:
            expected = sorted(raw_case_files(raw)) if raw is not None and (raw / "dataset.json").is_file() else None
        except Exception:  # a raw folder nnU-Net cannot read: its own checks say why where it matters
            expected = None
        source = raw
        if expected is None:
            ending, source = self.dataset_json.get("file_ending", ""), base / "gt_segmentations"
            labels = [p.name for p in source.glob(f"*{ending}")] if ending and source.is_dir() else []
            expected = sorted(name[: -len(ending)] for name in labels) or None
        if expected is None:
            return
        missing = {case: str(folder / name) for case, name in missing_case_files(folder, expected).items()}
        missing = {**self._missing_label_copies(expected), **missing}
        if not missing:
            return
        problems = [f"{case} (no {name})" for case, name in sorted(missing.items())]
        refusal = (f"nnU-Net would split the cases that are there into its folds and keep that split in {splits_file}, "
                   f"leaving the others out of every fold for good" if isinstance(self.fold, int) else
                   f"fold {self.fold} would train on the cases that are there alone")
        raise MissingPreprocessedDataError(
            f"{len(problems)} of the {len(expected)} cases of {source} are not whole in the preprocessed data: "
            f"{first_five(problems)}. Preprocessing did not finish (interrupted, or another preprocessing of this dataset ran at "
            f"the same time and rebuilt the folder); {refusal}. Preprocess again ({self._preprocess_again()}), "
            f"one preprocessing of the dataset at a time.")

    def check_fold_cases_are_preprocessed(self) -> None:
        """Refuse a fold whose cases (nnU-Net's ``splits_final.json``) are not whole in the data folder: nnU-Net's
        loader would stop on them in a background worker ("background workers are no longer alive"), the real
        error buried above. Fold ``all`` takes the cases the folder holds, so it cannot miss one."""
        from pathlib import Path

        from nnunet_logonet.planning.data_check import missing_case_files
        from nnunet_logonet.workfolders import read_json_if_whole

        splits_file = Path(self.preprocessed_dataset_folder_base) / "splits_final.json"
        splits = read_json_if_whole(splits_file) if isinstance(self.fold, int) else None
        if not isinstance(splits, list) or not 0 <= self.fold < len(splits) or not isinstance(splits[self.fold], dict):
            return  # nnU-Net makes or remakes the splits from the folder's cases
        cases = sorted({*splits[self.fold].get("train", []), *splits[self.fold].get("val", [])})
        missing = missing_case_files(self.preprocessed_dataset_folder, cases)
        missing = {**self._missing_label_copies(sorted(splits[self.fold].get("val", []))), **missing}
        if not missing and self.is_cascaded:  # the previous stage's segmentations of every case, from its validation
            previous = missing_case_files(self.folder_with_segs_from_previous_stage, cases, segmentations_only=True)
            if previous:
                stage = self.configuration_manager.previous_stage_name
                raise MissingPreprocessedDataError(
                    f"{len(previous)} of the {len(cases)} cases of fold {self.fold} have no {stage} segmentation in "
                    f"{self.folder_with_segs_from_previous_stage}: {first_five(list(previous))}. The cascade's second stage reads the "
                    f"first stage's predictions of every training case, which its validation writes fold by fold: train "
                    f"{stage} on all five folds first (nnUNetv2_train {dataset_id_of(self.plans_manager)} {stage} "
                    f"FOLD -tr {type(self).__name__} -p {self.plans_manager.plans_name}, FOLD 0..4; for fold all, "
                    f"its fold all).")
        if not missing:
            return
        listed = first_five([f"{case} (no {name})" for case, name in missing.items()])
        raise MissingPreprocessedDataError(
            f"{len(missing)} of the {len(cases)} cases of fold {self.fold} ({splits_file}) are not whole in "
            f"{self.preprocessed_dataset_folder}: {listed}. Preprocess again ({self._preprocess_again()}); if "
            f"those cases left the dataset on purpose, delete {splits_file} so that nnU-Net makes new splits.")

    def check_pretrained_weights(self, argv) -> None:
        """Before nnU-Net loads ``-pretrained_weights`` (right after ``initialize``), list every key
        and shape that does not fit, instead of nnU-Net's first-mismatch assertion.

        nnU-Net hands the file to its loader, not to the trainer, so it is read from ``nnUNetv2_train``'s
        command line (``argv``). Called from Python (``run_training(..., pretrained_weights=F)``), run
        ``nnunet_logonet.ssl.transfer.check_pretrained(network, F)`` first for the same list."""
        from nnunet_logonet.ssl.transfer import check_pretrained, pretrained_weights_from_argv

        path = pretrained_weights_from_argv(argv)
        if path:
            check_pretrained(self.network, path, network_description=(
                f"{self.__class__.__name__}, plans {self.plans_manager.plans_name}, {self.configuration_name}"))

    def train_step(self, batch: dict) -> dict:
        return self._explaining_label_errors(super().train_step, batch)

    def validation_step(self, batch: dict) -> dict:
        return self._explaining_label_errors(super().validation_step, batch)

    def _explaining_label_errors(self, step, batch: dict) -> dict:
        try:
            return step(batch)
        except RuntimeError as error:
            explained = self.explain_label_error(error)
            if explained is None:
                raise
            raise explained from error

    def explain_label_error(self, error: RuntimeError) -> UndeclaredLabelError | None:
        """nnU-Net's loss stops on a label value dataset.json lacks with PyTorch's "index 9 is out of bounds for
        dimension 1 with size 7" on a CPU, with "CUDA error: device-side assert triggered" on a GPU, naming no
        file (nnU-Net checks the values only with --verify_dataset_integrity). Read the fold's segmentations (on
        the CPU) for the cases and values, and name the raw files and the fix; None for any other error, and for
        a device-side assert where every label is declared."""
        match = _ONE_HOT_OUT_OF_BOUNDS.search(str(error))
        device_assert = "device-side assert triggered" in str(error)
        if match is None and not device_assert:
            return None
        from nnunet_logonet.planning.data_check import undeclared_label_values

        label_manager = self.label_manager
        declared = set(label_manager.all_labels)
        if label_manager.has_ignore_label:
            declared.add(label_manager.ignore_label)
        train_cases, val_cases = self.do_split()
        found = undeclared_label_values(self.preprocessed_dataset_folder, sorted({*train_cases, *val_cases}),
                                        declared, progress=self.local_rank == 0)
        dataset = self.plans_manager.dataset_name
        raw_dataset = Path(os.environ.get("nnUNet_raw") or "$nnUNet_raw") / dataset
        raw_labels = raw_dataset / "labelsTr"
        ending = self.dataset_json.get("file_ending", "")
        if found:
            listed = first_five([f"{raw_labels / (case + ending)} (values {values})" for case, values in found.items()])
            where = f"{len(found)} label file(s) hold values dataset.json does not declare: {listed}"
        elif match is not None:
            where = (f"a label value {match.group(1)} that dataset.json does not declare, in the data of fold "
                     f"{self.fold}")
        else:  # a device-side assert of something else
            return None
        names = ", ".join(f"{name}={value}" for name, value in self.dataset_json.get("labels", {}).items())
        outputs = match.group(2) if match else label_manager.num_segmentation_heads
        stop = match.group(0) if match else "CUDA error: device-side assert triggered"
        return UndeclaredLabelError(
            f"{dataset}: {where}. Its dataset.json declares {names}, so the network has {outputs} outputs and "
            f"nnU-Net's loss stopped ({stop}). Correct those label files (or declare the label in "
            f"{raw_dataset / 'dataset.json'}), then preprocess "
            f"again with nnU-Net's check on: logonet_plan_and_preprocess -d {dataset_id_of(self.plans_manager)} -pl "
            f"{planner_of(self.plans_manager)} "
            f"--clean --verify_dataset_integrity.")

    def configure_optimizers(self):
        from nnunet_logonet.training.recipes import build_optimizer_and_scheduler

        return build_optimizer_and_scheduler(self)

    def _do_i_compile(self) -> bool:
        """torch.compile is nnU-Net's default on CUDA. LoGoNet's compiled graph has not been verified
        on every CUDA/torch combination we support, so it is on only when asked for explicitly."""
        wanted = os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")
        if wanted:  # nnU-Net's own rules then: off, with its log line, on CPU, MPS and Windows
            return super()._do_i_compile()
        if self.device.type == "cuda" and not getattr(self, "_compile_reason_logged", False):
            self._compile_reason_logged = True
            self.print_to_log_file("INFO: torch.compile is off for LoGoNet by default (dynamic local-path "
                                   "stitching; not verified on this torch build). Set nnUNet_compile=t to use it.")
        return False


class LoGoNetTrainer_paperRecipe(LoGoNetTrainer):
    """The paper's fine-tuning recipe: AdamW (lr 1e-4, wd 1e-5), linear warm-up then cosine, Dice+CE,
    no deep supervision. Compared with the default in docs/training_recipe.md."""

    recipe = "paper"


class ULKANetTrainer(LoGoNetTrainer):
    """ULKANet alone: the paper's single-path ablation (plans from ULKANetPlanner)."""

    network_class = ULKANet


def with_budget(base: type, name: str, epochs: int, iterations: int | None = None,
                val_iterations: int | None = None, module: str | None = None,
                save_every: int | None = None) -> type:
    """A subclass of ``base`` that differs only in its training length (nnU-Net's _Xepochs pattern)."""
    epochs = positive_int(epochs, f"{name}: epochs")
    iterations, val_iterations, save_every = (
        None if value is None else positive_int(value, f"{name}: {what}")
        for what, value in (("iterations", iterations), ("val_iterations", val_iterations), ("save_every", save_every)))

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations
        if save_every is not None:
            self.save_every = save_every  # short CPU runs: a checkpoint every epoch, so --c loses little

    doc = f"{base.__name__} for {epochs} epochs" + (f" of {iterations} iterations" if iterations else "")
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": module or __name__})


LoGoNetTrainer_1epoch = with_budget(LoGoNetTrainer, "LoGoNetTrainer_1epoch", 1)
LoGoNetTrainer_5epochs = with_budget(LoGoNetTrainer, "LoGoNetTrainer_5epochs", 5)
LoGoNetTrainer_10epochs = with_budget(LoGoNetTrainer, "LoGoNetTrainer_10epochs", 10)
LoGoNetTrainer_50epochs = with_budget(LoGoNetTrainer, "LoGoNetTrainer_50epochs", 50)
LoGoNetTrainer_100epochs = with_budget(LoGoNetTrainer, "LoGoNetTrainer_100epochs", 100)
ULKANetTrainer_1epoch = with_budget(ULKANetTrainer, "ULKANetTrainer_1epoch", 1)
ULKANetTrainer_5epochs = with_budget(ULKANetTrainer, "ULKANetTrainer_5epochs", 5)
ULKANetTrainer_10epochs = with_budget(ULKANetTrainer, "ULKANetTrainer_10epochs", 10)
ULKANetTrainer_100epochs = with_budget(ULKANetTrainer, "ULKANetTrainer_100epochs", 100)
LoGoNetTrainer_paperRecipe_1epoch = with_budget(LoGoNetTrainer_paperRecipe, "LoGoNetTrainer_paperRecipe_1epoch", 1)
LoGoNetTrainer_paperRecipe_100epochs = with_budget(LoGoNetTrainer_paperRecipe, "LoGoNetTrainer_paperRecipe_100epochs",
                                                   100)

#: CPU budgets of the demo (logonet_demo) and of the end-to-end tests: equal for every model.
DEMO_BUDGET = {"epochs": 14, "iterations": 25, "val_iterations": 5}
DEMO_QUICK_BUDGET = {"epochs": 3, "iterations": 10, "val_iterations": 3}
LoGoNetTrainer_demo = with_budget(LoGoNetTrainer, "LoGoNetTrainer_demo", DEMO_BUDGET["epochs"],
                                  DEMO_BUDGET["iterations"], DEMO_BUDGET["val_iterations"], save_every=1)
LoGoNetTrainer_demoQuick = with_budget(LoGoNetTrainer, "LoGoNetTrainer_demoQuick", DEMO_QUICK_BUDGET["epochs"],
                                       DEMO_QUICK_BUDGET["iterations"], DEMO_QUICK_BUDGET["val_iterations"], save_every=1)
LoGoNetTrainer_paperRecipe_demo = with_budget(LoGoNetTrainer_paperRecipe, "LoGoNetTrainer_paperRecipe_demo",
                                              DEMO_BUDGET["epochs"], DEMO_BUDGET["iterations"],
                                              DEMO_BUDGET["val_iterations"], save_every=1)
