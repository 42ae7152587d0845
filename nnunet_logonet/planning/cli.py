"""``logonet_plan_and_preprocess``: nnU-Net's plan-and-preprocess with a LoGoNet planner.

``nnUNetv2_plan_and_preprocess -pl`` only looks for planners inside nnU-Net's own package, so this
command runs the same three steps through nnU-Net's API: fingerprint -> ``plan_experiment_dataset``
with our planner class -> ``preprocess_dataset``. Flags mean what they mean in nnU-Net.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnunet_logonet.planning.planners import PLANNERS, PlanningError

COMPARED_PLAN_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel")
COMPARED_CONFIG_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                        "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs",
                        "preprocessor_name")


def shared_data_is_ready(preprocessed_dataset: Path, plans: dict, configuration: str) -> bool:
    """True when ``configuration`` reads a data folder that the default plans already filled with
    identical preprocessing (same spacing, normalisation, resampling), so no second pass is needed."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    config = plans["configurations"].get(configuration)
    default_plans_file = preprocessed_dataset / "nnUNetPlans.json"
    if config is None or not default_plans_file.is_file():
        return False
    default = load_json(str(default_plans_file))
    default_config = default["configurations"].get(configuration)
    if default_config is None or default_config.get("data_identifier") != config.get("data_identifier"):
        return False
    if any(default.get(k) != plans.get(k) for k in COMPARED_PLAN_KEYS):
        return False
    if any(default_config.get(k) != config.get(k) for k in COMPARED_CONFIG_KEYS):
        return False
    data_folder = preprocessed_dataset / config["data_identifier"]
    gt_folder = preprocessed_dataset / "gt_segmentations"
    if not data_folder.is_dir() or not gt_folder.is_dir():
        return False
    cases = [p.name[: -len(".pkl")] for p in data_folder.glob("*.pkl")]
    n_gt = len(list(gt_folder.iterdir()))
    return len(cases) > 0 and len(cases) == n_gt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logonet_plan_and_preprocess",
        description="Fingerprint, plan (with a LoGoNet planner) and preprocess datasets with nnU-Net's API.")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset IDs, e.g. 900")
    parser.add_argument("-pl", default="LoGoNetPlanner", choices=sorted(PLANNERS),
                        help="LoGoNet planner (default LoGoNetPlanner = preset S, plans LoGoNetPlans; "
                             "LoGoNetTinyPlanner for CPU runs)")
    parser.add_argument("-c", nargs="+", default=["3d_fullres", "3d_lowres"],
                        help="configurations to preprocess (default: 3d_fullres 3d_lowres; 2d does not exist "
                             "for LoGoNet). Configurations the plans do not have are skipped")
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
    if args.overwrite_target_spacing is not None and len(args.overwrite_target_spacing) != 3:
        parser.error(f"-overwrite_target_spacing needs 3 numbers, got {args.overwrite_target_spacing}")
    if args.np is not None and len(args.np) not in (1, len(args.c)):
        parser.error(f"-np takes one number or one per configuration ({len(args.c)}), got {args.np}")
    if "2d" in args.c:
        print("LoGoNet is 3D only: configuration 2d is skipped (plan it with nnUNetv2_plan_and_preprocess).")
        args.c = [c for c in args.c if c != "2d"]

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    planner_class = PLANNERS[args.pl]
    for dataset_id in args.d:
        try:
            dataset_name = maybe_convert_to_dataset_name(dataset_id)
        except RuntimeError as e:
            parser.error(f"-d {dataset_id}: {e}")
        print(f"Fingerprint extraction for {dataset_name}...")
        extract_fingerprints([dataset_id], num_processes=args.npfp,
                             check_dataset_integrity=args.verify_dataset_integrity, clean=args.clean)
        print(f"Experiment planning with {args.pl}...")
        try:
            _, plans_identifier = plan_experiment_dataset(
                dataset_id, planner_class, args.gpu_memory_target,
                overwrite_target_spacing=args.overwrite_target_spacing,
                overwrite_plans_name=args.overwrite_plans_name)
        except PlanningError as e:
            print(f"logonet_plan_and_preprocess: error: {e}", file=sys.stderr)
            return 2
        if args.no_pp:
            continue
        preprocessed = Path(str(nnUNet_preprocessed)) / dataset_name
        plans = load_json(str(preprocessed / f"{plans_identifier}.json"))
        todo = []
        for c in args.c:
            if not args.force_pp and shared_data_is_ready(preprocessed, plans, c):
                print(f"{c}: reusing the data nnUNetPlans already preprocessed in "
                      f"{preprocessed / plans['configurations'][c]['data_identifier']} (same spacing, "
                      f"normalisation and resampling; --force_pp to redo)")
            else:
                todo.append(c)
        if todo:
            n_proc = args.np if args.np is not None else [4]
            if len(n_proc) == len(args.c) and len(todo) != len(args.c):
                n_proc = [n for n, c in zip(n_proc, args.c) if c in todo]
            print("Preprocessing...")
            preprocess_dataset(dataset_id, plans_identifier, todo, n_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
