"""fntk.ntk: every method and outputs mode against the dense float64 reference J(x1) J(x2)ᵀ."""

import pytest
import torch
from torch import nn

import fntk
from fntk.ntk import NTKMemoryError, NTKMethod, choose_method, ntk
from fntk.ntk import structured as S
from fntk.ntk.blocks import Outputs
from fntk.ntk.methods import prepare

from models import make, tanh_mlp
from reference import assert_same_fingerprint, dense_jacobian, fingerprint, rel_err

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["structured", "contraction", "products", "auto"]
OUTPUTS = ["full", 1, "independent"]


class SeqNet(nn.Module):
    """A Linear applied to (n, L, d) sequences, LayerNorm over features, flattened head."""

    def __init__(self, d=4, L=3, k=2):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(d, 5), nn.LayerNorm(5), nn.Linear(5 * L, k)

    def forward(self, x):
        return self.b(torch.tanh(self.ln(self.a(x))).flatten(1))


class Conv1dNet(nn.Module):
    """Conv1d (stride, dilation, reflect padding), GroupNorm, grouped 'same' Conv1d, BatchNorm1d."""

    def __init__(self, k=3):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.g, self.bn = nn.GroupNorm(2, 4), nn.BatchNorm1d(4)
        self.c2 = nn.Conv1d(4, 4, 3, groups=2, padding="same")
        self.f = nn.Linear(4 * 6, k)

    def forward(self, x):
        return self.f(torch.relu(self.bn(self.c2(torch.tanh(self.g(self.c(x)))))).flatten(1))


class Conv2dNet(nn.Module):
    """Asymmetric kernel/stride, circular padding, a depthwise bias-free conv, in-place ReLUs."""

    def __init__(self, k=2):
        super().__init__()
        self.c = nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="circular")
        self.d = nn.Conv2d(4, 4, 3, groups=4, bias=False, padding=1)
        self.r, self.f = nn.ReLU(inplace=True), nn.Linear(4 * 3 * 3, k)

    def forward(self, x):
        return self.f(self.r(self.d(self.r(self.c(x)))).flatten(1))


class PadEmbed(nn.Module):
    def __init__(self, k=2):
        super().__init__()
        self.e, self.f = nn.Embedding(7, 3, padding_idx=0), nn.Linear(3, k)

    def forward(self, t):
        return self.f(torch.tanh(self.e(t)).sum(1))


class FunctionalTie(nn.Module):
    """The embedding matrix reused, outside its module, as the output layer."""

    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(6, 3), nn.Linear(3, 3)

    def forward(self, t):
        return torch.tanh(self.h(self.e(t).mean(1))) @ self.e.weight.T


class Custom(nn.Module):
    """A raw Parameter used in the parent's forward (an unknown layer type), then BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.w, self.l, self.bn = nn.Parameter(torch.randn(3, 4)), nn.Linear(4, 2), nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.l(torch.tanh(x @ self.w)))


def _case(name):
    """(model, x1, x2, params) in float64 with non-trivial normalization statistics."""
    g = torch.Generator().manual_seed(1)
    params = None
    if name in ("mlp", "cnn", "embed", "tied"):
        model, x1, x2 = make(name)
    elif name == "ten":
        model, x1, x2 = make("mlp")
        model = tanh_mlp(k=10).double()
    elif name == "subset":
        model, x1, x2 = make("cnn")
        params = ["conv.bias", "bn.weight", "fc.weight"]
    else:
        model, shape, ints = {
            "seq": (SeqNet(), (3, 4), 0),
            "conv1d": (Conv1dNet(), (2, 11), 0),
            "conv2d": (Conv2dNet(), (2, 6, 4), 0),
            "padembed": (PadEmbed(), (4,), 7),
            "functie": (FunctionalTie(), (2,), 6),
            "custom": (Custom(), (3,), 0),
        }[name]
        if ints:
            x1, x2 = (torch.randint(0, ints, (n, *shape), generator=g) for n in (5, 4))
        else:
            x1, x2 = (torch.randn(n, *shape, generator=g, dtype=torch.float64) for n in (5, 4))
        model = model.double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
    return model, x1, x2, params


def _reference(J1, J2, outputs):
    k = J1.shape[1]
    if outputs == "full":
        K = torch.einsum("icp,jdp->icjd", J1, J2)
    elif outputs == "independent":
        K = torch.einsum("icp,jcp->cij", J1, J2)
    else:
        K = J1[:, outputs] @ J2[:, outputs].T
    return K.reshape(J1.shape[0], J2.shape[0]) if k == 1 else K


def _forced(force):
    """fntk.ntk's structured method with every layer in one per-layer form (a kernel function with
    ntk's signature and result)."""

    def kernel(lin, x1, x2, method, outputs):
        x1, x2, sym, spec, budget = prepare(lin, x1, x2, outputs, None)
        with torch.no_grad():
            return spec.finalize(S.structured_ntk(lin, x1, x2, sym, spec, budget, force=force))

    return kernel


def _check_all(model, x1, x2, params, methods, outputs=OUTPUTS, kernel=ntk):
    fp = fingerprint(model)
    lin = fntk.Linearized(model, params=params)
    names = lin.names
    J1, J2 = dense_jacobian(model, x1, names), dense_jacobian(model, x2, names)
    k = J1.shape[1]
    for method in methods:
        for out in outputs:
            out = out if not isinstance(out, int) else min(out, k - 1)
            for sym in (True, False):
                ref = _reference(J1, J1 if sym else J2, out)
                K = kernel(lin, x1, None if sym else x2, method=method, outputs=out)
                assert K.shape == ref.shape, (method, out, sym)
                assert rel_err(K, ref) <= TOL, (method, out, sym, rel_err(K, ref))
    assert_same_fingerprint(fp, fingerprint(model))
    return lin


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["mlp", "cnn", "embed", "tied", "ten", "subset", "seq"])
def test_methods_match_dense_reference(case, method):
    model, x1, x2, params = _case(case)
    _check_all(model, x1, x2, params, [method])


@pytest.mark.parametrize("case", ["conv1d", "conv2d", "padembed", "functie", "custom", "seq", "embed"])
@pytest.mark.parametrize("force", [None, "kron", "explicit"])
def test_structured_layer_rules(case, force):
    """Both per-layer forms (factored "kron" and explicit gradients) of every layer rule."""
    model, x1, x2, params = _case(case)
    lin = _check_all(model, x1, x2, params, ["structured"], kernel=ntk if force is None else _forced(force))
    an = S.analyze(lin, lin.check_input(x1))
    expected_fallback = {"tied": ["shared.weight", "shared.bias"], "functie": ["e.weight"], "custom": ["w"]}
    assert an.fallback == expected_fallback.get(case, [])


def test_tied_weights_fall_back():
    model, x1, _, _ = _case("tied")
    lin = fntk.Linearized(model)
    an = S.analyze(lin, lin.check_input(x1))
    assert an.fallback == ["shared.weight", "shared.bias"]
    assert {L.weight for L in an.layers} == {"inp.weight", "out.weight"}


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_psd(method):
    model, x1, _, _ = _case("cnn")
    lin = fntk.Linearized(model)
    K = ntk(lin, torch.cat([x1, x1[:2]]), method=method)  # duplicated points: singular
    n, k = K.shape[:2]
    M = K.reshape(n * k, n * k)
    assert torch.equal(M, M.T)
    ev = torch.linalg.eigvalsh(M)
    assert ev.min() >= -1e-10 * ev.max()
    Ki = ntk(lin, x1, method=method, outputs="independent")
    assert torch.equal(Ki, Ki.transpose(1, 2))


@pytest.mark.parametrize("method, extra", [("structured", 150_000), ("contraction", 250_000),
                                           ("products", 250_000)])
def test_blocked_under_small_budget(method, extra):
    """A budget just above the output forces several blocks; the result is unchanged."""
    model, _, _, _ = _case("cnn")
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(23, 1, 8, 8, generator=g, dtype=torch.float64)
    x2 = torch.randn(17, 1, 8, 8, generator=g, dtype=torch.float64)
    lin = fntk.Linearized(model)
    J1, J2 = dense_jacobian(model, x1), dense_jacobian(model, x2)
    for sym in (True, False):
        xb = x1 if sym else x2
        Jb = J1 if sym else J2
        spec = Outputs.parse("full", 2)
        budget = spec.nbytes(23, len(xb), torch.float64) + extra
        K = ntk(lin, x1, None if sym else x2, method=method, memory_budget=budget)
        assert rel_err(K, _reference(J1, Jb, "full")) <= TOL
        Ki = ntk(lin, x1, None if sym else x2, method=method, outputs="independent", memory_budget=budget)
        assert rel_err(Ki, _reference(J1, Jb, "independent")) <= TOL
    budget = spec.nbytes(23, 23, torch.float64) + extra
    if method == "contraction":  # square blocks, recomputed
        from fntk.ntk.contraction import plan

        blocks = plan(lin, 23, 23, True, spec, budget)
        assert blocks.b1 < 23 and not blocks.cache2
    elif method == "structured":
        an = S.analyze(lin, x1)
        assert not S.plan(lin, an, 23, 17, False, spec, budget).blocks.cache2
    else:
        from fntk.ntk.products import plan

        b, rows = plan(lin, 23, 23, spec, budget)
        assert b < 23 and rows < 23


def test_memory_refusal():
    model, x1, _, _ = _case("mlp")
    lin = fntk.Linearized(model)
    x = torch.randn(100_000, 3, dtype=torch.float64)  # an 80 GB kernel
    with pytest.raises(NTKMemoryError, match=r"GiB") as err:
        ntk(lin, x)
    assert isinstance(err.value, MemoryError) and isinstance(err.value, ValueError)
    with pytest.raises(MemoryError, match=r"GiB"):
        ntk(lin, x1, method="structured", memory_budget=64)  # 6x6 doubles do not fit 64 bytes
    with pytest.raises(ValueError, match=r"GiB"):  # output fits, one working block does not
        ntk(lin, x1, method="contraction", memory_budget=6 * 6 * 8 + 100)
    with pytest.raises(ValueError, match=r"GiB"):
        ntk(fntk.Linearized(model, memory_budget=100), x1, method="products")
    old = fntk.get_memory_budget()
    try:
        fntk.set_memory_budget(200)
        with pytest.raises(NTKMemoryError, match=r"GiB"):
            ntk(fntk.Linearized(model), x1)
    finally:
        fntk.set_memory_budget(old)


def test_outputs_shapes_and_errors():
    model, x1, x2, _ = _case("ten")
    lin = fntk.Linearized(model)
    assert ntk(lin, x1, x2).shape == (6, 10, 5, 10)
    assert ntk(lin, x1, x2, outputs=-1).shape == (6, 5)
    assert ntk(lin, x1, x2, outputs="independent").shape == (10, 6, 5)
    assert torch.equal(ntk(lin, x1, x2, outputs=9, method="structured"),
                       ntk(lin, x1, x2, outputs=-1, method=NTKMethod.STRUCTURED))
    k1 = fntk.Linearized(make("mlp")[0])
    for out in ("full", 0, "independent"):
        assert ntk(k1, x1, x2, outputs=out).shape == (6, 5)
    with pytest.raises(ValueError, match="out of range"):
        ntk(lin, x1, outputs=10)
    with pytest.raises(ValueError, match="outputs must be"):
        ntk(lin, x1, outputs="diagonal")
    with pytest.raises(ValueError, match="method must be one of"):
        ntk(lin, x1, method="magic")
    with pytest.raises(TypeError, match="Linearized"):
        ntk(model, x1)
    with pytest.raises(ValueError, match="memory_budget"):
        ntk(lin, x1, memory_budget=-1)


def test_auto_planner():
    model, _, _, _ = _case("mlp")
    lin = fntk.Linearized(model)
    x1 = torch.randn(200, 3, dtype=torch.float64)
    method, est = choose_method(lin, x1)
    assert method is NTKMethod.STRUCTURED and set(est) == set(NTKMethod) - {NTKMethod.AUTO}
    assert est[NTKMethod.STRUCTURED] < est[NTKMethod.CONTRACTION] < est[NTKMethod.PRODUCTS]
    # an all-fallback network (one raw Parameter): structured has nothing to gain
    net = Custom().double()
    lin2 = fntk.Linearized(net, params=["w"])
    assert choose_method(lin2, x1)[0] is NTKMethod.CONTRACTION


def test_user_model_untouched_on_error():
    model, x1, _, _ = _case("cnn")
    model.train()
    fp = fingerprint(model)
    lin = fntk.Linearized(model)
    with pytest.raises(ValueError):
        ntk(lin, x1, method="structured", memory_budget=64)
    ntk(lin, x1, method="structured")
    assert_same_fingerprint(fp, fingerprint(model))
    assert all(len(m._forward_hooks) == 0 for m in lin.module.modules())
