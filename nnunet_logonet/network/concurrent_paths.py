"""LoGoNet's independent paths side by side on two worker threads on the CPU (levers ``concurrent_paths``,
``concurrent_training``).

Why: on 2 cores every operation of a forward is one OpenMP parallel region of 2 threads, and
LoGoNet-S dispatches ~400 of them per patch, most on small maps where splitting the work gains
little. Worse, in ``nnUNetPredictor``'s sliding window a producer thread copies the next tiles
with an OpenMP team of its own; while more OpenMP threads exist than cores libgomp lets idle
workers sleep at once, so every region pays a wake-up (docs/speed.md, "nnU-Net's sliding window
and OpenMP"). LoGoNet's global path and its 8 local paths do not read each other's results until
their sum, so here they run as 9 jobs on two worker threads of *one* OpenMP thread each (global
path first: it is the longest): each core runs its own chain of operations, no region, no
barrier, no wake-up. The head after the sum runs on the caller's 2 threads as before. Same
operations on the same tensors: the local paths run as the plain loop (the grouped network pays
for its size only when its calls are parallel regions), so the output equals the one-thread-team
forward up to the float32 rounding of grouped vs looped kernels.

Measured on the 2-core AMD EPYC Zen 4 (docs/speed.md, "Concurrent paths"); taken only where that
holds: CPU float32 inference (no autograd, eval mode) with exactly 2 intra-op threads.

Training (lever ``concurrent_training``) splits the same way: in a training forward the 9 paths run
on the workers with autograd recording (each job's graph starts at a detached copy of its input),
and :class:`_SideBySide`, the one autograd node the caller's graph sees for all of them, runs their
backwards on the workers too when the caller's backward reaches it. Each path has its own
parameters and BatchNorms, so no two jobs write the same gradient or statistic. Like PyTorch's
reentrant checkpointing, the paths' gradients reach the parameters' ``.grad`` (``backward()``, as
nnU-Net's trainer calls it): a ``torch.autograd.grad`` or ``backward(inputs=...)`` that reaches the
paths (through the input) stops with an error naming the lever; one asked only for the paths'
parameters does not reach them and returns None for those (as it would for reentrant checkpointing);
the paths' graph is freed by the first backward.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.autograd.function import once_differentiable

from .buffers import OutputPool, current_pool, current_training_pool, using_pool, using_training_pool
from .levers import LeverState, lever_enabled, lever_state, using_lever_state

__all__ = ["WORKERS", "concurrent_paths_pay", "concurrent_training_pays", "run_concurrently",
           "run_concurrently_with_autograd"]

#: Worker threads (each with one OpenMP thread), and the intra-op thread count this is taken for.
WORKERS = 2

_lock = threading.Lock()
_workers: "_PathWorkers | None" = None
_in_worker = threading.local()


class _Batch:
    """One forward's jobs: their results and errors in order, and a count of jobs done."""

    def __init__(self, n: int) -> None:
        self.results: list[Any] = [None] * n
        self.errors: list[BaseException | None] = [None] * n
        self.done = threading.Semaphore(0)


class _CallerState:
    """What a job must see of the thread that handed it over: grad and inference mode, levers, pools."""

    def __init__(self) -> None:
        self.grad: bool = torch.is_grad_enabled()
        self.inference: bool = torch.is_inference_mode_enabled()
        self.levers: LeverState = lever_state()
        self.pool: OutputPool | None = current_pool()
        self.training_pool: OutputPool | None = current_training_pool()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad), \
                using_lever_state(self.levers), using_pool(self.pool), using_training_pool(self.training_pool):
            yield


class _PathWorkers:
    """Daemon threads with one OpenMP thread each, taking jobs from one queue (made once per process)."""

    def __init__(self, n: int) -> None:
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        restore = torch.get_num_threads()
        for _ in range(n):  # one after the other: each sets the process-wide default while it starts
            ready = threading.Event()
            threading.Thread(target=self._serve, args=(ready,), name="logonet-path-worker", daemon=True).start()
            ready.wait()
        # torch.set_num_threads also sets the default a thread takes on its first parallel operation;
        # put it back, so the workers' 1 stays theirs alone
        torch.set_num_threads(restore)

    def _serve(self, ready: threading.Event) -> None:
        torch.get_num_threads()  # PyTorch's per-thread set-up first: it would undo the next line later
        torch.set_num_threads(1)  # this thread's OpenMP team: itself alone
        _in_worker.active = True
        ready.set()
        while True:
            batch, index, call, state = self.jobs.get()
            try:
                with state.applied():
                    batch.results[index] = call()
            except BaseException as error:  # handed to the caller, which raises it
                batch.errors[index] = error
            finally:
                batch.done.release()


def _path_workers() -> _PathWorkers:
    global _workers
    with _lock:
        if _workers is None or _workers.pid != os.getpid():  # threads do not survive a fork
            _workers = _PathWorkers(WORKERS)
        return _workers


def _profiling() -> bool:
    """Whether torch.profiler records this thread: it records no other thread's operations, so a
    profiled forward keeps every operation in one stream (step_profile's tables stay complete)."""
    enabled = getattr(torch._C._autograd, "_profiler_enabled", None)
    return bool(enabled and enabled())


def _workers_may_take(lever: str, x: torch.Tensor) -> bool:
    """What both levers need: the lever on, a CPU float32 input, no autocast, not compiling, exactly 2
    intra-op threads (where it was measured), not already inside a worker, not profiled."""
    return (lever_enabled(lever) and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch.get_num_threads() == WORKERS
            and not getattr(_in_worker, "active", False) and not _profiling())


def concurrent_paths_pay(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s paths should run side by side for input ``x``: CPU float32 inference (no
    autograd, eval mode) where the workers may take it (``_workers_may_take``)."""
    return not torch.is_grad_enabled() and not module.training and _workers_may_take("concurrent_paths", x)


def concurrent_training_pays(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s paths should train side by side on input ``x``: a CPU float32 training forward
    with autograd recording (train mode) where the workers may take it (``_workers_may_take``)."""
    return torch.is_grad_enabled() and module.training and _workers_may_take("concurrent_training", x)


def run_concurrently(calls: Sequence[Callable[[], Any]], state: _CallerState | None = None) -> list[Any]:
    """``[call() for call in calls]``, the calls run on the worker threads (in this order, as workers
    free up) with this thread's grad mode, inference mode, levers and output pools (or ``state``'s);
    the first failing call's error is raised here once all have finished."""
    workers = _path_workers()
    batch, state = _Batch(len(calls)), state or _CallerState()
    for index, call in enumerate(calls):
        workers.jobs.put((batch, index, call, state))
    for _ in calls:
        batch.done.acquire()
    for error in batch.errors:
        if error is not None:
            raise error
    return batch.results


class _SideBySide(torch.autograd.Function):
    """The paths' forwards and, when the caller's backward gets here, their backwards, on the workers.

    Inputs: an ``anchor`` that requires grad (so the node is recorded even when no input does), the
    calls, the caller's state, a list to note the results' structure in, and each call's input (the
    caller's graph routes their gradients back, e.g. the sub-crops' into the whole input). Outputs: the
    calls' tensors, flattened, detached from the jobs' own graphs, which ``ctx`` keeps until the backward.
    (The paths' parameters are not inputs: the caller's engine would then call their gradient hooks a
    second time, with None.)
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, calls: Sequence[Callable[[torch.Tensor], Any]],  # type: ignore[override]
                state: _CallerState, structure: list, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]  # where each job's graph starts
        results = run_concurrently([partial(call, leaf) for call, leaf in zip(calls, leaves)], state)
        ctx.state, ctx.leaves = state, leaves
        ctx.outputs = [[t] if torch.is_tensor(t) else list(t) for t in results]
        structure.extend(None if torch.is_tensor(t) else len(outs) for t, outs in zip(results, ctx.outputs))
        return tuple(t.detach() for outs in ctx.outputs for t in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        if ctx.outputs is None:
            raise RuntimeError("LoGoNet's concurrent paths (lever concurrent_training) freed their graph in the "
                               "first backward; to backward twice run the step inside "
                               "nnunet_logonet.network.levers.reference_kernels('concurrent_training')")
        if not torch.autograd._is_checkpoint_valid():  # as PyTorch's reentrant checkpointing checks
            raise RuntimeError("LoGoNet's concurrent paths (lever concurrent_training) run their backward as "
                               "loss.backward() does (nnU-Net's trainer), into each parameter's .grad: "
                               "under torch.autograd.grad or backward(inputs=...) the paths' gradients would go to .grad, not to "
                               "the result. "
                               "Run such a step inside "
                               "nnunet_logonet.network.levers.reference_kernels('concurrent_training')")
        outputs, ctx.outputs = ctx.outputs, None
        jobs, given = [], iter(grads)
        for outs in outputs:
            pairs = [(t, g) for t, g in zip(outs, [next(given) for _ in outs]) if g is not None and t.requires_grad]
            if pairs:
                jobs.append(partial(torch.autograd.backward, [t for t, _ in pairs], [g for _, g in pairs]))
        run_concurrently(jobs, ctx.state)
        leaves, ctx.leaves = ctx.leaves, None
        return None, None, None, None, *(leaf.grad for leaf in leaves)


def run_concurrently_with_autograd(calls: Sequence[Callable[[torch.Tensor], Any]],
                                   inputs: Sequence[torch.Tensor]) -> list[Any]:
    """``[call(x) for call, x in zip(calls, inputs)]`` (each returning a tensor or a sequence of tensors, as a
    list) in a training forward, forwards and backwards on the workers (lever ``concurrent_training``): the
    results are tensors of the caller's graph, whose backward runs each call's backward on the workers and
    hands each input its gradient."""
    structure: list[int | None] = []
    flat = iter(_SideBySide.apply(torch.empty(0, requires_grad=True), list(calls), _CallerState(), structure,
                                  *inputs))
    return [next(flat) if n is None else [next(flat) for _ in range(n)] for n in structure]
