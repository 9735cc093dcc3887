"""Step overhead of guidance: exact guided step against its floor and against the official code.

For each workload ((a) Deep FCN ← ResNet-18, (b) LSTM LM ← Transformer LM; and, R1 only, (c) plain
FCN 24×512 ← plain 8-conv CNN and (d) nn.LSTM LM ← Hugging Face GPT-2, both written as plain torch /
transformers with Guidance defaults, skipped with the reason printed where the defaults find no layer):

* floor = plain target step (forward, backward, Adam) + guide forward under no_grad + every matrix
  product the measure needs for every pair, each timed alone (for linear CKA in the Gram form: each
  guide layer's Gram, each target layer's Gram and the one product of its backward);
* R1 = exact guided step / floor (goal ≤ 1.05); R2 = exact / official-style step (goal ≤ 0.40);
* peak memory: the rise of the process's peak RSS (VmHWM) over two steps after a warm-up step, in
  fresh subprocesses, of the guided step against a process that runs the guide forward and the
  plain step one after the other: what any exact guided step must hold (goal ≤ 1.2); on CUDA
  (``BENCH_DEVICE=cuda``) the rise of ``torch.cuda.max_memory_allocated()`` over two steps after a
  warm-up step, in this process (the caching allocator counts each tensor exactly, so no fresh
  process or repeat is needed), also with ``--quick``;
* the opt-in fast modes: step time, and their error against the exact alignment loss on a batch
  the timing did not use (|Δ loss|, the largest change of one pair's similarity, 1 − cosine
  between the alignment gradients);
* with ``--compile``, the exact step with ``Guidance(compile=True)`` (linear CKA's stacked
  similarity through torch.compile), timed with the others after its compilation, against the same
  floor: R1 compiled.

    bash benchmarks/run.sh step          # or: python benchmarks/bench_step.py [--quick]
    BENCH_DEVICE=cuda bash benchmarks/gpu.sh   # on a CUDA machine (with bench_kernels)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import official_style  # noqa: E402
from _common import (  # noqa: E402
    CUDA, DEVICE, WORKLOADS, check_environment, interleaved, machine, save, seeded, sync, table,
)
from _floor import floor_products, time_products  # noqa: E402

import repguide as rg  # noqa: E402
from repguide.guidance import GuideFeatureCache  # noqa: E402

SKETCH_DIM = 1024
FULL = "ab"  # workloads with the official-style step, fast modes and memory; the others get R1 only

# Fast modes: Guidance keyword arguments (the cache is added by make_guidance).
FAST_MODES = {
    "bf16 guide Grams": dict(guide_precision="bf16"),
    "sketch {k}": dict(sketch_dim="{k}"),
    "guide cache": dict(guide_cache=True),
    "guide cache + sketch {k}": dict(guide_cache=True, sketch_dim="{k}"),
    "guide cache + sketch {k} + bf16": dict(guide_cache=True, sketch_dim="{k}", guide_precision="bf16"),
}


def fast_modes(k: int = SKETCH_DIM) -> dict[str, dict]:
    return {
        name.format(k=k): {o: (k if v == "{k}" else v) for o, v in options.items()}
        for name, options in FAST_MODES.items()
    }


def make_guidance(target, guide, x, workload, options: dict) -> rg.Guidance:
    """A Guidance with the workload's and then ``options``; a requested guide cache is created and
    filled on the pool."""
    options = {**workload.guidance_options, **options}
    cache = options.pop("guide_cache", False)
    if cache:
        options["guide_cache"] = GuideFeatureCache(len(workload.dataset))
    guidance = rg.Guidance(target, guide, example_input=x, **options)
    if cache:
        with torch.no_grad():
            for k in range(-(-len(workload.dataset) // workload.batch_size)):
                xb, _, index = workload.batch(k)
                guidance.eval()(xb, guide_index=index)
        guidance.train()
    return guidance


class Runner:
    """The objects of one variant and its optimiser step on a fixed batch."""

    def __init__(self, workload, variant: str, options: dict | None = None, pairs=None):
        self.workload, self.variant = workload, variant
        self.x, self.y, self.index = workload.batch(0)
        self.target = seeded(workload.make_target, 0)
        self.guide = seeded(workload.make_guide, 1).eval()
        self.optimizer = torch.optim.Adam(self.target.parameters(), lr=1e-3)
        self.guidance = None
        if variant == "official":
            self.pairs = pairs
        elif variant not in ("plain", "guide forward", "plain + guide forward"):
            self.guidance = make_guidance(self.target, self.guide, self.x, workload, options or {})

    def __call__(self) -> None:
        x, y, loss_fn = self.x, self.y, self.workload.loss
        if self.variant == "guide forward":
            with torch.no_grad():
                self.guide(x)
            return
        if self.variant == "official":
            official_style.step(self.target, self.guide, self.pairs, self.optimizer, loss_fn, x, y)
            return
        if self.variant == "plain + guide forward":
            with torch.no_grad():
                self.guide(x)
        if self.guidance is None:
            loss = loss_fn(self.target(x), y)
        else:
            kwargs = {"guide_index": self.index} if self.guidance.guide_cache is not None else {}
            out = self.guidance(x, **kwargs)
            loss = loss_fn(out.output, y) + out.loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


# --------------------------------------------------------------------------------------------
# Errors of the fast modes


def alignment(workload, options: dict, x, index, target_state, guide) -> tuple[float, dict, torch.Tensor]:
    target = seeded(workload.make_target, 0)
    target.load_state_dict(target_state)
    guidance = make_guidance(target, copy.deepcopy(guide), x, workload, options)
    kwargs = {"guide_index": index} if guidance.guide_cache is not None else {}
    torch.manual_seed(123)  # the same dropout masks in every variant
    out = guidance(x, **kwargs)
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in target.parameters() if p.grad is not None])
    return float(out.loss.detach()), {k: float(v.detach()) for k, v in out.similarities.items()}, grad


def fast_mode_errors(workload, modes: dict[str, dict], runner: Runner) -> dict[str, dict]:
    x, _, index = workload.batch(1)
    state = runner.target.state_dict()
    loss0, sims0, grad0 = alignment(workload, {}, x, index, state, runner.guide)
    errors = {}
    for name, options in modes.items():
        loss, sims, grad = alignment(workload, options, x, index, state, runner.guide)
        errors[name] = {
            "loss": loss, "exact_loss": loss0, "loss_error": abs(loss - loss0),
            "max_similarity_error": max(abs(sims[k] - sims0[k]) for k in sims0),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(grad.double(), grad0.double(), dim=0)),
        }
    return errors


# --------------------------------------------------------------------------------------------
# Peak memory, one fresh process per variant


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(key: str, variant: str, pairs: list, options: dict) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    workload = WORKLOADS[key]()
    runner = Runner(workload, variant, options, [tuple(p) for p in pairs])
    runner()  # one warm-up step: optimiser state and one-time buffers are not the step's peak
    # Free what set-up left for the garbage collector and return the heap it freed (data loading,
    # discovery forwards, cache filling) to the system, so that the step cannot hide its needs in
    # it; then reset the peak RSS (VmHWM) to the current RSS.
    gc.collect()
    gc.disable()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS:")
    for _ in range(2):
        runner()
    print(json.dumps({"peak_rise_mib": (_status_kb("VmHWM:") - base) / 1024}))


def measure_memory(key: str, variant: str, pairs, options=None, repeats: int = 1) -> float:
    """Median over ``repeats`` fresh processes of the peak RSS rise over two steps (MiB)."""
    cmd = [sys.executable, __file__, "--memory-child", json.dumps([key, variant, pairs, options or {}])]
    rises = []
    for _ in range(repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True).stdout
        rises.append(json.loads(out.strip().splitlines()[-1])["peak_rise_mib"])
    return statistics.median(rises)


def measure_cuda_memory(runner: Runner) -> float:
    """Rise of ``torch.cuda.max_memory_allocated()`` over two steps after a warm-up step (MiB).

    In this process: what other runners hold (weights, optimiser states, caches) is in the
    baseline, and the allocator counts each tensor exactly, so the rise is the step's own.
    """
    runner()  # warm-up: optimiser state and one-time buffers are not the step's peak
    gc.collect()
    sync()
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    for _ in range(2):
        runner()
    sync()
    return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20


# --------------------------------------------------------------------------------------------


def run_workload(key: str, repeats: int, quick: bool, compile: bool = False) -> dict:
    workload = WORKLOADS[key]()
    print(f"\n## ({key}) {workload.name}\n\ndata: {workload.source}\n", flush=True)
    try:
        exact = Runner(workload, "exact")
    except ValueError as e:  # (d): no candidate layer found with the defaults
        reason = str(e).splitlines()[0]
        if "0 guide layer" in reason or "0 target layer" in reason:
            reason = ("today's layer discovery finds no candidate layer in the model with Guidance defaults "
                      f"(the known bug of the issue 'What a layer is', being fixed elsewhere): {reason}")
        md = f"skipped: {reason}"
        print(md, flush=True)
        return {"workload": workload.name, "data": workload.source, "skipped": reason, "markdown": md}
    pairs = [p.key for p in exact.guidance.pairs]
    full = key in FULL  # (c) and (d): R1 only (plain, guide forward, exact, the floor)
    modes = fast_modes() if full else {}
    runners = {
        "plain": Runner(workload, "plain"),
        "guide forward": Runner(workload, "guide forward"),
        "exact": exact,
        **({"official": Runner(workload, "official", pairs=pairs)} if full else {}),
        **{name: Runner(workload, "fast", options) for name, options in modes.items()},
    }
    if compile:  # compiled by its first step, outside the timing
        runners["compiled"] = Runner(workload, "compiled", {"compile": True})
        t0 = time.perf_counter()
        runners["compiled"]()
        compile_s = time.perf_counter() - t0
    timed = interleaved(runners, repeats)
    med = {k: v["median"] for k, v in timed.items()}
    products = floor_products(exact.guidance, exact.x)
    product_times = time_products(products, repeats=max(5, repeats))
    product_total = sum(product_times[str((op, dims))] * c for _, op, dims, c in products)
    floor = med["plain"] + med["guide forward"] + product_total
    result = {
        "workload": workload.name, "data": workload.source, "pairs": len(pairs),
        "timings": timed, "products": [
            {"what": what, "op": op, "dims": dims, "count": c, "seconds": product_times[str((op, dims))]}
            for what, op, dims, c in products
        ],
        "floor": floor, "R1": med["exact"] / floor,
        "R2": med["exact"] / med["official"] if full else float("nan"),
        **({"R1_compiled": med["compiled"] / floor, "compile_seconds": compile_s} if compile else {}),
    }
    rows = [
        ["plain target step", med["plain"] * 1e3, med["plain"] / med["plain"]],
        ["guide forward (no_grad)", med["guide forward"] * 1e3, float("nan")],
        [f"products, {sum(c for *_, c in products)} for {len(pairs)} pairs, each timed alone",
         product_total * 1e3, float("nan")],
        ["**floor** (sum of the three)", floor * 1e3, floor / med["plain"]],
        ["**exact guided step**", med["exact"] * 1e3, med["exact"] / med["plain"]],
    ]
    extra = ["compiled"] * compile + ["official"] * full + list(modes)
    names = {"compiled": "exact guided step, compile=True", "official": "official-style guided step"}
    rows += [[names.get(v, f"fast: {v}"), med[v] * 1e3, med[v] / med["plain"]] for v in extra]
    md = [table(["step", "median ms", "× plain step"], rows)]
    md.append(f"\nR1 = exact / floor = **{result['R1']:.3f}** (goal ≤ 1.05)" + (
        f"; R2 = exact / official = **{result['R2']:.3f}** (goal ≤ 0.40)" if full else
        f" ({len(pairs)} pairs; R1 only on this workload: no official-style step, fast modes or memory)"))
    if compile:
        md.append(f"\nR1 compiled = compile=True step / floor = **{result['R1_compiled']:.3f}** "
                  f"(its first step, compilation included: {compile_s:.1f} s wall)")
    if not full:
        result["markdown"] = "\n".join(md)
        print(result["markdown"], flush=True)
        return result

    print("measuring fast-mode errors ...", flush=True)
    errors = fast_mode_errors(workload, modes, exact)
    result["fast_mode_errors"] = errors
    exact_loss = next(iter(errors.values()))["exact_loss"]
    md.append(f"\nErrors on another batch, same weights; exact alignment loss there: {exact_loss:.4f} "
              f"(Σ over {len(pairs)} pairs of 1 − similarity):\n")
    md.append(table(
        ["fast mode", "step ms", "× plain", "× exact", "Δ loss (abs)", "largest Δ similarity (abs)", "1 − grad cosine"],
        [[name, med[name] * 1e3, med[name] / med["plain"], med[name] / med["exact"],
          e["loss_error"], e["max_similarity_error"], 1 - e["grad_cosine"]] for name, e in errors.items()],
    ))

    cache_sketch = f"guide cache + sketch {SKETCH_DIM}"
    if CUDA:
        print("measuring peak CUDA memory (in this process) ...", flush=True)
        memory_runners = {v: runners[v] for v in ("plain", "guide forward")}
        memory_runners["plain + guide forward"] = Runner(workload, "plain + guide forward")
        memory_runners.update({v: runners[v] for v in ("exact", "official", cache_sketch)})
        mem = {v: measure_cuda_memory(r) for v, r in memory_runners.items()}
        memory_columns = ["variant", "peak CUDA memory rise MiB (max_memory_allocated)",
                          "× (plain step + guide forward)"]
    elif not quick:
        print("measuring peak memory (one process per variant) ...", flush=True)
        # The ratio's two terms are medians of 3 processes: the glibc heap's layout makes a single
        # process's peak vary by ~10%.
        mem = {v: measure_memory(key, v, pairs, repeats=3 if v in ("plain + guide forward", "exact") else 1)
               for v in ("plain", "guide forward", "plain + guide forward", "exact", "official")}
        mem[cache_sketch] = measure_memory(key, "fast", pairs, modes[cache_sketch])
        memory_columns = ["process runs", "peak RSS rise MiB", "× (plain step + guide forward)"]
    if CUDA or not quick:
        base = mem["plain + guide forward"]
        result["memory_mib"] = mem
        result["memory_ratio"] = mem["exact"] / base
        md.append("\n" + table(memory_columns, [[v, m, m / base] for v, m in mem.items()]))
        md.append(f"\nmemory ratio = exact / (plain step + guide forward) = **{result['memory_ratio']:.3f}** "
                  f"(goal ≤ 1.2); against the sum of the two {'variants' if CUDA else 'processes'}' rises: "
                  f"{mem['exact'] / (mem['plain'] + mem['guide forward']):.3f}")
    result["markdown"] = "\n".join(md)
    print(result["markdown"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, no memory subprocesses (on CUDA memory is still measured, in-process)")
    parser.add_argument("--workloads", default="abcd")
    parser.add_argument("--compile", action="store_true", help="also time the exact step with Guidance(compile=True)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*json.loads(args.memory_child))
        return
    check_environment()
    repeats = 5 if args.quick else 9
    results = {"machine": machine(), "workloads": {}}
    print("# bench_step\n", results["machine"])
    for key in args.workloads.replace(",", ""):  # "ac" or "a,c"
        results["workloads"][key] = run_workload(key, repeats, args.quick, args.compile)
        if CUDA:  # a run cut short by a time limit keeps the workloads it finished
            save("bench_step", results)
    results["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    print("saved", save("bench_step", results))


if __name__ == "__main__":
    main()
