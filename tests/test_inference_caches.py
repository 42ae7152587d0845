"""The inference caches of derived tensors (folded BatchNorms, grouped weights and statistics) never
serve stale values, and the fast paths honour what users do to a network: fused optimizers, BatchNorm
recalibration, frozen BatchNorms, hooks, parametrized weights (each case found by an audit, each
failing before its fix). Every check compares the fast network with the same weights run under
``reference_kernels()``."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from nnunet_logonet.network import LoGoNet
from nnunet_logonet.network.levers import reference_kernels

PATCH = (16, 32, 32)  # LoGoNet-tiny's local paths run grouped here, in training too
ANISOTROPIC = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the grouped local paths (on 2 the paths run side by side as a loop)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(seed: int = 0) -> LoGoNet:
    torch.manual_seed(seed)
    net = LoGoNet.from_preset("tiny", 1, 4, PATCH, strides=ANISOTROPIC)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def _x(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, *PATCH, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _eval_vs_reference(net: LoGoNet, x: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        fast = net(x)
        with reference_kernels():
            reference = net(x)
    return _rel(fast, reference)


def _train_step(net: LoGoNet, x: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    net.train()
    net(x).square().mean().backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_validation_after_fused_optimizer_steps_sees_the_new_weights():
    """nnU-Net's epoch: train steps, then eval for validation, again and again. Our CPU recipe's fused
    SGD changes no version counter, so the folded weights of the first validation were served to
    every later one (and to the final validation nnUNetv2_find_best_configuration ranks by)."""
    net, x = _tiny(), _x()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, nesterov=True, fused=True)
    assert _eval_vs_reference(net, x) < 1e-4  # fills the caches
    for _ in range(2):
        _train_step(net, x, optimizer)
        net.eval()
        assert _eval_vs_reference(net, x) < 1e-4


def test_a_fused_step_between_mode_switches_is_seen_without_a_training_forward():
    """``train()``/``eval()`` alone drop the caches: a fused optimizer step taken after the validation
    forwards (gradients of an earlier backward) changes no version counter, and no training forward
    follows it before the next validation."""
    net, x = _tiny(), _x()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, fused=True)
    net.train()
    net(x).square().mean().backward()
    assert _eval_vs_reference(net, x) < 1e-4  # fills the caches after the training forward
    net.train()
    optimizer.step()
    assert _eval_vs_reference(net, x) < 1e-4


def test_eval_after_batchnorm_recalibration_sees_the_new_statistics():
    """Train-mode forwards under no_grad (BatchNorm recalibration) update running statistics in place
    without a version bump."""
    net, x = _tiny(), _x()
    assert _eval_vs_reference(net, x) < 1e-4
    net.train()
    with torch.no_grad():
        net(_x(seed=2) * 3 + 1)
    assert _eval_vs_reference(net, x) < 1e-4


def test_grouped_running_statistics_follow_a_step_run_as_the_loop():
    """A step of the paths one by one (2 threads, or the lever off) updates each path's statistics
    unversioned; the next grouped step must not reuse its kept concatenation."""
    net, x = _tiny(), _x()
    reference = copy.deepcopy(net)
    with reference_kernels():
        for _ in range(3):
            _train_step(reference, x)
    _train_step(net, x)
    with reference_kernels("grouped_local_paths"):
        _train_step(net, x)
    _train_step(net, x)
    buffers = dict(reference.named_buffers())
    for name, value in net.named_buffers():
        if "running" in name:
            assert _rel(value, buffers[name]) < 1e-4, name


@pytest.mark.parametrize("case", ["one_path_frozen", "cumulative_momentum"])
def test_grouped_batchnorms_follow_each_paths_own_settings(case):
    """Training with one local path's BatchNorms frozen in eval (the grouped paths normalise paths in
    different modes one by one), and BatchNorms with ``momentum=None`` (cumulative averages): the
    outputs and every path's statistics and batch counts are the reference's."""
    net, x = _tiny(), _x()
    if case == "cumulative_momentum":
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.momentum = None
    reference = copy.deepcopy(net)
    outputs = []
    for model, context in ((net, contextlib.nullcontext()), (reference, reference_kernels())):
        model.train()
        if case == "one_path_frozen":
            for m in model.local_paths[0].modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.eval()
        with context:
            for _ in range(2):
                out = model(x)
                out.square().mean().backward()
        outputs.append(out.detach())
    assert _rel(*outputs) < 1e-4
    buffers = dict(reference.named_buffers())
    for name, value in net.named_buffers():  # (cumulative means of about 0 compare absolutely)
        torch.testing.assert_close(value, buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("edited", ["running_var", "local_paths.5"])
def test_in_place_edits_in_eval_are_seen_without_a_mode_switch(edited):
    """Versioned in-place edits between two eval forwards, with no ``train()``/``eval()`` between (which
    would rebuild every cache anyway): every BatchNorm's running variance (a hand recalibration), or every
    tensor of one local path (the grouped paths' caches must be keyed on each path, not the first)."""
    net, x = _tiny(), _x(batch=1)
    assert _eval_vs_reference(net, x) < 1e-4  # fills the caches
    with torch.no_grad():
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            wanted = name.endswith("running_var") if edited == "running_var" else name.startswith(edited + ".")
            if wanted and t.is_floating_point():
                t.mul_(1.5)
        fast = net(x)
        with reference_kernels():
            reference = net(x)
    assert _rel(fast, reference) < 1e-4


def test_training_after_a_train_mode_forward_under_inference_mode():
    """A validation pass that forgot ``eval()``: its statistics were kept as inference tensors, which
    the next training step could not save for backward."""
    net, x = _tiny(), _x()
    net.train()
    with torch.inference_mode():
        net(x)
    _train_step(net, x)  # raised "Inference tensors cannot be saved for backward"


@pytest.mark.parametrize("network_mode, batchnorm_mode", [("train", "eval"), ("eval", "train")])
def test_batchnorms_in_their_own_mode(network_mode, batchnorm_mode):
    """Fine-tuning with frozen BatchNorms (network in train, BatchNorms in eval), and test-time
    adaptation (the reverse): the grouped paths' LKA blocks used the block's mode for their norms."""
    net, x = _tiny(), _x()
    reference = copy.deepcopy(net)
    outputs = []
    for model, context in ((net, torch.enable_grad()), (reference, reference_kernels())):
        model.train(network_mode == "train")
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.train(batchnorm_mode == "train")
        with context, torch.no_grad():
            outputs.append(model(x))
    assert _rel(*outputs) < 1e-4
    buffers = dict(reference.named_buffers())
    for name, value in net.named_buffers():
        if "running" in name:
            assert _rel(value, buffers[name]) < 1e-5, name


@pytest.mark.parametrize("module_name", ["local_paths.3.encoder.stages.0", "local_paths.2.encoder.stem.0.conv",
                                         "global_path.encoder.stem.1.norm", "head"])
def test_forward_hooks_run_and_may_change_outputs(module_name):
    """A hook (feature extraction, Grad-CAM, pruning's pre-hook) must see its module run: the grouped
    local paths and the folded conv units used to skip them silently."""
    net, x = _tiny(), _x(batch=1)
    calls = []

    def halve(module, inputs, output):
        calls.append(module_name)
        return output * 0.5

    net.get_submodule(module_name).register_forward_hook(halve)
    net.eval()
    with torch.no_grad():
        fast = net(x)
        assert calls == [module_name]
        with reference_kernels():
            reference = net(x)
    assert _rel(fast, reference) < 1e-4


def test_parametrized_weight_edits_are_seen_in_eval():
    """A parametrized weight (weight_norm) is a fresh tensor at each access, often at the address of
    the last one and at version 0: the cache must not take it for the same tensor. (No ``eval()``
    between the forwards, which would rebuild every cache anyway.)"""
    net, x = _tiny(), _x(batch=1)
    for conv in [m for m in net.modules() if isinstance(m, nn.Conv3d)]:
        torch.nn.utils.parametrizations.weight_norm(conv)
    assert _eval_vs_reference(net, x) < 1e-4
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.endswith("original0"):  # the magnitudes, edited in place (their versions bumped)
                parameter.mul_(1.3)
        fast = net(x)
        with reference_kernels():
            reference = net(x)
    assert _rel(fast, reference) < 1e-4


def test_sync_batchnorm_of_multi_gpu_training_is_not_replaced_by_instance_norm():
    """nnUNetv2_train -num_gpus N converts the norms to SyncBatchNorm, which is no BatchNorm3d: the grouped
    local paths normalised them as instance norm (output error 6.9 at outputs of about 3) and never
    updated their running statistics, which nnUNetv2_predict then used untouched."""
    net = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny())
    ref = copy.deepcopy(net)
    x = torch.randn(2, 1, *PATCH).contiguous(memory_format=torch.channels_last_3d)
    net.train(), ref.train()
    out = net(x)
    with reference_kernels():
        expected = ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for (name, got), want in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    net.eval(), ref.eval()
    with torch.no_grad():
        out = net(x)
        with reference_kernels():
            expected = ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
