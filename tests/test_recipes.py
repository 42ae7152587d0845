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
