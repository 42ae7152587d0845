"""Prepare an image-only pre-training dataset that shares a labeled dataset's plans.

Runs the documented flow (docs/ssl.md), one command per step, and skips the steps already done,
so it can be called again after an interruption::

    logonet_prepare_unlabeled -i $nnUNet_raw/DatasetS_X/imagesTr [-i $nnUNet_raw/DatasetS_X/imagesUnlabeled] \
        [-i EXTRA ...] -d T --name NAME
    nnUNetv2_extract_fingerprint -d T -np 1
    nnUNetv2_move_plans_between_datasets -s S -t T -sp PLANS -tp PLANS
    cp $nnUNet_raw/DatasetT_NAME/dataset.json $nnUNet_preprocessed/DatasetT_NAME/
    nnUNetv2_preprocess -d T -plans_name PLANS -c 3d_fullres -np 1

The ``cp`` is needed because only nnU-Net's planner copies dataset.json into the preprocessed
folder, and nnUNetv2_preprocess and nnUNetv2_train read it there (nnU-Net issue #2560). The moved
plans keep S's patch size, spacing and CT intensity statistics, so the pre-trained network sees
data normalised exactly as in fine-tuning. Then
``nnUNetv2_train T 3d_fullres all -tr LoGoNetSSLTrainer -p PLANS`` pre-trains and
``nnUNetv2_train S 3d_fullres FOLD -tr LoGoNetTrainer -p PLANS -pretrained_weights ...`` fine-tunes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from nnunet_logonet.workfolders import copy_file_whole, last_written, read_json_if_whole

__all__ = ["PipelineError", "prepare_pretraining_dataset", "main"]

#: keys that nnUNetv2_move_plans_between_datasets rewrites for the target; all others must match the source
_PER_DATASET_KEYS = ("dataset_name", "image_reader_writer", "plans_name")
Log = Callable[[str], None] | str | os.PathLike | None


class PipelineError(RuntimeError):
    """A step of the flow cannot run (missing source plans, failed nnU-Net command, ...)."""


def _dataset_folder(root: Path, dataset_id: int) -> Path | None:
    found = sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.is_dir() else []
    return found[0] if found else None


def _other_scans(target_raw: Path, folders: Sequence[Path]) -> str:
    """How the image-only dataset's cases differ from those the folders give now ("" if they do not): a rerun
    with another -i must not quietly pre-train on the old scans."""
    from nnunet_logonet.ssl.unlabeled import find_cases

    have = {path.name[:-len("_0000.nii.gz")] for path in (target_raw / "imagesTr").glob("*_0000.nii.gz")}
    wanted = set(find_cases(folders))
    if have == wanted:
        return ""

    def listed(names: set[str]) -> str:
        shown = sorted(names)[:5]
        return ", ".join(shown) + (f" and {len(names) - len(shown)} more" if len(names) > len(shown) else "")

    parts = [f"{len(wanted - have)} new ({listed(wanted - have)})"] if wanted - have else []
    parts += [f"{len(have - wanted)} no longer given ({listed(have - wanted)})"] if have - wanted else []
    return f"holds other cases than the image folders give now: {'; '.join(parts)}"


def _source_channel_names(source_raw: Path) -> list[str]:
    """The labeled source's channel names in channel order: the image-only dataset must have the same channels,
    named alike, so that the source's plans (normalisation per channel) apply to it."""
    dataset_json = source_raw / "dataset.json"
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"{dataset_json} cannot be read ({error}); the pre-training dataset takes its channel "
                            f"names from it.") from error
    names = meta.get("channel_names", meta.get("modality")) if isinstance(meta, dict) else None
    try:
        ordered = [str(names[key]) for key in sorted(names, key=int)]
    except (TypeError, ValueError, KeyError):
        ordered = []
    if not ordered or sorted(names, key=int) != [str(i) for i in range(len(ordered))]:
        raise PipelineError(f"{dataset_json} has no valid channel_names ({names!r}); expected e.g. "
                            f'{{"0": "CT"}} or {{"0": "T2", "1": "ADC"}}, one entry per channel from "0".')
    return ordered


def _same_plans(source: dict, target: dict) -> bool:
    def strip(plans: dict) -> str:
        return json.dumps({k: v for k, v in plans.items() if k not in _PER_DATASET_KEYS}, sort_keys=True)

    return strip(source) == strip(target)


def _check_configuration(plans_file: Path, dataset: str, plans: str, configuration: str) -> dict:
    """The source plans, once ``configuration`` is known to be a 3D one of theirs: checked before step 1, so a
    wrong ``-c`` leaves no pre-training dataset behind in nnUNet_raw and nnUNet_preprocessed."""
    try:
        source_plans = json.loads(plans_file.read_text())
        configurations = source_plans["configurations"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PipelineError(f"{plans_file} cannot be read as nnU-Net plans ({type(error).__name__}: {error}); "
                            f"plan the source again.") from error
    three_d = [c for c, config in configurations.items() if len(config.get("patch_size", (0, 0, 0))) == 3]
    if configuration not in three_d:
        what = "is 2D in" if configuration in configurations else "is not in"
        fix = (f"pass -c {' or -c '.join(three_d)}" if three_d else
               f"plan the source for LoGoNet first (logonet_plan_and_preprocess -d {dataset} -pl LoGoNetPlanner)")
        raise ValueError(f"configuration {configuration!r} {what} plans {plans} of {dataset} (they have: "
                         f"{', '.join(configurations) or 'none'}). LoGoNet is a 3D network: {fix}.")
    return source_plans


def _command(name: str, env: Mapping[str, str]) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise PipelineError(f"command {name} not found next to {sys.executable} nor on PATH; is nnunetv2 installed?")
    return found


class _Logger:
    """Messages to a callable, or messages and command output appended to a log file (each call of the
    pipeline under a header line with its start time, so an earlier attempt's output stays readable)."""

    def __init__(self, log: Log) -> None:
        self.path = Path(log) if isinstance(log, (str, os.PathLike)) else None
        self.call = log if callable(log) else (print if log is None else None)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            separator = "\n" if self.path.is_file() and self.path.stat().st_size > 0 else ""
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            with open(self.path, "a") as f:
                f.write(f"{separator}# {started}\n")

    def __call__(self, message: str) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(message + "\n")
        else:
            self.call(message)

    @property
    def on_screen(self) -> bool:
        """Whether messages go to the terminal (the command line's case): then nnU-Net's own output, with
        its progress bars, is shown as it comes instead of being collected."""
        return self.path is None and self.call is print

    def run(self, argv: list[str], env: Mapping[str, str], step: str = "") -> None:
        """Run ``argv``, its command line shown after ``step`` (``[2/5]``) as the steps' own lines are."""
        self(f"{step} {shlex.join([Path(argv[0]).name, *argv[1:]])}" if step else shlex.join(argv))
        if self.on_screen:
            output, returncode = _run_showing_output(argv, env)
        else:
            done = subprocess.run(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output, returncode = done.stdout, done.returncode
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(output)
        if returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise PipelineError(f"{Path(argv[0]).name} failed with exit code {returncode}:\n{tail}")


def _run_showing_output(argv: list[str], env: Mapping[str, str], keep: int = 16384) -> tuple[str, int]:
    """Run ``argv`` with its output passed to our stdout as it comes (progress bars redraw with \\r, so
    chunks, not lines); return the output's last ``keep`` characters and the exit code."""
    process = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    while chunk := process.stdout.read1(4096):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        tail = (tail + chunk)[-keep:]
    return tail.decode(errors="replace"), process.wait()


def prepare_pretraining_dataset(
    source_dataset_id: int,
    target_dataset_id: int,
    plans: str,
    extra_image_folders: Sequence[str | os.PathLike] = (),
    *,
    name: str = "Pretraining",
    include_source_images: bool = True,
    include_source_unlabeled: bool = True,
    configuration: str = "3d_fullres",
    num_processes: int = 1,
    env: Mapping[str, str] | None = None,
    log: Log = None,
) -> dict[str, Any]:
    """Build (or finish) image-only dataset ``target_dataset_id``, preprocessed with the source's plans.

    Args:
        source_dataset_id: labeled dataset whose plans are used; it must already be planned, e.g.
            with ``logonet_plan_and_preprocess -d SOURCE -pl LoGoNetTinyPlanner``.
        target_dataset_id: ID of the image-only dataset to create (``Dataset<ID>_<name>``).
        plans: plans identifier of the source, e.g. ``LoGoNetPlans``, ``LoGoNetTinyPlans``, ``LoGoNetLPlans``.
        extra_image_folders: more folders of unlabeled NIfTI scans.
        include_source_images: pre-train on the source's ``imagesTr`` too (its labels are never used).
        include_source_unlabeled: add the source's ``imagesUnlabeled`` folder when it has scans (the
            phantom's ``--num-unlabeled`` cases live there).
        configuration: the configuration to preprocess.
        num_processes: processes for fingerprint extraction and preprocessing.
        env: environment of the nnU-Net commands (default ``os.environ``); ``nnUNet_raw`` and
            ``nnUNet_preprocessed`` are read from it.
        log: a callable for the step messages, or a file that gets them and the commands' output
            (default: print).

    Returns ``{"dataset", "preprocessed_folder", "num_cases", "ran", "skipped"}``. Steps that are
    complete are skipped; when the source plans changed since the last call they are moved again
    and the target is preprocessed again.
    """
    from nnunet_logonet.ssl.unlabeled import UnlabeledDataError, prepare_unlabeled

    for label, value in (("source_dataset_id", source_dataset_id), ("target_dataset_id", target_dataset_id),
                         ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}.")
    if source_dataset_id == target_dataset_id:
        raise ValueError(f"target_dataset_id must differ from source_dataset_id ({source_dataset_id}): the "
                         f"image-only dataset is a new one.")
    env = dict(os.environ if env is None else env)
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not env.get(v)]
    if missing:
        raise PipelineError(f"environment variable(s) {', '.join(missing)} not set; run: eval \"$(logonet_env)\"")
    raw, preprocessed = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    say = _Logger(log)
    ran: list[str] = []
    skipped: list[str] = []

    source_raw = _dataset_folder(raw, source_dataset_id)
    if source_raw is None:
        raise PipelineError(f"no raw dataset {source_dataset_id} (Dataset{source_dataset_id:03d}_*) in "
                            f"nnUNet_raw={raw}.")
    source_plans_file = preprocessed / source_raw.name / f"{plans}.json"
    if not source_plans_file.is_file():
        raise PipelineError(
            f"{source_plans_file} does not exist: plan the source first, e.g. logonet_plan_and_preprocess "
            f"-d {source_dataset_id} -pl LoGoNetTinyPlanner (plans LoGoNetTinyPlans) or -pl LoGoNetPlanner "
            f"(LoGoNetPlans).")
    source_plans = _check_configuration(source_plans_file, source_raw.name, plans, configuration)
    folders = [source_raw / "imagesTr"] if include_source_images else []
    unlabeled = source_raw / "imagesUnlabeled"
    if include_source_unlabeled and unlabeled.is_dir() and any(unlabeled.glob("*.nii*")):
        folders.append(unlabeled)
    for folder in map(Path, extra_image_folders):  # a folder given twice would be every case twice
        if any(folder.resolve() == earlier.resolve() for earlier in folders):
            say(f"note: {folder} is already among the image folders (the source's own are added unless "
                f"--no-source-images / --no-source-unlabeled): read once")
        else:
            folders.append(folder)
    if not folders:
        raise ValueError("no image folder: pass extra_image_folders or include the source's images.")

    # 1. image-only raw dataset
    target_raw = _dataset_folder(raw, target_dataset_id)
    rebuild = ""
    if target_raw is not None:
        meta = json.loads((target_raw / "dataset.json").read_text())
        if not meta.get("logonet_image_only"):
            raise PipelineError(f"dataset {target_dataset_id} already exists as {target_raw} and is not an "
                                f"image-only dataset made by logonet_prepare_unlabeled; choose another ID.")
        rebuild = _other_scans(target_raw, folders)
        if rebuild:
            name = target_raw.name.split("_", 1)[1]
    if target_raw is None or rebuild:
        if rebuild:
            say(f"[1/5] {target_raw} {rebuild}: made again")
        channel_names = _source_channel_names(source_raw)
        say("[1/5] " + shlex.join(["logonet_prepare_unlabeled", *(a for f in folders for a in ("-i", str(f))),
                                   "-d", str(target_dataset_id), "--name", name,
                                   *(a for c in channel_names for a in ("--channel-name", c))]))
        try:
            target_raw = prepare_unlabeled(folders, target_dataset_id, name=name, channel_names=channel_names,
                                           raw_root=raw, progress=say.on_screen, overwrite=bool(rebuild))
        except UnlabeledDataError as error:
            raise UnlabeledDataError(f"{error} (the pipeline gives the source's channels, {', '.join(channel_names)} "
                                     f"from {source_raw / 'dataset.json'}: the scans must have the same channels)"
                                     ) from error
        ran.append("prepare_unlabeled")
    else:
        say(f"[1/5] {target_raw} exists with the same cases: skipped")
        skipped.append("prepare_unlabeled")
    target_pre = preprocessed / target_raw.name
    tid, n = str(target_dataset_id), str(num_processes)

    # 2. fingerprint (nnU-Net's preprocessing expects it)
    fingerprint_file = target_pre / "dataset_fingerprint.json"
    raw_written = _dataset_written(target_raw)
    fingerprint_whole = read_json_if_whole(fingerprint_file) is not None
    if fingerprint_whole and last_written(fingerprint_file) >= raw_written:
        say("[2/5] fingerprint exists: skipped")
        skipped.append("extract_fingerprint")
    else:
        if fingerprint_whole:
            say(f"[2/5] {target_raw} was written after its fingerprint (logonet_prepare_unlabeled --overwrite?): "
                f"extracting it again")
        elif fingerprint_file.exists():
            say(f"[2/5] {fingerprint_file} is not valid JSON (cut short by an interrupted run?): extracting it again")
        say.run([_command("nnUNetv2_extract_fingerprint", env), "-d", tid, "-np", n]
                + (["--clean"] if fingerprint_file.exists() else []), env, "[2/5]")
        ran.append("extract_fingerprint")

    # 3. the source's plans: architecture and normalisation of the fine-tuning
    target_plans_file = target_pre / f"{plans}.json"
    moved = False
    target_plans_now = read_json_if_whole(target_plans_file)
    if target_plans_file.exists() and target_plans_now is None:
        say(f"[3/5] {target_plans_file} is not valid JSON (cut short by an interrupted run?): moving the plans again")
    if target_plans_now is not None and _same_plans(source_plans, target_plans_now):
        say(f"[3/5] {target_plans_file.name} matches the source plans: skipped")
        skipped.append("move_plans")
    else:
        say.run([_command("nnUNetv2_move_plans_between_datasets", env), "-s", str(source_dataset_id), "-t", tid,
                 "-sp", plans, "-tp", plans], env, "[3/5]")
        ran.append("move_plans")
        moved = True

    # 4. dataset.json where nnUNetv2_preprocess / nnUNetv2_train look for it (nnU-Net #2560)
    dataset_json = target_pre / "dataset.json"
    if dataset_json.is_file() and dataset_json.read_bytes() == (target_raw / "dataset.json").read_bytes():
        say("[4/5] dataset.json in place: skipped")
        skipped.append("copy_dataset_json")
    else:
        say(f"[4/5] {shlex.join(['cp', str(target_raw / 'dataset.json'), str(dataset_json)])}")
        copy_file_whole(target_raw / "dataset.json", dataset_json)
        ran.append("copy_dataset_json")

    # 5. preprocessing with those plans
    target_plans = json.loads(target_plans_file.read_text())
    if configuration not in target_plans["configurations"]:
        raise ValueError(f"plans {plans} have no configuration {configuration!r} "
                         f"(available: {sorted(target_plans['configurations'])}).")
    data_folder = target_pre / target_plans["configurations"][configuration]["data_identifier"]
    cases = {p.name[: -len("_0000.nii.gz")] for p in (target_raw / "imagesTr").glob("*_0000.nii.gz")}
    done = {p.stem: last_written(p) for p in data_folder.glob("*.pkl")} if data_folder.is_dir() else {}
    current = cases == set(done) and all(written >= raw_written for written in done.values())
    if not moved and cases and current:
        say(f"[5/5] {data_folder} holds all {len(cases)} cases: skipped")
        skipped.append("preprocess")
    else:
        if done and not moved and not current:
            say(f"[5/5] {data_folder} holds cases of an earlier {target_raw.name} (other cases, or preprocessed "
                f"before the raw dataset was last written): preprocessing again")
        say.run([_command("nnUNetv2_preprocess", env), "-d", tid, "-plans_name", plans, "-c", configuration,
                 "-np", n], env, "[5/5]")
        ran.append("preprocess")
    return {"dataset": target_raw.name, "preprocessed_folder": str(data_folder), "num_cases": len(cases),
            "ran": ran, "skipped": skipped}


def _dataset_written(raw_dataset: Path) -> float:
    """When the image-only dataset was last written: its ``dataset.json`` (written anew by every
    ``prepare_unlabeled``, ``--overwrite`` included) or its newest image, whichever is later (hard-linked
    scans keep their own times). A fingerprint or preprocessed case older than this describes other data."""
    files = [raw_dataset / "dataset.json", *(raw_dataset / "imagesTr").glob("*.nii*")]
    return max((p.stat().st_mtime for p in files if p.is_file()), default=0.0)


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
    parser.add_argument("--no-source-unlabeled", action="store_true",
                        help="do not add the source's imagesUnlabeled folder")
    parser.add_argument("-c", default="3d_fullres", help="configuration to preprocess (default 3d_fullres)")
    parser.add_argument("-np", type=int, default=4,
                        help="processes for fingerprint extraction and preprocessing (default 4, as "
                             "logonet_plan_and_preprocess)")
    args = parser.parse_args(argv)
    try:
        info = prepare_pretraining_dataset(args.s, args.t, args.p, args.i, name=args.name,
                                           include_source_images=not args.no_source_images,
                                           include_source_unlabeled=not args.no_source_unlabeled,
                                           configuration=args.c, num_processes=args.np)
    except (ValueError, PipelineError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted. Run the same command again: finished steps are skipped, an unfinished one is redone.",
              file=sys.stderr)
        return 130
    print(f"Ready: {info['dataset']} ({info['num_cases']} cases). Pre-train on a GPU (the paper's settings) with:\n"
          f"    nnUNetv2_train {args.t} {args.c} all -tr LoGoNetSSLTrainer -p {args.p}\n"
          f"or on a CPU (12 clusterers, k 16..64; docs/ssl.md) with:\n"
          f"    nnUNetv2_train {args.t} {args.c} all -tr LoGoNetSSLTrainerCPU -p {args.p} -device cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
