"""``logonet_phantom``: write the built-in synthetic abdominal CT dataset.

Examples::

    logonet_phantom -d 900                      # $nnUNet_raw/Dataset900_Phantom
    logonet_phantom -d 9 --format msd -o tasks  # tasks/Task09_Phantom (for nnUNetv2_convert_MSD_dataset)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from nnunet_logonet.phantom.anatomy import MAX_SIZE, MIN_SIZE
from nnunet_logonet.phantom.writer import (FORMATS, PhantomArgumentError, conflicting_folders, dataset_folder_name,
                                           write_dataset)
from nnunet_logonet.workfolders import exit_cleanly_on_sigterm

# write_dataset's parameter -> the flag that sets it
_FLAGS = {"dataset_id": "-d/--dataset-id", "name": "--name", "num_train": "--num-train",
          "num_test": "--num-test", "num_unlabeled": "--num-unlabeled", "seed": "--seed",
          "size": "--size", "fmt": "--format"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logonet_phantom",
        description="Write a synthetic contrast-enhanced abdominal CT dataset (spleen, kidneys, "
                    "gallbladder, liver, aorta) in nnU-Net raw format or as an MSD task.")
    parser.add_argument("-d", "--dataset-id", type=int, required=True,
                        help="dataset id: 1-999 (nnunet -> DatasetXXX_<name>) or 1-99 (msd -> TaskXX_<name>)")
    parser.add_argument("--name", default="Phantom", help="dataset name (letters, digits, '-'; default Phantom)")
    parser.add_argument("--num-train", type=int, default=20, help="labelled training cases (>= 1, default 20)")
    parser.add_argument("--num-test", type=int, default=5,
                        help="held-out test cases, images + reference labels (>= 0, default 5)")
    parser.add_argument("--num-unlabeled", type=int, default=10,
                        help="image-only cases for self-supervised pretraining, written to "
                             "imagesUnlabeled/ (>= 0, default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0); same seed, same bytes")
    parser.add_argument("--size", type=int, default=64,
                        help=f"in-plane voxels per axis ({MIN_SIZE}-{MAX_SIZE}, default 64); slices "
                             f"follow from the scan length and slice spacing (about 0.3-0.6 x size)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="nnunet",
                        help="nnunet (default) or msd (Medical Segmentation Decathlon task folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("-o", "--output", default=None,
                        help="folder to write into (default: $nnUNet_raw)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = args.output or os.environ.get("nnUNet_raw")
    if not output:
        parser.error("no output folder: set nnUNet_raw (eval \"$(logonet_env)\") or pass -o/--output")
    flags = {**_FLAGS, "root": "-o/--output" if args.output else f"$nnUNet_raw={output}"}
    if Path(output).exists() and not Path(output).is_dir():
        parser.error(f"argument {flags['root']}: {output} is not a folder")
    if args.fmt == "nnunet":
        _check_id_unused_in_nnunet_folders(parser, args.dataset_id, dataset_folder_name(args.dataset_id, args.name,
                                                                                       args.fmt))
    if argv is None:  # the console script, not a call from Python
        exit_cleanly_on_sigterm()
    try:
        folder = write_dataset(output, args.dataset_id, name=args.name, num_train=args.num_train,
                               num_test=args.num_test, num_unlabeled=args.num_unlabeled,
                               seed=args.seed, size=args.size, fmt=args.fmt,
                               overwrite=args.overwrite, progress=not args.quiet)
    except PhantomArgumentError as err:
        parser.error(f"argument {flags.get(err.param, err.param)}: {err}")
    except FileExistsError as err:
        parser.error(f"{err}".replace("overwrite=True (--overwrite)", "--overwrite"))
    except KeyboardInterrupt:
        print("logonet_phantom: interrupted; no dataset was written (an existing one is unchanged)", file=sys.stderr)
        sys.exit(130)
    print(folder)
    if args.fmt == "nnunet":
        hint = (f"logonet_plan_and_preprocess -d {args.dataset_id} -pl LoGoNetTinyPlanner --verify_dataset_integrity "
                f"(LoGoNet; -pl LoGoNetPlanner for the paper's S on a GPU), and for nnU-Net's baseline "
                f"nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres")
        preprocessed_root = os.environ.get("nnUNet_preprocessed")
        preprocessed = Path(preprocessed_root or ".") / folder.name
        # nnU-Net reuses an existing fingerprint unless --clean
        if args.overwrite and preprocessed_root and preprocessed.is_dir():
            print(f"note: {preprocessed} was made from the dataset just replaced; plan again with --clean "
                  f"(its fingerprint would be reused otherwise)", file=sys.stderr)
            hint = hint.replace(" --verify_dataset_integrity", " --verify_dataset_integrity --clean") + " --clean"
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root or Path(output).resolve() != Path(raw_root).resolve():
            # nnU-Net finds a dataset ID only under $nnUNet_raw: the commands below would not find this one
            place = (f"mkdir -p \"$nnUNet_raw\" && mv {shlex.quote(str(folder))} \"$nnUNet_raw\"/ (nnU-Net finds datasets only under "
                     f"$nnUNet_raw={raw_root})" if raw_root else
                     f"export nnUNet_raw={shlex.quote(str(Path(output).resolve()))} (nnU-Net finds datasets only "
                     f"under $nnUNet_raw, which is not set; eval \"$(logonet_env)\" sets the other folders)")
            hint = f"{place}, then {hint}"
    else:
        hint = shlex.join(["nnUNetv2_convert_MSD_dataset", "-i", str(folder)])
    if args.num_train < 5:  # nnU-Net's 5-fold split stops with sklearn's "Cannot have number of splits"
        print(f"note: {args.num_train} training case(s): nnU-Net's folds 0-4 need 5 or more (its 5-fold split "
              f"fails on fewer); train fold all (nnUNetv2_train ... all), or write --num-train 5 or more",
              file=sys.stderr)
    print(f"next: {hint}", file=sys.stderr)


def _check_id_unused_in_nnunet_folders(parser: argparse.ArgumentParser, dataset_id: int, folder_name: str) -> None:
    """nnU-Net finds a dataset by its id in all three folders and stops on two names for one id."""
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(variable)
        taken = conflicting_folders(Path(root), dataset_id, folder_name) if root else []
        if taken:
            parser.error(f"argument -d/--dataset-id: {dataset_id} is already used by {', '.join(taken)} in "
                         f"{variable}={root}; nnU-Net would find two datasets of that id. Choose another id.")


if __name__ == "__main__":
    main()
