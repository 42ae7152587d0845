"""What nnU-Net's tile producer thread costs each network's forward on this CPU.

``nnUNetPredictor``'s sliding window copies the next tiles in a producer thread. That thread's copy starts
a second OpenMP (libgomp) team, and while more OpenMP threads exist than cores, libgomp lets idle workers
sleep at once instead of spinning, so every parallel region of the forward in the main thread pays a
wake-up: a network with many small convolutions pays more than one with a few large ones. This command
times each network's inference forward (batch 1) alone and while such a thread is alive (one that has
copied a tile and now waits, as nnU-Net's waits on its full queue), in rounds in one process, the two
figures in alternating order:

    python -m nnunet_logonet.benchmark.producer_thread            # nnunet and logonet_s at 64^3, ~1 min
    python -m nnunet_logonet.benchmark.producer_thread --models logonet_tiny --patch-size 32 32 32
"""
from __future__ import annotations

import argparse
import sys
import threading
from queue import Queue
from statistics import median
from typing import Callable, Sequence, TypeVar

import torch

from nnunet_logonet.benchmark.measure import time_runs
from nnunet_logonet.benchmark.models import MODELS, resolve_model
from nnunet_logonet.machine import cpu_line

T = TypeVar("T")

__all__ = ["forward_seconds", "main", "with_waiting_producer"]


def forward_seconds(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median of ``repeats`` timed inference forwards, after one untimed."""
    with torch.inference_mode():
        return median(time_runs(lambda: net(x), warmup=1, repeats=repeats, device=x.device))


def with_waiting_producer(tile: Sequence[int], call: Callable[[], T]) -> T:
    """``call()`` while a thread that has copied one tile, as nnU-Net's producer does, waits to be released."""
    copied: Queue = Queue(maxsize=1)
    release = threading.Event()

    def producer() -> None:
        case = torch.randn(1, *(2 * s for s in tile))
        copied.put(torch.clone(case[(slice(None), *(slice(0, s) for s in tile))][None],
                               memory_format=torch.contiguous_format))
        release.wait()

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    copied.get()
    try:
        return call()
    finally:
        release.set()
        thread.join()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.producer_thread",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["nnunet", "logonet_s"], choices=list(MODELS),
                        help="networks to time (default: nnunet logonet_s)")
    parser.add_argument("--patch-size", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"),
                        help="patch (tile) size (default 64 64 64)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per figure and round (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.rounds, args.repeats, *args.patch_size) < 1:
        print("error: --rounds, --repeats and --patch-size must be >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    nets = {}
    for name in args.models:
        try:
            spec = resolve_model(name, patch_size=args.patch_size)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        layout = torch.channels_last_3d if spec.prefers_channels_last else torch.contiguous_format
        x = torch.randn(1, spec.input_channels, *args.patch_size).contiguous(memory_format=layout)
        nets[name] = (spec.build().to(memory_format=layout).eval(), x)
    print(f"{cpu_line()}; inference forward "
          f"at {'x'.join(map(str, args.patch_size))}, batch 1, s (median of {args.repeats})")
    ratios: dict[str, list[float]] = {name: [] for name in nets}
    for round_ in range(args.rounds):
        for name, (net, x) in nets.items():
            timed = lambda: forward_seconds(net, x, args.repeats)  # noqa: E731
            if round_ % 2:  # the order alternates, so that neither figure always runs first
                waiting = with_waiting_producer(args.patch_size, timed)
                alone = timed()
            else:
                alone = timed()
                waiting = with_waiting_producer(args.patch_size, timed)
            ratios[name].append(waiting / alone)
            print(f"round {round_ + 1}: {name:14s} alone {alone:8.3f}  with the producer thread {waiting:8.3f}  "
                  f"({waiting / alone:.3f}x)", flush=True)
    for name, values in ratios.items():
        print(f"{name:14s} median {median(values):.3f}x (rounds {min(values):.3f}x-{max(values):.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
