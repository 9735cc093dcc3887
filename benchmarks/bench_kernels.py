"""Every similarity measure on (n, d) inputs, forward and forward+backward, against its matrix products.

For each n ∈ {64, 256, 1024, 4096} and d ∈ {64, 4096, 65536} (x: (n, d) with a gradient, as a
target layer; y: (n, d) without, as a guide layer), every registered measure is timed forward and
forward+backward. Linear CKA (biased and unbiased) is timed in both of its forms, forced, and its
time is divided by the time of the matrix products that form cannot avoid, each timed alone:

* Gram form: forward X Xᵀ and Y Yᵀ, backward one (n, n) @ (n, d) product;
* feature form: forward Xᵀ Y, and X's and Y's self-products (n×n Gram or d×d, the smaller);
  backward Y Cᵀ and X's self-product backward.

Goal: ≤ 1.3× in both forms, and the automatic choice (``use_gram_form``) picks the faster form in
every cell where both can run. Cells are skipped where one call would take more than ~6 s here or
a d×d matrix would not fit; the table says why.

    bash benchmarks/run.sh kernels [--quick]
    BENCH_DEVICE=cuda python benchmarks/bench_kernels.py --budget-s 30   # on a CUDA device

On CUDA the skip and repeat estimates use a GPU's multiply-add rate, the 2 GiB input limit is
lifted, and ``--budget-s`` runs the cells from the cheapest up and skips those left when the time
is spent (the table keeps the grid's order); results are saved after every cell.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CUDA, DEVICE, check_environment, interleaved, machine, save, table  # noqa: E402

import repguide.similarity as sim  # noqa: E402
from repguide.similarity import kernel_alignment  # noqa: E402

NS = (64, 256, 1024, 4096)
DS = (64, 4096, 65536)
EXTRA = ((4096, 1024),)  # a cell where the feature form is chosen and its products dominate
LINEAR = ("cka", "cka_unbiased")
BIG_S = 0.5  # in cells whose forward+backward takes longer, only linear CKA is timed
ROUND_BUDGET_S = 6.0
MAC_PER_S = 6e10  # rough multiply-adds per second of a large fp32 GEMM on this machine (2 cores)
LIMIT_S = 6.0  # skip a (measure, form) whose one forward+backward is estimated to take longer
MEMORY_LIMIT = 3 * 2**30  # bytes for one d×d matrix
SVD_MAC_PER_S = MAC_PER_S  # the rate procrustes' QR/SVD term (30·k³) is estimated at
if CUDA:
    # An H100/H200 does ~3e13 fp32 multiply-adds per second in a large GEMM (TF32 off, PyTorch's
    # default for matmul); its QR and SVD (cuSOLVER) are far slower than that, so they are
    # estimated at a much lower rate, which skips procrustes where min(n, d) = 4096.
    MAC_PER_S = 2e13
    SVD_MAC_PER_S = 1e11
    BIG_S = LIMIT_S = 1.0
    ROUND_BUDGET_S = 0.5


@contextlib.contextmanager
def forced(form: str | None):
    """Make linear CKA use ``form`` ("gram" or "feature"), or the automatic choice for None."""
    original = kernel_alignment.use_gram_form
    if form is not None:
        kernel_alignment.use_gram_form = lambda n, d1, d2: form == "gram"
    try:
        yield
    finally:
        kernel_alignment.use_gram_form = original


def products(form: str, n: int, d: int) -> tuple[list, list]:
    """(forward, backward) product callables of linear CKA in ``form`` for x, y: (n, d)."""
    x, y = torch.randn(n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    if form == "gram":
        g = torch.randn(n, n, device=DEVICE)
        return [lambda: x @ x.T, lambda: y @ y.T], [lambda: g @ x]
    c = torch.randn(d, d, device=DEVICE)
    if n <= d:  # self-products as n×n Grams
        g = torch.randn(n, n, device=DEVICE)
        fwd = [lambda: x.T @ y, lambda: x @ x.T, lambda: y @ y.T]
        bwd = [lambda: y @ c.T, lambda: g @ x]
    else:
        fwd = [lambda: x.T @ y, lambda: x.T @ x, lambda: y.T @ y]
        bwd = [lambda: y @ c.T, lambda: x @ c]
    return fwd, bwd


def macs(form: str, n: int, d: int) -> tuple[float, float]:
    """Estimated (forward, backward) multiply-adds of linear CKA in ``form``."""
    if form == "gram":
        return 2 * n * n * d, n * n * d
    self_product = min(n * n * d, n * d * d)
    return n * d * d + 2 * self_product, n * d * d + self_product


def estimate_seconds(measure: str, form: str | None, n: int, d: int) -> float:
    """Rough seconds of one forward+backward here, from multiply-add counts."""
    if measure in LINEAR:
        fwd, bwd = macs(form or ("gram" if kernel_alignment.use_gram_form(n, d, d) else "feature"), n, d)
    elif measure == "procrustes":
        k = min(n, d)
        svd = 30 * k**3 * (MAC_PER_S / SVD_MAC_PER_S)  # in GEMM multiply-adds (factor 1 on the CPU)
        fwd, bwd = 2 * n * n * d + svd, 2 * n * n * d + svd
    else:
        fwd, bwd = 2 * n * n * d, n * n * d
    return (fwd + bwd) / MAC_PER_S


def skip_reason(measure: str, form: str | None, n: int, d: int) -> str | None:
    if form == "feature" and d * d * 4 > MEMORY_LIMIT:
        return f"d×d matrix is {d * d * 4 / 2**30:.0f} GiB"
    seconds = estimate_seconds(measure, form, n, d)
    if seconds > LIMIT_S:
        return f"~{seconds:.0f} s per call here"
    return None


def time_cell(n: int, d: int, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(n, d, device=DEVICE, requires_grad=True)
    y = torch.randn(n, d, device=DEVICE)
    rows, fns, round_s = [], {}, 0.0
    auto = "gram" if kernel_alignment.use_gram_form(n, d, d) else "feature"
    big = sum(macs(auto, n, d)) / MAC_PER_S > BIG_S
    for name in sim.list_measures():
        measure = sim.get_measure(name)
        forms = ("gram", "feature") if name in LINEAR else (None,)
        for form in forms:
            row = {"measure": name, "n": n, "d": d, "form": form or "", "auto": form == auto if form else None}
            reason = "a large cell: only linear CKA is timed here" if big and name != "cka" else None
            reason = reason or skip_reason(name, form, n, d)
            if reason:
                rows.append({**row, "skipped": reason})
                continue

            def forward(measure=measure, form=form):
                with forced(form):
                    return measure(x, y)

            def both(measure=measure, form=form):
                with forced(form):
                    measure(x, y).backward()
                x.grad = None

            key = f"{name}/{form}"
            fns[key + "/fwd"], fns[key + "/both"] = forward, both
            round_s += 2 * estimate_seconds(name, form, n, d) * (2 if name == "cka" else 1)
            if name == "cka":
                fwd, bwd = products(form, n, d)
                fns[key + "/products fwd"] = lambda fwd=fwd: [f() for f in fwd]
                fns[key + "/products both"] = lambda fwd=fwd, bwd=bwd: [f() for f in fwd + bwd]
            rows.append({**row, "key": key})
    # Repeats to fit ~ROUND_BUDGET_S of estimated work per cell (1 to 9 rounds, after one warm-up).
    # A cell whose round takes over 10 s is timed once without warm-up: first-call costs are ~1% there.
    repeats = max(1, min(3 if quick else 9, int(ROUND_BUDGET_S / max(round_s, 1e-9))))
    timed = interleaved(fns, repeats, warmup=0 if round_s > 10 else 1) if fns else {}
    for row in rows:
        key = row.pop("key", None)
        if key is None:
            continue
        row["fwd_s"] = timed[key + "/fwd"]["median"]
        row["both_s"] = timed[key + "/both"]["median"]
        products_key = "cka/" + row["form"]
        if row["measure"] in LINEAR and products_key + "/products fwd" in timed:
            row["products_fwd_s"] = timed[products_key + "/products fwd"]["median"]
            row["products_both_s"] = timed[products_key + "/products both"]["median"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n ≤ 1024, d ≤ 4096, fewer repeats")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="run the cells from the cheapest up and skip those left after this many seconds")
    args = parser.parse_args()
    check_environment()
    result = {"machine": machine(), "cells": []}
    print("# bench_kernels\n", result["machine"], flush=True)
    grid = [(n, d) for n in NS for d in DS] + list(EXTRA)
    if args.quick:
        grid = [(n, d) for n, d in grid if not (n > 1024 or d > 4096)]
    order = grid if args.budget_s is None else sorted(grid, key=lambda nd: nd[0] * nd[0] * nd[1])
    start = time.perf_counter()
    done: dict[tuple[int, int], list[dict]] = {}
    for n, d in order:
        if not CUDA and n * d * 4 * 2 >= 2**31:  # x and y alone would take 2 GiB
            done[n, d] = [{"measure": "all", "n": n, "d": d, "form": "",
                           "skipped": f"inputs are {n * d * 8 / 2**30:.0f} GiB, one Gram ~{n * n * d / MAC_PER_S:.0f} s"}]
            continue
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            done[n, d] = [{"measure": "all", "n": n, "d": d, "form": "",
                           "skipped": f"time budget (--budget-s {args.budget_s:g}) spent"}]
            continue
        done[n, d] = time_cell(n, d, args.quick)
        print(f"n={n} d={d}: done", flush=True)
        if CUDA:  # a run cut short by a time limit keeps the cells it finished
            result["cells"] = [c for nd in grid if nd in done for c in done[nd]]
            result["markdown"] = render(result["cells"])
            save("bench_kernels", result)
    result["cells"] = [c for nd in grid for c in done[nd]]
    result["markdown"] = render(result["cells"])
    result["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print(result["markdown"])
    print("saved", save("bench_kernels", result))


def render(cells: list[dict]) -> str:
    rows, verdicts = [], []
    by_cell: dict[tuple, dict] = {}
    for c in cells:
        if "skipped" in c:
            rows.append([c["measure"], c["n"], c["d"], c["form"], "", "", "", "", f"skipped: {c['skipped']}"])
            continue
        ratio_f = c["fwd_s"] / c["products_fwd_s"] if "products_fwd_s" in c else float("nan")
        ratio_b = c["both_s"] / c["products_both_s"] if "products_both_s" in c else float("nan")
        auto = {True: "auto", False: "", None: ""}[c["auto"]]
        rows.append([c["measure"], c["n"], c["d"], c["form"] + (f" ({auto})" if auto else ""),
                     c["fwd_s"] * 1e3, ratio_f, c["both_s"] * 1e3, ratio_b, ""])
        if c["measure"] in LINEAR:
            by_cell.setdefault((c["measure"], c["n"], c["d"]), {})[c["form"]] = c
    for (name, n, d), forms in by_cell.items():
        if len(forms) < 2:
            continue
        fastest = min(forms, key=lambda f: forms[f]["both_s"])
        chosen = next(f for f in forms if forms[f]["auto"])
        loss = forms[chosen]["both_s"] / forms[fastest]["both_s"]
        verdicts.append([name, n, d, chosen, fastest, loss])
    md = table(["measure", "n", "d", "form", "fwd ms", "fwd / products", "fwd+bwd ms",
                "fwd+bwd / products", "note"], rows)
    md += "\n\nAutomatic form choice against the faster forced form (fwd+bwd):\n\n"
    md += table(["measure", "n", "d", "auto picks", "faster", "auto / faster"], verdicts)
    return md


if __name__ == "__main__":
    main()
