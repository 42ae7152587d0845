"""Levers ``concurrent_paths`` and ``concurrent_training``: LoGoNet's global and local paths side by side on two
single-threaded workers in CPU inference, and in CPU training forward and backward (network/concurrent_paths.py,
docs/speed.md "Concurrent paths", "Concurrent training")."""
from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch

from nnunet_logonet.network import LoGoNet
from nnunet_logonet.network import buffers as buffers_module
from nnunet_logonet.network import concurrent_paths as concurrent_module
from nnunet_logonet.network import grouped as grouped_module
from nnunet_logonet.network import logonet as logonet_module
from nnunet_logonet.network.levers import LEVERS, lever_enabled, reference_kernels

ANISOTROPIC = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def _two_threads():
    """The lever is taken on exactly 2 intra-op threads (the machines it was measured on); force them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _tiny(patch, **kw) -> LoGoNet:
    torch.manual_seed(0)
    if patch[0] < patch[1]:
        kw["strides"] = ANISOTROPIC
    net = LoGoNet.from_preset("tiny", 1, 3, patch, **kw)
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial BatchNorm statistics, so the folded weights matter
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def _spy_runs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = logonet_module.run_concurrently

    def spy(jobs):
        calls.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(logonet_module, "run_concurrently", spy)
    return calls


def _forward_in_case(net: LoGoNet, x: torch.Tensor, case: str, lever: str, grad_mode) -> None:
    """One forward of ``net`` in a setting where ``lever`` must step aside: ``case`` names it (another thread
    count, the lever off, autocast, the profiler, float64; ``grad_mode`` the autograd setting). A bfloat16 forward
    of two samples takes ~15 s on a CPU without bfloat16 instructions: under autocast an inference forward runs
    one sample, and a training forward (whose BatchNorms need two) is replaced by the rule it would consult."""
    if case in ("one_thread", "three_threads"):
        torch.set_num_threads(1 if case == "one_thread" else 3)
    if case == "float64":
        net, x = net.double(), x.double()
    with contextlib.ExitStack() as stack:
        stack.enter_context(grad_mode)
        if case == "lever_off":
            stack.enter_context(reference_kernels(lever))
        if case == "autocast":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            if net.training:
                assert not concurrent_module.concurrent_training_pays(net, x)
                return
            x = x[:1]
        if case == "profiled":
            stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
        net(x)


@pytest.mark.parametrize("patch, batch, deep_supervision", [
    ((32, 32, 32), 1, False), ((32, 32, 32), 2, True), ((16, 64, 64), 1, False), ((32, 64, 32), 2, False)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_concurrent_paths_equal_the_reference_and_the_single_stream(patch, batch, deep_supervision, mode, monkeypatch):
    net = _tiny(patch, deep_supervision=deep_supervision).eval()
    x = torch.randn(batch, 1, *patch)
    runs = _spy_runs(monkeypatch)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        fast = net(x)
        assert runs == [9]  # the global path and the 8 local ones, in one batch of jobs
        with reference_kernels("concurrent_paths"):
            single = net(x)
        with reference_kernels():
            ref = net(x)
    assert runs == [9]
    fast, single, ref = ([t] if torch.is_tensor(t) else t for t in (fast, single, ref))
    assert len(fast) == len(single) == len(ref)
    for a, b, c in zip(fast, single, ref):
        assert a.shape == c.shape and a.dtype == c.dtype
        assert _rel(a, c) < 1e-4 and _rel(a, b) < 1e-4, (_rel(a, c), _rel(a, b))
    # under no_grad the outputs are ordinary tensors (a caller may use them with autograd later)
    assert all(t.is_inference() == (mode == "inference_mode") for t in fast)


def test_concurrent_paths_give_the_same_output_forward_after_forward(monkeypatch):
    """nnU-Net's sliding window calls the network tile after tile: kept buffers and workers are reused."""
    net = _tiny((32, 32, 32)).eval()
    xs = [torch.randn(1, 1, 32, 32, 32) for _ in range(3)]
    with torch.inference_mode():
        once = [net(x).clone() for x in xs]
        again = [net(x).clone() for x in xs]
        with reference_kernels("concurrent_paths"):
            single = [net(x) for x in xs]
    for a, b, c in zip(once, again, single):
        assert torch.equal(a, b) and _rel(a, c) < 1e-4


@pytest.mark.parametrize("case", ["training", "grad", "one_thread", "three_threads", "lever_off", "autocast",
                                  "profiled", "float64"])
def test_concurrent_paths_only_in_cpu_float32_inference_on_two_threads(case, monkeypatch):
    """Not in training (autograd, or BatchNorm statistics of a no-grad training-mode forward), not on other
    thread counts, not under autocast, and not under torch.profiler, which records only the calling
    thread's operations (a profiled forward shows every operation: step_profile)."""
    net = _tiny((32, 32, 32))
    net.train(case == "training")
    runs = _spy_runs(monkeypatch)
    _forward_in_case(net, torch.randn(2, 1, 32, 32, 32), case, "concurrent_paths",
                     torch.enable_grad() if case == "grad" else torch.no_grad())
    assert runs == []
    torch.set_num_threads(2)
    with torch.no_grad():
        net.float().eval()(torch.randn(2, 1, 32, 32, 32))
    assert runs == [9]


def test_workers_run_one_openmp_thread_each_and_leave_the_callers_alone():
    caller = torch.get_num_threads()
    assert concurrent_module.run_concurrently([torch.get_num_threads] * 4) == [1] * 4
    assert torch.get_num_threads() == caller == 2
    seen = []  # a thread made afterwards starts with the process default, not the workers' 1
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [2]


def test_starting_the_workers_leaves_later_threads_the_callers_thread_count(monkeypatch):
    """Each worker sets its own OpenMP team to 1, which also sets the default of threads made later
    (nnUNetPredictor's producer, a DataLoader's pin thread): starting the workers puts the caller's back."""
    monkeypatch.setattr(concurrent_module, "_workers", None)  # workers started in this test
    assert concurrent_module.run_concurrently([torch.get_num_threads] * 2) == [1, 1]
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [2] and torch.get_num_threads() == 2


def test_jobs_see_the_callers_grad_mode_levers_and_pools():
    def state():
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), lever_enabled("post_ops"),
                lever_enabled("onednn"), buffers_module.current_pool())

    pool = buffers_module.OutputPool()
    with torch.inference_mode(), reference_kernels("post_ops"), buffers_module.using_pool(pool):
        assert concurrent_module.run_concurrently([state, state]) == [(False, True, False, True, pool)] * 2
    with torch.no_grad():
        assert concurrent_module.run_concurrently([state]) == [(False, False, True, True, None)]
    with reference_kernels():
        assert concurrent_module.run_concurrently([state]) == [(True, False, False, False, None)]
    # the workers' own settings are back afterwards
    assert concurrent_module.run_concurrently([state]) == [(True, False, True, True, None)]
    with buffers_module.using_training_pool(pool):  # concurrent_training: the training conv units' pool
        assert concurrent_module.run_concurrently([buffers_module.current_training_pool]) == [pool]
    assert concurrent_module.run_concurrently([buffers_module.current_training_pool]) == [None]


def test_a_failing_job_raises_in_the_caller_after_all_have_run_and_the_workers_go_on():
    done = []

    def fails():
        raise ValueError("bad sub-crop")

    with pytest.raises(ValueError, match="bad sub-crop"):
        concurrent_module.run_concurrently([fails, lambda: done.append(1), lambda: done.append(2)])
    assert sorted(done) == [1, 2]
    assert concurrent_module.run_concurrently([lambda: 3, lambda: 4]) == [3, 4]


def test_workers_are_made_again_in_a_forked_process(monkeypatch):
    """Threads do not survive a fork: a child process (pid changed) gets workers of its own."""
    first = concurrent_module._path_workers()
    monkeypatch.setattr(first, "pid", -1)
    second = concurrent_module._path_workers()
    assert second is not first and second.pid > 0
    assert concurrent_module.run_concurrently([lambda: 5]) == [5]


def test_concurrent_paths_write_into_kept_buffers_as_into_fresh_memory(monkeypatch):
    """``output_buffers`` with both workers taking blocks from one pool at once: the outputs of fresh memory
    bit for bit, forward after forward, and never more blocks of a size than the pool keeps."""
    monkeypatch.setattr(buffers_module, "MIN_BYTES", 0)  # every convolution and upsampling it may take
    net = _tiny((32, 64, 32)).eval()
    xs = [torch.randn(1, 1, 32, 64, 32).contiguous(memory_format=CL) for _ in range(3)]
    runs = _spy_runs(monkeypatch)
    with torch.inference_mode():
        for _ in range(2):
            fast = [net(x).clone() for x in xs]
            with reference_kernels("output_buffers"):
                plain = [net(x) for x in xs]
            assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert len(runs) == 12
    kept = buffers_module.pool_of(net)._buffers
    assert kept and all(len(blocks) <= buffers_module.MAX_PER_SIZE for blocks in kept.values())


# ---- lever concurrent_training: the same split in a training step, backward included ----------------------


def _spy_training_runs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = logonet_module.run_concurrently_with_autograd

    def spy(jobs, inputs):
        calls.append(len(jobs))
        return real(jobs, inputs)

    monkeypatch.setattr(logonet_module, "run_concurrently_with_autograd", spy)
    return calls


def _training_step(net: LoGoNet, x: torch.Tensor, *without: str):
    """One training step on a copy of ``net``: outputs, input gradient, parameter gradients, BatchNorm statistics."""
    net = copy.deepcopy(net)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with reference_kernels(*without) if without else contextlib.nullcontext():
        outs = net(x)
        outs = [outs] if torch.is_tensor(outs) else outs
        weights = torch.linspace(-1, 1, outs[0].shape[1]).view(1, -1, 1, 1, 1)
        sum((o * weights).square().mean() for o in outs).backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    stats = {k: v for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    return [o.detach() for o in outs], x.grad, grads, stats


@pytest.mark.parametrize("patch, deep_supervision, input_grad", [
    ((32, 32, 32), True, False), ((32, 32, 32), False, True), ((16, 64, 64), True, True)])
def test_concurrent_training_equals_the_single_stream_and_the_reference(patch, deep_supervision, input_grad,
                                                                         monkeypatch):
    """Outputs, every parameter's gradient, the input's gradient and the BatchNorm statistics of a training
    step with the paths' forwards and backwards on the workers equal the single stream's (the local paths as
    the same loop) and the reference kernels'. The single stream runs its OpenMP regions on 2 threads, the
    workers on 1, so sums may round differently; a LeakyReLU input that close to 0 may flip sides, which moves
    the gradients upstream of it by up to ~1e-2 of their scale (tests/test_fast_paths.py, KINK_FLIP_TOLERANCE;
    tests/test_fast_paths.py also holds this lever to the float64 step), while a wiring error (a path's gradient
    lost, a sub-crop misplaced, statistics not written) is of order one."""
    monkeypatch.setattr(grouped_module, "CPU_GROUPING_LIMIT", 0)  # the single stream's local paths: the loop too
    net = _tiny(patch, deep_supervision=deep_supervision).train()
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(2)).requires_grad_(input_grad)
    runs = _spy_training_runs(monkeypatch)
    fast = _training_step(net, x)
    assert runs == [9]
    single = _training_step(net, x, "concurrent_training")
    ref = _training_step(net, x, *LEVERS)
    assert runs == [9]
    for other in (single, ref):
        assert len(fast[0]) == len(other[0]) and (len(fast[0]) > 1) == deep_supervision
        assert all(_rel(a, b) < 1e-4 for a, b in zip(fast[0], other[0]))
        assert (fast[1] is None) == (other[1] is None) == (not input_grad)
        if input_grad:
            assert _rel(fast[1], other[1]) < 5e-2  # (a kink flip next to the input: up to ~2e-2 seen)
        unused = {k for k, g in other[2].items() if g is None}  # without deep supervision: its classifiers
        assert unused == {k for k, g in fast[2].items() if g is None} and fast[2].keys() == other[2].keys()
        assert all(k.startswith("head.seg_layers.") for k in unused) and bool(unused) != deep_supervision
        grads = {k: g for k, g in other[2].items() if g is not None}
        scale = max(g.abs().max() for g in grads.values())
        worst = max(((fast[2][k] - g).abs().max() / scale).item() for k, g in grads.items())
        assert worst < 5e-2, worst  # (kink flips: up to 1.3e-2 seen)
        for k, g in grads.items():  # every path's gradient is there, not just the largest ones
            if g.norm() > 1e-3 * scale:
                assert ((fast[2][k] - g).norm() / g.norm()).item() < 1e-1, k
        for k, v in other[3].items():
            assert torch.allclose(fast[3][k].float(), v.float(), rtol=1e-4, atol=1e-4), k


@pytest.mark.parametrize("case", ["inference", "no_grad_training", "one_thread", "three_threads", "lever_off",
                                  "autocast", "profiled", "float64"])
def test_concurrent_training_only_in_cpu_float32_training_on_two_threads(case, monkeypatch):
    """Taken by a training forward with autograd (nnU-Net's train_step) on exactly 2 threads, and not in eval mode,
    a training-mode forward without autograd, other thread counts, autocast, the profiler or float64."""
    net = _tiny((32, 32, 32)).train(case != "inference")
    runs = _spy_training_runs(monkeypatch)
    _forward_in_case(net, torch.randn(2, 1, 32, 32, 32), case, "concurrent_training",
                     torch.no_grad() if case == "no_grad_training" else torch.enable_grad())
    assert runs == []
    torch.set_num_threads(2)
    net.float().train()(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
    assert runs == [9]


def test_concurrent_training_with_frozen_local_paths(monkeypatch):
    """Fine-tuning with the local paths frozen (neither their parameters nor the input need a gradient):
    their jobs get no backward, and the step gives the single stream's gradients."""
    net = _tiny((32, 32, 32)).train()
    net.local_paths.requires_grad_(False)
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    runs = _spy_training_runs(monkeypatch)
    fast = _training_step(net, x)
    assert runs == [9]
    single = _training_step(net, x, "concurrent_training")
    assert fast[2].keys() == single[2].keys()
    grads = {k: g for k, g in single[2].items() if g is not None}
    assert {k for k, g in fast[2].items() if g is not None} == grads.keys()
    assert not any(k.startswith("local_paths.") for k in grads)
    scale = max(g.abs().max() for g in grads.values())
    assert max(((fast[2][k] - g).abs().max() / scale).item() for k, g in grads.items()) < 5e-2


def test_concurrent_training_refuses_autograd_grad_instead_of_misplacing_gradients():
    """Under ``torch.autograd.grad`` (or ``backward(inputs=...)``) the paths' backward would fill the
    parameters' ``.grad`` instead of the result: it stops with an error naming the lever, as PyTorch's
    reentrant checkpointing does; nnU-Net's ``loss.backward()`` is unaffected."""
    net = _tiny((32, 32, 32)).train()
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="concurrent_training.*autograd.grad"):
        torch.autograd.grad(net(x).square().mean(), x)
    assert all(p.grad is None for p in net.parameters())


def test_concurrent_training_backward_runs_on_the_workers_and_frees_the_paths_graph(monkeypatch):
    """The paths' backward runs on the two workers (one OpenMP thread each), and a second backward through the
    same step (``retain_graph=True``) stops with an error that says how to allow it."""
    threads: list[tuple[str, int]] = []
    net = _tiny((32, 32, 32)).train()
    hooked = [next(m for m in path.modules() if isinstance(m, torch.nn.Conv3d))
              for path in (net.global_path, net.local_paths[0])]
    for module in hooked:
        module.weight.register_hook(lambda g: threads.append((threading.current_thread().name,
                                                               torch.get_num_threads())) or g)
    out = net(torch.randn(2, 1, 32, 32, 32))
    out.square().mean().backward(retain_graph=True)
    assert threads == [("logonet-path-worker", 1)] * 2
    with pytest.raises(RuntimeError, match="concurrent_training"):
        out.square().mean().backward()
