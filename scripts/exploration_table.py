"""Print the exploration runs' results (runs/explore/*) as a Markdown table for docs/exploration.md."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/explore")
print("| run | overrides | test copy accuracy (%) |")
print("|---|---|---|")
for summary in sorted(root.glob("*/summary.json")):
    s = json.loads(summary.read_text())
    if s.get("status") != "finished":
        continue
    cfg = (summary.parent / "config.yaml").read_text()
    g = __import__("yaml").safe_load(cfg)["guidance"]
    overrides = f"pairs={g['pairs']}, measure={g['measure']}, reduction={g['reduction']}, seed={__import__('yaml').safe_load(cfg)['train']['seed']}"
    print(f"| `{summary.parent.name}` | {overrides} | {100 * s['test_metric']:.2f} |")
