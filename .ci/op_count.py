"""Operations one training forward+backward dispatches, counted without a GPU.

    python .ci/op_count.py [MODEL] [PATCH]      # e.g. logonet_s 96 (the defaults)

The network runs on PyTorch's meta device (shapes only, no arithmetic), where it takes the same
code path as on CUDA (the CPU-only levers are off there). On CUDA a step of LoGoNet is bound by
launching its kernels (docs/speed.md, H100), so the count of non-view operations is the figure to
bring down between GPU sessions; views and allocations launch nothing and are listed apart.
"""
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_logonet.benchmark.models import resolve_model

NO_KERNEL = {"aten.view", "aten._unsafe_view", "aten.permute", "aten.t", "aten.expand", "aten.as_strided",
             "aten.slice", "aten.split", "aten.chunk", "aten.split_with_sizes", "aten.unsqueeze", "aten.squeeze",
             "aten.alias", "aten.detach", "aten.select", "aten.transpose", "aten.reshape", "aten.unbind",
             "aten.narrow", "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.new_empty",
             "aten.empty_strided", "aten.new_empty_strided", "aten.empty_permuted"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "logonet_s"
    p = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    spec = resolve_model(name, patch_size=(p, p, p))
    layout = torch.channels_last_3d if spec.prefers_channels_last else torch.contiguous_format
    net = spec.build().to(memory_format=layout).to("meta").train()
    x = torch.randn(2, spec.input_channels, p, p, p, device="meta").contiguous(memory_format=layout)
    net(x).float().mean().backward()  # first step: lazily made tensors
    net.zero_grad(set_to_none=True)
    with _Count() as count:
        net(x).float().mean().backward()
    kernels = sum(v for k, v in count.ops.items() if k not in NO_KERNEL)
    print(f"{name} at {p}^3, batch 2, forward+backward: {kernels} operations "
          f"(+{sum(count.ops.values()) - kernels} views/allocations)")
    for op, n in count.ops.most_common(20):
        print(f"  {n:6d} {op}{'  (no kernel)' if op in NO_KERNEL else ''}")


if __name__ == "__main__":
    main()
