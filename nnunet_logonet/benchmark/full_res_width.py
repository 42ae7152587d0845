"""What LoGoNet's full-resolution width costs, next to the paper's parameters and GFLOPs.

The paper gives parameter counts and GFLOPs (Table 6, 96^3) but no decoder widths. Parameters
live in the deep stages, multiply-accumulates in the full-resolution 3^3 convolutions
(``decoder.final`` of the global and every local path, and the head), whose width
``decoder_channels[0]`` the parameter counts leave open. This study varies only that width and
prints, per model, parameters and fvcore MACs at the paper's 96^3 beside the paper's figures; with
``--time`` it also measures the variants with ``logonet_benchmark``'s own measurement (one process
per model) side by side with nnU-Net's default network, ratios to it as usual.

    python -m nnunet_logonet.benchmark.full_res_width                               # counts at 96^3, a few minutes on CPU
    python -m nnunet_logonet.benchmark.full_res_width --time --models logonet_s ulkanet_s --widths 32 16

It is the evidence behind the presets' full-resolution widths: the first presets had 32 (S) and
48 (L), matched the parameter counts and did 1.5x / 1.3x the paper's GFLOPs; 16 and 36 match
both (docs/architecture.md, docs/speed.md).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import shlex
import sys
from typing import Any, Sequence

import torch
from tqdm import tqdm

from nnunet_logonet.benchmark.efficiency import format_table, run_benchmark
from nnunet_logonet.benchmark.measure import DEFAULTS, default_settings
from nnunet_logonet.benchmark.models import MODELS, REFERENCE_MODEL, ModelSpec, resolve_model
from nnunet_logonet.counting import count_macs, count_parameters
from nnunet_logonet.workfolders import output_file_argument, write_json_whole

__all__ = ["PAPER", "OUR_MODELS", "width_variant", "count_variants", "main"]

#: the paper's Table 6 (96^3, one input channel, 14 classes): parameters and GFLOPs
PAPER: dict[str, dict[str, float]] = {
    "ulkanet_s": {"parameters": 40.2e6, "gflops": 109.94},
    "logonet_s": {"parameters": 67.5e6, "gflops": 246.96},
    "logonet_l": {"parameters": 172.5e6, "gflops": 487.65},
}
OUR_MODELS = tuple(name for name in MODELS if name.startswith(("logonet", "ulkanet")))
PAPER_PATCH = (96, 96, 96)


def width_variant(spec: ModelSpec, width: int) -> ModelSpec:
    """``spec`` with full-resolution decoder width ``width`` (``decoder_channels[0]``); all else unchanged."""
    if width < 1:
        raise ValueError(f"full-resolution width must be >= 1, got {width}")
    kwargs = copy.deepcopy(spec.arch_kwargs)
    kwargs["decoder_channels"][0] = int(width)
    return dataclasses.replace(spec, name=f"{spec.name}_w{width}", arch_kwargs=kwargs,
                               description=f"{spec.description}, full-resolution width {width}",
                               notes=list(spec.notes))


def count_variants(models: Sequence[str], widths: Sequence[int], patch_size: Sequence[int] = PAPER_PATCH
                   ) -> list[dict[str, Any]]:
    """Parameters and fvcore MACs (batch 1) of every model at every width, at ``patch_size``."""
    rows = []
    x = torch.zeros(1, 1, *patch_size)
    bar = tqdm(total=len(models) * len(widths), desc="counting", unit="variant", file=sys.stderr, leave=False)
    for name in models:
        base = resolve_model(name, patch_size=patch_size)
        for width in widths:
            bar.set_postfix_str(f"{name} width {width}")
            bar.update()
            spec = width_variant(base, width)
            net = spec.build()
            macs, _ = count_macs(net, x)
            paper = PAPER.get(name, {}) if tuple(patch_size) == PAPER_PATCH else {}
            rows.append({"model": name, "width": int(width), "default_width": base.arch_kwargs["decoder_channels"][0],
                         "parameters": count_parameters(net), "macs": macs,
                         "paper_parameters": paper.get("parameters"), "paper_gflops": paper.get("gflops")})
            del net
    bar.close()
    return rows


def format_counts(rows: Sequence[dict[str, Any]], patch_size: Sequence[int]) -> str:
    """The rows of :func:`count_variants` as a text table, each count beside its deviation from the
    paper's (the preset's own width marked)."""
    lines = [f"full-resolution width study at {list(patch_size)}: parameters and GMACs (fvcore, batch 1); "
             "paper = Table 6 (its GFLOPs are most likely MACs)",
             "model        width  params M  vs paper   GMACs  vs paper"]
    for r in rows:
        p_ratio = f"{r['parameters'] / r['paper_parameters'] - 1:+.1%}" if r["paper_parameters"] else "-"
        m_ratio = f"{r['macs'] / 1e9 / r['paper_gflops'] - 1:+.1%}" if r["paper_gflops"] else "-"
        mark = " (preset)" if r["width"] == r["default_width"] else ""
        lines.append(f"{r['model']:<12} {r['width']:>5}  {r['parameters'] / 1e6:8.2f}  {p_ratio:>8}  "
                     f"{r['macs'] / 1e9:6.1f}  {m_ratio:>8}{mark}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.full_res_width",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ulkanet_s", "logonet_s", "logonet_l"], metavar="NAME",
                        help=f"our models to vary (default ulkanet_s logonet_s logonet_l): {', '.join(OUR_MODELS)}")
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 32, 36, 48], metavar="W",
                        help="full-resolution widths to try (default 16 32 36 48; the presets use 16 (S) and 36 (L), "
                             "the first presets 32 and 48)")
    parser.add_argument("--count-size", nargs=3, type=int, default=list(PAPER_PATCH), metavar=("D", "H", "W"),
                        help="patch for the counts (default the paper's 96 96 96)")
    parser.add_argument("--time", action="store_true",
                        help="also measure every variant with logonet_benchmark beside nnU-Net's default network")
    parser.add_argument("-device", "--device", default="cpu", help="device for --time (default cpu)")
    parser.add_argument("--patch-size", nargs=3, type=int, default=None, metavar=("D", "H", "W"),
                        help="patch for --time (default: logonet_benchmark's for the device)")
    parser.add_argument("--json", type=output_file_argument, default=None, metavar="FILE",
                        help="write the counts (and timings) here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.models if m not in OUR_MODELS]
    if unknown:
        print(f"full_res_width: error: unknown model(s) {', '.join(unknown)}; valid: {', '.join(OUR_MODELS)}",
              file=sys.stderr)
        return 2
    if min(args.widths) < 1:
        print(f"full_res_width: error: --widths must be >= 1, got {args.widths}", file=sys.stderr)
        return 2
    widths = list(dict.fromkeys(args.widths))
    try:
        rows = count_variants(args.models, widths, args.count_size)
    except ValueError as error:
        print(f"full_res_width: error: {error}", file=sys.stderr)
        return 2
    print(format_counts(rows, args.count_size))
    result: dict[str, Any] = {"command": shlex.join(["python", "-m", "nnunet_logonet.benchmark.full_res_width",
                                                     *(argv if argv is not None else sys.argv[1:])]),
                              "count_size": list(args.count_size), "counts": rows}
    if args.time:
        device = torch.device(args.device)
        patch = args.patch_size or list(DEFAULTS[device.type]["patch_size"])
        specs = [resolve_model(REFERENCE_MODEL, patch_size=patch)]
        specs += [width_variant(resolve_model(m, patch_size=patch), w) for m in args.models for w in widths]
        settings = default_settings(device, patch)
        report = run_benchmark(specs, settings, meta={"patch_size": patch})
        print()
        print(format_table(report))
        result["timing"] = report
    if args.json:
        write_json_whole(args.json, result, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
