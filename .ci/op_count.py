"""Operations one training forward+backward (or one inference forward) dispatches, counted without a GPU.

    python .ci/op_count.py [MODEL] [PATCH] [train|infer] [--without LEVER ...]
    # e.g. logonet_s 96 train (the defaults); logonet_s 96 infer --without lka_folding (a lever's "before")

``infer``: one eval-mode forward of a batch-1 tile under torch.inference_mode, as nnUNetv2_predict's
sliding window runs it. ``--without``: the named levers off (``levers.reference_kernels``).

The network runs on PyTorch's meta device (shapes only, no arithmetic), where it takes the same
code path as on CUDA (the CPU-only levers are off there). On CUDA a step of LoGoNet is bound by
launching its kernels (docs/speed.md, H100), so the count of non-view operations is the figure to
bring down between GPU sessions; views and allocations launch nothing and are listed apart.
"""
import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_logonet.benchmark.models import resolve_model
from nnunet_logonet.network.levers import LEVERS, reference_kernels

NO_KERNEL = {"aten.view", "aten._unsafe_view", "aten.permute", "aten.t", "aten.expand", "aten.as_strided",
             "aten.slice", "aten.split", "aten.chunk", "aten.split_with_sizes", "aten.unsqueeze", "aten.squeeze",
             "aten.alias", "aten.detach", "aten.select", "aten.transpose", "aten.reshape", "aten.unbind",
             "aten.narrow", "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.new_empty",
             "aten.empty_strided", "aten.new_empty_strided", "aten.empty_permuted"}
#: composite ops that inference mode dispatches as they are, and that copy only when they must
RETURNS_INPUT_IF_NOTHING_TO_DO = {"aten.to", "aten.contiguous", "aten.type_as"}
NO_KERNEL |= {f"{name} (returned its input)" for name in RETURNS_INPUT_IF_NOTHING_TO_DO}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in RETURNS_INPUT_IF_NOTHING_TO_DO and args and out is args[0]:
            name += " (returned its input)"  # e.g. .to(x.dtype) of a tensor of that dtype: no kernel
        self.ops[name] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="logonet_s")
    parser.add_argument("patch", nargs="?", type=int, default=96, help="cubic patch edge (default 96)")
    parser.add_argument("mode", nargs="?", choices=("train", "infer"), default="train")
    parser.add_argument("--without", nargs="+", default=[], choices=list(LEVERS), metavar="LEVER",
                        help="levers switched off: " + ", ".join(LEVERS))
    args = parser.parse_args()
    name, p, mode = args.model, args.patch, args.mode
    with reference_kernels(*args.without) if args.without else contextlib.nullcontext():
        count = _count(name, p, mode)
    kernels = sum(v for k, v in count.ops.items() if k not in NO_KERNEL)
    what = "forward+backward, batch 2" if mode == "train" else "inference forward, batch 1"
    off = f", without {' '.join(args.without)}" if args.without else ""
    print(f"{name} at {p}^3, {what}{off}: {kernels} operations "
          f"(+{sum(count.ops.values()) - kernels} views/allocations)")
    for op, n in count.ops.most_common(20):
        print(f"  {n:6d} {op}{'  (no kernel)' if op in NO_KERNEL else ''}")


def _count(name: str, p: int, mode: str) -> _Count:
    spec = resolve_model(name, patch_size=(p, p, p))
    layout = torch.channels_last_3d if spec.prefers_channels_last else torch.contiguous_format
    net = spec.build().to(memory_format=layout).to("meta").train(mode == "train")
    batch = 2 if mode == "train" else 1
    x = torch.randn(batch, spec.input_channels, p, p, p, device="meta").contiguous(memory_format=layout)

    def step() -> None:
        if mode == "train":
            net(x).float().mean().backward()
            net.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                net(x)

    step()  # first call: lazily made tensors, inference caches
    with _Count() as count:
        step()
    return count


if __name__ == "__main__":
    main()
