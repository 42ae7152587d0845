"""``logonet_demo``: LoGoNet against nnU-Net's default network on the built-in phantom, one command.

    logonet_demo                 # full demo (~20 min on 2 CPU cores)
    logonet_demo --quick         # every stage, smaller budget (~5 min)
    logonet_demo --fresh         # redo every stage

Everything runs through nnU-Net's own commands (``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train``, ``nnUNetv2_predict``, ``nnUNetv2_evaluate_folder``) with the environment
``logonet_env`` gives; each command's output goes to ``<out>/logs/<stage>.log`` (a rerun appends, under a
header line with its start time, so a failed or interrupted attempt's output stays). Finished stages
are recorded in ``<base>/demo_state.json`` and reused by the next run with the same settings.
The dataset folders the demo makes carry a ``.logonet_demo`` marker; ``--fresh`` deletes only those,
and a same-named folder without it (a user's own dataset) stops the demo before it does anything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from nnunet_logonet.demo import report
from nnunet_logonet.demo.settings import DEVICES, PRESETS, DemoError, DemoSettings, make_settings
from nnunet_logonet.demo.stages import PREDICTIONS, DemoContext, Stage, build_stages
from nnunet_logonet.demo.state import MARKER, STATE_FILE, DemoState, is_marked, mark
from nnunet_logonet.env import NNUNET_FOLDERS
from nnunet_logonet.machine import cpu_description
from nnunet_logonet.workfolders import (LockHeldError, delete_folder, exclusive_lock, exit_cleanly_on_sigterm,
                                       remove_stale_work_folders)

__all__ = ["build_parser", "demo_environment", "check_dataset_ids", "check_own_folders", "demo_folders", "demo_locks",
           "main", "remove_previous", "run_demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logonet_demo",
        description="Phantom data -> plan -> SSL pretraining -> train nnU-Net, LoGoNet and LoGoNet+SSL with equal "
                    "budgets -> predict -> evaluate, all through nnU-Net's commands; prints one table.")
    parser.add_argument("--base", default="demo_work",
                        help="work folder: nnUNet_raw/_preprocessed/_results (unless already set in the environment), "
                             "predictions and the stage record (default ./demo_work)")
    parser.add_argument("--out", default="demo_results",
                        help="results.json, results.md, figures and logs (default ./demo_results)")
    parser.add_argument("-device", "--device", default="auto", choices=DEVICES, help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="LoGoNet size (default: tiny on CPU, S on CUDA)")
    parser.add_argument("--quick", action="store_true", help="smaller phantom and budget; still every stage")
    parser.add_argument("--fresh", action="store_true",
                        help=f"redo every stage (first deletes the datasets, trainings and predictions this demo "
                             f"made: dataset folders holding its {MARKER} marker)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("-d", "--dataset-id", type=int, default=900,
                        help="nnU-Net dataset id of the phantom (default 900); the pretraining dataset uses id+1")
    return parser


# ------------------------------------------------------------------------------- set-up
def demo_environment(base: Path, settings: DemoSettings, environ: dict | None = None) -> dict[str, str]:
    """The user's environment + what ``logonet_env`` exports + nnU-Net's small-machine settings."""
    from nnunet_logonet.env import environment

    environ = dict(os.environ if environ is None else environ)
    env = {**environ, **environment(base, environ)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir])
    env.setdefault("nnUNet_n_proc_DA", "2")
    env.setdefault("nnUNet_def_n_proc", str(max(1, min(4, os.cpu_count() or 1))))
    if settings.device == "cpu":
        env["nnUNet_compile"] = "f"
    return env


def check_dataset_ids(settings: DemoSettings, env: dict[str, str]) -> None:
    """The demo's two dataset ids must not be taken by other datasets in any nnU-Net folder."""
    for dataset_id, wanted in ((settings.dataset_id, settings.dataset), (settings.ssl_dataset_id, settings.ssl_dataset)):
        for variable in NNUNET_FOLDERS:
            root = Path(env[variable])
            taken = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != wanted) \
                if root.is_dir() else []
            if taken:
                raise DemoError(
                    f"--dataset-id {settings.dataset_id}: dataset id {dataset_id} is already used by {taken[0]} in "
                    f"{variable}={root}; the demo needs it for {wanted} (it uses ID and ID+1). Choose another "
                    f"--dataset-id.")


def demo_folders(settings: DemoSettings, env: dict[str, str]) -> list[tuple[str, Path]]:
    """(variable, folder) of the demo's two datasets in each nnU-Net folder."""
    return [(variable, Path(env[variable]) / name) for variable in NNUNET_FOLDERS
            for name in (settings.dataset, settings.ssl_dataset)]


def _made_by_earlier_demo(folder: Path, base: Path, settings: DemoSettings, env: dict[str, str]) -> bool:
    """An unmarked folder from a demo run killed before it could mark it, or from before the markers.

    Accepted when ``<base>/demo_state.json`` records that a stage of the demo was creating exactly this
    folder (``creates``, recorded while it did not exist yet) or, inside --base only (nnUNet_* not set
    by the user, so the demo chose these folders), that the phantom stage wrote the raw dataset there."""
    try:
        stages = json.loads((base / STATE_FILE).read_text())["stages"]
        creating = {Path(r["creates"]).resolve() for r in stages.values()
                    if isinstance(r, dict) and isinstance(r.get("creates"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if folder.resolve() in creating:
        return True
    if not folder.resolve().is_relative_to(base.resolve()):
        return False
    written = stages.get("phantom", {}).get("folder") if isinstance(stages.get("phantom"), dict) else None
    raw = (Path(env["nnUNet_raw"]) / settings.dataset).resolve()
    return isinstance(written, str) and Path(written).resolve() == raw


def check_own_folders(base: Path, settings: DemoSettings, env: dict[str, str]) -> None:
    """A folder with the demo's dataset name that the demo did not make is someone's own dataset: the
    demo's stages would write into it (and reuse its trainings) and --fresh would delete it. The same
    for ``<base>/predictions``, which the demo's prediction stages and --fresh replace."""
    predictions = base / PREDICTIONS
    if predictions.exists() and not is_marked(predictions):
        if predictions.is_dir() and _predicted_by_earlier_demo(base):
            mark(predictions)
        else:
            raise DemoError(
                f"{predictions} exists but was not made by logonet_demo (it has no {MARKER} file); the demo "
                f"replaces its predictions there, and --fresh would delete it. Move it away or choose another "
                f"--base. If an earlier logonet_demo made it, `touch {predictions / MARKER}` lets the demo use it.")
    for variable, folder in demo_folders(settings, env):
        if not folder.exists() or is_marked(folder):
            continue
        if folder.is_dir() and _made_by_earlier_demo(folder, base, settings, env):
            mark(folder)
            continue
        raise DemoError(
            f"{folder} exists but was not made by logonet_demo (it has no {MARKER} file); the demo would write "
            f"into it, and --fresh would delete it. Choose another --dataset-id (the demo uses ID and ID+1), or "
            f"move that folder out of {variable}={folder.parent}. If an earlier logonet_demo made it, "
            f"`touch {folder / MARKER}` lets the demo use (and --fresh delete) it.")


def _predicted_by_earlier_demo(base: Path) -> bool:
    """``<base>/predictions`` from a demo run before its marker: the state records a prediction stage."""
    try:
        stages = json.loads((base / STATE_FILE).read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(stages, dict) and any(name.startswith("predict_") for name in stages)


def remove_previous(base: Path, settings: DemoSettings, env: dict[str, str]) -> None:
    """--fresh: delete this demo's datasets and predictions (only folders holding its marker) and its
    stage record."""
    for _, folder in demo_folders(settings, env):
        if is_marked(folder):
            delete_folder(folder)
    if is_marked(base / PREDICTIONS):
        delete_folder(base / PREDICTIONS)
    (base / STATE_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------- running
def _summary(stage: Stage, info: dict) -> str:
    parts = []
    if info.get("resumed"):
        parts.append("continued with --c")
    if info.get("seconds_per_iteration") is not None:
        parts.append(f"{info['seconds_per_iteration']:.2f} s/iter")
    if info.get("validation_dice") is not None:
        parts.append(f"fold-0 val Dice {info['validation_dice']:.3f}")
    if info.get("pseudo_label_accuracy"):
        acc = info["pseudo_label_accuracy"]
        parts.append(f"pseudo-label accuracy {acc['val']:.3f} (chance {acc['chance']:.3f})")
    if info.get("seconds_per_case") is not None:
        parts.append(f"{len(info.get('case_seconds', {}))} cases, {info['seconds_per_case']:.2f} s/case")
    if "models" in info and stage.name == "evaluate":
        parts.append("mean Dice " + ", ".join(f"{k} {v['mean_dice']:.3f}" for k, v in info["models"].items()))
    if info.get("ranked_dice"):
        parts.append("ranking " + " > ".join(f"{k} {v:.3f}" for k, v in
                                             sorted(info["ranked_dice"].items(), key=lambda kv: -kv[1])))
    if "models" in info and stage.name == "costs":
        parts.append(", ".join(f"{k} {v['parameters'] / 1e6:.2f} M params" for k, v in info["models"].items()))
    if info.get("max_rss_mb"):
        parts.append(f"peak RSS {info['max_rss_mb']:.0f} MB")
    if info.get("log"):
        parts.append(f"log {info['log']}")
    return "; ".join(parts)


def run_stages(ctx: DemoContext, stages: list[Stage]) -> dict[str, bool]:
    """Run what is not finished; returns stage -> reused."""
    reused: dict[str, bool] = {}
    ran: set[str] = set()
    with tqdm(stages, desc="logonet_demo", unit="stage", position=0, dynamic_ncols=True) as bar:
        for stage in bar:
            bar.set_postfix_str(stage.name)
            record = ctx.state.finished(stage.name)
            # a stage it needs was redone in this run, or in an earlier one that stopped before this stage
            stale = any(need in ran for need in stage.needs) or bool(ctx.state.redone_since(stage.name, stage.needs))
            if record and record.get("status") == "done" and not stale \
                    and all(p.exists() for p in stage.outputs(ctx)):
                reused[stage.name] = True
                tqdm.write(f"[reused] {stage.title} (finished {record['finished']}, took "
                           f"{record.get('stage_wall_s', 0):.0f} s)")
                continue
            ctx.resuming = bool(record and record.get("status") == "started" and not stale)
            ctx.state.record(stage.name, status="started")
            start = time.perf_counter()
            info = stage.run(ctx)
            wall = time.perf_counter() - start
            ctx.state.record(stage.name, status="done", stage_wall_s=round(wall, 2), **info)
            ran.add(stage.name)
            reused[stage.name] = False
            tqdm.write(f"[{wall:6.1f} s] {stage.title}: {_summary(stage, info)}".rstrip(": "))
    return reused


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("nnunet-logonet", "nnunetv2", "torch", "numpy", "fvcore", "SimpleITK"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_outputs(ctx: DemoContext, results: dict) -> None:
    """Write results.json, results.md and the two figures to ``--out`` (results.json again with the
    overlay's entry)."""
    out = ctx.out
    report.write_json(results, out / "results.json")
    report.write_markdown(results, out / "results.md")
    report.plot_dice(results, out / "dice_per_organ.png")
    overlay = report.overlay_from_files(ctx.raw_dataset, {m.label: ctx.predictions(m) for m in ctx.settings.models},
                                        out / "overlay.png")
    results["overlay"] = overlay
    report.write_json(results, out / "results.json")


def run_demo(settings: DemoSettings, *, base: Path, out: Path, fresh: bool = False, command: str = "logonet_demo",
             environ: dict | None = None) -> dict:
    """The whole demo: check ``base`` and ``out``, hold the locks, run the unfinished stages and write the
    results; returns what results.json holds."""
    started = time.perf_counter()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = [round(x, 2) for x in os.getloadavg()]
    base, out = Path(base).resolve(), Path(out).resolve()
    for flag, folder in (("--base", base), ("--out", out)):
        if folder.exists() and not folder.is_dir():
            raise DemoError(f"{flag} {folder} is a file, not a folder.")
        try:  # before any stage runs, not after the first ones
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DemoError(f"{flag} {folder}: cannot create it ({error.strerror or error}); choose a folder "
                            f"you can write to.") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DemoError(f"{flag} {folder} is not writable; choose a folder you can write to.")
    env = demo_environment(base, settings, environ)
    with demo_locks(base, settings, env):
        return _run_demo_alone(settings, base=base, out=out, env=env, fresh=fresh, command=command,
                               started=started, date=date, load_start=load_start)


@contextlib.contextmanager
def demo_locks(base: Path, settings: DemoSettings, env: dict[str, str]):
    """Hold ``<base>/.logonet_demo.lock`` and ``$nnUNet_raw/.<dataset>.logonet_demo.lock`` while the demo
    runs: two demos in one --base, or on one dataset id of shared nnU-Net folders, would write the same
    files (DemoError naming the other run; released when its process ends, however it ends)."""
    with contextlib.ExitStack() as held:
        for path in (base / ".logonet_demo.lock", Path(env["nnUNet_raw"]) / f".{settings.dataset}.logonet_demo.lock"):
            try:
                held.enter_context(exclusive_lock(path))
            except LockHeldError as error:
                raise DemoError(f"another logonet_demo ({error.holder}) is running with the same "
                                f"{'--base' if path.parent == base else 'dataset id in nnUNet_raw'} ({path}); wait "
                                f"for it to finish, or use another --base and --dataset-id.") from None
        yield


def _run_demo_alone(settings: DemoSettings, *, base: Path, out: Path, env: dict[str, str], fresh: bool, command: str,
                    started: float, date: str, load_start: list[float]) -> dict:
    check_dataset_ids(settings, env)
    check_own_folders(base, settings, env)
    if fresh:
        remove_previous(base, settings, env)
    for _, folder in [*demo_folders(settings, env), ("", base / PREDICTIONS)]:  # what an interrupted --fresh left
        remove_stale_work_folders(folder.parent, folder.name, "deleting")
    state = DemoState.open(base, settings)
    base.mkdir(parents=True, exist_ok=True)
    for variable in NNUNET_FOLDERS:
        Path(env[variable]).mkdir(parents=True, exist_ok=True)
    for variable, folder in demo_folders(settings, env):
        if variable != "nnUNet_raw":  # marked before nnU-Net's commands make them; the raw datasets'
            mark(folder)  # writers refuse an existing folder, so run_phantom and run_ssl_dataset mark those
    mark(base / PREDICTIONS)
    ctx = DemoContext(settings=settings, base=base, out=out, env=env, state=state)
    stages = build_stages(settings)
    print(f"logonet_demo: {'quick' if settings.quick else 'full'} run on {settings.device}, LoGoNet-{settings.preset}, "
          f"{settings.num_train}/{settings.num_test}/{settings.num_unlabeled} phantom cases (train/test/unlabeled), "
          f"budget {settings.budget}; work folder {base}, results {out}")
    reused = run_stages(ctx, stages)

    organs = [k for k, v in sorted(json.loads((ctx.raw_dataset / "dataset.json").read_text())["labels"].items(),
                                   key=lambda kv: kv[1]) if v != 0]
    records = state.stages
    results = {
        "command": command, "date": date, "settings": settings.as_dict(), "device": settings.device,
        "tta": settings.tta, "organs": organs,
        "models": report.assemble_models(settings.as_dict(), settings.models, records),
        "ssl_pretraining": {k: records.get("ssl_pretrain", {}).get(k) for k in
                            ("command", "seconds_per_iteration", "pseudo_label_accuracy", "stage_wall_s", "cpu_s",
                             "max_rss_mb", "folder", "resumed")},
        "find_best_configuration": {"command": records.get("rank", {}).get("command"),
                                    "validation_dice": records.get("rank", {}).get("ranked_dice"),
                                    "best": records.get("rank", {}).get("best")},
        "stages": {s.name: {**records.get(s.name, {}), "reused": reused.get(s.name, False)} for s in stages},
        "versions": _versions(),
        "machine": {"platform": platform.platform(), **cpu_description(), "cpu_count": os.cpu_count(),
                    "load_average_start": load_start},
        "paths": {"base": str(base), "out": str(out), **{v: env[v] for v in NNUNET_FOLDERS}},
    }
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write_outputs(ctx, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # the console script: `kill` and `timeout` stop the running nnU-Net command too
        exit_cleanly_on_sigterm()
    try:
        import torch

        settings = make_settings(dataset_id=args.dataset_id, seed=args.seed, device=args.device, preset=args.preset,
                                 quick=args.quick, cuda_available=torch.cuda.is_available())
    except DemoError as error:
        parser.error(str(error))
    command = shlex.join(["logonet_demo", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    try:
        results = run_demo(settings, base=Path(args.base), out=Path(args.out), fresh=args.fresh, command=command)
    except DemoError as error:
        print(f"logonet_demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlogonet_demo: interrupted; run the same command again to continue where it stopped.",
              file=sys.stderr)
        return 130
    print()
    print(report.format_table(results))
    print()
    for note in report.table_notes(results):
        print(f"- {note}")
    out = Path(args.out)
    print(f"\nSaved {out / 'results.json'}, {out / 'results.md'}, {out / 'dice_per_organ.png'}, "
          f"{out / 'overlay.png'}; logs in {out / 'logs'}.")
    print(f"Total wall time: {time.perf_counter() - started:.0f} s ({(time.perf_counter() - started) / 60:.1f} min).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
