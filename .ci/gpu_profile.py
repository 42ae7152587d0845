"""Where LoGoNet's CUDA time goes, next to nnU-Net's default network (run by .ci/gpu_check).

    python3 .ci/gpu_profile.py OUT_DIR      # writes OUT_DIR/gpu_prof.json, prints a summary

For nnunet, logonet_tiny and logonet_s at 96^3 (fp16 autocast, cuDNN benchmark mode, batch 2, the
benchmark's training step): wall time per training step and per batch-1 forward, CUDA kernels
launched per step, the summed kernel time (GPU busy time; wall >> busy means the step is bound by
launches on the CPU side) and the top kernels; for LoGoNet-S also every depthwise convolution shape,
timed in fp16 with cuDNN and with PyTorch's own kernel, channels-last and channels-first.
PROF_DEV=cpu PROF_PATCH=32 PROF_N=1 is a dry run of the code on a CPU (no kernel figures).
"""
import json, sys, time, traceback
from collections import Counter
from types import SimpleNamespace
import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from nnunet_logonet.benchmark.models import resolve_model
from nnunet_logonet.benchmark.measure import make_train_step

out = sys.argv[1]
torch.backends.cudnn.benchmark = True
import os
dev = torch.device(os.environ.get("PROF_DEV", "cuda"))
P = int(os.environ.get("PROF_PATCH", "96"))
NT = int(os.environ.get("PROF_N", "10"))
settings = SimpleNamespace(amp=True, batch_size=2, device="cuda")
res = {}

def sync():
    if dev.type == "cuda": torch.cuda.synchronize()

def kernel_stats(prof, steps):
    n, tot = 0, 0.0
    names = Counter()
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            n += 1
            t = e.time_range.elapsed_us()
            tot += t
            names[e.name[:90]] += t
    return {"kernels_per_step": n / steps, "gpu_ms_per_step": tot / steps / 1e3,
            "top": [(k, round(v / steps / 1e3, 3)) for k, v in names.most_common(25)]}

def timed(fn, n=None, warm=3):
    n = n or NT; warm = min(warm, NT)
    for _ in range(warm): fn()
    sync(); t = time.perf_counter()
    for _ in range(n): fn()
    sync(); return (time.perf_counter() - t) / n

for name in ["nnunet", "logonet_tiny", "logonet_s"]:
    try:
        spec = resolve_model(name, patch_size=(P, P, P))
        mf = torch.channels_last_3d if spec.prefers_channels_last else torch.contiguous_format
        torch.manual_seed(0)
        net = spec.build().to(dev).to(memory_format=mf).train()
        step = make_train_step(net, spec, settings, dev, mf)
        r = {"train_ms": timed(step) * 1e3}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(min(3, NT)): step()
            sync()
        r["train"] = kernel_stats(prof, min(3, NT))
        net.eval()
        x = torch.randn(1, 1, P, P, P, device=dev).contiguous(memory_format=mf)
        def fwd():
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                net(x)
        r["fwd_ms"] = timed(fwd) * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(min(3, NT)): fwd()
            sync()
        r["fwd"] = kernel_stats(prof, min(3, NT))
        # CPU-side launch cost: forward time with the GPU work tiny (batch 1, 32^3 would change shapes) -> skip
        res[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k in ("train_ms", "fwd_ms")}),
              "train kernels/step", r["train"]["kernels_per_step"], "gpu ms", round(r["train"]["gpu_ms_per_step"], 2),
              "fwd kernels", r["fwd"]["kernels_per_step"], "gpu ms", round(r["fwd"]["gpu_ms_per_step"], 2), flush=True)
        for k, v in r["train"]["top"][:15]: print("   train", v, k)
        for k, v in r["fwd"]["top"][:10]: print("   fwd", v, k)
        if name == "logonet_s":
            convs = []
            hooks = []
            for m in net.modules():
                if isinstance(m, torch.nn.Conv3d) and m.groups > 1 and m.groups == m.in_channels:
                    hooks.append(m.register_forward_hook(lambda mod, inp, o: convs.append(
                        (tuple(inp[0].shape), tuple(mod.weight.shape), mod.padding, mod.dilation, mod.groups))))
            net.train()
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                net(torch.randn(2, 1, P, P, P, device=dev).contiguous(memory_format=mf))
            for h in hooks: h.remove()
            cfgs = Counter(convs)
            dw = []
            for (xs, ws, pad, dil, g), count in cfgs.most_common():
                row = {"x": xs, "w": ws, "pad": pad, "dil": dil, "count": count}
                for layout in ("cl", "cf"):
                    for cudnn in (True, False):
                        fmt = torch.channels_last_3d if layout == "cl" else torch.contiguous_format
                        xx = torch.randn(xs, device=dev, dtype=torch.half if dev.type == "cuda" else torch.float).contiguous(memory_format=fmt).requires_grad_()
                        ww = torch.randn(ws, device=dev, dtype=torch.half if dev.type == "cuda" else torch.float).contiguous(memory_format=fmt).requires_grad_()
                        try:
                            torch.backends.cudnn.enabled = cudnn
                            y = F.conv3d(xx, ww, None, 1, pad, dil, g); gy = torch.randn_like(y)
                            f1 = lambda: F.conv3d(xx, ww, None, 1, pad, dil, g)
                            def fb():
                                yy = F.conv3d(xx, ww, None, 1, pad, dil, g); yy.backward(gy)
                            row[f"{layout}_{'cudnn' if cudnn else 'native'}_fwd_ms"] = round(timed(f1) * 1e3, 3)
                            row[f"{layout}_{'cudnn' if cudnn else 'native'}_fb_ms"] = round(timed(fb) * 1e3, 3)
                        except Exception as exc:
                            row[f"{layout}_{'cudnn' if cudnn else 'native'}"] = repr(exc)[:100]
                        finally:
                            torch.backends.cudnn.enabled = True
                dw.append(row); print("  dw", row, flush=True)
            res["depthwise"] = dw
        del net, step
        torch.cuda.empty_cache()
    except Exception:
        traceback.print_exc()
    json.dump(res, open(f"{out}/gpu_prof.json", "w"), indent=1)
