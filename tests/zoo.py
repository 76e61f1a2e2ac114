"""Small in-project versions of real architecture families (torchvision/timm are not installable
here), for tests/linearize/test_architectures.py.

Each :class:`Case` holds a float64 model, inputs x (n points) and xs (test points), the output
selection, a *reference twin* (a module with the same parameter names and values that the plain
autograd reference in tests/reference.py can differentiate: the model itself unless it cannot be
deep-copied or differentiated by plain autograd) and, for models fntk must refuse, the expected
message fragment.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.nn.utils import parametrizations

F64 = torch.float64


@dataclass
class Case:
    name: str
    model: nn.Module
    x: Tensor
    xs: Tensor
    output_fn: Callable | None = None
    twin: nn.Module | None = None  # reference twin (same parameter names and values)
    refused: str | None = None  # regex the refusal message must match
    expect: dict = field(default_factory=dict)  # capabilities the probes must find


class Selected(nn.Module):
    """model followed by the output selection: what the reference differentiates."""

    def __init__(self, model: nn.Module, output_fn: Callable | None):
        super().__init__()
        self.m, self.output_fn = model, output_fn

    def forward(self, x):
        out = self.m(x)
        if self.output_fn is not None:
            return self.output_fn(out)
        return out if isinstance(out, Tensor) else out["logits"]


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g, dtype=F64) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=F64))
            m.weight.data.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=F64))
            m.bias.data.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=F64))


# ---------------------------------------------------------------------------------- CNN families
class ResBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (1x1 conv + BN) shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
        self.layer1 = ResBlock(3, 3)
        self.layer2 = ResBlock(3, 4, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 2):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MobileBlock(nn.Module):
    """MobileNetV3-style: 1x1 expand, BN, Hardswish, depthwise 3x3, SE, 1x1 project, head."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.expand = nn.Conv2d(2, 6, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.se = SqueezeExcite(6)
        self.project = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, k)

    def forward(self, x):
        h = F.hardswish(self.bn1(self.expand(x)))
        h = self.se(F.hardswish(self.bn2(self.dw(h))))
        return self.head(self.project(h).mean((2, 3)))


def prelu_mlp(k: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.PReLU(6), nn.Linear(6, 5), nn.PReLU(), nn.Linear(5, k))


def prelu_cnn(k: int = 2) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(3 * 4 * 4, k))


# ---------------------------------------------------------------------------------- sequences
class LSTMNet(nn.Module):
    def __init__(self, k: int = 2):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class GRUText(nn.Module):
    def __init__(self, vocab: int = 10, k: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.rnn = nn.GRU(4, 3, batch_first=True)
        self.fc = nn.Linear(3, k)

    def forward(self, t):
        return self.fc(self.rnn(self.emb(t))[1][-1])


class TransformerText(nn.Module):
    """Embedding (padding_idx 0) + TransformerEncoder with a key padding mask + masked mean pool."""

    def __init__(self, vocab: int = 12, d: int = 8, k: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.fc = nn.Linear(d, k)

    def forward(self, t):
        pad = t == 0
        h = self.enc(self.emb(t), src_key_padding_mask=pad)
        keep = (~pad).to(h.dtype)[..., None]
        return self.fc((h * keep).sum(1) / keep.sum(1))  # padded positions are left out


@dataclass
class TextConfig:
    """A Hugging Face-style config, in miniature (no download: the model is built from it)."""

    vocab_size: int = 12
    hidden_size: int = 8
    num_heads: int = 2
    intermediate_size: int = 12
    num_layers: int = 2
    num_labels: int = 3
    dropout: float = 0.1


class DictTextClassifier(nn.Module):
    """The TransformerText family with a Hugging Face signature: ``forward(input_ids,
    attention_mask)`` (int64 ids, 1 = token / 0 = padding), returning a ModelOutput with logits."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                                           dropout=cfg.dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, cfg.num_layers)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, attention_mask):
        assert input_ids.dtype == torch.int64 and attention_mask.dtype == torch.int64  # never cast
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        keep = attention_mask.to(h.dtype)[..., None]
        return ModelOutput(logits=self.classifier((h * keep).sum(1) / keep.sum(1)))


def text_batch(g: torch.Generator, n: int, vocab: int = 12, length: int = 5) -> dict:
    """{"input_ids", "attention_mask"} (n, length) int64 with trailing padding of varying length."""
    ids = _tokens(g, vocab, n, length, pad=True)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class EmbedPad(nn.Module):
    """Embedding with padding_idx whose (non-zero) padding row is read by the forward: autograd
    gives that row no gradient, forward-mode AD would; fntk follows autograd."""

    def __init__(self, vocab: int = 8, k: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, 3, padding_idx=0)
        self.fc = nn.Linear(3 * 4, k)
        with torch.no_grad():
            self.emb.weight[0] = 1.0

    def forward(self, t):
        return self.fc(torch.tanh(self.emb(t)).flatten(1))


class TiedLM(nn.Module):
    """A padded embedding whose weight is also the output layer: held by a second module
    (``tie="module"``) or used functionally (``tie="functional"``, logits = h Eᵀ)."""

    def __init__(self, tie: str, vocab: int = 6, d: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.tie = tie
        if tie == "module":
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight
        with torch.no_grad():
            self.emb.weight[0] = 0.5

    def forward(self, t):
        h = torch.tanh(self.mix(self.emb(t).mean(1)))
        return self.head(h) if self.tie == "module" else h @ self.emb.weight.T


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim: queries from one part of the features, keys and values
    from others."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.q = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2, kdim=5, vdim=2, batch_first=True)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        out, _ = self.att(self.q(x[..., :3]), x[..., 3:8], x[..., 8:10])
        return self.fc(out.mean(1))


class SelfAttention(nn.Module):
    """Self-attention without weights: the MHA fast path and the CPU flash SDPA kernel in eval."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(self.att(x, x, x, need_weights=False)[0].mean(1))


class BagText(nn.Module):
    def __init__(self, vocab: int = 10, k: int = 2):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, 4, mode="mean")
        self.fc = nn.Linear(4, k)

    def forward(self, t):
        return self.fc(torch.tanh(self.bag(t)))


# ---------------------------------------------------------------------------------- reparametrized
def param_norms(k: int = 3) -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 5)), nn.Tanh(),
                         parametrizations.spectral_norm(nn.Linear(5, k)))


def hook_norms(k: int = 2) -> nn.Module:
    return nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 5)), nn.Tanh(),
                         torch.nn.utils.spectral_norm(nn.Linear(5, k)))


class ExplicitWN(nn.Module):
    """Twin of a hook-weight-normed Linear: w = g v / ‖v‖ (rows), same parameter names."""

    def __init__(self, src: nn.Linear):
        super().__init__()
        self.weight_g = nn.Parameter(src.weight_g.detach().clone())
        self.weight_v = nn.Parameter(src.weight_v.detach().clone())
        self.bias = nn.Parameter(src.bias.detach().clone())

    def forward(self, x):
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w, self.bias)


class ExplicitSN(nn.Module):
    """Twin of a hook-spectral-normed Linear in eval: w = w_orig / (uᵀ w_orig v), same names."""

    def __init__(self, src: nn.Linear):
        super().__init__()
        self.weight_orig = nn.Parameter(src.weight_orig.detach().clone())
        self.bias = nn.Parameter(src.bias.detach().clone())
        self.register_buffer("weight_u", src.weight_u.detach().clone())
        self.register_buffer("weight_v", src.weight_v.detach().clone())

    def forward(self, x):
        sigma = self.weight_u @ (self.weight_orig @ self.weight_v)
        return F.linear(x, self.weight_orig / sigma, self.bias)


class MaskedLinear(nn.Linear):
    """A Linear subclass with its own forward (a fixed connectivity mask)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.register_buffer("mask", (torch.arange(d_in * d_out).reshape(d_out, d_in) % 3 != 0).float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class Checkpointed(nn.Module):
    """Two blocks under torch.utils.checkpoint (non-reentrant and reentrant); ``ckpt=False`` is the
    same function without checkpointing (the reference twin)."""

    def __init__(self, k: int = 2, ckpt: bool = True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, k)
        self.ckpt = ckpt

    def forward(self, x):
        f1, f2 = (lambda z: torch.tanh(self.a(z))), (lambda z: torch.tanh(self.b(z)))
        if not self.ckpt:
            return self.c(f2(f1(x)))
        h = cp.checkpoint(f1, x, use_reentrant=False)
        h = cp.checkpoint(f2, h, use_reentrant=True)
        return self.c(h)


# ---------------------------------------------------------------------------------- outputs
class ModelOutput(OrderedDict):
    """A Hugging Face-style output: a dict whose entries are also attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class MultiOut(nn.Module):
    def __init__(self, kind: str, k: int = 3):
        super().__init__()
        self.body, self.head = nn.Linear(3, 5), nn.Linear(5, k)
        self.kind = kind

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits = self.head(h)
        if self.kind == "tuple":
            return logits, h
        if self.kind == "dict":
            return {"hidden": h, "logits": logits}
        if self.kind == "model_output":
            return ModelOutput(logits=logits, hidden_states=(h,))
        return {"scores": logits}  # no logits: refused without output_fn


# ---------------------------------------------------------------------------------- refused
class Coupled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x - x.mean(0))


class IntOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x).argmax(-1, keepdim=True)


class ComplexOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = self.fc(x)
        return torch.complex(h[:, :2], h[:, 2:])


# ---------------------------------------------------------------------------------- a broken vmap rule
class BadBatchSquare(torch.autograd.Function):
    """x² with correct derivatives but a wrong vmap rule (25% too large): vmap over points through it
    gives wrong values; plain autograd and vmaps over cotangents or tangents do not use the rule."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t

    @staticmethod
    def vmap(info, in_dims, x):
        d = in_dims[0]
        x = x.movedim(d, 0) if d is not None else x
        return 1.25 * BadBatchSquare.apply(x), 0  # wrong by 25% whenever vmapped


class BadBatchNet(nn.Module):
    def __init__(self, k: int = 2):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, k)

    def forward(self, x):
        return self.b(BadBatchSquare.apply(torch.tanh(self.a(x))))


# ---------------------------------------------------------------------------------- the cases
def _floats(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def _tokens(g, vocab, n, L, pad=False):
    t = torch.randint(1, vocab, (n, L), generator=g)
    if pad:  # trailing padding of varying length (never a full row)
        for i in range(n):
            t[i, L - (i % (L - 1)) :] = 0
    return t


def build(name: str, seed: int = 0) -> Case:
    """The named case (see :data:`WORKING` and :data:`REFUSED`)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, m = 5, 3
    if name == "resnet_bn":
        model = TinyResNet()
        x, xs = _floats(g, n, 2, 6, 6), _floats(g, m, 2, 6, 6)
    elif name == "hardswish_se":
        model = MobileBlock()
        x, xs = _floats(g, n, 2, 5, 5), _floats(g, m, 2, 5, 5)
    elif name == "prelu_mlp":
        model, x, xs = prelu_mlp(), _floats(g, n, 3), _floats(g, m, 3)
    elif name == "prelu_cnn":
        model, x, xs = prelu_cnn(), _floats(g, n, 1, 6, 6), _floats(g, m, 1, 6, 6)
    elif name == "lstm":
        model, x, xs = LSTMNet(), _floats(g, n, 4, 3), _floats(g, m, 4, 3)
    elif name == "gru_text":
        model, x, xs = GRUText(), _tokens(g, 10, n, 5), _tokens(g, 10, m, 5)
    elif name == "transformer_text":
        model, x, xs = TransformerText(), _tokens(g, 12, n, 5, pad=True), _tokens(g, 12, m, 5, pad=True)
    elif name == "embedding_pad":
        model, x, xs = EmbedPad(), _tokens(g, 8, n, 4, pad=True), _tokens(g, 8, m, 4, pad=True)
    elif name in ("tied_module", "tied_functional"):
        model = TiedLM(name.removeprefix("tied_"))
        x, xs = _tokens(g, 6, n, 4, pad=True), _tokens(g, 6, m, 4, pad=True)
    elif name == "mha_kdim":
        model, x, xs = CrossAttention(), _floats(g, n, 3, 10), _floats(g, m, 3, 10)
    elif name == "mha_fast_path":
        model, x, xs = SelfAttention(), _floats(g, n, 3, 4), _floats(g, m, 3, 4)
    elif name == "embedding_bag":
        model, x, xs = BagText(), _tokens(g, 10, n, 4), _tokens(g, 10, m, 4)
    elif name == "param_norms":
        model, x, xs = param_norms(), _floats(g, n, 3), _floats(g, m, 3)
    elif name == "hook_norms":
        model, x, xs = hook_norms(), _floats(g, n, 3), _floats(g, m, 3)
    elif name == "masked_linear":
        model = nn.Sequential(MaskedLinear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        x, xs = _floats(g, n, 3), _floats(g, m, 3)
    elif name == "checkpoint":
        model, x, xs = Checkpointed(), _floats(g, n, 3), _floats(g, m, 3)
    elif name in ("tuple_out", "dict_out", "model_output", "dict_no_logits"):
        model = MultiOut(name.removesuffix("_out") if name != "dict_no_logits" else "scores")
        x, xs = _floats(g, n, 3), _floats(g, m, 3)
    elif name == "broken_vmap_rule":
        model, x, xs = BadBatchNet(), _floats(g, n, 3), _floats(g, m, 3)
    elif name == "batch_coupled":
        model, x, xs = Coupled(), _floats(g, n, 3), _floats(g, m, 3)
    elif name == "bn_batch_stats":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
        x, xs = _floats(g, n, 3), _floats(g, m, 3)
    elif name == "int_output":
        model, x, xs = IntOut(), _floats(g, n, 3), _floats(g, m, 3)
    elif name == "complex_output":
        model, x, xs = ComplexOut(), _floats(g, n, 3), _floats(g, m, 3)
    else:
        raise KeyError(name)
    model = model.to(F64)
    _randomize_bn(model, g)
    model.eval()
    case = Case(name, model, x, xs)
    if name == "tuple_out":
        case.output_fn = lambda out: out[0]
    if name == "hook_norms":
        case.twin = nn.Sequential(ExplicitWN(model[0]), nn.Tanh(), ExplicitSN(model[2]))
    if name == "checkpoint":
        case.twin = Checkpointed(ckpt=False).to(F64)
        case.twin.load_state_dict(model.state_dict())
    case.refused = REFUSED.get(name)
    case.expect = EXPECT.get(name, {})
    return case


#: what the probes must find for a family (the fast path elsewhere)
EXPECT = {
    "prelu_mlp": {"rows": "cotangent_vmap"},
    "prelu_cnn": {"rows": "cotangent_vmap"},
    "lstm": {"rows": "cotangent_vmap"},
    "gru_text": {"rows": "cotangent_vmap"},
    "transformer_text": {"jvp": "forward"},  # fast path off: forward mode works
    "embedding_pad": {"jvp": "forward"},  # forward mode, with the padding row projected out
    "tied_module": {"jvp": "double_vjp"},  # the padding row also gets the head's gradient
    "tied_functional": {"jvp": "double_vjp"},  # the same, found by the adjoint test
    "mha_fast_path": {"jvp": "forward", "rows": "nested_vmap"},  # fast path and flash kernel off
    "embedding_bag": {"jvp": "rows"},  # no forward mode, no double backward: J V from rows
    "param_norms": {"jvp": "double_vjp"},
    "hook_norms": {"jvp": "double_vjp", "rows": "nested_vmap"},
    "checkpoint": {"checkpoint": True},
    "broken_vmap_rule": {"rows": "cotangent_vmap"},
}

#: refused models and the message fragment (regex)
REFUSED = {
    "batch_coupled": r"couples the points of a batch.*top-level Coupled, before it calls 'fc'",
    "bn_batch_stats": r"'1' \(BatchNorm1d\) has no running statistics.*interact",
    "int_output": r"dtype torch.int64.*no derivative",
    "complex_output": r"output is complex",
    "dict_no_logits": r"must be a Tensor.*keys \['scores'\].*output_fn",
}

WORKING = ["resnet_bn", "hardswish_se", "prelu_mlp", "prelu_cnn", "lstm", "gru_text", "transformer_text",
           "embedding_pad", "tied_module", "tied_functional", "mha_kdim", "mha_fast_path", "embedding_bag",
           "param_norms", "hook_norms", "masked_linear", "checkpoint", "tuple_out", "dict_out",
           "model_output", "broken_vmap_rule"]


def reference_model(case: Case) -> nn.Module:
    """The module tests/reference.py differentiates: the twin (or the model) with its selection."""
    base = case.twin if case.twin is not None else case.model
    return Selected(base, case.output_fn)


__all__ = ["TextConfig", "DictTextClassifier", "text_batch", "Case", "build", "reference_model", "WORKING",
           "REFUSED", "EXPECT"]
