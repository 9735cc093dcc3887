"""Collects the latest results (benchmarks/results/*.json) into benchmarks/RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_step", "bench_kernels", "bench_scaling", "bench_compile"]


def main() -> None:
    parts = [
        "# Latest benchmark results",
        "",
        "Written by benchmarks/report.py from the latest benchmarks/results/*.json; each section "
        "names the command that made it. How to read them: benchmarks/README.md.",
        "GPU numbers: pending (no GPU lent to this task).",
    ]
    paths = sorted((HERE / "results").glob("*.json"),
                   key=lambda p: (ORDER.index(p.stem.split("-")[0]) if p.stem.split("-")[0] in ORDER else 99, p.stem))
    for path in paths:
        result = json.loads(path.read_text())
        m = result["machine"]
        settings = (f"THREADS={m['threads']} " if m["threads"] != 2 else "") + (
            f"BENCH_CLOCK={m['clock']} " if m.get("clock", "wall") != "wall" else "")
        command = f"{settings}bash benchmarks/run.sh {path.stem.split('-')[0].removeprefix('bench_')}"
        parts += [
            "", f"## {path.stem}", "",
            f"`{command}`: {m['date']}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}, {m['threads']} intra-op "
            f"thread(s), {m.get('clock', 'wall')} clock; malloc thresholds set: {m['malloc_env_set']}; "
            f"load average (1 min) {m['loadavg_1min']:.1f} at start, {m.get('loadavg_1min_end', float('nan')):.1f} at end.",
        ]
        sections = result["workloads"].values() if "workloads" in result else [result]
        for section in sections:
            if "workload" in section:
                parts += ["", f"### {section['workload']} (data: {section['data']})"]
            parts += ["", section["markdown"]]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")
    print("wrote", HERE / "RESULTS.md")


if __name__ == "__main__":
    main()
