"""Every similarity measure on (n, d) inputs, forward and forward+backward, against its matrix products.

For each n ∈ {64, 256, 1024, 4096} and d ∈ {64, 4096, 65536} (x: (n, d) with a gradient, as a
target layer; y: (n, d) without, as a guide layer), every registered measure is timed forward and
forward+backward. Linear CKA (biased and unbiased) is timed in both of its forms, forced, and its
time is divided by the time of the matrix products that form cannot avoid, each timed alone:

* Gram form: forward X Xᵀ and Y Yᵀ, backward one (n, n) @ (n, d) product;
* feature form: forward Xᵀ Y, and X's and Y's self-products (n×n Gram or d×d, the smaller);
  backward Y Cᵀ and X's self-product backward.

Goal: ≤ 1.3× in both forms, and the automatic choice (``_use_gram_form``) picks the faster form in
every cell where both can run. Cells are skipped where one call would take more than ~6 s here or
a d×d matrix would not fit; the table says why.

    bash benchmarks/run.sh kernels [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_environment, interleaved, machine, save, table  # noqa: E402

import repguide.similarity as sim  # noqa: E402

NS = (64, 256, 1024, 4096)
DS = (64, 4096, 65536)
EXTRA = ((4096, 1024),)  # a cell where the feature form is chosen and its products dominate
LINEAR = ("cka", "cka_unbiased")
BIG_S = 0.5  # in cells whose forward+backward takes longer, only linear CKA is timed
ROUND_BUDGET_S = 6.0
MAC_PER_S = 6e10  # rough multiply-adds per second of a large fp32 GEMM on this machine (2 cores)
LIMIT_S = 6.0  # skip a (measure, form) whose one forward+backward is estimated to take longer
MEMORY_LIMIT = 3 * 2**30  # bytes for one d×d matrix


@contextlib.contextmanager
def forced(form: str | None):
    """Make linear CKA use ``form`` ("gram" or "feature"), or the automatic choice for None."""
    original = sim._use_gram_form
    if form is not None:
        sim._use_gram_form = lambda n, d1, d2: form == "gram"
    try:
        yield
    finally:
        sim._use_gram_form = original


def products(form: str, n: int, d: int) -> tuple[list, list]:
    """(forward, backward) product callables of linear CKA in ``form`` for x, y: (n, d)."""
    x, y = torch.randn(n, d), torch.randn(n, d)
    if form == "gram":
        g = torch.randn(n, n)
        return [lambda: x @ x.T, lambda: y @ y.T], [lambda: g @ x]
    c = torch.randn(d, d)
    if n <= d:  # self-products as n×n Grams
        g = torch.randn(n, n)
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
        fwd, bwd = macs(form or ("gram" if sim._use_gram_form(n, d, d) else "feature"), n, d)
    elif measure == "procrustes":
        k = min(n, d)
        fwd, bwd = 2 * n * n * d + 30 * k**3, 2 * n * n * d + 30 * k**3
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
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, d)
    rows, fns, round_s = [], {}, 0.0
    auto = "gram" if sim._use_gram_form(n, d, d) else "feature"
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
    args = parser.parse_args()
    check_environment()
    result = {"machine": machine(), "cells": []}
    print("# bench_kernels\n", result["machine"], flush=True)
    for n, d in [(n, d) for n in NS for d in DS] + list(EXTRA):
        if args.quick and (n > 1024 or d > 4096):
            continue
        if n * d * 4 * 2 >= 2**31:  # x and y alone would take 2 GiB
            result["cells"].append({"measure": "all", "n": n, "d": d, "form": "",
                                    "skipped": f"inputs are {n * d * 8 / 2**30:.0f} GiB, one Gram ~{n * n * d / MAC_PER_S:.0f} s"})
            continue
        result["cells"].extend(time_cell(n, d, args.quick))
        print(f"n={n} d={d}: done", flush=True)
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
