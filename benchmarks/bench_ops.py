"""Op count of a guided step: aten ops dispatched and host syncs, counted eagerly (runs on a CPU).

For every benchmark workload ((a)-(d) of _common.py), every measure and the fast modes, one guided
step (forward + task loss, backward, Adam step) after one warm-up step is run under a
``TorchDispatchMode`` that counts every aten op it sees (after autograd, i.e. what a device would
run: on a GPU each is about one kernel launch) and every **host sync**:

* ``aten._local_scalar_dense`` (what ``.item()``, ``bool()``, ``float()``, ``int()`` and ``if t:``
  on a tensor call),
* ops whose output size depends on tensor values (``nonzero``, ``masked_select``, ``unique*``,
  indexing or ``index_put_`` with a boolean mask, ``repeat_interleave`` without ``output_size``),
  and ``equal`` (returns a host bool),
* on CUDA, a copy from the device to the host.

Each sync is attributed to the innermost frame under ``src/repguide`` (file:line) that issued it.
The extra ops per pair = (guided step − plain step − guide forward under no_grad) / pairs; for
the guide-cache modes, whose step does not run the guide, the baseline is the plain step alone.
Goal (issue 14): ≤ 30 extra ops per pair and 0 host syncs, on the exact path and the fast modes.

On CUDA (``BENCH_DEVICE=cuda``) each guided step is also run once under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call; on a CPU
that check is skipped.

Only the public API is used (``repguide.Guidance``, ``repguide.GuideFeatureCache``), and one
internal switch: ``repguide.similarity.fused.CPU_TUNED = False``, so that the guide's Grams take
the sync-free device path on the CPU too (by default a CPU takes a raw-Gram path with one host read
per guide layer, free there: benchmarks/README.md, log #31), and the syncs counted here are those an
accelerator would wait for.

    bash benchmarks/run.sh ops           # or: python benchmarks/bench_ops.py [--workloads abcd]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CUDA, DEVICE, WORKLOADS, check_environment, machine, save, table  # noqa: E402
from bench_step import Runner  # noqa: E402

import repguide as rg  # noqa: E402
from repguide.similarity import fused  # noqa: E402

fused.CPU_TUNED = False  # count the accelerator's paths (see the docstring)

GOAL_OPS, GOAL_SYNCS = 30, 0
MEASURES = ["cka", "cka_unbiased", "cka_rbf", "rsa", "procrustes"]
SKETCH_DIM = 1024
FAST_MODES = {  # Guidance keyword arguments, with the default measure (linear CKA)
    "bf16 guide Grams": dict(guide_precision="bf16"),
    f"sketch {SKETCH_DIM}": dict(sketch_dim=SKETCH_DIM),
    "guide cache": dict(guide_cache=True),
    f"guide cache + sketch {SKETCH_DIM} + bf16": dict(guide_cache=True, sketch_dim=SKETCH_DIM, guide_precision="bf16"),
}

aten = torch.ops.aten
SRC = str(Path(rg.__file__).resolve().parent)
_VALUE_SIZED = {  # output size depends on values: the host must read them
    aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
}


#: Ops that only make new tensor metadata (no kernel on a device) beside those whose schema says they
#: alias their input (``OpOverload.is_view``: view, transpose, select, unbind, expand, detach, ...).
_NO_KERNEL = {aten._unsafe_view.default, aten.lift_fresh.default}


def launches_kernel(func) -> bool:
    """Whether the op does work on the device (on a GPU, about one kernel launch): not a view."""
    return not (func.is_view or func in _NO_KERNEL)


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def sync_kind(func, args, kwargs) -> str | None:
    """Why calling ``func`` on these arguments makes the host wait for the device, or None."""
    if func is aten._local_scalar_dense.default:
        return "_local_scalar_dense"
    if func in _VALUE_SIZED:
        return func.overloadpacket.__name__
    if func is aten.equal.default:
        return "equal"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default) \
            and _is_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return f"{func.overloadpacket.__name__} with a boolean mask"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        if isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst is not None \
                and torch.device(dst).type == "cpu":
            return "device-to-host copy"
    return None


def _site() -> str:
    """The innermost frame in repguide's sources, else the innermost outside torch."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if frame.filename.startswith(SRC):
            return f"src/repguide/{Path(frame.filename).relative_to(SRC)}:{frame.lineno} ({frame.name})"
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "?"


class OpCounter(TorchDispatchMode):
    """Counts aten ops per phase and host syncs with their call sites."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops: Counter = Counter()  # phase -> ops
        self.kernels = 0  # ops that are not views
        self.by_op: Counter = Counter()
        self.syncs: Counter = Counter()  # (kind, site) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[self.phase] += 1
        self.kernels += launches_kernel(func)
        self.by_op[func.overloadpacket.__name__] += 1
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.syncs[(kind, _site())] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())


class Step(Runner):
    """bench_step's objects for one variant ("guided" is its exact step with ``options``), and a
    ``step(counter)`` that moves ``counter.phase`` along."""

    def __init__(self, workload, variant: str, options: dict | None = None):
        super().__init__(workload, "exact" if variant == "guided" else variant, options)
        self.variant = variant

    @property
    def pairs(self) -> int:
        return len(self.guidance.pairs)

    def __call__(self, counter: OpCounter | None = None) -> None:
        def phase(name):
            if counter is not None:
                counter.phase = name

        phase("forward")
        if self.variant == "guide forward":
            with torch.no_grad():
                self.guide(self.x)
            return
        if self.guidance is None:
            loss = self.workload.loss(self.target(self.x), self.y)
        else:
            kwargs = {"guide_index": self.index} if self.guidance.guide_cache is not None else {}
            out = self.guidance(self.x, **kwargs)
            loss = self.workload.loss(out.output, self.y) + out.loss
        phase("backward")
        loss.backward()
        phase("optimizer")
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()

    def count(self) -> OpCounter:
        """Ops of the second step (the first fills the optimiser state and a guide cache)."""
        self()
        counter = OpCounter()
        with counter:
            self(counter)
        return counter

    def cuda_sync_check(self) -> str:
        """On CUDA: one step under ``set_sync_debug_mode("error")``; "n/a (CPU)" elsewhere."""
        if not CUDA:
            return "n/a (CPU)"
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self()
            return "passed"
        except RuntimeError as e:
            return "raised: " + str(e).splitlines()[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()


def self_check() -> None:
    """The counter sees what it claims to: 3 ops and 3 syncs in a known snippet."""
    x = torch.arange(4.0, device=DEVICE)
    with OpCounter() as c:
        x.sum().item()  # sum + _local_scalar_dense
        x.view(2, 2).t()  # two views: no kernel
        _ = x[x > 1]  # gt + index with a boolean mask
        torch.nonzero(x)
    kinds = sorted(k for k, _ in c.syncs)
    assert kinds == ["_local_scalar_dense", "index with a boolean mask", "nonzero"], kinds
    assert c.total == 7 and c.kernels == 5, c.by_op


def run_workload(key: str) -> dict:
    workload = WORKLOADS[key]()
    print(f"\n## ({key}) {workload.name}\n", flush=True)
    plain = Step(workload, "plain").count()
    guide = Step(workload, "guide forward").count()
    result = {"workload": workload.name, "plain_ops": dict(plain.ops), "plain_syncs": plain.sync_count,
              "plain_kernels": plain.kernels, "guide_forward_kernels": guide.kernels,
              "guide_forward_ops": guide.total, "guide_forward_syncs": guide.sync_count, "variants": {}}
    variants = {f"exact, {m}": dict(measure=m) for m in MEASURES} | {f"{k} (cka)": v for k, v in FAST_MODES.items()}
    for name, options in variants.items():
        t0 = time.perf_counter()
        try:
            step = Step(workload, "guided", options)
        except ValueError as e:
            reason = str(e).splitlines()[0]
            if "0 guide layer" in reason or "0 target layer" in reason:
                reason = ("today's layer discovery finds no candidate layer in this model (the known bug of "
                          f"the issue 'What a layer is', being fixed elsewhere): {reason}")
            print(f"skipped ({key}) with Guidance defaults: {reason}", flush=True)
            result["skipped"] = reason
            break
        try:
            c = step.count()
        except Exception as e:  # a measure that cannot run on this pair: say so, go on
            result["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            print(f"  {name}: {result['variants'][name]['error']}", flush=True)
            continue
        cached = "guide_cache" in options
        base = plain.total + (0 if cached else guide.total)
        extra = (c.total - base) / step.pairs
        extra_kernels = (c.kernels - plain.kernels - (0 if cached else guide.kernels)) / step.pairs
        result["variants"][name] = {
            "pairs": step.pairs, "ops": dict(c.ops), "total": c.total, "baseline": base,
            "baseline_is": "plain step" if cached else "plain step + guide forward",
            "extra_ops_per_pair": extra, "extra_kernels_per_pair": extra_kernels, "syncs": c.sync_count,
            "sync_sites": [{"kind": k, "site": s, "count": n} for (k, s), n in c.syncs.most_common()],
            "top_ops": c.by_op.most_common(12),
            "cuda_sync_debug": step.cuda_sync_check(),
            "seconds": time.perf_counter() - t0,
        }
        print(f"  {name}: {step.pairs} pairs, {c.total} ops ({extra:.1f} extra per pair, "
              f"{extra_kernels:.1f} of them not views), "
              f"{c.sync_count} syncs  [{time.perf_counter() - t0:.1f} s]", flush=True)
    return result


def markdown(results: dict) -> str:
    md = [f"Goal (issue 14): ≤ {GOAL_OPS} extra aten ops per pair and {GOAL_SYNCS} host syncs per guided step, "
          "exact and fast modes. Extra ops per pair = (guided step − plain step − guide forward) / pairs "
          "(guide-cache modes: − plain step only); of them not views: the same without the ops that only make "
          "tensor metadata (view, transpose, select, unbind, expand, ...), which launch no kernel on a GPU. "
          "Counts are of one step after a warm-up step.\n"]
    rows, sites = [], Counter()
    for key, r in results.items():
        if "skipped" in r:
            rows.append([f"({key})", "—", "—", "—", "—", "—", "—", f"skipped: {r['skipped']}", "—"])
        for name, v in r["variants"].items():
            if "error" in v:
                rows.append([f"({key})", name, "—", "—", "—", "—", "—", v["error"], "—"])
                continue
            ops = v["ops"]
            rows.append([
                f"({key})", name, v["pairs"],
                f"{ops.get('forward', 0)} / {ops.get('backward', 0)} / {ops.get('optimizer', 0)}",
                f"{v['extra_ops_per_pair']:.1f} (goal ≤ {GOAL_OPS}: {'met' if v['extra_ops_per_pair'] <= GOAL_OPS else 'not met'})",
                f"{v['extra_kernels_per_pair']:.1f}" if "extra_kernels_per_pair" in v else "—",
                f"{v['syncs']} (goal {GOAL_SYNCS}: {'met' if v['syncs'] <= GOAL_SYNCS else 'not met'})",
                "; ".join(f"{s['count']}× {s['kind']} at {s['site']}" for s in v["sync_sites"][:3])
                + (" …" if len(v["sync_sites"]) > 3 else ""),
                v["cuda_sync_debug"],
            ])
            for s in v["sync_sites"]:
                sites[(s["kind"], s["site"])] += s["count"]
    base = [[f"({k})", sum(r["plain_ops"].values()), r["plain_syncs"], r["guide_forward_ops"], r["guide_forward_syncs"]]
            for k, r in results.items()]
    md.append(table(["pair", "plain step ops", "plain syncs", "guide forward ops", "guide forward syncs"], base))
    md.append("")
    md.append(table(["pair", "variant", "pairs", "ops fwd / bwd / optim", "extra ops per pair",
                     "of them not views (≈ GPU kernels)", "host syncs",
                     "where (innermost src/repguide frame)", "CUDA sync debug mode"], rows))
    if sites:
        md.append("\nEvery sync site, summed over all rows above:\n")
        md.append(table(["kind", "site", "syncs"], [[k, s, n] for (k, s), n in sites.most_common()]))
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="abcd")
    args = parser.parse_args()
    check_environment()
    self_check()
    t0 = time.perf_counter()
    payload = {"machine": machine(), "goal": {"extra_ops_per_pair": GOAL_OPS, "host_syncs": GOAL_SYNCS},
               "by_workload": {}}
    print("# bench_ops\n", payload["machine"])
    for key in args.workloads:
        payload["by_workload"][key] = run_workload(key)
    payload["markdown"] = markdown(payload["by_workload"])
    payload["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    payload["seconds"] = time.perf_counter() - t0
    print("\n" + payload["markdown"], flush=True)
    print("saved", save("bench_ops", payload))


if __name__ == "__main__":
    main()
