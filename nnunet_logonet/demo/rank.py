"""Rank trained models with nnU-Net's own ``find_best_configuration``.

``nnUNetv2_find_best_configuration`` on the command line takes ``-tr`` and ``-p`` as lists and
tries every trainer x plans pair, so nnU-Net's baseline (``nnUNetTrainer``/``nnUNetPlans``) next
to ours (``LoGoNetTrainer``/``LoGoNetTinyPlans``) fails on the two pairs nobody trained. The
function behind it takes an explicit list of models; this module calls it with one, in its own
process so nnU-Net reads the caller's ``nnUNet_results``::

    python -m nnunet_logonet.demo.rank 900 nnUNetTrainer:nnUNetPlans LoGoNetTrainer:LoGoNetTinyPlans -f 0

nnU-Net's own form works too: ``-tr nnUNetTrainer LoGoNetTrainer -p nnUNetPlans LoGoNetTinyPlans`` takes every
trainer x plans pair trained to the end on one of the folds at least, names the ones it leaves out, and ranks
the rest.

It writes nnU-Net's ``inference_information.json`` / ``inference_instructions.txt`` next to the
dataset's results, as the command does.
"""

from __future__ import annotations

import argparse
import sys

from nnunet_logonet.workfolders import output_file_argument, write_json_whole

__all__ = ["parse_model", "trained_pairs", "rank_models", "main"]


def parse_model(text: str, configuration: str = "3d_fullres") -> dict:
    """``TRAINER:PLANS`` -> the model dict nnU-Net's ``find_best_configuration`` expects."""
    trainer, sep, plans = text.partition(":")
    if not sep or not trainer or not plans:
        raise argparse.ArgumentTypeError(f"expected TRAINER:PLANS (e.g. LoGoNetTrainer:LoGoNetTinyPlans), got {text!r}")
    return {"plans": plans, "configuration": configuration, "trainer": trainer}


def trained_pairs(dataset: str | int, trainers: list[str], plans: list[str], configuration: str = "3d_fullres",
                  folds: tuple[int, ...] = (0,)) -> tuple[list[dict], list[str], list[str]]:
    """Every trainer x plans pair (nnU-Net's ``-tr``/``-p``) trained to the end on at least one of ``folds`` (its
    ``fold_N/validation``, which nnU-Net's selection reads), as model dicts; the ``TRAINER:PLANS`` of the pairs
    without a results folder; and of those with one but no such fold (a training refused or cut short before its
    validation left only a log there). A pair trained on some of the folds is kept: nnU-Net names the missing
    one."""
    import os

    from nnunetv2.utilities.file_path_utilities import get_output_folder

    models, missing, unfinished = [], [], []
    for trainer in trainers:
        for plan in plans:
            folder = get_output_folder(dataset, trainer, plan, configuration)
            if not os.path.isdir(folder):
                missing.append(f"{trainer}:{plan}")
            elif not any(os.path.isdir(os.path.join(folder, f"fold_{f}", "validation")) for f in folds):
                unfinished.append(f"{trainer}:{plan}")
            else:
                models.append({"plans": plan, "configuration": configuration, "trainer": trainer})
    return models, missing, unfinished


def rank_models(dataset: str | int, models: list[dict], folds: tuple[int, ...] = (0,), num_processes: int = 1,
                allow_ensembling: bool = False) -> dict:
    """nnU-Net's model selection on the cross-validation folds it was given; returns its result
    dict (``all_results``: identifier -> foreground-mean Dice, ``best_model_or_ensemble``)."""
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration

    return find_best_configuration(dataset, models, allow_ensembling=allow_ensembling, num_processes=num_processes,
                                   folds=tuple(folds), strict=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.demo.rank", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset name or id")
    parser.add_argument("models", nargs="*", help="TRAINER:PLANS, one per trained model")
    parser.add_argument("-tr", nargs="+", default=[], metavar="TRAINER",
                        help="nnU-Net's form: trainers, paired with every -p; pairs never trained are left out")
    parser.add_argument("-p", nargs="+", default=[], metavar="PLANS", help="nnU-Net's form: plans identifiers")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-f", nargs="+", type=int, default=[0], help="folds that were trained (default 0)")
    parser.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--ensembling", action="store_true", help="also try pairwise ensembles (needs --npz runs)")
    parser.add_argument("--json", type=output_file_argument, help="also write the ranking here")
    args = parser.parse_args(argv)
    if bool(args.tr) != bool(args.p):
        parser.error("-tr and -p go together (every trainer is paired with every plans identifier)")
    if not args.models and not args.tr:
        parser.error("name the models: TRAINER:PLANS ... or -tr TRAINER ... -p PLANS ...")
    try:
        models = [parse_model(m, args.c) for m in args.models]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as error:  # nnU-Net's message lists its folders; no training would help here
        print(f"error: {error}\nSet nnU-Net's folders first: eval \"$(logonet_env)\".", file=sys.stderr)
        return 1
    if args.tr:
        pairs, missing, unfinished = trained_pairs(args.dataset, args.tr, args.p, args.c, tuple(args.f))
        if missing:
            print(f"left out (no results folder): {', '.join(missing)}", file=sys.stderr)
        if unfinished:
            print(f"left out (a results folder, but no fold of -f {' '.join(map(str, args.f))} trained to the end: "
                  f"no fold_N/validation): {', '.join(unfinished)}", file=sys.stderr)
        models += [m for m in pairs if m not in models]
        if not models:
            print(f"error: none of the trainer x plans pairs has been trained ({args.c}).", file=sys.stderr)
            return 1
    try:
        result = rank_models(args.dataset, models, tuple(args.f), args.np, args.ensembling)
    except (RuntimeError, FileNotFoundError) as error:
        train = f"nnUNetv2_train DATASET {args.c} FOLD -tr TRAINER -p PLANS"
        if args.ensembling:  # an ensemble reads the validation probabilities
            train += " --npz; for a model trained without --npz, validate it again with --val --npz"
        print(f"error: {error}\nTrain every model on folds {args.f} first ({train}).", file=sys.stderr)
        return 1
    if args.json:
        write_json_whole(args.json, result, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
