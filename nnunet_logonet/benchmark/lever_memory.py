"""Peak resident memory of a network's training steps (or inference forwards), levers on and off.

    python -m nnunet_logonet.benchmark.lever_memory --model logonet_s --patch-size 96 96 96 --lever training_buffers
    python -m nnunet_logonet.benchmark.lever_memory --model logonet_s --lever output_buffers --figure forward

Levers that keep memory from one call to the next (``output_buffers``, ``training_buffers``) trade
page faults for resident memory; ``logonet_lever_ab`` measures the time, this the memory. A process's
peak only grows, so each setting runs in a fresh process of its own (this module with ``--child``):
it builds the network as ``logonet_lever_ab`` does, makes ``--calls`` calls (a training step as
``logonet_benchmark`` times it, or a batch-1 inference forward without autograd) and reports its peak
resident set size (``ru_maxrss``: the interpreter, torch and the network included, the same in
both), the blocks the network keeps (``buffers.pool_of``) and the seconds of each call. CPU only.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import torch

from nnunet_logonet.network import buffers
from nnunet_logonet.network.levers import LEVERS, reference_kernels

from nnunet_logonet.workfolders import output_file_argument, write_json_whole

from .measure import default_settings, make_train_step
from .models import MODELS, resolve_model
from .records import allocator_settings, device_info

__all__ = ["measure", "main"]

STATES = ("on", "off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.lever_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="logonet_s", choices=sorted(MODELS), help="network (default logonet_s)")
    parser.add_argument("--patch-size", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"),
                        help="patch size (default 64 64 64)")
    parser.add_argument("--lever", nargs="+", required=True, choices=sorted(LEVERS), metavar="LEVER",
                        help=f"levers switched off in the 'off' process: {', '.join(sorted(LEVERS))}")
    parser.add_argument("--figure", choices=("train", "forward"), default="train",
                        help="training steps (batch 2, default) or inference forwards (batch 1)")
    parser.add_argument("--calls", type=int, default=4, help="calls per process (default 4)")
    parser.add_argument("--json", type=output_file_argument, metavar="PATH", help="also write the figures here")
    parser.add_argument("--child", choices=STATES, help=argparse.SUPPRESS)
    return parser


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure(model: str, patch_size: Sequence[int], levers_off: Sequence[str], figure: str, calls: int) -> dict[str, Any]:
    """In this process: ``calls`` calls of ``figure`` with ``levers_off`` off; peak RSS, kept blocks, seconds."""
    device = torch.device("cpu")
    spec = resolve_model(model, patch_size=patch_size)
    settings = default_settings(device, spec.patch_size)
    torch.manual_seed(settings.seed)
    layout = torch.channels_last_3d
    net = spec.build().to(memory_format=layout)
    if figure == "train":
        net.train()
        call = make_train_step(net, spec, settings, device, layout)
    else:
        net.eval()
        x = torch.randn(1, spec.input_channels, *spec.patch_size).contiguous(memory_format=layout)

        def call() -> None:
            with torch.no_grad():
                net(x)
    seconds = []
    with reference_kernels(*levers_off) if levers_off else contextlib.nullcontext():
        for _ in range(calls):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
    kept = sum(buffers.pool_of(net, training=t).nbytes for t in (False, True))
    return {"peak_rss_mb": _peak_rss_mb(), "kept_mib": kept / 2 ** 20, "seconds": seconds}


def _run_child(argv: Sequence[str], state: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "nnunet_logonet.benchmark.lever_memory", *argv, "--child", state]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the '{state}' process failed ({shlex.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.calls < 1 or min(args.patch_size) < 1:
        print("lever_memory: error: --calls and --patch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        resolve_model(args.model, patch_size=args.patch_size)
    except ValueError as error:
        print(f"lever_memory: error: {error}", file=sys.stderr)
        return 2
    if args.child:
        result = measure(args.model, args.patch_size, args.lever if args.child == "off" else [], args.figure, args.calls)
        print(json.dumps(result))
        return 0
    results = {state: _run_child(argv, state) for state in STATES}
    what = "training steps (batch 2)" if args.figure == "train" else "inference forwards (batch 1)"
    print(f"{args.model} at {args.patch_size}, {args.calls} {what}, each setting in a fresh process; "
          f"off: {', '.join(args.lever)}")
    print(f"{'levers':7s} {'peak RSS MB':>12s} {'kept MiB':>9s} {'s/call (median after the first)':>32s}")
    for state, r in results.items():
        later = r["seconds"][1:] or r["seconds"]
        print(f"{state:7s} {r['peak_rss_mb']:12.0f} {r['kept_mib']:9.0f} {statistics.median(later):32.3f}")
    on, off = results["on"]["peak_rss_mb"], results["off"]["peak_rss_mb"]
    print(f"peak RSS on/off: {on / off:.3f}x ({on - off:+.0f} MB)")
    if args.json:
        report = {"command": shlex.join(["python -m nnunet_logonet.benchmark.lever_memory", *argv]),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "model": args.model, "patch_size": list(args.patch_size), "levers_off": list(args.lever),
                  "figure": args.figure, "calls": args.calls, "device_info": device_info(torch.device("cpu")),
                  "allocator": allocator_settings(), "results": results}
        write_json_whole(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
