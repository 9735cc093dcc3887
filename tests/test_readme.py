"""The README's API example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_and_trains():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    loader = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(2)]
    namespace = {"loader": loader}
    exec(compile(block, "README.md", "exec"), namespace)
    guidance = namespace["guidance"]
    assert len(guidance.pairs) > 1
    assert int(guidance.step) == 2
