"""LoGoNet's independent paths side by side on two worker threads in CPU inference (lever ``concurrent_paths``).

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
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import torch

from .buffers import OutputPool, current_pool, using_pool
from .levers import LeverState, lever_enabled, lever_state, using_lever_state

__all__ = ["WORKERS", "concurrent_paths_pay", "run_concurrently"]

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
    """What a job must see of the thread that handed it over: grad and inference mode, levers, pool."""

    def __init__(self) -> None:
        self.grad: bool = torch.is_grad_enabled()
        self.inference: bool = torch.is_inference_mode_enabled()
        self.levers: LeverState = lever_state()
        self.pool: OutputPool | None = current_pool()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad), \
                using_lever_state(self.levers), using_pool(self.pool):
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


def concurrent_paths_pay(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s paths should run side by side for input ``x``: the lever is on, CPU float32
    inference (no autograd, eval mode, no autocast, not compiling, not profiled) on exactly 2 intra-op
    threads, and not already inside a worker."""
    return (lever_enabled("concurrent_paths")
            and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not module.training
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch.get_num_threads() == WORKERS
            and not getattr(_in_worker, "active", False) and not _profiling())


def run_concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """``[call() for call in calls]``, the calls run on the worker threads (in this order, as workers
    free up) with this thread's grad mode, inference mode, levers and output pool; the first failing
    call's error is raised here once all have finished."""
    workers = _path_workers()
    batch, state = _Batch(len(calls)), _CallerState()
    for index, call in enumerate(calls):
        workers.jobs.put((batch, index, call, state))
    for _ in calls:
        batch.done.acquire()
    for error in batch.errors:
        if error is not None:
            raise error
    return batch.results
