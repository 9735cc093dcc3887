"""Does torch.compile of the similarity path speed up an exact guided step? (Not part of `make bench`.)

The per-pair target-side computation (centre the target activation, its Gram, the CKA against the
guide's prepared Gram, and their backward) is what a step runs besides the networks and the guide
Grams, and it is many small ops: the part a compiler could fuse. This compiles exactly that
(linear CKA's Gram form against the guide's prepared Gram) with the default inductor backend and times workload (a), interleaved with
the uncompiled step, after the compilation is done; it also reports the compile time and the
largest similarity difference.

    bash benchmarks/run.sh compile
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORKLOADS, check_environment, interleaved, machine, require_cpu, save, table  # noqa: E402
from bench_step import Runner  # noqa: E402

from repguide.similarity import Prepared  # noqa: E402
from repguide.similarity.base import safe_div  # noqa: E402
from repguide.similarity.kernel_alignment import gram_norm  # noqa: E402


def _cka_against_gram(t: torch.Tensor, gram: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """LinearCKA.compare in the Gram form, for a target (n, d) against a prepared guide Gram."""
    p = Prepared(t)
    return safe_div((p.gram * gram).sum(), gram_norm(p) * norm)


def main() -> None:
    require_cpu("bench_compile")
    check_environment()
    result = {"machine": machine()}
    print("# bench_compile\n", result["machine"], flush=True)
    workload = WORKLOADS["a"]()
    exact, compiled = Runner(workload, "exact"), Runner(workload, "exact")
    guidance = compiled.guidance
    cka_against_gram = torch.compile(_cka_against_gram, dynamic=False)
    uncompiled = guidance._compare

    def compare(t, key, guide, prepared):
        if isinstance(guide, Prepared) and guide.x is None and t.requires_grad:
            return cka_against_gram(t, guide.gram, gram_norm(guide))
        return uncompiled(t, key, guide, prepared)

    guidance._compare = compare
    t0 = time.perf_counter()
    for _ in range(3):  # the first step sees unknown target widths, the second the Gram-only guide
        compiled()
    compile_s = time.perf_counter() - t0
    exact.target.load_state_dict(compiled.target.state_dict())
    x = workload.batch(1)[0]
    torch.manual_seed(0)
    a = exact.guidance(x).similarities
    torch.manual_seed(0)
    b = guidance(x).similarities
    difference = max(abs(float((a[k] - b[k]).detach())) for k in a)
    timed = interleaved({"exact": exact, "exact, compiled similarity path": compiled}, repeats=9)
    med = {k: v["median"] for k, v in timed.items()}
    result.update(compile_seconds=compile_s, max_similarity_difference=difference, timings=timed)
    result["markdown"] = (
        f"workload: {workload.name}; compilation (first 3 steps): {compile_s:.0f} s; "
        f"largest similarity difference: {difference:.1e}\n\n"
        + table(["step", "median ms", "× uncompiled"],
                [[k, v * 1e3, v / med["exact"]] for k, v in med.items()])
    )
    result["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print(result["markdown"])
    print("saved", save("bench_compile", result))


if __name__ == "__main__":
    main()
