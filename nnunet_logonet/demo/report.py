"""The demo's results: one JSON, one markdown table, two figures. Nothing here is typed in by hand:
every number comes from the stage records (nnU-Net's evaluator, logs, fvcore, the kernel).

``results.json`` layout (what the table and figures read)::

    {"settings": {...}, "organs": ["spleen", ...], "tta": false, "device": "cpu",
     "models": {"nnunet": {"label": ..., "dice": {"spleen": 0.91, ...}, "mean_dice": 0.83,
                           "parameters": ..., "macs": ..., "seconds_per_case": ...,
                           "seconds_per_iteration": ..., "peak_memory_mb": ..., ...}, ...},
     "stages": {...}, "wall_s": ..., ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_logonet.figures import save_figure
from nnunet_logonet.workfolders import write_json_whole, write_text_whole

__all__ = ["ORGAN_COLOURS", "assemble_models", "format_table", "pick_slice", "plot_dice", "plot_overlay",
           "write_json", "write_markdown"]

#: organ -> RGB, fixed so every figure of every run uses the same colours
ORGAN_COLOURS = {
    "spleen": (0.12, 0.47, 0.71),
    "right_kidney": (1.00, 0.50, 0.05),
    "left_kidney": (0.17, 0.63, 0.17),
    "gallbladder": (0.84, 0.15, 0.16),
    "liver": (0.58, 0.40, 0.74),
    "aorta": (0.89, 0.47, 0.76),
}
_FALLBACK_COLOURS = [(0.55, 0.34, 0.29), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)]
MODEL_COLOURS = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def organ_colour(organ: str, index: int) -> tuple[float, float, float]:
    """The organ's fixed colour; an organ not in ``ORGAN_COLOURS`` gets a fallback by its index."""
    return ORGAN_COLOURS.get(organ, _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)])


def _pretty(organ: str) -> str:
    return organ.replace("_", " ")


# ----------------------------------------------------------------------------- assembling
def assemble_models(settings: Mapping, models: Sequence, stages: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per model, every figure of the table from the stage records (missing ones are None)."""
    evaluation = stages.get("evaluate", {}).get("models", {})
    costs = stages.get("costs", {}).get("models", {})
    out = {}
    for model in models:
        train = stages.get(f"train_{model.key}", {})
        predict = stages.get(f"predict_{model.key}", {})
        score = evaluation.get(model.key, {})
        cost = costs.get(model.key, {})
        if settings.get("device") == "cuda":
            peak, peak_source = cost.get("cuda_training_peak_mb"), "torch.cuda.max_memory_allocated, training step"
        else:
            peak, peak_source = train.get("max_rss_mb"), "max resident set of the nnUNetv2_train process"
        out[model.key] = {
            "label": model.label, "trainer": model.trainer, "plans": model.plans,
            "pretrained_weights": train.get("pretrained_weights"),
            "dice": score.get("dice"), "mean_dice": score.get("mean_dice"),
            "parameters": cost.get("parameters"), "macs": cost.get("macs"), "patch_size": cost.get("patch_size"),
            "network": cost.get("network"),
            "seconds_per_case": predict.get("seconds_per_case"),
            "seconds_per_iteration": train.get("seconds_per_iteration"),
            "peak_memory_mb": peak, "peak_memory_source": peak_source,
            "validation_dice_fold0": train.get("validation_dice"),
            "train_wall_s": train.get("wall_s"), "train_cpu_s": train.get("cpu_s"),
            "train_resumed": bool(train.get("resumed")),
        }
    return out


# --------------------------------------------------------------------------------- table
def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def format_table(results: Mapping) -> str:
    """The markdown table: Dice per organ and mean, then the costs."""
    organs = list(results["organs"])
    header = ["model", *(_pretty(o) for o in organs), "mean Dice", "params (M)", "GMACs", "s/case",
              "s/train iter", "peak mem (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for model in results["models"].values():
        dice = model.get("dice") or {}
        cells = [model["label"], *(_fmt(dice.get(o), ".3f") for o in organs), _fmt(model.get("mean_dice"), ".3f"),
                 _fmt(None if model.get("parameters") is None else model["parameters"] / 1e6, ".2f"),
                 _fmt(None if model.get("macs") is None else model["macs"] / 1e9, ".2f"),
                 _fmt(model.get("seconds_per_case"), ".2f"), _fmt(model.get("seconds_per_iteration"), ".2f"),
                 _fmt(model.get("peak_memory_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _device_note(settings: Mapping, machine: Mapping) -> str:
    cpu = machine.get("cpu_model")
    family = (f", family {machine['cpu_family']} model {machine['cpu_model_number']}"
              if machine.get("cpu_family") and machine.get("cpu_model_number") else "")
    return (f"Device: {settings['device']}; {machine.get('cpu_count', '?')} CPU cores"
            f"{f' ({cpu}{family})' if cpu else ''}; load average {machine.get('load_average_start', '?')} at start.")


def table_notes(results: Mapping) -> list[str]:
    """The notes under the table: how each column was measured, the budgets, resumed trainings, the
    SSL pretext accuracy and the device."""
    settings = results["settings"]
    budget = settings["budget"]
    patches = {m["label"]: m.get("patch_size") for m in results["models"].values()}
    patch_text = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in patches.items() if v)
    peak = next(iter(results["models"].values()), {}).get("peak_memory_source", "")
    return [
        f"Dice: nnU-Net's evaluator (nnUNetv2_evaluate_folder) on the {settings['num_test']} held-out test cases "
        f"(imagesTs/labelsTs), fold-0 models; mean Dice is its foreground mean.",
        f"Equal budgets: {budget['epochs']} epochs x {budget['iterations']} iterations (+{budget['val_iterations']} "
        f"validation iterations per epoch) for every model and for the SSL pretraining.",
        f"GMACs: fvcore multiply-accumulates of one forward pass at batch 1 and the planned patch ({patch_text}).",
        f"s/case: sliding-window prediction per test case as timed from nnUNetv2_predict's output "
        f"(test-time augmentation {'on' if results.get('tta') else 'off (--disable_tta)'}); "
        f"s/train iter: median epoch time from nnU-Net's training log / iterations per epoch "
        f"(first epoch left out: it starts the data-augmentation workers; includes the epoch's "
        f"validation iterations).",
        f"peak mem: {peak}.",
        *_resumed_note(results),
        *_ssl_note(results),
        _device_note(settings, results.get("machine", {})),
    ]


def ranking_lines(results: Mapping) -> list[str]:
    """nnU-Net's find_best_configuration verdict on the fold-0 validation cases."""
    rank = results.get("find_best_configuration") or {}
    scores = rank.get("validation_dice") or {}
    if not scores:
        return []
    labels = {key: model["label"] for key, model in results["models"].items()}
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    lines = ["", "## nnU-Net's model selection", "",
             "`nnUNetv2_find_best_configuration`'s ranking (foreground-mean Dice on the fold-0 validation cases, "
             "no ensembling; run through `python -m nnunet_logonet.demo.rank`, see its docstring):", ""]
    lines += [f"{i}. {labels.get(key, key)}: {value:.3f}{' (best)' if key == rank.get('best') else ''}"
              for i, (key, value) in enumerate(ordered, 1)]
    return lines


def _resumed_note(results: Mapping) -> list[str]:
    resumed = [m["label"] for m in results["models"].values() if m.get("train_resumed")]
    if (results.get("ssl_pretraining") or {}).get("resumed"):
        resumed.append("the SSL pretraining")
    if not resumed:
        return []
    return [f"Resumed with --c after an interruption: {', '.join(resumed)}. Peak memory and the training's wall "
            f"and CPU time (the stage times in results.json too) are those of the last nnUNetv2_train process "
            f"only; s/train iter comes from every process's training log."]


def _ssl_note(results: Mapping) -> list[str]:
    ssl = results.get("ssl_pretraining") or {}
    accuracy = ssl.get("pseudo_label_accuracy")
    if not accuracy:
        return []
    settings = results["settings"]
    return [f"SSL pretraining (LoGoNet + SSL): masked multi-cluster pretext on the {settings['num_train']} training + "
            f"{settings['num_unlabeled']} unlabeled images (labels unused); final pseudo-label accuracy on masked "
            f"slices {accuracy['val']:.3f} (chance {accuracy['chance']:.3f})."]


def write_markdown(results: Mapping, path: Path) -> None:
    """``results.md``: title, date and wall time, the table, its notes and nnU-Net's ranking."""
    settings = results["settings"]
    text = [f"# LoGoNet demo results ({'quick' if settings['quick'] else 'full'})", "",
            f"{results.get('date', '')}, `{results.get('command', 'logonet_demo')}`, total wall time "
            f"{results.get('wall_s', 0) / 60:.1f} min{_reuse_note(results)}.", "", format_table(results), ""]
    text += [f"- {note}" for note in table_notes(results)]
    text += ranking_lines(results)
    write_text_whole(path, "\n".join(text) + "\n")


def _reuse_note(results: Mapping) -> str:
    """When stages were reused, the wall time of this call says little: add the stages' own times."""
    stages = results.get("stages") or {}
    reused = [name for name, record in stages.items() if record.get("reused")]
    if not reused:
        return ""
    total = sum(record.get("stage_wall_s") or 0 for record in stages.values())
    return (f" ({len(reused)} of {len(stages)} stages reused from an earlier run; the stages' own times "
            f"add up to {total / 60:.1f} min)")


def write_json(results: Mapping, path: Path) -> None:
    """``results.json``, written whole; numpy values and paths become plain JSON."""
    write_json_whole(path, results, default=_json_default)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def plot_dice(results: Mapping, path: Path) -> None:
    """Grouped bars: per organ (and the mean), one bar per model, value on top."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    organs = list(results["organs"])
    groups = [*organs, "mean"]
    models = list(results["models"].values())
    width = 0.8 / max(1, len(models))
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.5 * len(groups)), 4.8))
    for i, model in enumerate(models):
        dice = model.get("dice") or {}
        values = [dice.get(o) for o in organs] + [model.get("mean_dice")]
        heights = [np.nan if v is None else float(v) for v in values]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, np.nan_to_num(heights), width,
                      label=model["label"], color=MODEL_COLOURS[i % len(MODEL_COLOURS)])
        for bar, value in zip(bars, heights):
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, 0 if np.isnan(value) else value),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, [_pretty(g) for g in groups])
    ax.axvline(len(organs) - 0.5, color="black", lw=0.6, ls=":")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("Dice (test cases)")
    settings = results["settings"]
    ax.set_title(f"Dice per organ on the held-out phantom test cases ({settings['num_test']} cases, "
                 f"{'quick' if settings['quick'] else 'full'} budget)")
    ax.legend(loc="upper left", ncol=len(models), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def pick_slice(labels: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """(case, axial index) showing the most organs, then the most foreground: the most telling slice."""
    best, best_score = None, (-1, -1)
    for case in sorted(labels):
        label = np.asarray(labels[case])
        for z in range(label.shape[0]):
            plane = label[z]
            score = (len(np.unique(plane[plane > 0])), int(np.count_nonzero(plane)))
            if score > best_score:
                best, best_score = (case, z), score
    if best is None:
        raise ValueError("no label volume to pick a slice from")
    return best


def _overlay(ax, image: np.ndarray, label: np.ndarray, organs: Mapping[str, int], window=(-160.0, 240.0)) -> None:
    ax.imshow(np.clip(image, *window), cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    rgba = np.zeros((*label.shape, 4))
    for index, (organ, value) in enumerate(organs.items()):
        rgba[label == value] = (*organ_colour(organ, index), 0.55)
    ax.imshow(rgba, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_overlay(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], organs: Mapping[str, int],
                 path: Path, title: str = "") -> None:
    """One axial slice: one panel per (title, label map) over the same CT image, one organ legend."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.9), squeeze=False)
    for ax, (name, label) in zip(axes[0], panels):
        _overlay(ax, image, label, organs)
        ax.set_title(name, fontsize=10)
    handles = [Patch(color=organ_colour(o, i), label=_pretty(o)) for i, o in enumerate(organs)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95 if title else 1))
    _save(fig, path)


def overlay_from_files(raw_dataset: Path, predictions: Mapping[str, Path], path: Path) -> dict:
    """overlay.png from the phantom's test images, its reference labels and each model's predictions."""
    import SimpleITK as sitk

    raw_dataset = Path(raw_dataset)
    labels_json = json.loads((raw_dataset / "dataset.json").read_text())["labels"]
    organs = {k: int(v) for k, v in sorted(labels_json.items(), key=lambda kv: kv[1]) if int(v) != 0}
    ending = ".nii.gz"
    references = {p.name[: -len(ending)]: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
                  for p in sorted((raw_dataset / "labelsTs").glob(f"*{ending}"))}
    case, z = pick_slice(references)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_dataset / "imagesTs" / f"{case}_0000{ending}")))
    panels = [("ground truth", references[case][z])]
    for label, folder in predictions.items():
        file = Path(folder) / f"{case}{ending}"
        if file.is_file():
            panels.append((label, sitk.GetArrayFromImage(sitk.ReadImage(str(file)))[z]))
    plot_overlay(image[z], panels, organs, path, title=f"{case}, axial slice {z} (test case)")
    return {"case": case, "slice": int(z), "panels": [name for name, _ in panels]}
