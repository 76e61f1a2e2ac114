"""fntk.inputs: the Batch row operations, and the batch-by-batch validation of loaders (refusals
naming the batch index, what was expected and what came)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fntk.inputs import (
    Batch,
    Stream,
    as_inputs,
    cast,
    cat,
    collect_inputs,
    fit_data,
    is_loader,
    row_keys,
    rows,
)


def _batch(n: int = 5) -> Batch:
    return Batch({"ids": torch.arange(n * 3).reshape(n, 3), "feat": torch.randn(n, 2, dtype=torch.float32)})


def test_batch_rows_slicing_and_concatenation():
    b = _batch()
    assert len(b) == rows(b) == 5 and b.shape == torch.Size([5])
    s = b[1:3]
    assert torch.equal(s.data["ids"], b.data["ids"][1:3]) and torch.equal(s.data["feat"], b.data["feat"][1:3])
    idx = b[torch.tensor([4, 0])]
    assert torch.equal(idx.data["ids"][:, 0], torch.tensor([12, 0]))
    assert torch.equal(b[[True, False, True, False, False]].data["ids"], b.data["ids"][[0, 2]])
    back = cat([b[:2], b[2:]])
    assert all(torch.equal(back.data[k], b.data[k]) for k in b)
    assert row_keys(b[1:2]) == [row_keys(b)[1]] and len(set(row_keys(b))) == 5
    with pytest.raises(TypeError, match="indexed by rows"):
        b[0]


def test_cast_keeps_integers():
    b = _batch()
    out = {k: cast(t, torch.float64, torch.device("cpu")) for k, t in b.items()}
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], b.data["ids"])
    assert out["feat"].dtype == torch.float64
    assert cast(torch.ones(2, dtype=torch.bool), torch.float64, torch.device("cpu")).dtype == torch.bool


def test_as_inputs_refusals():
    assert isinstance(as_inputs({"a": torch.ones(2)}), Batch)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor .*, a dict of tensors .* got list"):
        as_inputs([1, 2])
    with pytest.raises(ValueError, match=r"x\['b'\] has 3 rows but x\['a'\] has 2"):
        Batch({"a": torch.ones(2), "b": torch.ones(3)})
    with pytest.raises(TypeError, match=r"key 1 \(int\)"):
        Batch({1: torch.ones(2)})


def test_is_loader():
    x = torch.ones(4, 2)
    assert not is_loader(x) and not is_loader({"a": x}) and not is_loader(_batch()) and not is_loader("ab")
    assert is_loader([x]) and is_loader(DataLoader(TensorDataset(x), batch_size=2))


def test_stream_collects_in_order_with_targets():
    x, y = torch.randn(10, 3), torch.arange(10)
    s = Stream(DataLoader(TensorDataset(x, y), batch_size=4), targets=True)
    xs, ys = s.collect()
    assert torch.equal(xs, x) and torch.equal(ys, y) and s.n == 10
    assert [xb.shape[0] for _, xb, _ in s] == [4, 4, 2]
    assert torch.equal(collect_inputs([x[:3], x[3:]]), x)
    # Hugging Face style: the "labels" entry of a dict batch is the target, never a model input
    hf = [{"ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([0, 1])}] * 2
    xb, yb = fit_data(hf, None)
    assert isinstance(xb, Batch) and list(xb.keys()) == ["ids"]
    assert torch.equal(yb, torch.tensor([0, 1, 0, 1]))


def test_stream_refusals_name_the_batch():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="x is an empty loader: it yielded no batches"):
        Stream([]).collect()
    with pytest.raises(ValueError, match=r"batch 1 of x is a tensor \(2, 4\) float32 but batch 0 was a "
                                         r"tensor \(b, 3\) float32.*pad sequences"):
        Stream([x[:2], torch.randn(2, 4)]).collect()
    with pytest.raises(ValueError, match=r"batch 2 of x is a tensor \(2, 3\) float64 but batch 0 was .*32"):
        Stream([x[:2], x[2:4], x[4:].double()]).collect()
    with pytest.raises(ValueError, match=r"batch 1 of x is a dict \{'b'.*batch 0 was a dict \{'a'"):
        Stream([{"a": x[:2]}, {"b": x[2:]}]).collect()
    with pytest.raises(ValueError, match="batch 1 of x is empty"):
        Stream([x[:2], x[:0]]).collect()
    with pytest.raises(ValueError, match=r"batch 1 of x: the inputs have 2 rows but the targets have 1 rows"):
        Stream([(x[:2], torch.ones(2)), (x[2:4], torch.ones(1))]).collect()
    with pytest.raises(ValueError, match=r"batch 1 of x has targets \(b, 2\) float32 but batch 0 had "
                                         r"\(b\) float32"):
        Stream([(x[:2], torch.ones(2)), (x[2:4], torch.ones(2, 2))]).collect()
    with pytest.raises(ValueError, match=r"batch 0 of x has no targets .* needs \(x_b, y_b\) pairs"):
        fit_data([x[:2]], None)
    with pytest.raises(ValueError, match=r"y must be None when x is a loader"):
        fit_data([(x, x[:, 0])], x[:, 0])
    with pytest.raises(TypeError, match="y is missing"):
        fit_data(x, None)
    with pytest.raises(ValueError, match="batch 0 of x is a tuple of 3 items"):
        Stream([(x, x, x)]).collect()
    with pytest.raises(TypeError, match="batch 1 of x is a str"):
        Stream([x, "text"]).collect()
    with pytest.raises(TypeError, match=r"x is a one-shot iterator \(generator\).*DataLoader"):
        Stream(b for b in [x])


def test_stream_refuses_a_loader_that_changes_between_passes():
    class Growing:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([torch.ones(2, 3)] * self.passes)

    s = Stream(Growing())
    s.collect()
    with pytest.raises(ValueError, match="yielded 4 points on this pass but 2 on the first"):
        s.collect()


def test_labels_of_a_dict_are_targets_never_inputs():
    ids = torch.ones(3, 4, dtype=torch.long)
    x = {"input_ids": ids, "labels": torch.tensor([0, 1, 1])}
    assert list(as_inputs(x).keys()) == ["input_ids"]
    xb, yb = fit_data(x, None)
    assert torch.equal(yb, torch.tensor([0, 1, 1])) and list(as_inputs(xb).keys()) == ["input_ids"]


def test_python_numbers_are_refused_with_the_conversion():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor .*batch 0 of x is a list holding a float.*"
                                        r"torch.tensor"):
        Stream([[1.0, 2.0, 3.0]]).collect()
