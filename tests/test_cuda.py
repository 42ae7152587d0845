"""CUDA paths of LoGoNet: mixed precision, torch.compile and the eval-mode BatchNorm folding (LKA blocks' too).

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from nnunet_logonet.network import LoGoNet, ULKANet
from nnunet_logonet.network.levers import reference_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CL = torch.channels_last_3d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _net(cls, preset: str, patch, deep_supervision=False):
    torch.manual_seed(0)
    return cls.from_preset(preset, 1, 4, patch, deep_supervision=deep_supervision).cuda().to(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "S"])
def test_mixed_precision_training_step_is_finite_and_close_to_fp32(preset, dtype):
    patch = (64, 64, 64)
    net = _net(LoGoNet, preset, patch, deep_supervision=True).train()
    x = torch.randn(2, 1, *patch, device="cuda").contiguous(memory_format=CL)
    ref = copy.deepcopy(net)
    with torch.autocast("cuda", dtype=dtype):
        out = net(x)
    loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    fp32 = ref(x)
    assert _rel(out[0], fp32[0]) < (5e-2 if dtype == torch.float16 else 1e-1)


def _eval_net(cls) -> torch.nn.Module:
    """LoGoNet/ULKANet-tiny in eval mode with non-trivial BatchNorm statistics (so folding is exercised)."""
    net = _net(cls, "tiny", (64, 64, 64)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
def test_eval_folding_matches_reference_on_cuda(cls):
    net = _eval_net(cls)
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    with torch.no_grad():
        fast = net(x)
        with reference_kernels():
            ref = net(x)
    # fp32 convolutions run as TF32 on Ampere and later (PyTorch's default for cuDNN), so two
    # orders of summation differ by ~1e-3 (measured 2.0e-3 / 2.2e-3 on an H200)
    assert _rel(fast, ref) < 5e-3


@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
def test_folded_inference_under_autocast_matches_the_unfolded_one(cls):
    """nnUNetv2_predict on CUDA: inference_mode and fp16 autocast, BatchNorms (LKA blocks' too) folded."""
    net = _eval_net(cls)
    x = torch.randn(1, 1, 64, 64, 64, device="cuda").contiguous(memory_format=CL)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        fast = net(x)
        with reference_kernels("lka_folding", "batchnorm_folding"):
            unfolded = net(x)
    assert fast.dtype == unfolded.dtype and torch.isfinite(fast).all()
    assert _rel(fast, unfolded) < 2e-2  # fp16 rounding (bfloat16 autocast on the CPU: 1.2e-2, a coarser type)


def test_torch_compile_matches_eager():
    net = _net(LoGoNet, "tiny", (64, 64, 64)).eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda").contiguous(memory_format=CL)
    compiled = torch.compile(net)
    with torch.no_grad():
        eager = net(x)
        out = compiled(x)
    assert _rel(out, eager) < 5e-3  # TF32, as above (measured 1.4e-3 on an H200)
    net.train()
    y = compiled(x)
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_interleaved_benchmark_runs_on_cuda_with_mixed_precision(tmp_path):
    """``logonet_benchmark --interleave`` on the GPU: synchronised timings, fp16 autocast, paired ratios."""
    import json

    from nnunet_logonet.benchmark.efficiency import main

    out = tmp_path / "interleaved.json"
    assert main(["--device", "cuda", "--models", "nnunet", "logonet_tiny", "--patch-size", "32", "32", "32",
                 "--batch-size", "1", "--interleave", "2", "--json", str(out), "--no-progress"]) == 0
    models = json.loads(out.read_text())["models"]
    assert models["logonet_tiny"]["details"]["amp"] is True
    for entry in models.values():
        assert all(len(v) == 2 and min(v) > 0 for v in entry["samples"].values())
        assert entry["ratios"]["train_step_s"] > 0


def test_torch_kmeans_refit_on_cuda_is_bit_identical():
    """A --c whose cluster cache is gone refits with the same seed and keeps the head only if the digest
    matches: index_add_'s atomic adds on CUDA made each refit differ in the last bits."""
    from nnunet_logonet.ssl.clusterers import SliceClusterBank
    from nnunet_logonet.training.ssl_trainer import bank_digest

    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(20, 256, generator=generator).repeat_interleave(200, 0)
            + 0.3 * torch.randn(4000, 256, generator=generator)).cuda()
    banks = [SliceClusterBank(num_clusterers=4, k_range=(20, 40), sample_fraction=0.5, seed=3, backend="torch",
                              max_iter=30).fit(data) for _ in range(3)]
    assert len({bank_digest(bank) for bank in banks}) == 1


def test_slice_mask_is_drawn_on_the_generators_device():
    """Drawn with a CUDA generator and no device, the mask comes out on the generator's device (a CPU
    draw would fail against the CUDA generator, or give a mask that does not fit the CUDA batch)."""
    from nnunet_logonet.ssl.masking import SliceSequenceMasker

    mask = SliceSequenceMasker().sample((2, 1, 16, 8, 8), generator=torch.Generator("cuda").manual_seed(0))
    assert mask.voxels.device.type == "cuda" and mask.slices.device.type == "cuda"
