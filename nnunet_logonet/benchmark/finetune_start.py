"""Does fine-tuning start faster from pre-trained weights than from scratch? One fixed batch, both starts.

Takes the first training cases of a preprocessed dataset (the centre of each, cropped or padded to
the plans' patch), builds the network from the plans as ``LoGoNetTrainer`` does (deep supervision
off) once from a seeded random start and once more with the pre-trained file loaded by nnU-Net's own
``load_pretrained_weights`` (as ``nnUNetv2_train -pretrained_weights``), and trains each on that
batch with nnU-Net's Dice + CE loss and nnU-Net's SGD or, ``--recipe paper``, the paper's AdamW, at a
constant learning rate (``benchmark.overfit.fit_batch``). Printed per seed and
start: the loss and the foreground-mean Dice of the batch every ``--report-every`` steps, and the
first reported step at which any class's Dice exceeds 0.5 (leaving the all-background solution).
Minutes on a CPU instead of the hours a full fine-tuning comparison takes; it shows how the two
starts fit, not how they generalise (``benchmark.ssl_benefit`` asks that)::

    python -m nnunet_logonet.benchmark.finetune_start -d 900 -p LoGoNetTinySSLPlans \\
        --pretrained $nnUNet_results/Dataset901_PhantomSSL/LoGoNetSSLTrainer_demo__LoGoNetTinyPlans__3d_fullres/fold_all/checkpoint_final.pth

Voxels nnU-Net marks outside the image (label -1) count as background.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from nnunet_logonet.benchmark.overfit import center_fit, fit_batch
from nnunet_logonet.figures import figure_path
from nnunet_logonet.training.recipes import RECIPES, configure_recipe
from nnunet_logonet.workfolders import output_file_argument, write_json_whole

__all__ = ["STARTS", "TAKE_OFF_DICE", "preprocessed_dataset", "load_plans", "fixed_batch", "build_start", "compare_starts",
           "plot_starts", "main"]

STARTS = ("scratch", "pretrained")
#: a class Dice above this on the batch counts as having left the all-background solution
TAKE_OFF_DICE = 0.5


def preprocessed_dataset(dataset: str, preprocessed: str | os.PathLike | None = None) -> Path:
    """The folder of dataset ``dataset`` (id such as ``900`` or name ``Dataset900_Phantom``) in
    ``preprocessed`` (default: ``$nnUNet_preprocessed``)."""
    root = preprocessed if preprocessed is not None else os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ValueError("nnUNet_preprocessed is not set: run `eval \"$(logonet_env)\"` or pass --preprocessed DIR.")
    root = Path(root)
    if dataset.isdigit():
        matches = sorted(root.glob(f"Dataset{int(dataset):03d}_*"))
        if len(matches) != 1:
            found = ", ".join(p.name for p in matches) or "none"
            raise FileNotFoundError(f"expected one folder Dataset{int(dataset):03d}_* in {root}, found {found}: "
                                    f"plan and preprocess the dataset first (logonet_plan_and_preprocess -d {dataset}).")
        return matches[0]
    folder = root / dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: plan and preprocess the dataset first.")
    return folder


def load_plans(folder: Path, plans: str, configuration: str):
    """(PlansManager, ConfigurationManager) of ``folder/plans.json``, with a clear error if missing."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = folder / f"{plans}.json"
    if not plans_file.is_file():
        found = ", ".join(sorted(p.stem for p in folder.glob("*Plans*.json"))) or "none"
        raise FileNotFoundError(f"plans file {plans_file} does not exist (plans here: {found}); pass -p with one of "
                                f"them or plan with logonet_plan_and_preprocess -pl LoGoNetPlanner.")
    manager = PlansManager(str(plans_file))
    if configuration not in manager.available_configurations:
        raise ValueError(f"configuration {configuration!r} is not in {plans_file} "
                         f"(available: {', '.join(manager.available_configurations)}).")
    return manager, manager.get_configuration(configuration)


def fixed_batch(folder: Path, data_identifier: str, patch_size: Sequence[int], cases: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(image [cases, C, *patch], label [cases, 1, *patch] int64, identifiers): the centres of the
    first ``cases`` preprocessed cases (sorted by name), labels below 0 set to background."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data = folder / data_identifier
    if not data.is_dir():
        raise FileNotFoundError(f"preprocessed data {data} does not exist: run nnU-Net's preprocessing for these "
                                f"plans (logonet_plan_and_preprocess, or nnUNetv2_preprocess).")
    dataset = infer_dataset_class(str(data))(str(data))
    identifiers = sorted(dataset.identifiers)
    if cases < 1 or len(identifiers) < cases:
        raise ValueError(f"--cases must be between 1 and the {len(identifiers)} cases of {data}, got {cases}.")
    images, labels = [], []
    for identifier in identifiers[:cases]:
        image, seg, _, _ = dataset.load_case(identifier)
        images.append(np.stack([center_fit(np.asarray(channel, dtype=np.float32), patch_size) for channel in image]))
        labels.append(center_fit(np.maximum(np.asarray(seg[0]), 0).astype(np.int64), patch_size)[None])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels)), identifiers[:cases]


def build_start(plans_manager, configuration_manager, dataset_json: dict, start: str, seed: int,
                pretrained: str | os.PathLike | None = None) -> torch.nn.Module:
    """The network of the plans as ``LoGoNetTrainer`` builds it (deep supervision off), seeded; for
    ``start == "pretrained"`` with ``pretrained`` loaded by nnU-Net's ``load_pretrained_weights``
    after every key and shape was checked (``ssl.transfer.check_pretrained``)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnunet_logonet.ssl.transfer import check_pretrained
    from nnunet_logonet.training.trainer import LoGoNetTrainer

    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    label_manager = plans_manager.get_label_manager(dataset_json)
    torch.manual_seed(seed)
    network = LoGoNetTrainer.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads, enable_deep_supervision=False)
    if start == "pretrained":
        if pretrained is None:
            raise ValueError("the pretrained start needs a pretrained weights file")
        check_pretrained(network, pretrained, network_description=f"{plans_manager.plans_name}")
        load_pretrained_weights(network, str(pretrained), verbose=False)
    return network


def take_off_step(history: list[dict]) -> int | None:
    """The first reported step with a class Dice above TAKE_OFF_DICE, or None."""
    return next((h["step"] for h in history if max(h["dice"], default=0.0) > TAKE_OFF_DICE), None)


def compare_starts(dataset: str, plans: str, pretrained: str | os.PathLike, *, configuration: str = "3d_fullres",
                   seeds: Sequence[int] = (0, 1, 2), steps: int = 150, cases: int = 2, report_every: int = 25,
                   lr: float | None = None, recipe: str = "nnunet", preprocessed: str | os.PathLike | None = None,
                   log=print) -> dict:
    """Both starts trained on the same fixed batch for every seed; a JSON-ready report. Its ``lr`` and
    ``weight_decay`` are the ones used: ``lr`` or, when None, the recipe's initial rate."""
    settings = SimpleNamespace()
    configure_recipe(settings, recipe)  # the recipe's initial_lr and weight_decay (ValueError for an unknown one)
    lr = settings.initial_lr if lr is None else lr
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file {pretrained} does not exist.")
    folder = preprocessed_dataset(dataset, preprocessed)
    plans_manager, configuration_manager = load_plans(folder, plans, configuration)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    if plans_manager.get_label_manager(dataset_json).has_regions:
        raise ValueError(f"{folder / 'dataset.json'} defines region-based labels; this check supports plain labels.")
    # the file read and checked against the network now, not after the first scratch run
    build_start(plans_manager, configuration_manager, dataset_json, "pretrained", seeds[0] if seeds else 0, pretrained)
    x, y, identifiers = fixed_batch(folder, configuration_manager.data_identifier,
                                    configuration_manager.patch_size, cases)
    x = x.contiguous(memory_format=torch.channels_last_3d)  # LoGoNet's layout (3D only)
    log(f"fixed batch: {', '.join(identifiers)} at patch {'x'.join(map(str, configuration_manager.patch_size))}; "
        f"recipe {recipe}, lr {lr:g}, weight decay {settings.weight_decay:g}; "
        f"loss / foreground-mean Dice every {report_every} steps")
    runs = []
    for seed in seeds:
        for start in STARTS:
            began = time.perf_counter()
            network = build_start(plans_manager, configuration_manager, dataset_json, start, seed, pretrained)
            history = fit_batch(network, x, y, steps, report_every, lr, recipe, progress=f"seed {seed} {start}")
            run = {"seed": seed, "start": start, "history": history, "take_off_step": take_off_step(history),
                   "seconds": time.perf_counter() - began}
            runs.append(run)
            cells = "  ".join(f"{h['step']}: {h['loss']:+.3f} / {statistics.fmean(h['dice']):.2f}" for h in history)
            log(f"seed {seed} {start:10s} {cells}   take-off: {run['take_off_step'] or '-'}  "
                f"[{run['seconds']:.0f} s]")
    summary = {}
    for start in STARTS:
        mine = [r for r in runs if r["start"] == start]
        summary[start] = {"final_loss_median": statistics.median(r["history"][-1]["loss"] for r in mine),
                          "took_off": sum(r["take_off_step"] is not None for r in mine), "runs": len(mine)}
        log(f"{start:10s} final loss (median over seeds) {summary[start]['final_loss_median']:+.3f}; "
            f"left the all-background solution in {summary[start]['took_off']} of {len(mine)} seeds")
    return {"dataset": folder.name, "plans": plans, "configuration": configuration, "pretrained": str(pretrained),
            "cases": identifiers, "patch_size": list(configuration_manager.patch_size), "steps": steps,
            "seeds": list(seeds), "recipe": recipe, "lr": lr, "weight_decay": settings.weight_decay,
            "take_off_dice": TAKE_OFF_DICE, "runs": runs,
            "summary": summary}


def plot_starts(report: dict, path: str | os.PathLike) -> None:
    """Loss and foreground-mean Dice of the batch against the step, one colour per seed, the
    scratch start solid and the pre-trained one dashed; each start's take-off step (a class Dice
    above TAKE_OFF_DICE) circled. ``report``: :func:`compare_starts`'s, or its JSON read back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_logonet.figures import save_figure

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(12, 4.5))
    palette = plt.get_cmap("tab10").colors
    for run in report["runs"]:
        color = palette[report["seeds"].index(run["seed"]) % len(palette)]
        style = "-" if run["start"] == "scratch" else "--"
        steps = [h["step"] for h in run["history"]]
        label = f"seed {run['seed']}, {run['start']}"
        ax_loss.plot(steps, [h["loss"] for h in run["history"]], style, color=color, marker=".", label=label)
        dice = [statistics.fmean(h["dice"]) for h in run["history"]]
        ax_dice.plot(steps, dice, style, color=color, marker=".")
        if run["take_off_step"] is not None:
            ax_dice.plot(run["take_off_step"], dice[steps.index(run["take_off_step"])], "o", mfc="none", ms=10,
                         color=color)
    ax_loss.set(xlabel="step", ylabel="Dice + CE loss on the batch", title="loss")
    ax_dice.set(xlabel="step", ylabel="foreground-mean Dice of the batch", ylim=(-0.02, 1.02),
                title=f"Dice (circled: first step with a class Dice > {TAKE_OFF_DICE})")
    ax_loss.legend(fontsize="small")
    fig.suptitle(f"Fine-tuning start on one fixed batch: {report['dataset']}, {report['plans']}, recipe "
                 f"{report['recipe']}, lr {report['lr']:g} (solid: scratch, dashed: pre-trained)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.finetune_start",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True, help="fine-tuning dataset: id (900) or folder name")
    parser.add_argument("-p", "--plans", required=True, help="plans of the fine-tuning (e.g. LoGoNetPlans)")
    parser.add_argument("--pretrained", "-pretrained_weights", required=True, help="the file given to nnUNetv2_train -pretrained_weights")
    parser.add_argument("-c", "--configuration", default="3d_fullres",
                        help="configuration of the plans (default 3d_fullres)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the random start and of the new classifier; one run per start and seed "
                             "(default 0 1 2)")
    parser.add_argument("--steps", type=int, default=150, help="training steps on the batch per run (default 150)")
    parser.add_argument("--cases", type=int, default=2, help="training cases in the fixed batch (default 2)")
    parser.add_argument("--report-every", type=int, default=25,
                        help="record loss and Dice every N steps and at the last (default 25)")
    parser.add_argument("--recipe", choices=RECIPES, default="nnunet",
                        help="optimizer: nnU-Net's SGD (default) or the paper's AdamW (docs/training_recipe.md)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's initial one)")
    parser.add_argument("--preprocessed", default=None, help="nnU-Net's preprocessed folder (default: $nnUNet_preprocessed)")
    parser.add_argument("--json", type=output_file_argument, default=None, help="also write the report here")
    parser.add_argument("--chart", default=None, type=figure_path, metavar="PNG",
                        help="also draw loss and Dice against the step here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--cases", args.cases), ("--report-every", args.report_every)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr:g} (leave it out for the recipe's initial rate)")
    try:
        report = compare_starts(args.dataset, args.plans, args.pretrained, configuration=args.configuration,
                                seeds=args.seeds, steps=args.steps, cases=args.cases, report_every=args.report_every,
                                lr=args.lr, recipe=args.recipe, preprocessed=args.preprocessed)
    except (FileNotFoundError, ValueError) as error:  # missing files or plans, a checkpoint of other plans, ...
        print(f"finetune_start: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfinetune_start: interrupted; nothing was written.", file=sys.stderr)
        return 130
    if args.json:
        write_json_whole(args.json, report)
    if args.chart:
        plot_starts(report, args.chart)
        print(f"wrote {args.chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
