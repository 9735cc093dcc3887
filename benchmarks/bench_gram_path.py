"""The guide-side Gram on a CPU: the sync-free device path against the raw-Gram path (log #28, #31).

``Prepared.gram_only`` has two paths. The device path (log #26, what an accelerator runs) shifts the
rows by the first one and scales them by the range (``fused.unit_centred_gram``: an ``aminmax`` pass
and a subtract-and-divide pass over x) and centres the n×n Gram on the device. The raw-Gram path
(the path before commit c198737, and since log #31 the CPU default) takes the raw Gram of x, centres
it as an n×n matrix and decides on the host (one ``bool(...)``) whether that was precise enough,
falling back to the device path where the rows' common mean holds > 15/16 of their energy or the
products could overflow. ``repguide.similarity.fused.CPU_TUNED`` picks one. This runs both in
one process, interleaved:

* on every guide layer a workload's exact step prepares (the inputs recorded from one step), the
  sum of their ``gram_only`` times with either path, and an A/A control (the device path twice);
* the whole exact step with either path (and an A/A control), so the two steps see the same load.

(The first measurement, log #31, ran a verbatim copy of c198737^'s ``gram_only`` against the device
path: this file as of commit 2fbc549.)

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \
        BENCH_CLOCK=cpu python benchmarks/bench_gram_path.py --workloads ca
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORKLOADS, check_environment, interleaved, machine, require_cpu, save, table  # noqa: E402
from bench_step import Runner  # noqa: E402

from repguide.similarity import Prepared, fused, prepared  # noqa: E402

GRAM_ONLY = Prepared.__dict__["gram_only"]
RAW = "raw Gram + host check (CPU default)"
PATHS = {"device path": False, RAW: True}  # name → fused.CPU_TUNED


@contextlib.contextmanager
def gram_path(name: str):
    default = fused.CPU_TUNED
    fused.CPU_TUNED = PATHS[name]
    try:
        yield
    finally:
        fused.CPU_TUNED = default


def fallbacks(xs: list[torch.Tensor]) -> int:
    """On how many inputs the raw-Gram path's host check falls back to the device path."""
    return sum(prepared._raw_centred_gram(x) is None for x in xs)


def guide_inputs(runner: Runner) -> list[torch.Tensor]:
    """The (n, d) inputs one exact step hands to ``Prepared.gram_only``."""
    seen = []

    def record(cls, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return GRAM_ONLY.__func__(cls, x, *args, **kwargs)

    Prepared.gram_only = classmethod(record)
    try:
        runner()
    finally:
        Prepared.gram_only = GRAM_ONLY
    return seen


def run_workload(key: str, repeats: int, blocks: int) -> dict:
    workload = WORKLOADS[key]()
    runner = Runner(workload, "exact")
    xs = guide_inputs(runner)
    n_fallbacks = fallbacks(xs)
    shapes = sorted({tuple(x.shape) for x in xs})
    print(f"\n## ({key}) {workload.name}\n\n{len(xs)} guide layers, shapes {shapes}; the raw path falls "
          f"back to the device path on {n_fallbacks} of them", flush=True)

    def grams(name):
        def call():
            with gram_path(name):
                return [Prepared.gram_only(x) for x in xs]
        return call

    def step(name):
        def call():
            with gram_path(name):
                runner()
        return call

    names = list(PATHS)
    gram_fns = {names[0]: grams(names[0]), names[1]: grams(names[1]), "device path, again": grams(names[0])}
    step_fns = {names[0]: step(names[0]), names[1]: step(names[1]), "device path, again": step(names[0])}
    rows, result = [], {"workload": workload.name, "guide_layers": len(xs), "shapes": shapes,
                        "raw_path_fallbacks": n_fallbacks, "blocks": []}
    for b in range(blocks):  # repeated blocks: how far one interleaved comparison moves
        g = {k: v["median"] for k, v in interleaved(gram_fns, repeats).items()}
        s = {k: v["median"] for k, v in interleaved(step_fns, repeats).items()}
        result["blocks"].append({"grams": g, "step": s})
        for k in gram_fns:
            rows.append([b + 1, k, g[k] * 1e3, g[k] / g[RAW], s[k] * 1e3, s[k] / s[RAW]])
        print(table(["block", "guide Gram path", f"all {len(xs)} guide Grams ms", "× raw", "exact step ms", "× raw"],
                    rows[-3:]), flush=True)
    result["markdown"] = table(["block", "guide Gram path", f"all {len(xs)} guide Grams ms", "× raw",
                                "exact step ms", "× raw"], rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ca")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    require_cpu("bench_gram_path")
    check_environment()
    results = {"machine": machine(), "workloads": {}}
    print("# bench_gram_path\n", results["machine"], flush=True)
    for key in args.workloads:
        results["workloads"][key] = run_workload(key, args.repeats, args.blocks)
    results["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print("saved", save("bench_gram_path", results))


if __name__ == "__main__":
    main()
