"""Does ``Guidance(compile=True)`` speed up an exact guided step? (Not part of `make bench`.)

``compile=True`` runs linear CKA's stacked similarity (``guidance/_compute.py``: the cat/stack of
the equal-shape target activations and the ``linear_cka_stack`` autograd node, forward and
backward) through ``torch.compile`` (inductor, static shapes). This times the exact step with and
without it, interleaved, after the compilation, with an A/A control (the uncompiled step twice),
in repeated blocks; it reports the first compiled step's wall time (the compilation) and the
compiled alignment's error against the uncompiled one on a batch the timing did not use.

    bash benchmarks/run.sh compile [--workloads ac]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORKLOADS, check_environment, interleaved, machine, require_cpu, save, table  # noqa: E402
from bench_step import Runner, alignment  # noqa: E402

VARIANTS = {"exact": {}, "exact, again (A/A)": {}, "exact, compile=True": {"compile": True}}


def errors(workload, runner: Runner) -> dict:
    """The compiled alignment against the uncompiled one: same weights, batch 1, same dropout masks."""
    x, _, index = workload.batch(1)
    state = runner.target.state_dict()
    loss0, sims0, grad0 = alignment(workload, {}, x, index, state, runner.guide)
    loss, sims, grad = alignment(workload, {"compile": True}, x, index, state, runner.guide)
    return {
        "loss_relative": abs(loss - loss0) / abs(loss0),
        "max_similarity_difference": max(abs(sims[k] - sims0[k]) for k in sims0),
        "grad_relative": float((grad - grad0).norm() / grad0.norm()),
    }


def run_workload(key: str, repeats: int, blocks: int) -> dict:
    workload = WORKLOADS[key]()
    runners = {name: Runner(workload, "exact", options) for name, options in VARIANTS.items()}
    compiled = runners["exact, compile=True"]
    t0 = time.perf_counter()
    compiled()
    result = {"workload": workload.name, "pairs": len(compiled.guidance.pairs),
              "compile_seconds": time.perf_counter() - t0, "errors": errors(workload, compiled), "blocks": []}
    rows = []
    for b in range(blocks):
        med = {k: v["median"] for k, v in interleaved(runners, repeats).items()}
        result["blocks"].append(med)
        rows += [[b + 1, name, t * 1e3, t / med["exact"]] for name, t in med.items()]
    e = result["errors"]
    result["markdown"] = (
        f"## ({key}) {workload.name}, {result['pairs']} pairs\n\nfirst compiled step (compilation): "
        f"{result['compile_seconds']:.1f} s wall; against the uncompiled step on another batch: loss "
        f"{e['loss_relative']:.1e} relative, largest similarity difference {e['max_similarity_difference']:.1e}, "
        f"alignment gradient {e['grad_relative']:.1e} relative\n\n"
        + table(["block", "step", "median ms", "× exact"], rows)
    )
    print(result["markdown"] + "\n", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ac")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args()
    require_cpu("bench_compile")
    check_environment()
    result = {"machine": machine(), "workloads": {}}
    print("# bench_compile\n", result["machine"], flush=True)
    for key in args.workloads.replace(",", ""):
        result["workloads"][key] = run_workload(key, args.repeats, args.blocks)
    result["markdown"] = "\n\n".join(w["markdown"] for w in result["workloads"].values())
    result["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print("saved", save("bench_compile", result))


if __name__ == "__main__":
    main()
