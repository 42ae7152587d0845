"""Does Masked LoGoNet pre-training help when labels are scarce? The paper's claim, small and on CPU.

    python -m nnunet_logonet.benchmark.ssl_benefit            # demo budgets
    python -m nnunet_logonet.benchmark.ssl_benefit --quick    # demoQuick budgets, phantom size 32

On the phantom with few labeled cases (default 4) and more unlabeled ones, everything through
nnU-Net's commands: plan (tiny preset) -> image-only pre-training dataset from the labeled and
unlabeled images (:func:`~nnunet_logonet.ssl.pipeline.prepare_pretraining_dataset`) ->
``LoGoNetSSLTrainer_*`` pre-training -> fine-tuning ``LoGoNetTrainer_demo*`` (as the demo's, minus
nnU-Net's final validation on the training cases) on the labeled cases from scratch and from the
SSL weights (same trainer, same budget) -> ``nnUNetv2_predict`` on
``imagesTs`` -> nnU-Net's evaluator. Prints the test Dice of both side by side and writes a JSON.

nnU-Net's training is not seeded, so one run per arm carries run-to-run noise; ``--repeats``
trains each arm several times (the pre-training once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nnunet_logonet.training.trainer import LoGoNetTrainer_demo, LoGoNetTrainer_demoQuick
from nnunet_logonet.workfolders import delete_folder, output_file_argument, read_json_if_whole, write_json_whole

__all__ = ["LoGoNetTrainer_demoNoVal", "LoGoNetTrainer_demoQuickNoVal", "StepFailed", "main", "run"]

PLANNER, PLANS, CONFIGURATION = "LoGoNetTinyPlanner", "LoGoNetTinyPlans", "3d_fullres"
BUDGETS = {True: ("LoGoNetSSLTrainer_demoQuick", "LoGoNetTrainer_demoQuickNoVal"),
           False: ("LoGoNetSSLTrainer_demo", "LoGoNetTrainer_demoNoVal")}
ARMS = ("scratch", "ssl")
#: thin module for nnUNet_extTrainer (written into the work folder): the classes live here
EXT_MODULE = "from nnunet_logonet.benchmark.ssl_benefit import LoGoNetTrainer_demoNoVal, " \
             "LoGoNetTrainer_demoQuickNoVal  # noqa: F401\n"


def _skip_final_validation(self, save_probabilities: bool = False) -> None:
    self.print_to_log_file("ssl_benefit: nnU-Net's validation on the training cases is skipped; the benchmark "
                           "evaluates the test cases (imagesTs) instead.")


# The demo budgets, without nnU-Net's final validation on the (fold 'all') training cases: it
# predicts every case with 8-fold mirroring and 8 export workers, minutes per case on a busy 2-core CPU.
LoGoNetTrainer_demoNoVal = type("LoGoNetTrainer_demoNoVal", (LoGoNetTrainer_demo,),
                                {"perform_actual_validation": _skip_final_validation, "__module__": __name__})
LoGoNetTrainer_demoQuickNoVal = type("LoGoNetTrainer_demoQuickNoVal", (LoGoNetTrainer_demoQuick,),
                                     {"perform_actual_validation": _skip_final_validation, "__module__": __name__})


#: in the work folder: marks it as this command's (``--fresh`` deletes no other folder) and holds the data settings
MARKER = ".ssl_benefit"
#: the settings the work folder's phantom, plans and trainings were made with; others need a new --base
DATA_SETTINGS = ("dataset_id", "labeled", "unlabeled", "test", "size", "seed")


class WorkFolderError(RuntimeError):
    """The work folder is not this command's, or it holds results of other settings."""


def open_work_folder(args: argparse.Namespace) -> Path:
    """``--base``, made or reused; ``--fresh`` empties it first if this command made it.

    Finished steps are reused on a rerun (phantom, plans, pre-training, fine-tunings, predictions), so a
    folder made with other data settings is refused rather than reported under the new settings.
    """
    base = Path(args.base).expanduser().resolve()
    marker = base / MARKER
    settings = {key: getattr(args, key) for key in DATA_SETTINGS}
    if base.is_dir() and not marker.is_file() and any(base.iterdir()):
        what = "--fresh would delete" if args.fresh else "--base is"
        raise WorkFolderError(f"{what} {base}, which holds files but no {MARKER} marker: ssl_benefit did not make it "
                              f"(or an older version did, without recording its settings). Choose another --base, or "
                              f"delete that folder yourself.")
    if args.fresh and base.exists():
        delete_folder(base)
    recorded = read_json_if_whole(marker) if marker.is_file() else None
    if recorded is not None:
        changed = {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}
        if changed:
            said = ", ".join(f"--{key.replace('_', '-')} {new} (was {old})" for key, (old, new) in changed.items())
            raise WorkFolderError(f"{base} holds results made with other settings: {said}. Its phantom, models and "
                                  f"predictions would be reported under the new ones. Add --fresh to start over there, "
                                  f"or give another --base.")
    write_json_whole(marker, settings)
    return base


class StepFailed(RuntimeError):
    """One of the benchmark's nnU-Net commands exited with an error; the message names its log."""


def _binary(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


class _Runner:
    """Runs one nnU-Net command with the benchmark's environment through the demo's runner (output to
    logs/<step>.log, its tail on failure); a training shows its epochs as a progress bar."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base, self.env = base, env
        (base / "logs").mkdir(parents=True, exist_ok=True)
        self.commands: list[dict] = []

    def __call__(self, step: str, argv: list[str], **env_overrides: str) -> float:
        from tqdm import tqdm

        from nnunet_logonet.demo.runner import run_command
        from nnunet_logonet.demo.settings import DemoError
        from nnunet_logonet.demo.stages import EPOCH_TIME

        argv = [_binary(argv[0]), *map(str, argv[1:])]
        print(f"  {step}: {' '.join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))}", flush=True)
        training = Path(argv[0]).name == "nnUNetv2_train"
        with tqdm(desc=f"    {step}", unit="epoch", leave=False, disable=not training) as bar:
            def on_line(line: str) -> None:
                if EPOCH_TIME.search(line):
                    bar.update()

            try:
                result = run_command(argv, env={**self.env, **env_overrides}, log=self.base / "logs" / f"{step}.log",
                                     on_line=on_line)
            except DemoError as error:
                raise StepFailed(f"{step}: {error}") from None
        self.commands.append({"step": step, "command": " ".join(argv), "seconds": round(result.wall_s, 1),
                              "cpu_seconds": round(result.cpu_s, 1), "peak_rss_mb": round(result.max_rss_mb),
                              **({"env": env_overrides} if env_overrides else {})})
        return result.wall_s


def _training(command: list, fold: Path, pretrained: Path | None = None) -> list:
    """``command`` (an ``nnUNetv2_train`` line) continued with ``--c`` where an interrupted run left a
    checkpoint in ``fold``, else started, from ``pretrained`` if given (nnU-Net refuses ``--c`` with
    ``-pretrained_weights``; the checkpoint holds the fine-tuned weights)."""
    if any((fold / name).is_file() for name in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return [*command, "--c"]
    return [*command, "-pretrained_weights", pretrained] if pretrained is not None else list(command)


def _ssl_summary(checkpoint: Path) -> dict:
    import numpy as np
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    logging, ssl = ckpt["logging"], ckpt["ssl"]
    timing = ssl["timing"]
    share = (timing["fit_seconds"] + timing["label_seconds"]) / max(timing["pretrain_seconds"], 1e-9)
    return {
        "train_loss": [round(float(v), 4) for v in logging["train_losses"]],
        "val_loss": [round(float(v), 4) for v in logging["val_losses"]],
        "train_pseudo_label_accuracy": [round(float(v), 4) for v in logging["ssl_train_accuracy"]],
        "val_pseudo_label_accuracy": [round(float(v), 4) for v in logging["mean_fg_dice"]],
        "chance_accuracy": round(float(np.mean([1 / k for k in ssl["ks"]])), 4),
        "num_clusterers": len(ssl["ks"]), "k_range": [min(ssl["ks"]), max(ssl["ks"])],
        "clustering_seconds": round(timing["fit_seconds"], 1), "labelling_seconds": round(timing["label_seconds"], 1),
        "pretraining_seconds": round(timing["pretrain_seconds"], 1), "clustering_share": round(share, 4),
    }


def run(args: argparse.Namespace) -> dict:
    from nnunet_logonet.env import environment
    from nnunet_logonet.phantom import write_dataset
    from nnunet_logonet.ssl.pipeline import prepare_pretraining_dataset

    base = open_work_folder(args)
    ssl_trainer, ft_trainer = BUDGETS[args.quick]
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    # our own data folders, whatever the shell has: never touch the user's nnU-Net data
    ext = base / "ext_trainers"
    ext.mkdir(exist_ok=True)
    (ext / "ssl_benefit_trainers.py").write_text(EXT_MODULE)
    env = {**os.environ, **environment(base, {}), "nnUNet_compile": os.environ.get("nnUNet_compile", "f")}
    env["nnUNet_extTrainer"] += os.pathsep + str(ext)
    env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" else "4")
    env.setdefault("nnUNet_def_n_proc", "1" if device == "cpu" else "4")  # export workers of nnUNetv2_predict
    raw, pre, results = (Path(env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    runner = _Runner(base, env)
    labeled_id, pretrain_id = args.dataset_id, args.dataset_id + 1
    name = "SSLBenefit"
    wall = time.perf_counter()

    dataset = raw / f"Dataset{labeled_id:03d}_{name}"
    if not dataset.is_dir():
        print(f"  phantom: {args.labeled} labeled, {args.unlabeled} unlabeled, {args.test} test cases, size {args.size}")
        write_dataset(raw, labeled_id, name=name, num_train=args.labeled, num_test=args.test,
                      num_unlabeled=args.unlabeled, size=args.size, seed=args.seed)
    if not (pre / dataset.name / f"{PLANS}.json").is_file():
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would crash it
        runner("plan", ["logonet_plan_and_preprocess", "-d", labeled_id, "-pl", PLANNER, "-c", CONFIGURATION,
                        "-np", 1, "-npfp", 1], nnUNet_n_proc_DA="1")
    info = prepare_pretraining_dataset(labeled_id, pretrain_id, PLANS, name=f"{name}Pretrain", env=env,
                                       log=base / "logs" / "pretraining_dataset.log")
    print(f"  pretraining dataset: {info['dataset']} ({info['num_cases']} cases; ran {info['ran'] or 'nothing'})")

    ssl_fold = results / info["dataset"] / f"{ssl_trainer}__{PLANS}__{CONFIGURATION}" / "fold_all"
    ssl_checkpoint = ssl_fold / "checkpoint_final.pth"
    if not ssl_checkpoint.is_file():
        runner("pretrain", _training(["nnUNetv2_train", pretrain_id, CONFIGURATION, "all", "-tr", ssl_trainer,
                                      "-p", PLANS, "-device", device], ssl_fold))
    ssl = _ssl_summary(ssl_checkpoint)

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    arms: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm in ARMS:
            arm_results = base / f"results_{arm}_{repeat}"  # the same trainer and plans: separate result roots
            arm_env = {"nnUNet_results": str(arm_results)}
            fold = arm_results / dataset.name / f"{ft_trainer}__{PLANS}__{CONFIGURATION}" / "fold_all"
            train_seconds = None
            if arm == "ssl" and any(c.stat().st_mtime < ssl_checkpoint.stat().st_mtime for c in fold.glob("*.pth")):
                print(f"  {fold} was fine-tuned from an earlier pre-training: fine-tuning again", flush=True)
                delete_folder(fold)  # the benchmark's own folder; neither reused nor continued with --c
            if not (fold / "checkpoint_final.pth").is_file():
                command = _training(["nnUNetv2_train", labeled_id, CONFIGURATION, "all", "-tr", ft_trainer, "-p",
                                     PLANS, "-device", device], fold, ssl_checkpoint if arm == "ssl" else None)
                train_seconds = runner(f"finetune_{arm}_{repeat}", command, **arm_env)
            predictions = base / f"predictions_{arm}_{repeat}"
            summary_file = predictions / "summary.json"
            if train_seconds is not None or read_json_if_whole(summary_file) is None:  # a new model: predict again
                runner(f"predict_{arm}_{repeat}", [
                    "nnUNetv2_predict", "-i", dataset / "imagesTs", "-o", predictions, "-d", labeled_id,
                    "-c", CONFIGURATION, "-f", "all", "-tr", ft_trainer, "-p", PLANS, "-device", device,
                    "--disable_tta", "-npp", 1, "-nps", 1], **arm_env)
                # nnU-Net writes the summary in place: one a kill cut short is not JSON, and is made again above
                compute_metrics_on_folder2(str(dataset / "labelsTs"), str(predictions), str(dataset / "dataset.json"),
                                           str(pre / dataset.name / f"{PLANS}.json"), output_file=str(summary_file),
                                           num_processes=1)
            summary = json.loads(summary_file.read_text())
            labels = json.loads((dataset / "dataset.json").read_text())["labels"]
            names = {str(v): k for k, v in labels.items()}
            arms[arm].append({
                "test_dice": round(summary["foreground_mean"]["Dice"], 4),
                "per_organ_dice": {names.get(k, k): round(v["Dice"], 4) for k, v in summary["mean"].items()},
                "finetune_seconds": round(train_seconds, 1) if train_seconds is not None else None,
                "checkpoint": str(fold / "checkpoint_final.pth"),
            })
    return {
        "settings": {"quick": args.quick, "labeled": args.labeled, "unlabeled": args.unlabeled, "test": args.test,
                     "size": args.size, "seed": args.seed, "device": device, "repeats": args.repeats,
                     "pretraining_trainer": ssl_trainer, "finetuning_trainer": ft_trainer, "plans": PLANS},
        "pretraining": ssl,
        "arms": arms,
        "mean_test_dice": {arm: round(sum(r["test_dice"] for r in runs) / len(runs), 4) for arm, runs in arms.items()},
        "commands": runner.commands,
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }


def plot_arms(report: dict, path: str | os.PathLike) -> None:
    """The test Dice per organ (and the mean) of every fine-tuning, from scratch and from the SSL weights,
    as the demo draws its models (``demo.report.plot_dice``)."""
    from nnunet_logonet.demo.report import plot_dice

    organs = list(report["arms"]["scratch"][0]["per_organ_dice"])
    models = {}
    for arm, runs in report["arms"].items():
        for i, run in enumerate(runs):
            label = ("from scratch" if arm == "scratch" else "from the SSL weights") + (f" #{i}" if len(runs) > 1
                                                                                        else "")
            models[label] = {"label": label, "dice": run["per_organ_dice"], "mean_dice": run["test_dice"]}
    settings = report["settings"]
    plot_dice({"organs": organs, "models": models,
               "settings": {"num_test": settings["test"], "quick": settings["quick"]}}, Path(path))


def _print(report: dict) -> None:
    s, p = report["settings"], report["pretraining"]
    print(f"\nSSL benefit on the phantom ({s['labeled']} labeled + {s['unlabeled']} unlabeled training cases, "
          f"{s['test']} test cases, size {s['size']}, {s['device']}, plans {s['plans']})")
    print(f"pre-training {s['pretraining_trainer']}: loss {p['train_loss'][0]} -> {p['train_loss'][-1]}, "
          f"pseudo-label accuracy (train) {p['train_pseudo_label_accuracy'][0]} -> "
          f"{p['train_pseudo_label_accuracy'][-1]} (chance {p['chance_accuracy']}); clustering + labelling "
          f"{100 * p['clustering_share']:.1f}% of {p['pretraining_seconds']} s")
    print(f"fine-tuning {s['finetuning_trainer']} (same budget for both), test Dice (foreground mean):")
    organs = list(report["arms"]["scratch"][0]["per_organ_dice"])
    print(f"  {'':<10}{'Dice':>8}  " + "  ".join(f"{o[:12]:>12}" for o in organs))
    for arm, runs in report["arms"].items():
        for i, r in enumerate(runs):
            label = f"{arm}" + (f" #{i}" if len(runs) > 1 else "")
            print(f"  {label:<10}{r['test_dice']:>8.4f}  " + "  ".join(f"{r['per_organ_dice'][o]:>12.4f}"
                                                                    for o in organs))
    print(f"mean: scratch {report['mean_test_dice']['scratch']:.4f}, SSL {report['mean_test_dice']['ssl']:.4f} "
          f"(one nnU-Net run per arm and repeat; training is not seeded)")


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--unlabeled``, ``--test`` and ``--size`` stay None here: their defaults follow ``--quick``."""
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.ssl_benefit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="demoQuick budgets and fewer cases")
    parser.add_argument("--base", default="ssl_benefit_work", help="work folder (default ./ssl_benefit_work)")
    parser.add_argument("--json", "--output", type=output_file_argument, dest="output", default=None,
                        help="JSON report (default <base>/ssl_benefit.json)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases (default 4)")
    parser.add_argument("--unlabeled", type=int, default=None, help="unlabeled cases (default 16; quick 8)")
    parser.add_argument("--test", type=int, default=None, help="test cases (default 8; quick 4)")
    parser.add_argument("--size", type=int, default=None, help="phantom in-plane size (default 48; quick 32)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--repeats", type=int, default=1, help="fine-tunings per arm (default 1)")
    parser.add_argument("-d", "--dataset-id", type=int, default=930, help="labeled dataset ID (default 930; +1 for "
                                                                     "the pre-training dataset)")
    parser.add_argument("-device", "--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--fresh", action="store_true",
                        help="delete the work folder first (only one this command made); needed to rerun a --base with "
                             "other data settings (--labeled, --unlabeled, --test, --size, --seed, --dataset-id)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.unlabeled = args.unlabeled if args.unlabeled is not None else (8 if args.quick else 16)
    args.test = args.test if args.test is not None else (4 if args.quick else 8)
    args.size = args.size if args.size is not None else (32 if args.quick else 48)
    for flag, value in (("--test", args.test), ("--repeats", args.repeats)):  # the phantom allows 0 test cases
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not 1 <= args.dataset_id <= 998:
        parser.error(f"--dataset-id must be in [1, 998] (the pre-training dataset takes id+1), got {args.dataset_id}")
    output = Path(args.output) if args.output else Path(args.base) / "ssl_benefit.json"
    if output.is_dir():  # found now, not after the trainings
        parser.error(f"--json {args.output} is a folder; give the report's file name, e.g. {output / 'ssl_benefit.json'}")
    from nnunet_logonet.phantom.writer import PhantomArgumentError, check_arguments
    from nnunet_logonet.ssl.pipeline import PipelineError

    try:  # the phantom's own limits (cases, size, seed), before anything is written
        check_arguments(dataset_id=args.dataset_id, name="SSLBenefit", num_train=args.labeled, num_test=args.test,
                        num_unlabeled=args.unlabeled, seed=args.seed, size=args.size, fmt="nnunet")
    except PhantomArgumentError as error:
        flag = {"num_train": "--labeled", "num_test": "--test", "num_unlabeled": "--unlabeled"}.get(
            error.param, f"--{error.param.replace('_', '-')}")
        parser.error(f"{flag} {error}")
    try:
        report = run(args)
    except (StepFailed, PipelineError, PhantomArgumentError, FileExistsError, WorkFolderError) as error:
        print(f"ssl_benefit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nssl_benefit: interrupted. Run the same command again (same --base, without --fresh): finished "
              "steps are reused, an interrupted training is continued (--c).", file=sys.stderr)
        return 130
    _print(report)  # first: the table survives a report that cannot be written
    write_json_whole(output, report)
    chart = output.with_suffix(".png")
    plot_arms(report, chart)
    print(f"\nreport: {output}\nchart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
