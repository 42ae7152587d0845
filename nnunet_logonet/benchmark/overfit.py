"""Can the network fit one batch? The quickest check that a model can learn at all.

Two phantom cases, one fixed batch, nnU-Net's Dice + CE loss and nnU-Net's SGD (lr 1e-2,
Nesterov momentum 0.99, gradient clipping 12), no augmentation. A network that cannot bring the
liver Dice of the very batch it trains on above zero in 150 steps has a capacity or wiring
problem, whatever the recipe. This check found that LoGoNet-tiny with 4- or 8-channel
full-resolution decoders never leaves the all-background solution (docs/training_recipe.md)::

    python -m nnunet_logonet.benchmark.overfit                    # the table of that page
    python -m nnunet_logonet.benchmark.overfit --variants tiny --steps 100
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_logonet.training.recipes import configure_recipe, recipe_optimizer

__all__ = ["VARIANTS", "phantom_batch", "fit_batch", "class_dice", "overfit", "main"]

#: decoder / stem overrides of the tiny preset (full resolution first); ``nnunet`` is nnU-Net's
#: PlainConvUNet for reference
VARIANTS: dict[str, dict] = {
    "tiny": {},
    "tiny_decoder4": {"decoder_channels": [4, 4, 4, 8, 24, 32]},
    "tiny_decoder4_stem16": {"decoder_channels": [4, 4, 4, 8, 24, 32], "stem_channels": [16, 16]},
    "tiny_decoder8": {"decoder_channels": [8, 8, 8, 16, 24, 32], "stem_channels": [8, 8]},
    "nnunet": {},
}
LIVER = 5
PATCH = (16, 32, 32)
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]]


def phantom_batch(seeds: Sequence[int] = (0, 1), size: int = 32, patch: Sequence[int] = PATCH
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [B,1,*patch] float, label [B,1,*patch] long): phantom cases, CT-normalised like
    nnU-Net (clip to the foreground's 0.5-99.5 percentiles, z-score), centre-cropped or padded."""
    from nnunet_logonet.phantom.anatomy import generate_case

    images, labels = [], []
    for seed in seeds:
        case = generate_case(seed, size=size)
        image, label = case.image.astype(np.float32), case.label.astype(np.int64)
        fg = image[label > 0]
        low, high = np.percentile(fg, [0.5, 99.5])
        image = (np.clip(image, low, high) - fg.mean()) / max(fg.std(), 1e-8)
        images.append(center_fit(image, patch))
        labels.append(center_fit(label, patch))
    return (torch.from_numpy(np.stack(images)[:, None].astype(np.float32)),
            torch.from_numpy(np.stack(labels)[:, None].astype(np.int64)))


def center_fit(array: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """The centre of ``array`` cropped, or zero-padded, to ``patch`` in every axis."""
    out = np.zeros(tuple(patch), dtype=array.dtype)
    src, dst = [], []
    for n, p in zip(array.shape, patch):
        if n >= p:
            start = (n - p) // 2
            src.append(slice(start, start + p))
            dst.append(slice(0, p))
        else:
            start = (p - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = array[tuple(src)]
    return out


def build(variant: str, num_classes: int = 7) -> torch.nn.Module:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {sorted(VARIANTS)}")
    if variant == "nnunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet

        return PlainConvUNet(1, 5, [32, 64, 128, 256, 320], torch.nn.Conv3d, 3,
                             [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], 2, num_classes, 2,
                             conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                             norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                             nonlin_kwargs={"inplace": True})
    from nnunet_logonet.network import LoGoNet
    from nnunet_logonet.network.presets import arch_kwargs_for_preset

    kwargs = arch_kwargs_for_preset("tiny", STRIDES, local_grid=[1, 2, 2], **VARIANTS[variant])
    return LoGoNet(1, num_classes, False, **kwargs)


def fit_batch(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
              report_every: int = 25, lr: float | None = None, recipe: str = "nnunet",
              progress: str | None = None) -> list[dict]:
    """Train ``network`` (deep supervision off) on the fixed batch ``x`` [B, C, ...], ``y`` [B, 1, ...]
    with nnU-Net's Dice + CE loss, gradient clipping and the optimizer of ``recipe``
    (``training.recipes``: 'nnunet' SGD with Nesterov momentum 0.99, 'paper' AdamW) at the recipe's
    initial learning rate and weight decay, or at ``lr``, without a schedule. Every ``report_every``
    steps and at the last: the loss, the gradient norm before clipping and each foreground class's
    Dice of the batch's argmax (train mode, as trained; ``dice[c - 1]`` is class c's). With ``progress``
    (its label) a progress bar on stderr shows the steps and the last loss."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    if steps < 1 or report_every < 1:
        raise ValueError(f"steps and report_every must be >= 1, got {steps} and {report_every}")
    settings = SimpleNamespace()
    configure_recipe(settings, recipe)  # initial_lr, weight_decay
    lr = settings.initial_lr if lr is None else lr
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = recipe_optimizer(network.parameters(), recipe, lr, settings.weight_decay)
    network.train()
    history = []
    bar = tqdm(range(1, steps + 1), desc=progress, unit="step", disable=progress is None, file=sys.stderr,
               leave=False)
    for step in bar:
        output = network(x)
        loss = loss_fn(output, y)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        if step % report_every == 0 or step == steps:
            dice = class_dice(output.argmax(1), y[:, 0], output.shape[1])
            history.append({"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "dice": dice})
            bar.set_postfix(loss=f"{history[-1]['loss']:+.3f}")
    return history


def class_dice(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class over the batch, from nnU-Net's evaluator's counts
    (``compute_tp_fp_fn_tn``). A class in neither the prediction nor the batch scores 0, not nnU-Net's NaN,
    so that the means over classes the fitting reports stay defined."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    prediction, reference = prediction.cpu().numpy(), reference.cpu().numpy()
    dice = []
    for c in range(1, num_classes):
        tp, fp, fn, _ = compute_tp_fp_fn_tn(reference == c, prediction == c)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return [float(d) for d in dice]


def overfit(variant: str = "tiny", steps: int = 150, seed: int = 0, report_every: int = 25,
            batch: tuple[torch.Tensor, torch.Tensor] | None = None, progress: str | None = None) -> list[dict]:
    """Train ``variant`` on one fixed batch; every ``report_every`` steps the loss and the liver
    Dice of the batch's argmax prediction (train mode, as trained)."""
    torch.manual_seed(seed)
    x, y = batch if batch is not None else phantom_batch()
    history = fit_batch(build(variant), x, y, steps, report_every, progress=progress)
    for record in history:
        record["liver_dice"] = record["dice"][LIVER - 1]
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.overfit",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="networks to fit (default: all)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps on the batch (default 150)")
    parser.add_argument("--seed", type=int, default=0, help="seed of each network's initial weights (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:  # checked before the phantom batch is made
        parser.error(f"--steps must be at least 1, got {args.steps}")
    batch = phantom_batch()
    print(f"one batch of 2 phantom cases, patch {'x'.join(map(str, PATCH))}; liver Dice of the batch "
          f"(loss) every 25 steps")
    for variant in args.variants:
        start = time.perf_counter()
        history = overfit(variant, args.steps, args.seed, batch=batch, progress=variant)
        cells = "  ".join(f"{h['step']}: {h['liver_dice']:.2f} ({h['loss']:+.2f})" for h in history)
        print(f"{variant:22s} {cells}   [{time.perf_counter() - start:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
