"""Forward-only passes (Linearized.forward, the final layer's taps): cache-sized chunks and the
channels_last layout for convolutions, probed; the outputs equal the model's own forward."""

import copy

import pytest
import torch
from torch import nn

import fntk
import zoo
from fntk.linearize import streaming
from fntk.linearize.taps import final_inputs, final_linear

from models import make
from reference import eval_forward


class ViewCNN(nn.Module):
    """A convolution whose output is flattened with .view(): needs contiguous NCHW activations
    (float32: oneDNN's convolution returns channels_last outputs for channels_last weights)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


class ImageMLP(nn.Module):
    """4-d image inputs and no convolution."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _x(n: int = 40, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))


def test_cnn_forward_takes_channels_last_and_equals_the_model():
    model, x, _ = make("cnn")
    x = _x()
    lin = fntk.Linearized(model)
    out = lin.forward(x)
    assert lin.capabilities.layout == "channels_last"
    assert x.is_contiguous()  # the caller's tensor is not converted
    ref = eval_forward(model, x)
    assert float((out - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    # the final layer's taps: inputs φ and outputs f from the same (channels_last) forward
    last = fntk.Linearized(model, ["fc.weight", "fc.bias"])
    info = final_linear(last, last.check_input(x))
    phi, f = final_inputs(last, info, x)
    assert float((f - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    W, b = model.fc.weight.detach(), model.fc.bias.detach()
    assert float((phi @ W.T + b - f).abs().max()) <= 1e-13 * float(f.abs().max())


def test_view_on_conv_output_refuses_channels_last_and_stays_right():
    torch.manual_seed(0)
    model = ViewCNN()
    x = torch.randn(40, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    lin = fntk.Linearized(model)
    out = lin.forward(x)
    assert lin.capabilities.layout == "standard"
    assert "view" in lin.capabilities.rejected["layout:channels_last"]
    assert torch.equal(out, eval_forward(model, x))


def test_no_convolution_keeps_the_standard_layout():
    torch.manual_seed(0)
    model = ImageMLP().double()
    x = _x()
    lin = fntk.Linearized(model)
    assert torch.equal(lin.forward(x), eval_forward(model, x))
    assert lin.capabilities.layout == "standard"
    assert "layout:channels_last" not in lin.capabilities.rejected


def test_forward_chunks_fit_the_cache_target_and_agree():
    model, _, _ = make("cnn")
    x = _x(200)
    lin = fntk.Linearized(model)
    one = lin.forward(x[:1])  # first call: probes, activation size
    per_row = lin.activation_numel * 8
    rows = streaming.forward_rows(lin)
    cache = max(streaming.FORWARD_MIN_ROWS, streaming.FORWARD_CHUNK_BYTES // per_row)
    assert rows == min(lin.rows_per_chunk(0), cache)
    small = fntk.Linearized(model)
    small.forward(x[:1])
    saved = streaming.FORWARD_CHUNK_BYTES
    try:
        streaming.FORWARD_CHUNK_BYTES = 1  # FORWARD_MIN_ROWS points per chunk: 13 chunks
        assert streaming.forward_rows(small) == streaming.FORWARD_MIN_ROWS
        chunked = small.forward(x)
    finally:
        streaming.FORWARD_CHUNK_BYTES = saved
    whole = eval_forward(model, x)
    assert float((chunked - whole).abs().max()) <= 1e-13 * float(whole.abs().max())
    assert torch.equal(one, lin.forward(x[:1]))


def test_float32_cnn_channels_last_agrees_with_the_model():
    model, _, _ = make("cnn", dtype=torch.float32)
    x = _x(300, torch.float32)
    lin = fntk.Linearized(model)
    out = lin.forward(x)
    assert lin.capabilities.layout == "channels_last"
    ref = eval_forward(model, x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("name", ["resnet_bn", "hardswish_se", "prelu_cnn"])
def test_zoo_image_families_in_float32_channels_last_agree_with_float64(name):
    # float64 is compared entry point by entry point in test_architectures; here the float32
    # kernels, which the layout changes
    case = zoo.build(name)
    ref = eval_forward(case.model, case.x)
    lin = fntk.Linearized(copy.deepcopy(case.model).float())
    out = lin.forward(case.x.float())
    assert lin.capabilities.layout == "channels_last"
    assert float((out.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
