"""The README's usage examples run as written."""

import re
from pathlib import Path

import torch

from reference import dense_jacobian, rel_err

README = Path(__file__).resolve().parents[1] / "README.md"


def _run_block(heading: str) -> dict:
    """Execute the first python block under the README heading (a regex); return its namespace."""
    block = re.search(heading + r"\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, f"README has no python block under {heading!r}"
    namespace: dict = {}
    exec(compile(block.group(1), f"README {heading}", "exec"), namespace)
    return namespace


def test_readme_usage_example_runs():
    ns = _run_block("## Usage")
    assert ns["JV"].shape == (100, 3, 8)
    assert ns["J"].shape[:2] == (10, 3)


def test_readme_classification_example_runs():
    ns = _run_block(r"### Classification: [^\n]*")
    probs, w = ns["probs"], ns["w_map"]
    assert probs.shape == (40, 3) and torch.allclose(probs.sum(-1), torch.ones(40))
    assert ns["clf"].converged_ and ns["lb"].converged_
    assert w.shape == (ns["lb"].lin.num_params,)
    assert ns["vi"].vi_family == "meanfield" and ns["vi"].lin.num_params == 99


def test_readme_inputs_example_runs():
    """The dict-batch transformer and DataLoader example, against the tensor path and the dense
    float64 Jacobian of its model."""
    ns = _run_block(r"### Inputs: [^\n]*")
    model, lin, batch, clf = ns["model"], ns["lin"], ns["batch"], ns["clf"]
    assert ns["K"].shape == (8, 3, 8, 3) and ns["probs"].shape == (16, 3)
    assert torch.allclose(ns["probs"].sum(-1), torch.ones(16))
    x8 = {k: v[:8] for k, v in batch.items()}
    J = dense_jacobian(model, x8)
    assert rel_err(ns["K"].double(), torch.einsum("ikp,jlp->ikjl", J, J).double()) <= 1e-4  # float32 model
    test = {k: v[32:] for k, v in batch.items()}
    assert rel_err(ns["probs"], clf.predict_proba(test)) <= 1e-6
    assert ns["d"].shape == (lin.num_params,) and bool((ns["d"] >= 0).all())
