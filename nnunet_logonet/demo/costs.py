"""Parameters and multiply-accumulates of a planned network, at the patch size its plans train on.

The network is built the way nnU-Net builds it for inference (``get_network_from_plans`` with the
plans' architecture, no deep supervision); counting is the benchmark's (:mod:`nnunet_logonet.counting`,
fvcore). On CUDA the
training step's peak memory is measured here too, as nnU-Net does not log it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nnunet_logonet.counting import count_macs, count_parameters

__all__ = ["network_costs", "cuda_training_peak_mb"]


def _build(plans_file: Path, dataset_json: Path, configuration: str):
    """The configuration's network as ``nnUNetPredictor`` builds it, its configuration and input channels."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(json.loads(Path(plans_file).read_text()))
    config = plans.get_configuration(configuration)
    dataset = json.loads(Path(dataset_json).read_text())
    channels = len(dataset.get("channel_names", dataset.get("modality", {})))
    label_manager = plans.get_label_manager(dataset)
    net = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                 config.network_arch_init_kwargs_req_import, channels,
                                 label_manager.num_segmentation_heads, allow_init=True, deep_supervision=False)
    return net, config, channels


def cuda_training_peak_mb(net: torch.nn.Module, x: torch.Tensor, steps: int = 3) -> float:
    """``torch.cuda.max_memory_allocated`` over a few fp16-autocast training steps (SGD, as nnU-Net)."""
    device = x.device
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = net(x).float().mean()
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1024 ** 2


def network_costs(plans_file: str | Path, dataset_json: str | Path, configuration: str = "3d_fullres",
                  device: str = "cpu") -> dict:
    """``parameters``, ``macs`` (fvcore, batch 1), ``patch_size``, ``batch_size``, and on CUDA
    ``cuda_training_peak_mb`` at the planned batch size."""
    net, config, channels = _build(Path(plans_file), Path(dataset_json), configuration)
    patch_size, batch_size = [int(p) for p in config.patch_size], int(config.batch_size)
    x = torch.randn(1, channels, *patch_size)
    macs, uncounted = count_macs(net, x)
    costs = {"parameters": count_parameters(net), "macs": macs, "patch_size": patch_size,
             "batch_size": batch_size, "fvcore_uncounted_ops": uncounted, "network": config.network_arch_class_name}
    if device == "cuda":
        net = net.to("cuda")
        xb = torch.randn(batch_size, channels, *patch_size, device="cuda")
        costs["cuda_training_peak_mb"] = cuda_training_peak_mb(net, xb)
    return costs
