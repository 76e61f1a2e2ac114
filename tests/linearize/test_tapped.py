"""Tapped multi-column products (fntk.linearize.tapped) against the dense float64 Jacobian of plain
autograd: J V, Jᵀ U and Jᵀ H J V for networks of Linear layers and norm affines; the operators
that use them (GGNOperator, matrix-free NTKOperator); where they do not apply or do not pay.
Convolutions and Linear layers over sequences (S > 1 positions per point) in both forms."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fntk
from fntk.likelihoods import Categorical, Gaussian
from fntk.linearize import tapped
from fntk.linearize.tapped import TappedJacobian, tapped_layers
from zoo import MobileBlock, TinyResNet, _randomize_bn

from models import EmbedNet, SmallCNN, TiedMLP, tanh_mlp
from reference import dense_jacobian, rel_err

F64 = torch.float64


class _NormMLP(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 5)
        self.bn, self.c = nn.BatchNorm1d(5), nn.Linear(5, k)

    def forward(self, x):
        return self.c(torch.tanh(self.bn(self.b(torch.tanh(self.ln(self.a(x)))))))


def _model(name: str) -> tuple[nn.Module, list[str] | None]:
    torch.manual_seed(0)
    if name == "mlp":
        return tanh_mlp(d_in=4, width=7, k=3).to(F64), None
    if name == "norms":
        m = _NormMLP().to(F64).eval()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
            m.ln.weight.uniform_(0.5, 1.5)
        return m, None
    if name == "subset":  # a bias-only layer and a weight-only layer
        return tanh_mlp(d_in=4, width=7, k=3).to(F64), ["0.bias", "2.weight", "4.weight", "4.bias"]
    return tanh_mlp(d_in=4, width=7, k=1).to(F64), None


@pytest.mark.parametrize("name", ["mlp", "norms", "subset", "k1"])
def test_tapped_products_equal_dense_jacobian(name):
    model, params = _model(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 4, generator=g, dtype=F64)
    budget = 30_000 if name == "k1" else 60_000  # several chunks of points, taps kept
    lin = fntk.Linearized(model, params, memory_budget=budget)
    xc = lin.check_input(x)
    an = tapped_layers(lin, xc)
    assert an is not None
    J = dense_jacobian(model, x, lin.names)
    n, k, p = J.shape
    V = torch.randn(p, 5, generator=g, dtype=F64)
    U = torch.randn(n, k, 5, generator=g, dtype=F64)
    Hm = torch.randn(n, k, k, generator=g, dtype=F64)
    for keep in (True, False):
        tj = TappedJacobian(lin, xc, an, keep=keep)
        assert len(tj._chunks) > 1
        for _ in range(2):  # the second time from kept taps
            assert rel_err(tj.jvp(V), torch.einsum("nkp,pr->nkr", J, V)) <= 1e-12
            assert rel_err(tj.vjp(U), torch.einsum("nkp,nkr->pr", J, U)) <= 1e-12
            got = tj.ggn(V, lambda u, s: torch.einsum("nkl,nlr->nkr", Hm[s], u))
            want = torch.einsum("nkp,nkl,nlq,qr->pr", J, Hm, J, V)
            assert rel_err(got, want) <= 1e-12
        assert tj.cached() == keep


def _positions_model(name: str) -> tuple[nn.Module, Tensor]:
    """Models whose layers apply a weight at S > 1 positions per point (batch-norm statistics
    randomised so that eval mode is not the identity)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if name == "cnn":
        model, x = SmallCNN(k=3), torch.randn(11, 1, 8, 8, generator=g)
    elif name == "grouped":  # a grouped and a strided, dilated Conv1d
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=2, dilation=2), nn.Tanh(),
                              nn.Conv1d(4, 6, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(11, 2, 8, generator=g)
    elif name == "resnet":
        model, x = TinyResNet(k=3), torch.randn(11, 2, 6, 6, generator=g)
    elif name == "mobile":  # depthwise conv, squeeze-excite
        model, x = MobileBlock(k=3), torch.randn(11, 2, 5, 5, generator=g)
    else:  # Linear layers over the 5 tokens of a sequence
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4), nn.Flatten(), nn.Linear(20, 3))
        x = torch.randn(11, 5, 3, generator=g)
    model = model.to(F64).eval()
    _randomize_bn(model, g)
    return model, x.to(F64)


@pytest.mark.parametrize("form", ["auto", "kron"])
@pytest.mark.parametrize("name", ["cnn", "grouped", "resnet", "mobile", "sequence"])
def test_tapped_positions_equal_dense_jacobian(name, form, monkeypatch):
    """Convolutions and token-wise Linear layers: J V, Jᵀ U, Jᵀ H J V against the dense Jacobian,
    in the form the cost rule picks and with every ungrouped weight in the kron form; several
    chunks of points and sub-batches of the S > 1 temporaries (small budget) and one chunk."""
    if form == "kron":
        monkeypatch.setattr(tapped, "layer_mode", lambda L, k: "kron" if L.can_kron() else "explicit")
    model, x = _positions_model(name)
    J = dense_jacobian(model, x)
    n, k, p = J.shape
    g = torch.Generator().manual_seed(1)
    V = torch.randn(p, 4, generator=g, dtype=F64)
    U = torch.randn(n, k, 4, generator=g, dtype=F64)
    Hm = torch.randn(n, k, k, generator=g, dtype=F64)
    for budget in (40_000, 10**8):
        lin = fntk.Linearized(model, memory_budget=budget)
        xc = lin.check_input(x)
        an = tapped_layers(lin, xc)
        assert an is not None and {L.kind for L in an.layers} & {"conv", "linear"}
        tj = TappedJacobian(lin, xc, an)
        if form == "kron":
            assert "kron" in tj.modes
        if name == "cnn" and form == "auto":  # conv 1→3 (3×3) as explicit rows over S = 64 pixels
            assert tj.modes[0] == "explicit" and tj.tap_flops == n * 2 * k * 64 * (27 + 3)
        assert (len(tj._chunks) > 1) == (budget < 10**6)
        assert rel_err(tj.jvp(V), torch.einsum("nkp,pr->nkr", J, V)) <= 1e-12
        assert rel_err(tj.vjp(U), torch.einsum("nkp,nkr->pr", J, U)) <= 1e-12
        got = tj.ggn(V, lambda u, s: torch.einsum("nkl,nlr->nkr", Hm[s], u))
        assert rel_err(got, torch.einsum("nkp,nkl,nlq,qr->pr", J, Hm, J, V)) <= 1e-12
    K = fntk.NTKOperator(lin, x, dense=False)  # the matrix-free operator on the same taps
    W = torch.randn(n * k, 4, generator=g, dtype=F64)
    assert rel_err(K @ W, torch.einsum("ikp,jlp->ikjl", J, J).reshape(n * k, n * k) @ W) <= 1e-12
    assert K._cache["tapped"] is not None


def test_layer_form_rule():
    """LeNet's convolutions take the explicit rows (cheaper per column at similar memory); a wide
    token-wise Linear with many outputs keeps the kron taps."""
    from fntk.linearize.taps import Layer

    conv2 = Layer(nn.Identity(), "conv", "w", "b", S=196, d_in=288, d_out=64)
    assert tapped.layer_mode(conv2, 10) == "explicit"
    wide = Layer(nn.Identity(), "linear", "w", "b", S=4, d_in=32, d_out=32)
    assert tapped.layer_mode(wide, 10) == "kron"
    assert tapped.layer_mode(Layer(nn.Identity(), "linear", "w", None, S=1, d_in=3, d_out=1), 1) == "kron"


@pytest.mark.parametrize("kind", ["embedding", "tied", "prelu"])
def test_not_applicable(kind):
    torch.manual_seed(0)
    if kind == "embedding":
        model, x = EmbedNet().to(F64), torch.randint(0, 11, (4, 3))
    elif kind == "tied":
        model, x = TiedMLP().to(F64), torch.randn(4, 4, dtype=F64)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).to(F64)
        x = torch.randn(4, 3, dtype=F64)
    lin = fntk.Linearized(model)
    assert tapped_layers(lin, lin.check_input(x)) is None


def test_operators_take_the_tapped_path_and_agree():
    model, _ = _model("norms")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (30,), generator=g)
    lin = fntk.Linearized(model)
    J = dense_jacobian(model, x)
    p = J.shape[2]
    V = torch.randn(p, 4, generator=g, dtype=F64)
    G = fntk.GGNOperator(lin, x, Categorical(), y=y)
    f = torch.func.functional_call(model, dict(model.named_parameters()), (x,)).detach()
    pi = torch.softmax(f, -1)
    H = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None]
    want = torch.einsum("nkp,nkl,nlq,qr->pr", J, H, J, V)
    assert rel_err(G @ V, want) <= 1e-12 and G._taps["tj"] is not None and G._taps["tj"].cached()
    assert rel_err(G @ V[:, 0], want[:, 0]) <= 1e-12
    K = fntk.NTKOperator(lin, x, dense=False)
    W = torch.randn(30 * 3, 4, generator=g, dtype=F64)
    Kd = torch.einsum("ikp,jlp->ikjl", J, J).reshape(90, 90)
    assert rel_err(K @ W, Kd @ W) <= 1e-12 and K._cache["tapped"] is not None
    xs = torch.randn(7, 4, generator=g, dtype=F64)
    Ks = fntk.NTKOperator(lin, xs, x, dense=False)
    Js = dense_jacobian(model, xs)
    assert rel_err(Ks @ W, torch.einsum("ikp,jlp->ikjl", Js, J).reshape(21, 90) @ W) <= 1e-12


def test_cost_model_keeps_autodiff_where_taps_do_not_pay():
    """Many outputs: the taps cost k backward passes; a one-column product is cheaper by autodiff."""
    torch.manual_seed(0)
    model = tanh_mlp(d_in=3, width=6, k=200).to(F64)
    x = torch.randn(10, 3, dtype=F64)
    lin = fntk.Linearized(model)
    G = fntk.GGNOperator(lin, x, Gaussian(1.0))
    assert G._tapped(1) is None
    J = dense_jacobian(model, x)
    v = torch.randn(J.shape[2], dtype=F64)
    assert rel_err(G @ v, torch.einsum("nkp,nkq,q->p", J, J, v)) <= 1e-12


def test_float32():
    model = tanh_mlp(d_in=4, width=7, k=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=g)
    lin = fntk.Linearized(model)
    G = fntk.GGNOperator(lin, x, Gaussian(1.0))
    V = torch.randn(lin.num_params, 3, generator=g)
    J = dense_jacobian(model.double(), x.double())
    assert G._tapped(3) is not None
    assert rel_err((G @ V).double(), torch.einsum("nkp,nkq,qr->pr", J, J, V.double())) <= 1e-5


def test_repeated_products_take_the_taps_once_they_pay():
    """A single product on a CNN is cheaper by autodiff (the taps cost k backward passes); repeated
    products (CG, Lanczos) share kept taps, so the operator switches to them after a few calls —
    every product equal to the dense float64 GGN."""
    model, x = _positions_model("cnn")
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    J = dense_jacobian(model, x)
    f = torch.func.functional_call(model, dict(model.named_parameters()), (x,)).detach()
    pi = torch.softmax(f, -1)
    H = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None]
    G = fntk.GGNOperator(fntk.Linearized(model), x, Categorical(), y=y)
    used = []
    for _ in range(4):
        v = torch.randn(J.shape[2], generator=g, dtype=F64)
        assert rel_err(G @ v, torch.einsum("nkp,nkl,nlq,q->p", J, H, J, v)) <= 1e-12
        used.append(G._taps["tj"].cached())
    assert used[0] is False and used[-1] is True


class _DictCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN(k=3)

    def forward(self, pixels, scale):
        return self.net(pixels * scale[:, None, None, None])


def test_tapped_products_with_dict_inputs():
    """model(**batch) with a convolution: the tapped J V and the GGN operator on the tapped path equal
    the dense Jacobian, over several chunks of the dict's rows and over one."""
    torch.manual_seed(0)
    model = _DictCNN().to(F64).eval()
    g = torch.Generator().manual_seed(6)
    x = {"pixels": torch.randn(9, 1, 8, 8, generator=g, dtype=F64),
         "scale": torch.rand(9, generator=g, dtype=F64) + 0.5}
    J = dense_jacobian(model, x)
    V = torch.randn(J.shape[2], 3, generator=g, dtype=F64)
    for budget in (40_000, 10**8):
        lin = fntk.Linearized(model, memory_budget=budget)
        xc = lin.check_input(x)
        tj = TappedJacobian(lin, xc, tapped_layers(lin, xc))
        assert (len(tj._chunks) > 1) == (budget < 10**6)
        assert rel_err(tj.jvp(V), torch.einsum("nkp,pr->nkr", J, V)) <= 1e-12
        G = fntk.GGNOperator(lin, x, Gaussian(1.0))
        assert rel_err(G @ V, torch.einsum("nkp,nkq,qr->pr", J, J, V)) <= 1e-12
        assert G._taps["tj"].cached()  # the product ran on the (kept) taps
