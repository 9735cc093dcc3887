"""The guide-side Gram, sync-free device path against the raw-Gram path it replaced (log #28, #31).

``Prepared.gram_only`` today (log #26) shifts the rows by the first one, scales them by the range
(``fused.unit_centred_gram``: an ``aminmax`` pass and a subtract-and-divide pass over x) and centres
the n×n Gram on the device. Before commit c198737 it took the raw Gram of x, centred it as an n×n
matrix and decided on the host (one ``bool(...)``) whether that was precise enough, falling back to
``Prepared(x)`` (centre and rescale x first) where the rows' common mean held > 15/16 of their energy
or the products could overflow. This runs both in one process, interleaved:

* on every guide layer a workload's exact step prepares (the inputs recorded from one step), the
  sum of their ``gram_only`` times with either path, and an A/A control (today's path twice);
* the whole exact step with ``Prepared.gram_only`` switched to either path for that call only
  (and an A/A control), so the two steps see the same load.

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

from repguide.similarity import Prepared  # noqa: E402
from repguide.similarity.base import _check_input, _compute_dtype  # noqa: E402

CURRENT = Prepared.__dict__["gram_only"]
FALLBACKS: list[bool] = []  # raw path: whether each call fell back to centring x first


def raw_gram_only(cls, x, min_n: int = 2, matmul_dtype=None):
    """``Prepared.gram_only`` as of c198737^ (log #8, #20), verbatim but for the fallback record."""
    _check_input(x, min_n)
    with torch.no_grad():
        x = x.detach().to(_compute_dtype(x))
        n, d = x.shape
        finfo = torch.finfo(x.dtype)
        if matmul_dtype in (None, x.dtype):
            raw = x @ x.T
            rows = raw.mean(dim=1)
            centred = raw - rows[:, None] - rows[None, :] + rows.mean()
            norms = raw.diagonal()
            top = norms.amax()
            safe = (top < finfo.max / 64) & (top > finfo.tiny * 1e6 * d)
            if bool(safe & (16 * centred.diagonal().sum() > norms.sum())):
                FALLBACKS.append(False)
                p = cls.__new__(cls)
                p.n, p.d, p.x, p.matmul_dtype, p._cov, p._norm = n, d, None, x.dtype, None, None
                p.constant = torch.zeros((), dtype=torch.bool, device=x.device)
                p._gram = centred / centred.diagonal().amax()
                return p
            FALLBACKS.append(True)
        p = cls(x, min_n)
        if matmul_dtype is not None:
            p.matmul_dtype = matmul_dtype
        p.keep_gram_only()
        return p


PATHS = {"device (today)": CURRENT, "raw Gram + host check (c198737^)": classmethod(raw_gram_only)}


@contextlib.contextmanager
def gram_path(name: str):
    Prepared.gram_only = PATHS[name]
    try:
        yield
    finally:
        Prepared.gram_only = CURRENT


def guide_inputs(runner: Runner) -> list[torch.Tensor]:
    """The (n, d) inputs one exact step hands to ``Prepared.gram_only``."""
    seen = []

    def record(cls, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return CURRENT.__func__(cls, x, *args, **kwargs)

    Prepared.gram_only = classmethod(record)
    try:
        runner()
    finally:
        Prepared.gram_only = CURRENT
    return seen


def run_workload(key: str, repeats: int, blocks: int) -> dict:
    workload = WORKLOADS[key]()
    runner = Runner(workload, "exact")
    xs = guide_inputs(runner)
    FALLBACKS.clear()
    for x in xs:
        raw_gram_only(Prepared, x)
    shapes = sorted({tuple(x.shape) for x in xs})
    print(f"\n## ({key}) {workload.name}\n\n{len(xs)} guide layers, shapes {shapes}; the raw path falls "
          f"back to centring x on {sum(FALLBACKS)} of them", flush=True)

    def grams(name):
        return lambda: [PATHS[name].__func__(Prepared, x) for x in xs]

    def step(name):
        def call():
            with gram_path(name):
                runner()
        return call

    names = list(PATHS)
    gram_fns = {names[0]: grams(names[0]), names[1]: grams(names[1]), "device (today), again": grams(names[0])}
    step_fns = {names[0]: step(names[0]), names[1]: step(names[1]), "device (today), again": step(names[0])}
    rows, result = [], {"workload": workload.name, "guide_layers": len(xs), "shapes": shapes,
                        "raw_path_fallbacks": sum(FALLBACKS), "blocks": []}
    for b in range(blocks):  # repeated blocks: how far one interleaved comparison moves
        g = {k: v["median"] for k, v in interleaved(gram_fns, repeats).items()}
        s = {k: v["median"] for k, v in interleaved(step_fns, repeats).items()}
        result["blocks"].append({"grams": g, "step": s})
        for k in gram_fns:
            rows.append([b + 1, k, g[k] * 1e3, g[k] / g[names[1]], s[k] * 1e3, s[k] / s[names[1]]])
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
