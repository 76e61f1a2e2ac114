"""The README's regression example (Usage → Regression) runs as written and makes its choice."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_regression_example_runs():
    block = re.search(r"### Regression: [^\n]*\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no python block under '### Regression'"
    ns: dict = {}
    exec(compile(block.group(1), "README regression", "exec"), ns)
    reg, het, fixed = ns["reg"], ns["het"], ns["fixed"]
    assert set(reg.model_scores_) == {"network", "constant", "scaled", "scaled+rbf"}
    best = max(reg.model_scores_, key=lambda m: reg.model_scores_[m]["loo"])
    assert reg.model_ == best  # the default keeps the best leave-one-out candidate
    assert {"network+hetero", "scaled+rbf@src+hetero"} <= set(het.model_scores_)
    assert fixed.model_ == "scaled+matern52" and len(fixed.hyperparameters_["lengthscales"]) == 3
    assert ns["post"].mean.shape == (20,)
