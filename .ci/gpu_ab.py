"""LoGoNet-S on CUDA, one variant at a time in one process (run by .ci/gpu_check).

    python3 .ci/gpu_ab.py OUT_DIR           # writes OUT_DIR/ab.json

Training step (the benchmark's: DC+CE loss, SGD, GradScaler, fp16 autocast, batch 2) and batch-1
forward at 96^3 for: the defaults; the lever lka_folding off (the forward runs in eval mode, where it
applies); the forward and backward captured as CUDA graphs (torch.cuda.make_graphed_callables);
channels-first layout; the 8 local paths as a loop instead of
one grouped network; the defaults again (the spread between the two default rows is the noise);
then, on CUDA, torch.compile in its default mode and in "reduce-overhead" (CUDA graphs), whose
first step (compilation) is printed apart.
AB_BUDGET seconds (default 150) bounds the run; AB_DEV=cpu AB_PATCH=32 AB_N=1 is a CPU dry run.
"""
import json, os, sys, time, traceback
import torch
from nnunet_logonet.benchmark.models import resolve_model
from nnunet_logonet.network.levers import reference_kernels

out = sys.argv[1]
dev = torch.device(os.environ.get("AB_DEV", "cuda"))
P = int(os.environ.get("AB_PATCH", "96")); N = int(os.environ.get("AB_N", "10"))
BUDGET = float(os.environ.get("AB_BUDGET", "150")); T0 = time.time()
cuda = dev.type == "cuda"
torch.backends.cudnn.benchmark = True
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                         weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
res = {}

def sync():
    if cuda: torch.cuda.synchronize()

def timed(fn, n=N, warm=3):
    for _ in range(warm): fn()
    sync(); t = time.perf_counter()
    for _ in range(n): fn()
    sync(); return round((time.perf_counter() - t) / n * 1e3, 2)

def ac(**kw):
    return torch.autocast(dev.type, dtype=torch.float16, enabled=cuda, **kw)

def run(name, layout=torch.channels_last_3d, kernels=None, graphs=False, compile_mode=None):
    if time.time() - T0 > BUDGET:
        print("skip", name, "(budget)"); return
    try:
        spec = resolve_model("logonet_s", patch_size=(P, P, P))
        torch.manual_seed(0)
        # graphs: with deep supervision, so that every parameter takes part (make_graphed_callables
        # refuses parameters the forward does not use: the lower-resolution heads otherwise)
        net = spec.build(deep_supervision=graphs).to(dev).to(memory_format=layout).train()
        x = torch.randn(2, 1, P, P, P, device=dev).contiguous(memory_format=layout)
        target = torch.randint(0, spec.num_classes, (2, 1, P, P, P), device=dev).float()
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        ctx = reference_kernels(*kernels) if kernels else None
        if ctx: ctx.__enter__()
        fwd_net = net
        if compile_mode:  # the first (warm-up) steps include the compilation
            fwd_net = torch.compile(net, mode=compile_mode)
            t = time.perf_counter()
            with ac():
                loss_fn(fwd_net(x), target).backward()
            sync(); print(name, f"first compiled step {time.perf_counter() - t:.0f} s", flush=True)
        if graphs:
            with ac(cache_enabled=False):
                fwd_net = torch.cuda.make_graphed_callables(net, (x,), num_warmup_iters=3)
        def step():
            opt.zero_grad(set_to_none=True)
            with ac():
                y = fwd_net(x)
                loss = loss_fn(y[0], target) + sum(o.float().mean() * 0 for o in y[1:]) if graphs else loss_fn(y, target)
            scaler.scale(loss).backward(); scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12); scaler.step(opt); scaler.update()
        r = {"train_ms": timed(step)}
        if not graphs:
            net.eval(); x1 = x[:1].clone(memory_format=layout)
            def fwd():
                with torch.no_grad(), ac():
                    fwd_net(x1)
            r["fwd_ms"] = timed(fwd)
        if ctx: ctx.__exit__(None, None, None)
        if cuda: r["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        res[name] = r; print(name, r, f"t={time.time()-T0:.0f}s", flush=True)
        del net, opt, fwd_net
        if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    except Exception:
        traceback.print_exc(); res[name] = "failed"
    json.dump(res, open(f"{out}/ab.json", "w"), indent=1)

run("default")
run("no_lka_folding", kernels=("lka_folding",))  # its forward: the LKA blocks' norms unfolded (the lever off)
run("cuda_graphs", graphs=cuda)
run("contiguous", layout=torch.contiguous_format)
run("loop_local_paths", kernels=("grouped_local_paths",))
run("default_again")
# torch.compile (minutes to compile): inductor's fused kernels, then also CUDA graphs
if cuda:
    run("compile_default", compile_mode="default")
    run("compile_reduce_overhead", compile_mode="reduce-overhead")
