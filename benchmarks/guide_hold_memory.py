"""Peak memory of a guided step against how many guide-layer bytes are held for a stack
(``repguide.guidance._guide_stream.HOLD_BYTES``), on the device path (``fused.CPU_TUNED = False``,
the one that stacks guide layers; a CPU's tuned path prepares them one by one).

Each cell is bench_step's peak-memory measure (the rise of the peak RSS over two steps after a
warm-up step, in a fresh process); "plain + guide forward" is what any exact step must hold.

    PYTHONPATH=src python benchmarks/guide_hold_memory.py [--workloads ab] [--holds 0,8,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(key: str, variant: str, hold_mib: int) -> None:
    sys.path.insert(0, str(HERE))
    from repguide.guidance import _guide_stream
    from repguide.similarity import fused

    fused.CPU_TUNED = False
    _guide_stream.HOLD_BYTES = hold_mib << 20
    import bench_step

    bench_step.memory_child(key, variant, [], {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="ab")
    parser.add_argument("--holds", default="0,8,16,64", help="MiB held, comma-separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*json.loads(args.child))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    env.setdefault("OMP_NUM_THREADS", "1")

    def rise(key, variant, hold):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps([key, variant, hold])],
                             capture_output=True, text=True, env=env, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_rise_mib"]

    holds = [int(h) for h in args.holds.split(",")]
    print("| pair | plain + guide forward (MiB) | " + " | ".join(f"exact, {h} MiB held" for h in holds) + " |")
    print("|---" * (2 + len(holds)) + "|")
    for key in args.workloads:
        floor = rise(key, "plain + guide forward", 0)
        cells = [rise(key, "exact", h) for h in holds]
        print(f"| ({key}) | {floor:.0f} | " + " | ".join(f"{c:.0f} ({c / floor:.2f}×)" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
