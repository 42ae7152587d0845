"""Does a pretrained checkpoint fit a network? Every difference, before training starts.

nnU-Net's ``-pretrained_weights`` loader (``load_pretrained_weights``) stops at the first missing
key or shape mismatch, with an assertion. :func:`compare_pretrained` runs the same rule (every key
of the network except those containing ``.seg_layers.`` must be in the file's
``network_weights`` with the same shape) and lists *all* differences, plus where the file came
from (trainer, plans, preset), so a user sees at once that e.g. a tiny-preset SSL checkpoint was
given to an S network. It is stricter than nnU-Net in one way: keys of the file that the network
lacks are differences too, because nnU-Net's loader drops them silently. A checkpoint of a LoGoNet
with 8 local paths loads into one with 4 (another ``local_grid``) that way, each kept path given
weights learned on another sub-crop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnunet_logonet.network.classifier_weights import CLASSIFIER_KEY
from nnunet_logonet.ssl.features import unwrap_network

__all__ = ["PretrainedMismatchError", "check_pretrained", "compare_pretrained", "describe_checkpoint",
           "pretrained_weights_from_argv"]

#: nnU-Net's load_pretrained_weights skips keys containing these (the classifiers)
SKIPPED = (CLASSIFIER_KEY,)


class PretrainedMismatchError(ValueError):
    """The pretrained file does not fit the network; the message lists every difference."""


def _load(checkpoint: str | os.PathLike | dict) -> tuple[dict, str]:
    if isinstance(checkpoint, dict):
        return checkpoint, "<checkpoint dict>"
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist.")
    try:
        # nnU-Net checkpoints hold numpy values in their logs: not loadable with weights_only=True
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise PretrainedMismatchError(f"pretrained weights file {path} is unreadable "
                                      f"({type(error).__name__}: {error}).") from error
    if not isinstance(loaded, dict) or not isinstance(loaded.get("network_weights"), dict):
        raise PretrainedMismatchError(f"{path} is not an nnU-Net checkpoint: it has no 'network_weights' dict "
                                      f"(found keys {sorted(loaded)[:8] if isinstance(loaded, dict) else type(loaded)}).")
    return loaded, str(path)


def _checkpoint_configuration(checkpoint: dict) -> dict:
    """The plans' entry for the configuration the checkpoint was trained with ({} when not stored)."""
    init = checkpoint.get("init_args") or {}
    return ((init.get("plans") or {}).get("configurations") or {}).get(init.get("configuration")) or {}


def checkpoint_network_class(checkpoint: dict) -> str | None:
    """The class name of the network a checkpoint's plans describe (``PlainConvUNet``, ``LoGoNet``), when nnU-Net
    stored its init args."""
    name = (_checkpoint_configuration(checkpoint).get("architecture") or {}).get("network_class_name")
    return name.rsplit(".", 1)[-1] if isinstance(name, str) and name else None


def describe_checkpoint(checkpoint: dict) -> str:
    """'trainer T, plans P (configuration C, preset X)' from the checkpoint's init args, when present."""
    init = checkpoint.get("init_args") or {}
    plans = init.get("plans") or {}
    configuration = init.get("configuration")
    parts = [f"trainer {checkpoint.get('trainer_name', '?')}", f"plans {plans.get('plans_name', '?')}"]
    preset = (_checkpoint_configuration(checkpoint).get("logonet") or {}).get("preset")
    network = checkpoint_network_class(checkpoint)
    details = [f"configuration {configuration}"] if configuration else []
    if network:
        details.append(network + (f"-{preset}" if preset else ""))
    if plans.get("dataset_name"):
        details.append(plans["dataset_name"])
    return ", ".join(parts) + (f" ({', '.join(details)})" if details else "")


def compare_pretrained(network: nn.Module, checkpoint: str | os.PathLike | dict[str, Any]) -> list[str]:
    """Every reason nnU-Net's ``load_pretrained_weights`` would refuse ``checkpoint`` for ``network``.

    Returns one line per missing key, key the network lacks or shape mismatch (empty list: it
    loads whole). Classifier keys (``.seg_layers.``) are skipped as nnU-Net skips them. DDP /
    torch.compile wrappers around ``network`` are looked through.
    """
    loaded, _ = _load(checkpoint)
    pretrained = {k[len("module."):] if k.startswith("module.") else k: v
                  for k, v in loaded["network_weights"].items()}
    differences = []
    own = unwrap_network(network).state_dict()
    for key, value in own.items():
        if any(s in key for s in SKIPPED):
            continue
        if key not in pretrained:
            differences.append(f"missing in checkpoint: {key} (network shape {tuple(value.shape)})")
        elif tuple(pretrained[key].shape) != tuple(value.shape):
            differences.append(f"shape differs: {key}: checkpoint {tuple(pretrained[key].shape)} "
                               f"vs network {tuple(value.shape)}")
    for key, value in pretrained.items():
        if key not in own and not any(s in key for s in SKIPPED):
            shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            differences.append(f"not in network: {key} (checkpoint shape {shape}; nnU-Net would drop it)")
    return differences


def check_pretrained(network: nn.Module, checkpoint: str | os.PathLike, *, max_lines: int = 25,
                     network_description: str = "") -> None:
    """Raise :class:`PretrainedMismatchError` listing all differences (first ``max_lines``) if any."""
    loaded, name = _load(checkpoint)
    differences = compare_pretrained(network, loaded)
    if not differences:
        return
    missing = sum(d.startswith("missing") for d in differences)
    unused = sum(d.startswith("not in network") for d in differences)
    shown = "\n    ".join(differences[:max_lines])
    more = f"\n    ... and {len(differences) - max_lines} more" if len(differences) > max_lines else ""
    target = f" ({network_description})" if network_description else ""
    source, own = checkpoint_network_class(loaded), type(unwrap_network(network)).__name__
    if source is not None and source != own:  # no plans can make these fit
        start = ("pre-train one on your scans (-tr LoGoNetSSLTrainer, docs/ssl.md)" if own == "LoGoNet" else
                 f"give a checkpoint of a {own} training")
        fix = (f"These are weights of a {source}, not of a {own}: a {own} starts only from {own} weights; "
               f"{start}, or train without -pretrained_weights.")
    else:
        fix = (f"Pretrain with the same plans (same preset, patch size and input channels) as the fine-tuning, "
               f"e.g. move the fine-tuning plans to the pretraining dataset with nnUNetv2_move_plans_between_datasets "
               f"(docs/ssl.md).")
    raise PretrainedMismatchError(
        f"pretrained weights {name} do not fit this network{target}: {missing} key(s) missing, {unused} not in "
        f"the network, {len(differences) - missing - unused} shape mismatch(es). The file comes from "
        f"{describe_checkpoint(loaded)}.\n"
        f"    {shown}{more}\n{fix}")


def pretrained_weights_from_argv(argv: Sequence[str]) -> str | None:
    """The value of ``-pretrained_weights`` in an ``nnUNetv2_train`` command line, if given.

    nnU-Net passes the file only to its loader, after ``initialize()``; a trainer that wants to
    check it first can read it from ``sys.argv`` with this.
    """
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-pretrained_weights="):
            return arg.split("=", 1)[1]
    return None
