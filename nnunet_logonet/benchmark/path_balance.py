"""How evenly LoGoNet's 9 paths fill the two workers of ``concurrent_paths`` / ``concurrent_training``, and
whether splitting the global path into more jobs would pay.

On 2 threads LoGoNet runs its global path and its 8 local paths as 9 jobs on two single-threaded workers
(network/concurrent_paths.py), global path first. The paths can only finish as early as half their summed
single-threaded time (the ideal); the global path, the largest job, can hold one worker while the other has
run out of local paths. The global path's stem reads only the input and only its last decoder units read it
(``ULKAEncoder.forward_stages``, ``ULKADecoder.forward_final``), so the global path is also three jobs: stem,
body (the LKA stages and the decoder down to resolution 1) and final (after both). This command times every
job alone, single-threaded, as a worker runs it (the network's output pools on), and the paths side by side as
the lever runs them, in rounds that time every figure once (these shared machines drift by up to 20 % between
minutes); then it schedules both job lists greedily on two workers from those times (a worker that frees up
takes the first job of the list whose inputs are ready; in the split list ``final`` comes first). What it
showed: docs/speed.md, "How evenly the 9 paths fill the two workers".

    python -m nnunet_logonet.benchmark.path_balance --patch-size 96 96 96              # inference, batch 1
    python -m nnunet_logonet.benchmark.path_balance --patch-size 64 64 64 --training   # forward + backward

``--training`` times each path's forward and backward (batch 2, train mode; the split list is not
scheduled there: its backward would wait for ``final``'s before the stem's and the body's could start).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from statistics import median
from typing import Any, Callable, Sequence

import torch

from nnunet_logonet.benchmark.models import MODELS, resolve_model
from nnunet_logonet.machine import cpu_line
from nnunet_logonet.network.buffers import pooled_outputs
from nnunet_logonet.network.concurrent_paths import WORKERS, run_concurrently, run_concurrently_with_autograd
from nnunet_logonet.network.logonet import LoGoNet, _first_output
from nnunet_logonet.network.partition import split_subcrops
from nnunet_logonet.network.ulkanet import ULKAPath

__all__ = ["Job", "greedy_finish", "global_path_parts", "measure", "main"]

CL = torch.channels_last_3d


@dataclass(frozen=True)
class Job:
    """One job of a schedule: its name, its single-threaded seconds and the jobs whose results it reads."""

    name: str
    seconds: float
    needs: tuple[str, ...] = field(default=())


def greedy_finish(jobs: Sequence[Job], workers: int = WORKERS) -> float:
    """When the last of ``jobs`` ends if ``workers`` take them greedily: a worker that frees up takes the first
    job of the list whose ``needs`` have ended (or waits for the earliest of them to end)."""
    names = [job.name for job in jobs]
    if len(set(names)) != len(names) or any(n not in names for job in jobs for n in job.needs):
        raise ValueError(f"jobs must have distinct names and need only each other: {jobs}")
    end: dict[str, float] = {}
    free = [0.0] * workers
    pending = list(jobs)
    while pending:
        w = min(range(workers), key=free.__getitem__)
        ready = [job for job in pending if all(end.get(n, float("inf")) <= free[w] for n in job.needs)]
        if ready:
            job = ready[0]
            pending.remove(job)
            end[job.name] = free[w] = free[w] + job.seconds
            continue
        waits = [max(end[n] for n in job.needs) for job in pending if all(n in end for n in job.needs)]
        if not waits:
            raise ValueError(f"jobs need each other in a cycle: {[job.name for job in pending]}")
        free[w] = min(waits)
    return max(end.values(), default=0.0)


def global_path_parts(path: ULKAPath) -> tuple[Callable, Callable, Callable]:
    """``(stem, body, final)`` with ``final(stem(x), body(x)) == path(x)[0]``; ``body(x)`` returns the
    decoder features at resolutions 1 .. S, highest first."""
    encoder, decoder = path.encoder, path.decoder

    def body(x: torch.Tensor) -> list[torch.Tensor]:
        return decoder.forward_coarse(encoder.forward_stages(x))

    def final(stem: torch.Tensor, coarse: Sequence[torch.Tensor]) -> torch.Tensor:
        return decoder.forward_final(stem, coarse[0])

    return encoder.stem, body, final


def _rounds(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds, every call once per round (after one untimed
    round): a drift of the machine between minutes reaches every figure alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if r:
                samples[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in samples.items()}


def _alone(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` run as one job on a worker (one thread, this thread's modes and pools), nothing beside it."""
    return lambda: run_concurrently([call])


def _train(path: torch.nn.Module, x: torch.Tensor) -> None:
    out = path(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    out.backward(torch.ones_like(out))


def measure(net: LoGoNet, x: torch.Tensor, *, training: bool, repeats: int = 3) -> dict[str, Any]:
    """Single-threaded seconds of every job, the paths' seconds side by side on the workers, and the greedy
    schedules of the lever's job list and (inference) of the split one. Needs ``WORKERS`` intra-op threads."""
    if torch.get_num_threads() != WORKERS:
        raise RuntimeError(f"the workers are used on {WORKERS} intra-op threads; this process has "
                           f"{torch.get_num_threads()} (torch.set_num_threads({WORKERS}))")
    net.train(training)
    with torch.set_grad_enabled(training), pooled_outputs(net, x) as x:
        tiles = split_subcrops(x, net.local_grid)
        if training:
            calls = [partial(_train, net.global_path, x)]
            calls += [partial(_train, p, t) for p, t in zip(net.local_paths, tiles)]

            def side_by_side() -> None:
                outs = run_concurrently_with_autograd(  # as LoGoNet.forward hands them over
                    [net.global_path] + [partial(_first_output, p) for p in net.local_paths], [x, *tiles])
                firsts = [outs[0][0], *outs[1:]]
                torch.autograd.backward(firsts, [torch.ones_like(t) for t in firsts])
        else:
            calls = [partial(net.global_path, x)]
            calls += [partial(_first_output, p, t) for p, t in zip(net.local_paths, tiles)]

            def side_by_side() -> None:
                run_concurrently(calls)
        timed = {"global": _alone(calls[0]), **{f"local {i}": _alone(c) for i, c in enumerate(calls[1:])}}
        if not training:
            stem, body, final = global_path_parts(net.global_path)
            stem_out, coarse = stem(x), body(x)
            timed.update({"stem": _alone(partial(stem, x)), "body": _alone(partial(body, x)),
                          "final": _alone(partial(final, stem_out, coarse))})
        timed["side_by_side"] = side_by_side
        seconds = _rounds(timed, repeats)
        jobs = {name: seconds[name] for name in ["global", *(f"local {i}" for i in range(len(calls) - 1))]}
        locals_ = [Job(name, t) for name, t in jobs.items() if name != "global"]
        result: dict[str, Any] = {"jobs": jobs, "side_by_side": seconds["side_by_side"],
                                  "ideal": sum(jobs.values()) / WORKERS,
                                  "greedy": greedy_finish([Job("global", jobs["global"]), *locals_])}
        if not training:
            parts = {name: seconds[name] for name in ("stem", "body", "final")}
            result["global_parts"] = parts
            result["greedy_split"] = greedy_finish(
                [Job("final", parts["final"], ("stem", "body")), Job("stem", parts["stem"]),
                 Job("body", parts["body"]), *locals_])
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.path_balance",
                                     description=__doc__.split("\n\n")[0])
    logonets = sorted(name for name in MODELS if name.startswith("logonet"))
    parser.add_argument("--model", default="logonet_s", choices=logonets, help="network (default logonet_s)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96], metavar=("D", "H", "W"),
                        help="patch (default 96 96 96)")
    parser.add_argument("--training", action="store_true",
                        help="forward and backward in train mode at batch 2 (default: inference at batch 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, each timing every figure once; medians (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        print(f"--repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    try:
        spec = resolve_model(args.model, patch_size=args.patch_size)
    except ValueError as error:
        print(f"--patch-size {' '.join(map(str, args.patch_size))}: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(WORKERS)
    torch.manual_seed(0)
    net = spec.build()
    batch = 2 if args.training else 1
    x = torch.randn(batch, spec.input_channels, *spec.patch_size).contiguous(memory_format=CL)
    r = measure(net, x, training=args.training, repeats=args.repeats)
    what = "forward + backward, train mode" if args.training else "inference forward"
    print(f"{cpu_line()}; {args.model} at {'x'.join(map(str, spec.patch_size))}, batch {batch}, {what}; "
          f"ms, medians of {args.repeats} rounds")
    local_times = list(r["jobs"].values())[1:]
    print(f"single-threaded: global path {1e3 * r['jobs']['global']:.0f}, local paths {1e3 * sum(local_times):.0f} "
          f"({1e3 * min(local_times):.0f}-{1e3 * max(local_times):.0f} each)")
    if "global_parts" in r:
        print("  the global path in parts: " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in r["global_parts"].items()))
    print(f"ideal on {WORKERS} workers (half the sum) {1e3 * r['ideal']:.0f}")
    print(f"greedy schedule of the lever's 9 jobs {1e3 * r['greedy']:.0f} ({r['greedy'] / r['ideal']:.3f}x the ideal)")
    if "greedy_split" in r:
        print(f"greedy schedule with the global path as stem | body | final {1e3 * r['greedy_split']:.0f} "
              f"({r['greedy_split'] / r['ideal']:.3f}x)")
    print(f"measured, the paths side by side on the workers {1e3 * r['side_by_side']:.0f} "
          f"({r['side_by_side'] / r['ideal']:.3f}x the ideal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
