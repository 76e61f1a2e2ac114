"""The README section "Coming from laplace-torch / GPyTorch" runs as written: every python block of it,
in order, in one namespace (the laplace-torch block only when laplace-torch is installed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = re.search(r"\n## Coming from laplace-torch / GPyTorch\n(.*?)\n## ", text, re.S)
    assert section, "README has no section 'Coming from laplace-torch / GPyTorch'"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


@pytest.mark.filterwarnings("ignore:By default `link_approx`")  # laplace-torch's reminder
def test_coming_from_peers_section_runs():
    blocks = _blocks()
    assert len(blocks) == 5
    have_laplace = importlib.util.find_spec("laplace") is not None
    ns: dict = {}
    for i, block in enumerate(blocks):
        if "from laplace import" in block and not have_laplace:
            continue
        exec(compile(block, f"README peers block {i}", "exec"), ns)
    clf, reg = ns["clf"], ns["reg"]
    # fntk's side: the shapes the comments state, and the joint covariance's diagonal blocks are
    # predict_f's per-point covariances
    assert ns["probs"].shape == (50, 3) and torch.allclose(ns["probs"].sum(-1), torch.ones(50))
    assert ns["f"].shape == (100, 50, 3) and clf.space_ == "last-layer" and clf.converged_
    mean, cov = ns["mean"], ns["cov"]
    assert mean.shape == (50, 3) and cov.shape == (150, 150)
    pm, pc = clf.predict_f(ns["x_test"])
    i = torch.arange(50)
    torch.testing.assert_close(cov.reshape(50, 3, 50, 3)[i, :, i, :], pc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, pm)
    post = ns["post"]
    assert post.mean.shape == post.variance.shape == (50,) and ns["draws"].shape == (10, 50)
    assert bool((ns["lo"] < ns["hi"]).all()) and reg.space_ in ("function", "weight")
    assert ns["pred"].mean.shape == (50,)  # GPyTorch's side ran too
    if have_laplace:
        assert ns["probs_la"].shape == (50, 3) and ns["f_la"].shape == (100, 50, 3)
        assert ns["w_la"].shape == (100, 16 * 3 + 3)
