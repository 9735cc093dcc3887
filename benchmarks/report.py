"""Collects the latest results (benchmarks/results/*.json) into benchmarks/RESULTS.md.

CPU results come first; results of CUDA runs (``BENCH_DEVICE=cuda``, files ``*-cuda-<card>.json``)
follow in a section of their own per card.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_step", "bench_ops", "bench_kernels", "bench_scaling", "bench_compare", "bench_compile"]


def _bench(path: Path) -> str:
    return path.stem.split("-")[0]


def main() -> None:
    paths = sorted((HERE / "results").glob("*.json"),
                   key=lambda p: (ORDER.index(_bench(p)) if _bench(p) in ORDER else 99, p.stem))
    results = [(path, json.loads(path.read_text())) for path in paths]
    cpu = [(path, r) for path, r in results if r["machine"].get("device", "cpu") != "cuda"]
    gpu: dict[str, list] = {}
    for path, r in results:
        if r["machine"].get("device", "cpu") == "cuda":
            gpu.setdefault(r["machine"]["gpu"], []).append((path, r))
    parts = [
        "# Latest benchmark results",
        "",
        "Written by benchmarks/report.py from the latest benchmarks/results/*.json; each section "
        "names the command that made it. How to read them: benchmarks/README.md.",
        "GPU numbers: pending (no GPU lent to this task)." if not gpu else
        f"GPU numbers: in the last section{'s' if len(gpu) > 1 else ''} ({', '.join(gpu)}).",
    ]
    for path, result in cpu:
        m = result["machine"]
        settings = (f"THREADS={m['threads']} " if m["threads"] != 2 else "") + (
            f"BENCH_CLOCK={m['clock']} " if m.get("clock", "wall") != "wall" else "")
        command = f"{settings}bash benchmarks/run.sh {_bench(path).removeprefix('bench_')}"
        parts += [
            "", f"## {path.stem}", "",
            f"`{command}`: {m['date']}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}, {m['threads']} intra-op "
            f"thread(s), {m.get('clock', 'wall')} clock; malloc thresholds set: {m['malloc_env_set']}; "
            f"load average (1 min) {m['loadavg_1min']:.1f} at start, {m.get('loadavg_1min_end', float('nan')):.1f} at end.",
        ]
        parts += _sections(result)
    for card, runs in gpu.items():
        parts += ["", f"# GPU: {card}", "",
                  "Times are wall clock with `torch.cuda.synchronize()` after every timed call; memory is "
                  "the rise of `torch.cuda.max_memory_allocated()` over two steps (benchmarks/README.md)."]
        for path, result in runs:
            m = result["machine"]
            parts += [
                "", f"## {path.stem}", "",
                f"`BENCH_DEVICE=cuda python {m.get('argv', _bench(path) + '.py')}` (benchmarks/gpu.sh): {m['date']}; "
                f"{m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, compute capability {m['gpu_capability']}); "
                f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}; fp32 matmul precision "
                f"{m['float32_matmul_precision']}, cuDNN TF32 {m['cudnn_allow_tf32']}; host {m['cpu']}, "
                f"{m['cores']} cores, {m['threads']} intra-op thread(s); load average (1 min) "
                f"{m['loadavg_1min']:.1f} at start, {m.get('loadavg_1min_end', float('nan')):.1f} at end"
                + ("" if "loadavg_1min_end" in m else " (run cut short: the sections it finished)") + ".",
            ]
            parts += _sections(result)
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")
    print("wrote", HERE / "RESULTS.md")


def _sections(result: dict) -> list[str]:
    parts = []
    sections = result["workloads"].values() if "workloads" in result else [result]
    for section in sections:
        if "workload" in section:
            parts += ["", f"### {section['workload']} (data: {section['data']})"]
        parts += ["", section["markdown"]]
    return parts


if __name__ == "__main__":
    main()
