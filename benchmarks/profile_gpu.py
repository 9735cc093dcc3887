"""Where the exact guided step spends its time on a GPU: torch.profiler over 5 steps of (a) and (b).

    BENCH_DEVICE=cuda PYTHONPATH=src python3 benchmarks/profile_gpu.py > benchmarks/profiles/gpu-<card>-exact-step.txt
"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import torch
from torch.profiler import profile, ProfilerActivity
import _common as C
from bench_step import Runner

if not C.CUDA:
    raise SystemExit("profile_gpu.py profiles a CUDA device: run it with BENCH_DEVICE=cuda")


def launches(prof, steps: int = 5) -> float:
    """Kernel launches per step in a profile of ``steps`` steps."""
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    return sum(e.count for e in prof.key_averages() if e.key in names) / steps


for key in ("a", "b"):
    w = C.WORKLOADS[key]()
    r = Runner(w, "exact")
    p = Runner(w, "plain")
    for _ in range(5):
        r(); p()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            r()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(f"== workload {key}: exact step, 5 steps")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=45))
    syncs = {e.key: e.count for e in ka if any(s in e.key for s in ("Synchronize", "item", "is_nonzero", "Memcpy", "local_scalar"))}
    print("sync-like calls over 5 steps:", syncs)
    print("kernel launches per step:", launches(prof))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof2:
        for _ in range(5):
            p()
        torch.cuda.synchronize()
    print("plain step kernel launches per step:", launches(prof2))
