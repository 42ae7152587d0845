"""The demo's stages, each one nnU-Net command (or our API where nnU-Net has none).

phantom -> nnU-Net plans -> LoGoNet plans -> pretraining dataset -> SSL pretraining -> train
(nnU-Net, LoGoNet, LoGoNet from the SSL weights) -> predict imagesTs -> evaluate -> network costs.

Every stage returns what it measured; :mod:`nnunet_logonet.demo.state` records it, and a stage
whose record and outputs exist is not run again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nnunet_logonet.demo.runner import run_command
from nnunet_logonet.demo.settings import DATASET_NAME, FOLD, SSL_DATASET_NAME, DemoError, DemoSettings, ModelRun
from nnunet_logonet.demo.state import MARKER, DemoState, is_marked, mark
from nnunet_logonet.workfolders import write_json_whole

__all__ = ["PREDICTIONS", "DemoContext", "Stage", "build_stages", "checkpoint_folder", "epoch_seconds",
           "seconds_per_case", "seconds_per_iteration"]

CONFIGURATION = "3d_fullres"
#: ``<base>/predictions``: the test-set predictions of every model, one folder each
PREDICTIONS = "predictions"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")
# an epoch with no masked slice in its training or validation batches says "n/a (...)" (read as NaN)
_ACCURACY = r"([0-9.]+|nan|n/a \([^)]*\))"
SSL_ACCURACY = re.compile(rf"pseudo-label accuracy: train {_ACCURACY}, val {_ACCURACY} \(chance ([0-9.]+)\)")


@dataclass
class DemoContext:
    """Everything a stage needs: the settings, the work and output folders, nnU-Net's environment
    and the stage record."""

    settings: DemoSettings
    base: Path
    out: Path
    env: dict[str, str]
    state: DemoState
    #: set by the driver: the current stage was started before, was interrupted, and nothing it
    #: depends on has changed since, so a half-finished training may be continued (--c)
    resuming: bool = False

    @property
    def raw(self) -> Path:
        return Path(self.env["nnUNet_raw"])

    @property
    def preprocessed(self) -> Path:
        return Path(self.env["nnUNet_preprocessed"])

    @property
    def results(self) -> Path:
        return Path(self.env["nnUNet_results"])

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.settings.dataset

    @property
    def n_proc(self) -> int:
        """Worker processes for nnU-Net's preprocessing, export and evaluation."""
        return max(1, min(4, os.cpu_count() or 1))

    def log(self, stage: str) -> Path:
        return self.out / "logs" / f"{stage}.log"

    def predictions(self, model: ModelRun) -> Path:
        return self.base / PREDICTIONS / model.key

    def plans_file(self, plans: str, dataset: str | None = None) -> Path:
        return self.preprocessed / (dataset or self.settings.dataset) / f"{plans}.json"


@dataclass(frozen=True)
class Stage:
    """One step of the demo: ``run`` returns its figures for the record; ``outputs`` must still exist
    for a finished stage to be reused."""

    name: str
    title: str
    run: Callable[[DemoContext], dict]
    outputs: Callable[[DemoContext], list[Path]]
    #: stages whose re-run makes this one stale
    needs: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ helpers
def checkpoint_folder(results: Path, dataset: str, trainer: str, plans: str, fold: str) -> Path:
    """nnU-Net's folder of one training: ``<results>/<dataset>/<trainer>__<plans>__3d_fullres/fold_<fold>``."""
    return results / dataset / f"{trainer}__{plans}__{CONFIGURATION}" / f"fold_{fold}"


def epoch_seconds(folder: Path) -> list[list[float]]:
    """Epoch times nnU-Net logged, one list per ``training_log_*.txt`` (one per run of the fold)."""
    return [[float(m.group(1)) for m in EPOCH_TIME.finditer(log.read_text(errors="replace"))]
            for log in sorted(folder.glob("training_log_*.txt"))]


def seconds_per_iteration(runs: list[list[float]], iterations: int) -> float | None:
    """Median epoch time / iterations per epoch, leaving out each run's first epoch (it also pays for
    starting nnU-Net's data-augmentation workers; a run killed after one epoch logged only that), unless
    no run logged more than one."""
    steady = [t for times in runs for t in times[1:]] or [t for times in runs for t in times]
    return statistics.median(steady) / iterations if steady else None


def seconds_per_case(events: list[tuple[float, str]]) -> dict[str, float]:
    """Per case, the time from nnUNetv2_predict's 'Predicting X:' to its 'done with X' line: the
    sliding-window prediction alone (preprocessing and export run in background workers)."""
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for t, line in events:
        if line.startswith("Predicting "):
            started[line[len("Predicting "):].rstrip(":").strip()] = t
        elif line.startswith("done with "):
            case = line[len("done with "):].strip()
            if case in started:
                seconds[case.removesuffix(".nii.gz")] = t - started[case]
    return seconds


def _costs(result) -> dict:
    return {"wall_s": round(result.wall_s, 2), "cpu_s": round(result.cpu_s, 2),
            "max_rss_mb": round(result.max_rss_mb, 1), "log": result.log}


def _planning_env(ctx: DemoContext) -> dict[str, str]:
    """nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would crash it."""
    env = dict(ctx.env)
    if env.get("nnUNet_n_proc_DA", "").strip() in ("0", ""):
        env["nnUNet_n_proc_DA"] = "1"
    return env


def _test_cases(ctx: DemoContext) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (ctx.raw_dataset / "imagesTs").glob("*_0000.nii.gz"))


def _creating(ctx: DemoContext, stage: str, folder: Path) -> None:
    """Record that ``stage`` is making ``folder`` (absent until now), before it does: a run killed
    before it could leave its marker there may still use it (cli.check_own_folders)."""
    ctx.state.record(stage, status="started", creates=str(folder))


# ---------------------------------------------------------------------------------- stages
def _phantom_json_matches(folder: Path, s: DemoSettings) -> bool:
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    phantom = meta.get("phantom", {})
    return (phantom.get("seed"), phantom.get("size"), meta.get("numTraining"), meta.get("numTest"),
            meta.get("numUnlabeled")) == (s.seed, s.size, s.num_train, s.num_test, s.num_unlabeled)


def run_phantom(ctx: DemoContext) -> dict:
    """Write the phantom dataset to nnUNet_raw, or reuse one made with the same settings (any other
    folder of that name is a :class:`DemoError`)."""
    from nnunet_logonet.phantom import write_dataset

    s = ctx.settings
    if ctx.raw_dataset.exists():
        if _phantom_json_matches(ctx.raw_dataset, s):
            return {"reused_existing": str(ctx.raw_dataset)}
        raise DemoError(f"{ctx.raw_dataset} exists but was not made with these settings (seed {s.seed}, size "
                        f"{s.size}, {s.num_train}/{s.num_test}/{s.num_unlabeled} cases). Choose another "
                        f"--dataset-id to keep it, or re-run with --fresh to replace it (--fresh deletes this "
                        f"demo's datasets in nnUNet_raw, nnUNet_preprocessed and nnUNet_results, also those "
                        f"another --base made there).")
    _creating(ctx, "phantom", ctx.raw_dataset)
    folder = write_dataset(ctx.raw, s.dataset_id, name=DATASET_NAME, num_train=s.num_train, num_test=s.num_test,
                           num_unlabeled=s.num_unlabeled, seed=s.seed, size=s.size)
    mark(folder)
    return {"folder": str(folder)}


def run_plan_nnunet(ctx: DemoContext) -> dict:
    """nnUNetv2_plan_and_preprocess with nnU-Net's default planner (nnUNetPlans), for the baseline."""
    n = str(ctx.n_proc)
    result = run_command(["nnUNetv2_plan_and_preprocess", "-d", ctx.settings.dataset_id, "-c", CONFIGURATION,
                          "-np", n, "-npfp", n], env=_planning_env(ctx), log=ctx.log("plan_nnunet"))
    return _costs(result)


def run_plan_logonet(ctx: DemoContext) -> dict:
    """logonet_plan_and_preprocess with the preset's LoGoNet planner; records the patch size it planned."""
    n = str(ctx.n_proc)
    s = ctx.settings
    result = run_command(["logonet_plan_and_preprocess", "-d", s.dataset_id, "-pl", s.planner, "-c", CONFIGURATION,
                          "-np", n, "-npfp", n], env=_planning_env(ctx), log=ctx.log("plan_logonet"))
    plans = json.loads(ctx.plans_file(s.plans).read_text())
    return {**_costs(result), "patch_size": plans["configurations"][CONFIGURATION]["patch_size"]}


def run_ssl_dataset(ctx: DemoContext) -> dict:
    """Image-only dataset ID+1 from the phantom's imagesTr + imagesUnlabeled, preprocessed with the
    LoGoNet plans (logonet_prepare_unlabeled, nnUNetv2_extract_fingerprint,
    nnUNetv2_move_plans_between_datasets, nnUNetv2_preprocess)."""
    from nnunet_logonet.ssl.pipeline import PipelineError, prepare_pretraining_dataset

    s = ctx.settings
    log = ctx.log("ssl_dataset")
    if not (ctx.raw / s.ssl_dataset).exists():
        _creating(ctx, "ssl_dataset", ctx.raw / s.ssl_dataset)
    try:
        info = prepare_pretraining_dataset(s.dataset_id, s.ssl_dataset_id, s.plans, name=SSL_DATASET_NAME,
                                           num_processes=ctx.n_proc, env=_planning_env(ctx), log=log)
    except (PipelineError, ValueError) as error:
        raise DemoError(f"SSL pretraining dataset: {error} (log {log})") from error
    finally:  # its first step makes the raw folder; mark it even when a later step fails or is interrupted
        if (ctx.raw / s.ssl_dataset).is_dir():
            mark(ctx.raw / s.ssl_dataset)
    return {**info, "log": str(log)}


def _train(ctx: DemoContext, stage: str, *, dataset_id: int, dataset: str, fold: str, trainer: str, plans: str,
           pretrained: Path | None = None) -> dict:
    s = ctx.settings
    folder = checkpoint_folder(ctx.results, dataset, trainer, plans, fold)
    command = ["nnUNetv2_train", dataset_id, CONFIGURATION, fold, "-tr", trainer, "-p", plans, "-device", s.device]
    resumed = ctx.resuming and any((folder / c).is_file() for c in CHECKPOINTS)
    if not resumed and folder.exists():
        if not is_marked(ctx.results / dataset):  # run_demo marks it; never delete a training the demo did not make
            raise DemoError(f"{folder} holds a training the demo did not make ({ctx.results / dataset} has no "
                            f"{MARKER} file); move it away or choose another --dataset-id.")
        shutil.rmtree(folder)  # checkpoints of a run with other inputs must not be continued
    if resumed:
        command.append("--c")  # nnU-Net cannot combine --c with -pretrained_weights; the checkpoint has them
    elif pretrained is not None:
        command += ["-pretrained_weights", pretrained]
    with tqdm(total=s.budget["epochs"], desc=f"  {trainer}", unit="epoch", leave=False, position=1) as bar:
        def on_line(line: str) -> None:
            if EPOCH_TIME.search(line):
                bar.update()

        result = run_command(command, env=ctx.env, log=ctx.log(stage), on_line=on_line)
    times = epoch_seconds(folder)
    info = {**_costs(result), "command": result.command, "resumed": resumed, "folder": str(folder),
            "epoch_seconds": times, "iterations_per_epoch": s.budget["iterations"],
            "seconds_per_iteration": seconds_per_iteration(times, s.budget["iterations"])}
    accuracy = [m for log in sorted(folder.glob("training_log_*.txt"))
                for m in SSL_ACCURACY.finditer(log.read_text(errors="replace"))]
    if accuracy:  # the SSL trainer's pretext accuracy (masked slices), last epoch
        train, val, chance = accuracy[-1].groups()
        info["pseudo_label_accuracy"] = {"train": _accuracy(train), "val": _accuracy(val), "chance": float(chance)}
    summary = folder / "validation" / "summary.json"
    if summary.is_file():
        info["validation_dice"] = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    return info


def _accuracy(text: str) -> float:
    return float("nan") if text.startswith("n/a") else float(text)


def ssl_checkpoint(ctx: DemoContext) -> Path:
    """The SSL pretraining's final checkpoint (fold ``all`` of the pretraining dataset): the weights
    LoGoNet + SSL starts from."""
    s = ctx.settings
    return checkpoint_folder(ctx.results, s.ssl_dataset, s.ssl_trainer, s.plans, "all") / "checkpoint_final.pth"


def run_ssl_pretrain(ctx: DemoContext) -> dict:
    """nnUNetv2_train of the SSL trainer on the pretraining dataset (fold ``all``, LoGoNet plans)."""
    s = ctx.settings
    return _train(ctx, "ssl_pretrain", dataset_id=s.ssl_dataset_id, dataset=s.ssl_dataset, fold="all",
                  trainer=s.ssl_trainer, plans=s.plans)


def copy_plans(ctx: DemoContext, source: str, target: str) -> Path:
    """nnU-Net's way to a differently named model: the same plans under another ``plans_name``."""
    plans = json.loads(ctx.plans_file(source).read_text())
    plans["plans_name"] = target
    path = ctx.plans_file(target)
    write_json_whole(path, plans, indent=4)
    return path


def make_train(model: ModelRun) -> Callable[[DemoContext], dict]:
    """The training stage of ``model`` (fold 0); the pretrained model first gets its own copy of the
    LoGoNet plans and starts from the SSL checkpoint."""
    def run(ctx: DemoContext) -> dict:
        s = ctx.settings
        pretrained = None
        if model.pretrained:
            copy_plans(ctx, s.plans, model.plans)
            pretrained = ssl_checkpoint(ctx)
            if not pretrained.is_file():
                raise DemoError(f"{model.label}: the SSL checkpoint {pretrained} is missing; re-run the demo "
                                f"(the ssl_pretrain stage makes it).")
        info = _train(ctx, f"train_{model.key}", dataset_id=s.dataset_id, dataset=s.dataset, fold=FOLD,
                      trainer=model.trainer, plans=model.plans, pretrained=pretrained)
        return {**info, "pretrained_weights": str(pretrained) if pretrained else None}
    return run


def make_predict(model: ModelRun) -> Callable[[DemoContext], dict]:
    """The prediction stage of ``model``: nnUNetv2_predict on imagesTs into a fresh folder, timed per case."""
    def run(ctx: DemoContext) -> dict:
        s = ctx.settings
        target = ctx.predictions(model)
        if target.exists():
            shutil.rmtree(target)
        command = ["nnUNetv2_predict", "-i", ctx.raw_dataset / "imagesTs", "-o", target, "-d", s.dataset_id,
                   "-c", CONFIGURATION, "-f", FOLD, "-tr", model.trainer, "-p", model.plans, "-device", s.device,
                   "-npp", "1", "-nps", "1", "--disable_progress_bar"]
        if not s.tta:
            command.append("--disable_tta")
        result = run_command(command, env=ctx.env, log=ctx.log(f"predict_{model.key}"),
                             watch=lambda line: line.startswith(("Predicting ", "done with ")))
        per_case = seconds_per_case(result.events)
        return {**_costs(result), "case_seconds": per_case, "tta": s.tta,
                "seconds_per_case": statistics.mean(per_case.values()) if per_case else None}
    return run


def run_evaluate(ctx: DemoContext) -> dict:
    """nnUNetv2_evaluate_folder on every model's test predictions: Dice per organ and foreground mean."""
    s = ctx.settings
    organs = {str(v): k for k, v in json.loads((ctx.raw_dataset / "dataset.json").read_text())["labels"].items()
              if v != 0}
    scores = {}
    for model in s.models:
        folder = ctx.predictions(model)
        run_command(["nnUNetv2_evaluate_folder", ctx.raw_dataset / "labelsTs", folder, "-djfile",
                     ctx.raw_dataset / "dataset.json", "-pfile", ctx.plans_file(model.plans), "-np", ctx.n_proc],
                    env=ctx.env, log=ctx.log(f"evaluate_{model.key}"))
        summary = json.loads((folder / "summary.json").read_text())
        scores[model.key] = {"dice": {organs[k]: v["Dice"] for k, v in summary["mean"].items() if k in organs},
                             "mean_dice": summary["foreground_mean"]["Dice"], "summary": str(folder / "summary.json")}
    return {"models": scores}


def run_rank(ctx: DemoContext) -> dict:
    """nnU-Net's model selection (find_best_configuration) on the fold-0 validation of every model."""
    s = ctx.settings
    out = ctx.out / "find_best_configuration.json"
    command = [sys.executable, "-m", "nnunet_logonet.demo.rank", s.dataset_id,
               *[f"{m.trainer}:{m.plans}" for m in s.models], "-f", FOLD, "-np", ctx.n_proc, "--json", out]
    result = run_command(command, env=ctx.env, log=ctx.log("rank"))
    ranking = json.loads(out.read_text())
    identifiers = {f"{m.trainer}__{m.plans}__{CONFIGURATION}": m.key for m in s.models}
    scores = {identifiers.get(k, k): v for k, v in ranking["all_results"].items()}
    best = ranking["best_model_or_ensemble"]["selected_model_or_models"][0]
    return {**_costs(result), "command": result.command, "ranked_dice": scores,
            "best": identifiers.get(f"{best['trainer']}__{best['plans_identifier']}__{best['configuration']}"),
            "file": str(out)}


def run_costs(ctx: DemoContext) -> dict:
    """Parameters and MACs of every model's network at its planned patch
    (:func:`~nnunet_logonet.demo.costs.network_costs`)."""
    from nnunet_logonet.demo.costs import network_costs

    s = ctx.settings
    return {"models": {m.key: network_costs(ctx.plans_file(m.plans), ctx.raw_dataset / "dataset.json",
                                            CONFIGURATION, device=s.device) for m in s.models}}


# ----------------------------------------------------------------------------------- list
def build_stages(settings: DemoSettings) -> list[Stage]:
    """The demo's stages in running order, each with the outputs that show it finished and the stages
    whose re-run makes it stale."""
    s = settings

    def raw_json(ctx):
        return [ctx.raw_dataset / "dataset.json"]

    def plans(name):
        return lambda ctx: [ctx.plans_file(name)]

    stages = [
        Stage("phantom", "phantom dataset", run_phantom, raw_json),
        Stage("plan_nnunet", "plan + preprocess (nnUNetPlans)", run_plan_nnunet, plans("nnUNetPlans"),
              ("phantom",)),
        Stage("plan_logonet", f"plan (LoGoNet-{s.preset})", run_plan_logonet, plans(s.plans), ("plan_nnunet",)),
        Stage("ssl_dataset", "pretraining dataset", run_ssl_dataset,
              lambda ctx: [ctx.plans_file(s.plans, s.ssl_dataset)], ("plan_logonet",)),
        Stage("ssl_pretrain", "SSL pretraining", run_ssl_pretrain, lambda ctx: [ssl_checkpoint(ctx)],
              ("ssl_dataset",)),
    ]
    for model in s.models:
        needs = ("plan_nnunet",) if model.key == "nnunet" else ("plan_logonet",)
        stages.append(Stage(f"train_{model.key}", f"train {model.label}", make_train(model),
                            lambda ctx, m=model: [checkpoint_folder(ctx.results, s.dataset, m.trainer, m.plans, FOLD)
                                                  / "checkpoint_final.pth"],
                            needs + (("ssl_pretrain",) if model.pretrained else ())))
    for model in s.models:
        stages.append(Stage(f"predict_{model.key}", f"predict {model.label}", make_predict(model),
                            lambda ctx, m=model: [ctx.predictions(m) / f"{c}.nii.gz" for c in _test_cases(ctx)],
                            (f"train_{model.key}",)))
    stages.append(Stage("evaluate", "evaluate (nnU-Net)", run_evaluate,
                        lambda ctx: [ctx.predictions(m) / "summary.json" for m in s.models],
                        tuple(f"predict_{m.key}" for m in s.models)))
    stages.append(Stage("rank", "rank (nnU-Net find_best_configuration)", run_rank,
                        lambda ctx: [ctx.out / "find_best_configuration.json"],
                        tuple(f"train_{m.key}" for m in s.models)))
    stages.append(Stage("costs", "parameters + FLOPs", run_costs, lambda ctx: [], ("plan_nnunet", "plan_logonet")))
    return stages
