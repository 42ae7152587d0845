"""Where each network's CPU time goes, by kind of operation, side by side with nnU-Net's network.

    python -m nnunet_logonet.benchmark.step_profile --patch-size 64 64 64 --models nnunet logonet_s
    python -m nnunet_logonet.benchmark.step_profile --figure forward --patch-size 96 96 96
    python -m nnunet_logonet.benchmark.step_profile --figure sliding_window   # nnU-Net's predictor, one case
    python -m nnunet_logonet.benchmark.step_profile --chart step_profile.png   # also a stacked-bar chart

``logonet_benchmark`` says how long a step takes; this says what the time is spent on, which is what
decides the next lever (docs/speed.md). Each model is built as the benchmark builds it (its layout,
its trainer's optimizer), warmed up, then ``torch.profiler`` records one training step
(``measure.make_train_step``: nnU-Net's Dice + cross-entropy, backward, gradient clipping, SGD)
or one inference forward (batch 1, eval mode, no autograd) or nnU-Net's sliding window over one case
(``measure.make_sliding_window``: ``predict_sliding_window_return_logits``, the benchmark's case of
1.5x the patch per axis, 8 tiles, no mirroring; nnU-Net's own work around the network, the Gaussian
weighting and accumulation, shows up in the elementwise and copy rows). The self time of every operator is
summed into the categories of ``CATEGORIES`` (first matching rule wins; ``other`` is the framework's
own work: allocations, views, autograd bookkeeping), printed per model in seconds and as a share
of its total, with each category's ratio to the reference model (``nnunet``). The profiler adds
overhead per operator, so the totals exceed ``logonet_benchmark``'s times, more so for the model
with more operators; the table also gives the unprofiled median of the same call and the number of
operator calls, and the minor page faults and system CPU time of those unprofiled calls: the profiler
counts the kernel's zeroing of freshly mapped memory inside whichever operator first writes it, and on
glibc's defaults that is a sizeable part of both networks' CPU time (docs/speed.md, "The allocator").
torch.profiler records only the calling thread, so under it LoGoNet's inference runs its paths in one
stream (lever ``concurrent_paths`` steps aside; one unprofiled call that way warms that stream's caches
first): the table is that stream's operations, the unprofiled median the forward as it runs.
CPU only (on CUDA, ``.ci/gpu_profile.py``).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from nnunet_logonet.benchmark.measure import default_settings, make_sliding_window, make_train_step, time_runs
from nnunet_logonet.benchmark.models import MODELS, REFERENCE_MODEL, resolve_model
from nnunet_logonet.figures import figure_path
from nnunet_logonet.network.levers import reference_kernels

__all__ = ["CATEGORIES", "FIGURES", "category", "profile_model", "format_table", "plot_profile", "main"]

EXIT_USAGE = 2

#: what ``--figure`` profiles, as the table and chart name it
FIGURES = {"train": "training step (batch 2)", "forward": "forward (batch 1, no autograd)",
           "sliding_window": "sliding window over one case (nnU-Net's predictor)"}

#: (category, regular expression over the profiler's operator name), in order: the first match wins
CATEGORIES: list[tuple[str, str]] = [
    ("convolution backward", r"convolution_backward|conv.*backward|Conv3dBackward"),
    ("convolution forward", r"convolution|conv3d|slow_conv"),
    ("matrix products", r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"),
    ("normalization", r"batch_?norm|instance_?norm|layer_?norm|group_?norm"),
    ("activations", r"gelu|leaky_?relu|relu|silu|sigmoid|tanh"),
    ("loss", r"softmax|nll_loss|cross_entropy|one_hot|scatter"),
    ("upsampling", r"upsample|interpolate"),
    ("copies and layout", r"^aten::(copy_|clone|contiguous|cat|stack|flip|index_add_|constant_pad_nd|pad|_to_copy"
                          r"|to|repeat|index_select|gather)$"),
    ("optimizer and clipping", r"sgd|_foreach_|linalg_vector_norm|Optimizer|clip_grad"),
    ("elementwise and reductions", r"^aten::(add|add_|mul|mul_|sub|sub_|div|div_|sum|mean|fill_|zero_|zeros|"
                                   r"addcmul_|addcdiv_|lerp_|rsqrt|sqrt|pow|neg|where|clamp|maximum|minimum|"
                                   r"ones_like|zeros_like|full|rsub)$"),
]
OTHER = "other (allocation, views, autograd)"
ROWS = [name for name, _ in CATEGORIES] + [OTHER]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]


def category(operator: str) -> str:
    """The category of a profiler operator name (``aten::mm``, ``mkldnn::_convolution_pointwise``, ...)."""
    for name, pattern in _COMPILED:
        if pattern.search(operator):
            return name
    return OTHER


def profile_model(name: str, patch_size: Sequence[int], figure: str = "train", *, warmup: int = 1,
                  repeats: int = 3, seed: int = 0) -> dict[str, object]:
    """Seconds of profiled self time per category for one training step, forward or sliding-window case
    (``figure``: a key of ``FIGURES``) of model ``name``, with the operator calls, the profiled total and
    the unprofiled median of ``repeats`` calls."""
    if figure not in FIGURES:
        raise ValueError(f"figure must be one of {', '.join(FIGURES)}, got {figure!r}")
    device = torch.device("cpu")
    spec = resolve_model(name, patch_size=patch_size)
    torch.manual_seed(seed)
    layout = torch.channels_last_3d if spec.prefers_channels_last else torch.contiguous_format
    net = spec.build().to(memory_format=layout)
    if figure == "train":
        settings = default_settings(device, patch_size)
        net.train()
        run: Callable[[], object] = make_train_step(net, spec, settings, device, layout)
    elif figure == "sliding_window":
        net.eval()
        run, _ = make_sliding_window(net, spec, default_settings(device, patch_size), device)
    else:
        net.eval()
        x = torch.randn(1, spec.input_channels, *patch_size).contiguous(memory_format=layout)

        def run() -> object:
            with torch.no_grad():
                return net(x)
    costs: dict[str, float] = {}
    unprofiled = statistics.median(time_runs(run, warmup, repeats, device, costs))
    if figure != "train":
        with reference_kernels("concurrent_paths"):
            run()  # the profiled call's path (one stream, see the docstring), its caches warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seconds = dict.fromkeys(ROWS, 0.0)
    calls = 0
    for event in prof.key_averages():
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6
        calls += event.count
    return {"seconds": seconds, "total_s": sum(seconds.values()), "unprofiled_s": unprofiled, "calls": calls,
            "page_faults": costs.get("minor_page_faults", 0.0), "system_s": costs.get("system_s", 0.0)}


def format_table(results: dict[str, dict[str, object]], figure: str, patch_size: Sequence[int],
                 reference: str = REFERENCE_MODEL) -> str:
    """A markdown table: a row per category, per model its seconds and share, and the ratio to ``reference``."""
    models = list(results)
    others = [m for m in models if m != reference] if reference in results else []
    head = ["category"] + [f"{m} s (share)" for m in models] + [f"{m} / {reference}" for m in others]
    lines = [f"One {FIGURES[figure]} at "
             f"{'x'.join(map(str, patch_size))}, torch.profiler self time on {torch.get_num_threads()} CPU threads",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    for row in ROWS + ["total (profiled)"]:
        cells = [row]
        for m in models:
            sec = results[m]["seconds"]  # type: ignore[index]
            value = results[m]["total_s"] if row.startswith("total") else sec[row]  # type: ignore[index]
            cells.append(f"{value:.3f} ({value / results[m]['total_s']:.0%})")  # type: ignore[operator]
        for m in others:
            key = (lambda r: r["total_s"]) if row.startswith("total") else (lambda r, row=row: r["seconds"][row])
            cells.append(ratio(key(results[m]), key(results[reference])))  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key, fmt in (("unprofiled median, s", "unprofiled_s", "{:.3f}"), ("operator calls", "calls", "{:d}"),
                            ("minor page faults per call", "page_faults", "{:,.0f}"),
                            ("system CPU s per call", "system_s", "{:.3f}")):
        cells = [label] + [fmt.format(results[m][key]) for m in models]
        cells += [ratio(float(results[m][key]), float(results[reference][key])) for m in others]  # type: ignore
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_profile(results: dict[str, dict[str, object]], figure: str, patch_size: Sequence[int],
                 path: str) -> None:
    """A horizontal stacked bar per model: its profiled seconds by category, the total at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_logonet.figures import save_figure

    models = list(results)[::-1]  # the first model on top
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.7 * len(models)))
    palette = plt.get_cmap("tab10").colors
    left = [0.0] * len(models)
    for i, row in enumerate(ROWS):
        color = "0.88" if row == OTHER else palette[i % len(palette)]  # grey for the framework's own work
        widths = [float(results[m]["seconds"][row]) for m in models]  # type: ignore[index]
        ax.barh(models, widths, left=left, color=color, label=row, edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.2f} s", va="center")
    ax.set_xlim(0, max(left) * 1.15)
    ax.set_xlabel("profiled self time, s (torch.profiler)")
    ax.set_title(f"Where the time goes: one {FIGURES[figure]}, {'x'.join(map(str, patch_size))}, "
                 f"{torch.get_num_threads()} CPU threads")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45 if len(models) < 3 else -0.25), ncol=4,
              fontsize="small", frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.step_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch-size", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"),
                        help="patch size (default 64 64 64)")
    parser.add_argument("--models", nargs="+", default=[REFERENCE_MODEL, "logonet_s"], metavar="NAME",
                        help=f"models (default: nnunet logonet_s): {', '.join(MODELS)}")
    parser.add_argument("--figure", choices=list(FIGURES), default="train",
                        help="one training step (default), one inference forward or nnU-Net's sliding window "
                             "over one case (1.5x the patch per axis)")
    parser.add_argument("--repeats", type=int, default=3, help="unprofiled calls timed for the median (default 3)")
    parser.add_argument("--chart", default=None, type=figure_path, metavar="PNG",
                        help="also draw the table as stacked bars here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "step_profile"
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        print(f"{prog}: error: unknown model(s) {', '.join(unknown)}; valid models: {', '.join(MODELS)}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.repeats < 1:
        print(f"{prog}: error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return EXIT_USAGE
    for name in args.models:  # every patch checked before anything runs
        try:
            resolve_model(name, patch_size=args.patch_size)
        except ValueError as error:
            print(f"{prog}: error: --patch-size {' '.join(map(str, args.patch_size))}: {error}", file=sys.stderr)
            return EXIT_USAGE
    results = {}
    for name in dict.fromkeys(args.models):
        print(f"profiling {name} ...", file=sys.stderr, flush=True)
        results[name] = profile_model(name, args.patch_size, args.figure, repeats=args.repeats)
    print(format_table(results, args.figure, args.patch_size))
    if args.chart:
        plot_profile(results, args.figure, args.patch_size, args.chart)
        print(f"wrote {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
