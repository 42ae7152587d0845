"""``logonet_lever_ab``: one fast path (or several) on and off, interleaved in one process.

A lever worth 2-5 % is below the run-to-run spread of a shared CPU (10-15 % between runs here,
docs/speed.md), and ``logonet_benchmark --without`` measures its rows one after the other, each in
its own process. This command builds the network once and times the same calls with the levers on
and off in alternation (on/off, then off/on, ...), so the machine's drift hits both alike, and
prints the medians and the off/on ratio for the forward, the training step and nnU-Net's sliding
window (the same measurements as ``logonet_benchmark``).

    logonet_lever_ab --model logonet_s --patch-size 64 64 64 --lever channels_first_logits --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import shlex
import sys
import time
from statistics import median
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from nnunet_logonet.machine import this_cpu
from nnunet_logonet.network.kernels import narrowing
from nnunet_logonet.network.levers import LEVERS, reference_kernels

from nnunet_logonet.workfolders import output_file_argument, write_json_whole

from .efficiency import parse_device
from .measure import autocast, default_settings, make_sliding_window, make_train_step, sync
from .models import MODELS, resolve_model
from .records import allocator_settings, device_info

FIGURES = {"forward": "fwd s/patch", "train": "train s/iter", "sw": "sw s/case"}


def interleaved_times(calls: dict[str, Callable[[], Any]], levers: Sequence[str], rounds: int,
                      device: torch.device, block: int = 1) -> dict[str, dict[str, list[float]]]:
    """Seconds of every call with ``levers`` on and off, alternating the order each round.

    ``calls`` maps a figure name to a callable; each is run once on and once off untimed first
    (oneDNN's primitive caches, the allocator). With ``block`` > 1 each state runs ``block`` calls in
    a row per round and the first of them is not timed, so every timed call follows one in the same
    state: for levers that change what the allocator holds (``output_buffers``), where a call right
    after the switch inherits the other state's heap.
    """
    samples: dict[str, dict[str, list[float]]] = {}
    bar = tqdm(total=len(calls) * (rounds + 1), desc="lever on / off", unit="round", file=sys.stderr, leave=False)
    for figure, call in calls.items():
        samples[figure] = {"on": [], "off": []}
        bar.set_postfix_str(f"{figure}: warm-up")
        for state in ("on", "off"):
            with _kernels(state, levers):
                call()
        bar.update()
        for r in range(rounds):
            bar.set_postfix_str(f"{figure}: round {r + 1}/{rounds}")
            for state in (("on", "off") if r % 2 == 0 else ("off", "on")):
                with _kernels(state, levers):
                    for i in range(block):
                        sync(device)
                        start = time.perf_counter()
                        call()
                        sync(device)
                        if block == 1 or i > 0:
                            samples[figure][state].append(time.perf_counter() - start)
            bar.update()
    bar.close()
    return samples


def _kernels(state: str, levers: Sequence[str]):
    return reference_kernels(*levers) if state == "off" else contextlib.nullcontext()


def build_parser() -> argparse.ArgumentParser:
    ours = [name for name in MODELS if name not in ("nnunet", "resenc_m")]
    parser = argparse.ArgumentParser(prog="logonet_lever_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="logonet_s", choices=ours, help="network (default logonet_s)")
    parser.add_argument("--lever", nargs="+", required=True, choices=list(LEVERS), metavar="LEVER",
                        help=f"fast paths to switch off in the 'off' runs: {', '.join(LEVERS)}")
    parser.add_argument("--patch-size", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"),
                        help="patch (default 64 64 64)")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES),
                        help="what to time (default: forward train sw)")
    parser.add_argument("--rounds", type=int, default=3, help="timed on/off pairs per figure (default 3)")
    parser.add_argument("--block", type=int, default=1,
                        help="calls in a row per state and round, the first untimed (default 1: one timed call); "
                             "e.g. 4 for levers that change what the allocator holds, such as output_buffers")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch size (default 2)")
    parser.add_argument("-device", "--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--swap-narrowing-weight-grad", action="store_true",
                        help="take the narrowing-convolution lever on any CPU (by default AVX2 CPUs only), "
                             "to measure it where it is off")
    parser.add_argument("--json", type=output_file_argument, default=None, metavar="FILE",
                        help="write the samples and the device info here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.block < 1 or args.batch_size < 1 or min(args.patch_size) < 1:
        print("logonet_lever_ab: error: --rounds, --block, --batch-size and --patch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        device = parse_device(args.device)
    except ValueError as error:
        print(f"logonet_lever_ab: error: {error}", file=sys.stderr)
        return 2
    if args.swap_narrowing_weight_grad:
        narrowing.SWAP_NARROWING_WEIGHT_GRAD = True
    try:
        spec = resolve_model(args.model, patch_size=args.patch_size)
    except ValueError as error:
        print(f"logonet_lever_ab: error: {error}", file=sys.stderr)
        return 2
    settings = default_settings(device, args.patch_size, batch_size=args.batch_size)
    torch.manual_seed(settings.seed)
    memory_format = torch.channels_last_3d
    net = spec.build().to(device).to(memory_format=memory_format)
    x1 = torch.randn(1, spec.input_channels, *spec.patch_size, device=device).contiguous(memory_format=memory_format)

    def forward() -> None:
        net.eval()
        with torch.no_grad(), autocast(device, settings.amp):  # as logonet_benchmark's forward
            net(x1)

    calls: dict[str, Callable[[], Any]] = {}
    if "forward" in args.figures:
        calls["forward"] = forward
    if "train" in args.figures:
        step = make_train_step(net, spec, settings, device, memory_format)
        calls["train"] = lambda: (net.train(), step())
    if "sw" in args.figures:
        sliding_window, _ = make_sliding_window(net, spec, settings, device)
        calls["sw"] = lambda: (net.eval(), sliding_window())
    samples = interleaved_times(calls, args.lever, args.rounds, device, args.block)

    print(f"{spec.name} at {list(spec.patch_size)}, {this_cpu() if device.type == 'cpu' else device}, "
          f"levers off: {', '.join(args.lever)}; medians of {len(next(iter(samples.values()))['on'])}, interleaved"
          + (f" in blocks of {args.block} calls (first untimed)" if args.block > 1 else ""))
    print(f"{'figure':14s} {'on':>9s} {'off':>9s} {'off/on':>7s}")
    for figure, by_state in samples.items():
        on, off = median(by_state["on"]), median(by_state["off"])
        print(f"{FIGURES[figure]:14s} {on:9.3f} {off:9.3f} {off / on:7.3f}")
    if args.json:
        report = {"command": shlex.join(["logonet_lever_ab", *argv]),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "model": spec.name, "patch_size": list(spec.patch_size), "levers_off": list(args.lever),
                  "rounds": args.rounds, "block": args.block, "batch_size": args.batch_size,
                  "device_info": device_info(device), "allocator": allocator_settings(),
                  "samples_s": samples,
                  "medians_s": {f: {s: median(v) for s, v in by.items()} for f, by in samples.items()}}
        write_json_whole(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
