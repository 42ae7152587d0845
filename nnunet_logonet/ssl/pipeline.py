"""Prepare an image-only pre-training dataset that shares a labeled dataset's plans.

Runs the documented flow (docs/ssl.md) through nnU-Net's own API, one step per command, and
skips the steps that are already done, so it can be called again after an interruption::

    logonet_prepare_unlabeled -i $nnUNet_raw/DatasetS_X/imagesTr -i EXTRA... -d T --name NAME
    nnUNetv2_extract_fingerprint -d T -np 1
    nnUNetv2_move_plans_between_datasets -s S -t T -sp PLANS -tp PLANS
    cp $nnUNet_raw/DatasetT_NAME/dataset.json $nnUNet_preprocessed/DatasetT_NAME/
    nnUNetv2_preprocess -d T -plans_name PLANS -c 3d_fullres -np 1

After it, ``nnUNetv2_train T 3d_fullres all -tr LoGoNetSSLTrainer -p PLANS`` pre-trains and
``nnUNetv2_train S 3d_fullres FOLD -tr LoGoNetTrainer -p PLANS -pretrained_weights ...`` fine-tunes.
The ``cp`` is needed because only nnU-Net's planner copies dataset.json into the preprocessed
folder, and nnUNetv2_preprocess reads it there (nnU-Net issue #2560). The moved plans keep S's patch size, spacing and CT intensity statistics, so the pre-trained
network sees data normalised exactly as in fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["prepare_pretraining_dataset", "main"]

#: keys that move_plans_between_datasets rewrites for the target; everything else must match the source
_PER_DATASET_KEYS = ("dataset_name", "image_reader_writer", "plans_name")


def _dataset_folder(root: Path, dataset_id: int) -> Path | None:
    found = sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.is_dir() else []
    return found[0] if found else None


def _environment() -> tuple[Path, Path]:
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"environment variable(s) {', '.join(missing)} not set; run: eval \"$(logonet_env)\"")
    return Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])


def _same_plans(source: dict, target: dict) -> bool:
    strip = lambda plans: {k: v for k, v in plans.items() if k not in _PER_DATASET_KEYS}  # noqa: E731
    return json.dumps(strip(source), sort_keys=True) == json.dumps(strip(target), sort_keys=True)


def _preprocessed_cases(folder: Path) -> set[str]:
    return {p.name[: -len(".pkl")] for p in folder.glob("*.pkl")} if folder.is_dir() else set()


def prepare_pretraining_dataset(
    source_id: int,
    target_id: int,
    plans_identifier: str,
    extra_image_folders: Sequence[str | os.PathLike] = (),
    *,
    name: str = "Pretraining",
    include_source_images: bool = True,
    configuration: str = "3d_fullres",
    num_processes: int = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Build (or finish) image-only dataset ``target_id`` preprocessed with ``source_id``'s plans.

    Args:
        source_id: labeled dataset whose plans (``plans_identifier``) are used; it must already be
            planned, e.g. with ``logonet_plan_and_preprocess -d SOURCE -pl LoGoNetTinyPlanner``.
        target_id: ID of the image-only dataset to create (``Dataset<target_id>_<name>``).
        plans_identifier: e.g. ``LoGoNetPlans``, ``LoGoNetTinyPlans``, ``LoGoNetLPlans``.
        extra_image_folders: folders of unlabeled NIfTI scans (e.g. the phantom's ``imagesUnlabeled``).
        include_source_images: also pre-train on the source's ``imagesTr`` (its labels are not used).
        configuration: the configuration to preprocess.
        num_processes: processes for fingerprint extraction and preprocessing.
        log: where the step messages go.

    Returns the preprocessed data folder of the target. Every step that is already complete is
    skipped; when the source plans changed since the last call, they are moved again and the
    target is preprocessed again.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess_dataset
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
        move_plans_between_datasets)

    from nnunet_logonet.ssl.unlabeled import prepare_unlabeled

    for label, value in (("source_id", source_id), ("target_id", target_id), ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}.")
    if source_id == target_id:
        raise ValueError(f"target_id must differ from source_id ({source_id}): the image-only dataset is a new one.")
    raw, preprocessed = _environment()
    source_raw = _dataset_folder(raw, source_id)
    if source_raw is None:
        raise FileNotFoundError(f"no raw dataset {source_id} (Dataset{source_id:03d}_*) in nnUNet_raw={raw}.")
    source_plans_file = preprocessed / source_raw.name / f"{plans_identifier}.json"
    if not source_plans_file.is_file():
        raise FileNotFoundError(
            f"{source_plans_file} does not exist: plan the source first, e.g. logonet_plan_and_preprocess "
            f"-d {source_id} -pl LoGoNetTinyPlanner (plans LoGoNetTinyPlans) or -pl LoGoNetPlanner (LoGoNetPlans).")
    folders = ([source_raw / "imagesTr"] if include_source_images else []) + [Path(f) for f in extra_image_folders]
    if not folders:
        raise ValueError("no image folder: pass extra_image_folders or keep include_source_images=True.")

    # 1. image-only raw dataset
    target_raw = _dataset_folder(raw, target_id)
    if target_raw is None:
        log(f"[1/4] logonet_prepare_unlabeled {' '.join(f'-i {f}' for f in folders)} -d {target_id} --name {name}")
        target_raw = prepare_unlabeled(folders, target_id, name=name, progress=False)
    else:
        meta = json.loads((target_raw / "dataset.json").read_text())
        if not meta.get("logonet_image_only"):
            raise FileExistsError(f"dataset {target_id} already exists as {target_raw} and is not an image-only "
                                  f"dataset made by logonet_prepare_unlabeled; choose another target_id.")
        log(f"[1/4] {target_raw} exists: skipped (delete it to rebuild it from other folders)")
    target_pre = preprocessed / target_raw.name

    # 2. fingerprint (needed by nnU-Net's preprocessing for the CT statistics bookkeeping)
    if (target_pre / "dataset_fingerprint.json").is_file():
        log("[2/4] fingerprint exists: skipped")
    else:
        log(f"[2/4] nnUNetv2_extract_fingerprint -d {target_id} -np {num_processes}")
        extract_fingerprints([target_id], num_processes=num_processes, check_dataset_integrity=False, clean=False)

    # 3. the source's plans, so architecture and normalisation are those of the fine-tuning
    source_plans = load_json(str(source_plans_file))
    target_plans_file = target_pre / f"{plans_identifier}.json"
    moved = False
    if target_plans_file.is_file() and _same_plans(source_plans, load_json(str(target_plans_file))):
        log(f"[3/4] {target_plans_file.name} matches the source plans: skipped")
    else:
        log(f"[3/4] nnUNetv2_move_plans_between_datasets -s {source_id} -t {target_id} -sp {plans_identifier} "
            f"-tp {plans_identifier}")
        move_plans_between_datasets(source_id, target_id, plans_identifier, plans_identifier)
        moved = True
    dataset_json = target_pre / "dataset.json"
    if not dataset_json.is_file() or dataset_json.read_bytes() != (target_raw / "dataset.json").read_bytes():
        # only nnU-Net's planner copies it, and nnUNetv2_preprocess and nnUNetv2_train read it (nnU-Net #2560)
        log(f"[3/4] cp {target_raw / 'dataset.json'} {dataset_json}")
        shutil.copyfile(target_raw / "dataset.json", dataset_json)

    # 4. preprocessing with those plans
    plans = load_json(str(target_plans_file))
    if configuration not in plans["configurations"]:
        raise ValueError(f"plans {plans_identifier} have no configuration {configuration!r} "
                         f"(available: {sorted(plans['configurations'])}).")
    data_folder = target_pre / plans["configurations"][configuration]["data_identifier"]
    cases = {p.name[: -len("_0000.nii.gz")] for p in (target_raw / "imagesTr").glob("*_0000.nii.gz")}
    if not moved and cases and cases <= _preprocessed_cases(data_folder):
        log(f"[4/4] {data_folder} holds all {len(cases)} cases: skipped")
    else:
        log(f"[4/4] nnUNetv2_preprocess -d {target_id} -plans_name {plans_identifier} -c {configuration} "
            f"-np {num_processes}")
        preprocess_dataset(target_id, plans_identifier, [configuration], [num_processes])
    return data_folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_logonet.ssl.pipeline",
        description="Create an image-only dataset preprocessed with a labeled dataset's plans, for "
                    "LoGoNetSSLTrainer (steps already done are skipped).")
    parser.add_argument("-s", type=int, required=True, help="labeled source dataset ID (already planned)")
    parser.add_argument("-t", type=int, required=True, help="ID of the image-only pre-training dataset to create")
    parser.add_argument("-p", default="LoGoNetPlans", help="plans identifier of the source (default LoGoNetPlans)")
    parser.add_argument("-i", action="append", default=[], help="extra folder of unlabeled NIfTI scans (repeatable)")
    parser.add_argument("--name", default="Pretraining", help="dataset name of the target (default Pretraining)")
    parser.add_argument("--no-source-images", action="store_true", help="do not add the source's imagesTr")
    parser.add_argument("-c", default="3d_fullres", help="configuration to preprocess (default 3d_fullres)")
    parser.add_argument("-np", type=int, default=1, help="processes (default 1)")
    args = parser.parse_args(argv)
    try:
        folder = prepare_pretraining_dataset(args.s, args.t, args.p, args.i, name=args.name,
                                             include_source_images=not args.no_source_images,
                                             configuration=args.c, num_processes=args.np)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Ready: {folder}\nPre-train: nnUNetv2_train {args.t} {args.c} all -tr LoGoNetSSLTrainer -p {args.p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
