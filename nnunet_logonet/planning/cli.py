"""``logonet_plan_and_preprocess``: nnU-Net's plan-and-preprocess with a LoGoNet planner.

``nnUNetv2_plan_and_preprocess -pl`` only looks for planners inside nnU-Net's own package, so this
command runs the same three steps through nnU-Net's API: fingerprint -> ``plan_experiment_dataset``
with our planner class -> ``preprocess_dataset``. Flags mean what they mean in nnU-Net.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from nnunet_logonet.planning.data_check import (data_spacing_mismatch, missing_case_files, raw_case_files,
                                                repair_label_copies)
from nnunet_logonet.planning.planners import (DEFAULT_DATA_IDENTIFIER_PLANS, PLANNERS, PlanningError,
                                              preprocessing_differences)
from nnunet_logonet.workfolders import LockHeldError, exclusive_lock, last_written, read_json_if_whole



#: configurations nnU-Net can plan; any other name given to ``-c`` is a typo
KNOWN_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


class DatasetError(RuntimeError):
    """The raw dataset cannot be planned; the message names the file, the value and the fix."""


def shared_data_is_ready(preprocessed_dataset: Path, plans: dict, configuration: str,
                         raw_cases: dict[str, list[Path]] | None = None) -> bool:
    """True when ``configuration`` reads a data folder that the default plans already filled with
    identical preprocessing (same spacing, normalisation, resampling), so no second pass is needed.

    With ``raw_cases`` (``raw_case_files``) the folder must also hold exactly those cases, none of
    them preprocessed before its raw files were last written: a raw dataset changed since (cases
    added or removed, a label edited) is preprocessed again, as nnU-Net's own command would.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    config = plans["configurations"].get(configuration)
    default_plans_file = preprocessed_dataset / "nnUNetPlans.json"
    if config is None or not default_plans_file.is_file():
        return False
    default = load_json(str(default_plans_file))
    default_config = default["configurations"].get(configuration)
    if default_config is None or default_config.get("data_identifier") != config.get("data_identifier"):
        return False
    if preprocessing_differences(plans, config, default, default_config):
        return False
    data_folder = preprocessed_dataset / config["data_identifier"]
    gt_folder = preprocessed_dataset / "gt_segmentations"
    if not data_folder.is_dir() or not gt_folder.is_dir():
        return False
    cases = [p.name[: -len(".pkl")] for p in data_folder.glob("*.pkl")]
    # label copies only: a copy killed before its rename leaves a ``<case><ending>.tmp<pid>`` file beside them
    ending = (read_json_if_whole(preprocessed_dataset / "dataset.json") or {}).get("file_ending")
    n_gt = sum(1 for p in gt_folder.iterdir() if p.is_file() and (
        p.name.endswith(ending) if ending else not (p.name.startswith(".") or re.search(r"\.tmp\d+$", p.name))))
    if not cases or len(cases) != n_gt:
        return False
    if missing_case_files(data_folder, cases):  # a .pkl without its arrays: a run cut short, a file deleted
        return False
    if data_spacing_mismatch(data_folder, plans, configuration):  # written by other plans of the same folder name
        return False
    if raw_cases is None:
        return True
    if set(cases) != set(raw_cases):
        return False
    return all(max(map(last_written, files)) <= last_written(data_folder / f"{case}.pkl")
               for case, files in raw_cases.items())


def check_dataset_json(raw_dataset: Path) -> dict:
    """Read ``dataset.json`` and check what nnU-Net's planning reads from it first, so that a
    mistake stops with the file, the value and the fix instead of a traceback from deep inside
    nnU-Net (``--verify_dataset_integrity`` then checks the images themselves)."""
    import json

    path = raw_dataset / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist. Every nnU-Net raw dataset needs one (imagesTr, labelsTr "
                           f"and dataset.json): check that nnUNet_raw points to the right folder.")
    try:
        dataset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); fix the file.") from None
    fixes = {
        "channel_names": 'e.g. "channel_names": {"0": "CT"}',
        "labels": 'e.g. "labels": {"background": 0, "liver": 1}',
        "numTraining": "the number of training cases",
        "file_ending": 'e.g. "file_ending": ".nii.gz"',
    }
    for key, fix in fixes.items():
        if key not in dataset and not (key == "channel_names" and "modality" in dataset):
            raise DatasetError(f"{path} has no '{key}' entry ({fix}); see nnU-Net's documentation "
                               f"documentation/dataset_format.md.")
    if dataset["labels"].get("background") != 0:
        raise DatasetError(f"{path}: labels must map 'background' to 0, got "
                           f"{dataset['labels'].get('background')!r} (nnU-Net requires a background label 0).")
    if "dataset" not in dataset:
        ending = dataset["file_ending"]
        images = raw_dataset / "imagesTr"
        if not images.is_dir() or not any(f.name.endswith(ending) for f in images.iterdir()):
            found = sorted({"".join(f.suffixes) for f in images.iterdir()} if images.is_dir() else [])
            raise DatasetError(f"{images}: no file ends with file_ending {ending!r} of {path}"
                               + (f" (found: {', '.join(found)}); set file_ending to the files' ending."
                                  if found else "; put the training images there (CASE_0000" + ending + ")."))
    return dataset


def dataset_id_argument(text: str) -> int:
    """``-d``: an ID (``611``) or, as nnU-Net's messages and folders name it, ``Dataset611_Phantom``."""
    match = re.fullmatch(r"(?:Dataset)?(\d{1,3})(?:_[A-Za-z0-9_-]+)?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a dataset ID such as 611 (or its folder name, Dataset611_Name), "
                                         f"got {text!r}")
    return int(match.group(1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logonet_plan_and_preprocess",
        description="Fingerprint, plan (with a LoGoNet planner) and preprocess datasets with nnU-Net's API.")
    parser.add_argument("-d", nargs="+", type=dataset_id_argument, required=True,
                        help="dataset IDs, e.g. 900 (or folder names, Dataset900_Phantom)")
    parser.add_argument("-pl", default="LoGoNetPlanner", choices=sorted(PLANNERS),
                        help="LoGoNet planner (default LoGoNetPlanner = preset S, plans LoGoNetPlans; "
                             "LoGoNetTinyPlanner for CPU runs)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres", "3d_lowres"],
                        help="configurations to preprocess (default: 3d_fullres 3d_lowres). 2d is refused (LoGoNet "
                             "is 3D only); 3d_lowres where the plans have none (nnU-Net plans it only for large "
                             "images) is skipped, or an error when asked for alone")
    parser.add_argument("-np", type=int, nargs="+", default=None,
                        help="processes for preprocessing, one number or one per configuration (default 4)")
    parser.add_argument("-npfp", type=int, default=4, help="processes for fingerprint extraction (default 4)")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="GPU memory target in GB (default: the planner's, 8 for S, 24 for L)")
    parser.add_argument("-overwrite_plans_name", default=None,
                        help="custom plans identifier (default: the planner's, e.g. LoGoNetPlans)")
    parser.add_argument("-overwrite_target_spacing", default=None, nargs="+", type=float,
                        help="custom 3d_fullres target spacing (3 floats); gives the plans their own data folder")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="check the raw dataset with nnU-Net's verifier first (recommended once)")
    parser.add_argument("--clean", action="store_true", help="re-extract an existing fingerprint")
    parser.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    parser.add_argument("--force_pp", action="store_true",
                        help="preprocess even when the data shared with nnUNetPlans is already there")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
    if missing:
        parser.error(f"environment variable(s) {', '.join(missing)} not set; run: eval \"$(logonet_env)\"")
    spacing = args.overwrite_target_spacing
    if spacing is not None and (len(spacing) != 3 or not all(0 < v < float("inf") for v in spacing)):
        parser.error(f"-overwrite_target_spacing needs 3 positive numbers (mm, e.g. 1.5 0.8 0.8), got {spacing}")
    if args.np is not None and len(args.np) not in (1, len(args.c)):
        parser.error(f"-np takes one number or one per configuration ({len(args.c)}), got {args.np}")
    for flag, values in (("-np", args.np or []), ("-npfp", [args.npfp])):
        if any(n < 1 for n in values):
            parser.error(f"{flag} must be at least 1 (processes), got {' '.join(map(str, values))}")
    unknown = [c for c in args.c if c not in KNOWN_CONFIGURATIONS]
    if unknown:
        parser.error(f"-c {' '.join(unknown)}: not a configuration nnU-Net plans; choose from "
                     f"{', '.join(c for c in KNOWN_CONFIGURATIONS if c != '2d')}")
    if "2d" in args.c:
        if set(args.c) == {"2d"}:  # nothing would be preprocessed: exit 0 would look like success
            parser.error("-c 2d: LoGoNet is 3D only, so these plans have no 2d configuration; use -c 3d_fullres "
                         "(plan 2d with nnUNetv2_plan_and_preprocess -c 2d)")
        print("LoGoNet is 3D only: configuration 2d is skipped (plan it with nnUNetv2_plan_and_preprocess).")
        args.c = [c for c in args.c if c != "2d"]
    if args.overwrite_plans_name is not None and (not args.overwrite_plans_name
                                                  or any(ch in args.overwrite_plans_name for ch in "/\\")):
        parser.error(f"-overwrite_plans_name {args.overwrite_plans_name!r}: a plans identifier is a file name "
                     f"(e.g. LoGoNetPlans_custom), without '/'")
    if args.overwrite_plans_name == DEFAULT_DATA_IDENTIFIER_PLANS:
        parser.error(f"-overwrite_plans_name {DEFAULT_DATA_IDENTIFIER_PLANS}: that is nnU-Net's default plans name, "
                     f"the baseline's (nnUNetv2_plan_and_preprocess writes it, -tr nnUNetTrainer reads it); LoGoNet's "
                     f"plans there would replace it. Choose another name, e.g. LoGoNetPlans_custom")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        folder = Path(os.environ[variable])
        if folder.exists() and not folder.is_dir():
            parser.error(f"{variable}={folder} is a file, not a folder; point it to a folder "
                         f"(eval \"$(logonet_env)\" sets all three)")
    planner_class = PLANNERS[args.pl]
    try:
        for dataset_id in args.d:
            status = _plan_and_preprocess(parser, args, dataset_id, planner_class)
            if status:
                return status
    except KeyboardInterrupt:
        print("\nlogonet_plan_and_preprocess: interrupted. Run the same command again: a fingerprint or plans "
              "file cut short is made again, a configuration whose preprocessing did not finish is redone, and a "
              "label copy in gt_segmentations cut short is copied again.", file=sys.stderr)
        return 130
    return 0


def _plan_and_preprocess(parser: argparse.ArgumentParser, args: argparse.Namespace, dataset_id: int,
                         planner_class: type) -> int:
    """One dataset, under a lock: two runs at once (two planners, say) would each rebuild the data folder they
    share while the other reads or writes it, and both fail half-way."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_id)
    except RuntimeError as e:
        parser.error(f"-d {dataset_id}: {e}")
    lock = Path(str(nnUNet_preprocessed)) / f".{dataset_name}.logonet_plan_and_preprocess.lock"
    try:
        with exclusive_lock(lock):
            return _plan_and_preprocess_alone(args, dataset_id, dataset_name, planner_class)
    except LockHeldError as error:
        print(f"logonet_plan_and_preprocess: error: another logonet_plan_and_preprocess ({error.holder}) is planning "
              f"or preprocessing {dataset_name} ({lock}); two at once rebuild the same data folder under each other. "
              f"Wait for it to finish, then run this command again.", file=sys.stderr)
        return 2


def _plan_and_preprocess_alone(args: argparse.Namespace, dataset_id: int, dataset_name: str,
                               planner_class: type) -> int:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    raw = Path(str(nnUNet_raw)) / dataset_name

    def failed(step: str, e: BaseException) -> int:
        check = ("the message above is nnU-Net's check: fix what it names (dataset.json or the file) and run "
                 "again" if args.verify_dataset_integrity else
                 "run again with --verify_dataset_integrity, whose checks name the faulty file and value")
        concurrent = ("" if step != "preprocessing" else
                      f" Or another preprocessing of {dataset_name} ran at the same time (nnU-Net's "
                      f"nnUNetv2_plan_and_preprocess or nnUNetv2_preprocess rebuild the data folder this run shares "
                      f"with nnUNetPlans): then run this command again once it has finished.")
        print(f"logonet_plan_and_preprocess: error: {step} of {dataset_name} failed: {type(e).__name__}: {e}\n"
              f"Check the raw dataset in {raw}: {check}.{concurrent}", file=sys.stderr)
        return 2

    try:
        check_dataset_json(raw)
    except DatasetError as e:
        print(f"logonet_plan_and_preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"Fingerprint extraction for {dataset_name}...")
    clean = args.clean
    fingerprint_file = Path(str(nnUNet_preprocessed)) / dataset_name / "dataset_fingerprint.json"
    if not clean and fingerprint_file.is_file() and read_json_if_whole(fingerprint_file) is None:
        print(f"{fingerprint_file} is not valid JSON (cut short by an interrupted run?): extracting it again.")
        clean = True
    try:
        extract_fingerprints([dataset_id], num_processes=args.npfp,
                             check_dataset_integrity=args.verify_dataset_integrity, clean=clean)
    except Exception as e:  # nnU-Net's checks and readers raise bare errors on bad data
        return failed("fingerprint extraction" + (" (nnU-Net's dataset check)" if args.verify_dataset_integrity
                                                   else ""), e)
    print(f"Experiment planning with {args.pl}...")
    try:
        _, plans_identifier = plan_experiment_dataset(
            dataset_id, planner_class, args.gpu_memory_target,
            overwrite_target_spacing=args.overwrite_target_spacing,
            overwrite_plans_name=args.overwrite_plans_name)
    except PlanningError as e:
        print(f"logonet_plan_and_preprocess: error: {e}", file=sys.stderr)
        return 2
    preprocessed = Path(str(nnUNet_preprocessed)) / dataset_name
    plans = load_json(str(preprocessed / f"{plans_identifier}.json"))
    if args.no_pp:
        planned = [c for c in args.c if c in plans["configurations"]] or list(plans["configurations"])
        print(f"Planned {plans_identifier}; not preprocessed (--no_pp). Before training, preprocess: "
              f"nnUNetv2_preprocess -d {dataset_id} -plans_name {plans_identifier} -c {' '.join(planned)} (or this "
              f"command without --no_pp).")
        return 0
    missing = [c for c in args.c if c != "2d" and c not in plans["configurations"]]
    for c in missing:
        print(f"{c}: not in {plans_identifier} (nnU-Net plans 3d_lowres and 3d_cascade_fullres only where the "
              f"full-resolution patch covers too little of the median image); skipped. Planned: "
              f"{', '.join(plans['configurations'])}.")
    requested = [c for c in args.c if c not in missing]
    if missing and not requested:
        print(f"logonet_plan_and_preprocess: error: none of -c {' '.join(args.c)} is in {plans_identifier}; "
              f"nothing was preprocessed. Use -c {' '.join(plans['configurations'])}.", file=sys.stderr)
        return 2
    raw_cases = raw_case_files(raw)
    todo = []
    for c in requested:
        if not args.force_pp and shared_data_is_ready(preprocessed, plans, c, raw_cases):
            print(f"{c}: reusing the data already preprocessed in "
                  f"{preprocessed / plans['configurations'][c]['data_identifier']}, shared with nnUNetPlans (same "
                  f"cases, none changed since; same spacing, normalisation and resampling; --force_pp to redo)")
        else:
            todo.append(c)
    if todo:
        n_proc = args.np if args.np is not None else [4]
        if len(n_proc) == len(args.c) and len(todo) != len(args.c):
            n_proc = [n for n, c in zip(n_proc, args.c) if c in todo]
        for c in todo:
            folder = preprocessed / plans["configurations"][c]["data_identifier"]
            if folder.name.startswith(f"{DEFAULT_DATA_IDENTIFIER_PLANS}_") and any(folder.glob("*.pkl")):
                print(f"{c}: {folder} is nnUNetPlans' data folder too (same preprocessing) and is made again in place: "
                      f"nnU-Net deletes it first, so if this run is interrupted, rerun it before training either "
                      f"network.")
        print("Preprocessing...")
        try:
            preprocess_dataset(dataset_id, plans_identifier, todo, n_proc)
        except Exception as e:  # nnU-Net's readers raise bare errors on bad data
            return failed("preprocessing", e)
    file_ending = load_json(str(raw / "dataset.json"))["file_ending"]
    repaired = repair_label_copies(preprocessed, {case: files[-1] for case, files in raw_cases.items()}, file_ending)
    if repaired:
        print(f"gt_segmentations: copied {len(repaired)} label(s) again that differed from the raw labels "
              f"(cut short by an interrupted run?): {', '.join(repaired[:10])}{' ...' if len(repaired) > 10 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
