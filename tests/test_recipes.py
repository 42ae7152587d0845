"""The training recipes' optimizers: fused kernels on the CPU, the same update as PyTorch's default."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nnunet_logonet.training.recipes import build_optimizer_and_scheduler, configure_recipe


def _trainer(recipe: str, network: nn.Module) -> SimpleNamespace:
    trainer = SimpleNamespace(network=network, recipe=recipe, num_epochs=10, device=torch.device("cpu"))
    configure_recipe(trainer, recipe)
    return trainer


@pytest.mark.parametrize("recipe, reference", [("paper", torch.optim.AdamW), ("nnunet", torch.optim.SGD)])
def test_cpu_optimizer_is_fused_and_steps_like_the_default(recipe, reference):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 3, 1))
    twin = copy.deepcopy(net)
    optimizer, _ = build_optimizer_and_scheduler(_trainer(recipe, net))
    assert isinstance(optimizer, reference) and optimizer.defaults["fused"]
    group = optimizer.param_groups[0]
    kwargs = {k: group[k] for k in ("lr", "weight_decay")}
    kwargs.update({"momentum": group["momentum"], "nesterov": group["nesterov"]} if recipe == "nnunet"
                  else {"betas": group["betas"]})
    plain = reference(twin.parameters(), **kwargs)
    x = torch.randn(2, 2, 6, 6, 6)
    for _ in range(3):
        for model, opt in ((net, optimizer), (twin, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the state survives a checkpoint round trip (nnU-Net's --c)
    resumed, _ = build_optimizer_and_scheduler(_trainer(recipe, copy.deepcopy(net)))
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize("recipe, lr, weight_decay, deep_supervision", [
    ("nnunet", 1e-2, 3e-5, True),  # nnU-Net's defaults (nnUNetTrainer)
    ("paper", 1e-4, 1e-5, False),  # the paper's fine-tuning (docs/training_recipe.md)
])
def test_recipes_set_their_documented_constants(recipe, lr, weight_decay, deep_supervision):
    trainer = _trainer(recipe, nn.Linear(2, 2))
    assert (trainer.initial_lr, trainer.weight_decay, trainer.enable_deep_supervision) == \
        (lr, weight_decay, deep_supervision)
    optimizer, _ = build_optimizer_and_scheduler(trainer)
    group = optimizer.param_groups[0]
    if recipe == "nnunet":
        assert isinstance(optimizer, torch.optim.SGD) and (group["momentum"], group["nesterov"]) == (0.99, True)
    else:
        assert isinstance(optimizer, torch.optim.AdamW) and group["betas"] == (0.9, 0.999)
    assert group["weight_decay"] == weight_decay


def test_learning_rate_schedules_per_epoch():
    """nnU-Net's poly (1 - epoch/max)^0.9; the paper's linear warm-up over 5 % of the epochs, then cosine to 0."""
    import math

    def rates(recipe):
        trainer = _trainer(recipe, nn.Linear(2, 2))
        trainer.num_epochs = 100
        optimizer, scheduler = build_optimizer_and_scheduler(trainer)
        out = []
        for epoch in range(100):  # as nnUNetTrainer.on_train_epoch_start
            scheduler.step(epoch)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    poly = rates("nnunet")
    for epoch in (0, 50, 99):
        assert poly[epoch] == pytest.approx(1e-2 * (1 - epoch / 100) ** 0.9)
    paper = rates("paper")
    assert paper[:5] == pytest.approx([1e-4 * (e + 1) / 6 for e in range(5)])  # 5 warm-up epochs, rising
    for epoch in (5, 30, 52, 99):
        assert paper[epoch] == pytest.approx(0.5 * 1e-4 * (1 + math.cos(math.pi * (epoch - 5) / 95)))
    assert paper[5] == max(paper) == pytest.approx(1e-4) and paper[99] < 1e-7


def test_warmup_cosine_schedule_at_its_edges():
    """Past max_steps (a run resumed with more epochs) the rate stays 0 instead of rising along the cosine;
    a warm-up as long as the run is cut so the last step still decays; step() without an epoch counts on."""
    from nnunet_logonet.training.recipes import WarmupCosineLRScheduler

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = WarmupCosineLRScheduler(optimizer, 1e-3, 10, 2)
    assert scheduler.lr_at(10) == pytest.approx(0.0, abs=1e-12)
    assert scheduler.lr_at(15) == pytest.approx(0.0, abs=1e-12) and scheduler.lr_at(20) == pytest.approx(0, abs=1e-12)
    long_warmup = WarmupCosineLRScheduler(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), 1e-3, 3, 10)
    assert long_warmup.warmup_steps == 2 and long_warmup.lr_at(2) == pytest.approx(1e-3)
    counted = WarmupCosineLRScheduler(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), 1e-3, 10, 2)
    seen = []
    for _ in range(3):
        counted.step()
        seen.append(counted.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([counted.lr_at(step) for step in (1, 2, 3)])
