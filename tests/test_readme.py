"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    block = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S)
    assert block, "README has no ## Usage python block"
    namespace: dict = {}
    exec(compile(block.group(1), "README-usage", "exec"), namespace)
    assert namespace["JV"].shape == (100, 3, 8)
    assert namespace["J"].shape[:2] == (10, 3)
