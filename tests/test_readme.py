"""The README's usage example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    block = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S)
    assert block, "README has no ## Usage python block"
    namespace: dict = {}
    exec(compile(block.group(1), "README-usage", "exec"), namespace)
    assert namespace["JV"].shape == (100, 3, 8)
    assert namespace["J"].shape[:2] == (10, 3)


def test_readme_classification_example_runs():
    text = README.read_text()
    block = re.search(r"### Classification: [^\n]*\n\n```python\n(.*?)```", text, re.S)
    assert block, "README has no classification python block"
    namespace: dict = {}
    exec(compile(block.group(1), "README-classification", "exec"), namespace)
    probs, w = namespace["probs"], namespace["w_map"]
    assert probs.shape == (40, 3) and torch.allclose(probs.sum(-1), torch.ones(40))
    assert namespace["clf"].converged_ and namespace["lb"].converged_
    assert w.shape == (namespace["lb"].lin.num_params,)
    assert namespace["vi"].vi_family == "meanfield" and namespace["vi"].lin.num_params == 99
