"""Training recipes: nnU-Net's (SGD + poly, deep supervision) and the paper's (AdamW 1e-4,
linear warm-up then cosine). Both use nnU-Net's Dice + CE loss (1:1, as the paper's best).
Which one ``LoGoNetTrainer`` uses is decided in docs/training_recipe.md by an equal-budget run."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_logonet.network.arguments import positive_int, real_number

RECIPES = ("nnunet", "paper")


class WarmupCosineLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``max_steps``. Stepped with
    the epoch index, like nnU-Net's PolyLRScheduler, so ``--c`` resumes at the right rate."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, current_step: int = None):
        self.initial_lr = real_number(initial_lr, "initial_lr", minimum=0.0, exclusive_minimum=True)
        self.max_steps = positive_int(max_steps, "max_steps")
        # at most max_steps - 1: the last step is always the cosine's
        self.warmup_steps = min(positive_int(warmup_steps, "warmup_steps", minimum=0), self.max_steps - 1)
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return 0.5 * self.initial_lr * (1 + math.cos(math.pi * min(1.0, progress)))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def configure_recipe(trainer, recipe: str) -> None:
    """Set the recipe's trainer attributes (read later by nnU-Net's initialize)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "paper":
        trainer.initial_lr = 1e-4
        trainer.weight_decay = 1e-5
        trainer.enable_deep_supervision = False
    else:
        trainer.initial_lr = 1e-2
        trainer.weight_decay = 3e-5
        trainer.enable_deep_supervision = True


def optimizer_implementation(device: torch.device | str) -> dict:
    """Keyword arguments for PyTorch's fused optimizer kernels on the CPU.

    LoGoNet has 4x nnU-Net's parameters (S: 66.5 M), so the optimizer step is not negligible:
    on the 2-core CPU the fused kernels take AdamW from 0.193 to 0.072 s and SGD (Nesterov) from
    0.121 to 0.054 s per step for LoGoNet-S (same update, one pass over the parameters instead of
    one per operation). On CUDA PyTorch's default stays (not measured here: no GPU was lent).
    """
    return {"fused": True} if torch.device(device).type == "cpu" else {}


def recipe_optimizer(params, recipe: str, lr: float, weight_decay: float, **kwargs) -> torch.optim.Optimizer:
    """The recipe's optimizer: 'paper' AdamW (betas 0.9, 0.999), 'nnunet' SGD with Nesterov momentum 0.99."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "paper":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, **kwargs)
    return torch.optim.SGD(params, lr, weight_decay=weight_decay, momentum=0.99, nesterov=True, **kwargs)


def build_optimizer_and_scheduler(trainer):
    """The trainer's optimizer and LR scheduler for its recipe: 'paper' AdamW with warm-up (5% of the
    epochs) then cosine, 'nnunet' SGD with nnU-Net's poly schedule."""
    optimizer = recipe_optimizer(trainer.network.parameters(), trainer.recipe, trainer.initial_lr,
                                 trainer.weight_decay, **optimizer_implementation(trainer.device))
    if trainer.recipe == "paper":
        warmup = max(1, round(0.05 * trainer.num_epochs)) if trainer.num_epochs > 1 else 0
        scheduler = WarmupCosineLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs, warmup)
    else:
        scheduler = PolyLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs)
    return optimizer, scheduler
