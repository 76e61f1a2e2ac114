r"""The NTK-GP model options and the candidate set of the automatic choice.

A model (:class:`GPModel`) combines, for one network output c with f = f_c(x; θ̂), J = J_c:

    y = m(x) + g(x) + ε,
    m(x)   = f + b | b | a·f + b                       mean "network" | "constant" | "scaled"
    g ~ GP(0, k),  k(x, x′) = Σ_l s_l J_l(x)J_l(x′)ᵀ   (one s for all layers unless "layers")
                              + s_in · ρ(x)ρ(x′) · k_in(x, x′)    (optional input-space kernel)
    ε ~ N(0, σ² + c·σ²_src(x))                          ("hetero"; else N(0, σ²))

with J_l the Jacobian block of layer l (its parameters), k_in an ARD RBF or Matérn kernel on the
flattened inputs (:mod:`fntk.gp.kernels`), ρ ≡ 1 or ρ(x) = σ_src(x) ("@src": the input kernel's
amplitude follows the source network's predictive standard deviation), and σ²_src(x) =
link(f_v(x; θ̂)) the variance the source net predicts on its output v (``variance_output``,
link ``"softplus"`` | ``"exp"`` | ``"identity"``). a, b are profiled by generalised least squares
(:mod:`fntk.gp.means`); s_l, s_in, ℓ, c, σ² are learned by the evidence.

Names: ``<mean>[+<input kernel>[@src]][+layers][+hetero]``, e.g. ``"network"`` (the plain NTK-GP
with the network as prior mean), ``"scaled+rbf"``, ``"network+hetero"``, ``"scaled+rbf@src+hetero"``.

The candidate set of ``gp_model="auto"`` (:func:`default_candidates`), chosen from what the issue's
prototypes found competitive somewhere (no model won everywhere):

    "network", "constant", "scaled"          (one eigendecomposition serves all three)
    "scaled+rbf"                              (nests the target-only RBF GP: s_ntk → 0, a → 0)
    with a variance output also "network+hetero", "scaled+rbf@src+hetero".

Per-layer scales and the Matérn kernels are explicit options only (measured: small MSE gains for
one kernel pass per layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fntk import persist
from fntk.gp.kernels import INPUT_KERNELS
from fntk.gp.means import MEANS

VARIANCE_LINKS = ("softplus", "exp", "identity")
HYPERPARAMETERS = ("scale", "noise", "constant")
CRITERIA = ("loo", "evidence", "marglik")
FLAGS = ("layers", "hetero")
SOURCE = "@src"


@persist.register("gp.GPModel")
@dataclass(frozen=True)
class GPModel:
    """One model of the family in the module docstring."""

    mean: str = "network"
    input_kernel: str | None = None
    source_amplitude: bool = False
    layer_scales: bool = False
    source_noise: bool = False

    @property
    def name(self) -> str:
        parts = [self.mean]
        if self.input_kernel is not None:
            parts.append(self.input_kernel + (SOURCE if self.source_amplitude else ""))
        if self.layer_scales:
            parts.append("layers")
        if self.source_noise:
            parts.append("hetero")
        return "+".join(parts)

    @property
    def spectral(self) -> bool:
        """One eigendecomposition of the NTK serves every evaluation of the evidence (no input
        kernel, one scale, homoscedastic noise); else one Cholesky per evaluation."""
        return self.input_kernel is None and not self.layer_scales and not self.source_noise

    @property
    def needs_variance(self) -> bool:
        return self.source_noise or self.source_amplitude

    @classmethod
    def parse(cls, spec: object) -> GPModel:
        """A :class:`GPModel` from itself or its name; ValueError listing the valid parts."""
        if isinstance(spec, GPModel):
            return spec
        if not isinstance(spec, str) or not spec:
            raise TypeError(f"a model must be a name such as 'scaled+rbf' or a fntk.gp.GPModel, got {spec!r}")
        mean, *rest = spec.split("+")
        if mean not in MEANS:
            raise ValueError(
                f"model {spec!r}: unknown mean {mean!r}; the mean (first part) is one of {MEANS}"
            )
        kw: dict = {"mean": mean}
        for tok in rest:
            base = tok.removesuffix(SOURCE)
            if base in INPUT_KERNELS and "input_kernel" not in kw:
                kw.update(input_kernel=base, source_amplitude=tok.endswith(SOURCE))
            elif tok == "layers" and "layer_scales" not in kw:
                kw["layer_scales"] = True
            elif tok == "hetero" and "source_noise" not in kw:
                kw["source_noise"] = True
            else:
                valid = [*INPUT_KERNELS, *(k + SOURCE for k in INPUT_KERNELS), *FLAGS]
                raise ValueError(
                    f"model {spec!r}: unknown or repeated part {tok!r}; names are "
                    f"<mean>[+<input kernel>[@src]][+layers][+hetero] with a mean from {MEANS} and parts "
                    f"from {valid}"
                )
        return cls(**kw)


PLAIN = GPModel("network")
SPECTRAL_DEFAULTS = ("network", "constant", "scaled")
COMPOSITE_DEFAULTS = ("scaled+rbf",)
SOURCE_DEFAULTS = ("network+hetero", "scaled+rbf@src+hetero")


def parse_optimize(optimize: object) -> frozenset[str]:
    """The regressor's ``optimize`` option → the names of the hyperparameters learned."""
    if isinstance(optimize, bool):
        return frozenset(HYPERPARAMETERS) if optimize else frozenset()
    if isinstance(optimize, str):  # one name, not its letters
        optimize = (optimize,)
    if not isinstance(optimize, Iterable):
        raise TypeError(
            f"optimize must be True, False or an iterable of names from {HYPERPARAMETERS}, got {optimize!r}"
        )
    learn = frozenset(optimize)
    unknown = sorted(map(str, learn - set(HYPERPARAMETERS)))
    if unknown:
        raise ValueError(f"optimize: unknown hyperparameter(s) {unknown}; valid: {HYPERPARAMETERS}")
    return learn


def default_candidates(has_variance: bool) -> list[GPModel]:
    """The candidate set of ``gp_model="auto"`` (module docstring)."""
    names = [*SPECTRAL_DEFAULTS, *COMPOSITE_DEFAULTS, *(SOURCE_DEFAULTS if has_variance else ())]
    return [GPModel.parse(n) for n in names]


#: composite candidates of model="auto" are fitted up to this many points (each evaluation of
#: their evidence is one O(n³) Cholesky, ~130 per fit)
COMPOSITE_MAX_N = 2000
#: the automatic choice needs this many points; below, the plain "network" model is fitted. Measured
#: on the sine tasks (60 per setting): at 5 points the choice had the worst test NLL of the three
#: (4.01 against 3.31 "network", 2.98 "constant"), at 8 the best in both settings; 10 leaves a margin
#: (python -m fntk_bench.model_choice_sine --study small_n)
MIN_CHOICE_N = 10


def parse_options(mean: object, model: object) -> list[GPModel] | None:
    """The regressor's ``mean`` (legacy shorthand) and ``gp_model`` options → candidates (None: auto)."""
    if mean is not None:
        if not isinstance(mean, str) or mean not in MEANS:
            raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
        if not (isinstance(model, str) and model == "auto"):
            raise ValueError(
                f"pass either mean={mean!r} or gp_model={model!r}, not both (mean is short for it)"
            )
        return [GPModel(mean)]
    return parse_models(model)


def resolve(models: list[GPModel] | None, *, single_output: bool, space: str, solver: str, learn_all: bool,
            fixed: bool, n: int, has_variance: bool, dict_inputs: str | None = None) -> list[GPModel]:
    """The models a fit runs: the automatic set where the choice applies (else the plain model), or
    the explicit ones after checking that the fit's plan supports them (ValueError saying why).
    ``dict_inputs`` (a description of dict inputs, None for a tensor): no feature vector, so the
    automatic set leaves the input-kernel models out and an explicit one is a TypeError."""
    direct_function = space == "function" and solver == "direct"
    if models is None:
        if not (single_output and direct_function and learn_all and not fixed and n >= MIN_CHOICE_N):
            return [PLAIN]
        cands = default_candidates(has_variance)
        cands = cands if n <= COMPOSITE_MAX_N else [m for m in cands if m.spectral]
        return cands if dict_inputs is None else [m for m in cands if m.input_kernel is None]
    if dict_inputs is not None and any(m.input_kernel is not None for m in models):
        raise TypeError(
            f"gp_model {[m.name for m in models]} has an input kernel, which needs x as one "
            f"tensor (n, ...); x is {dict_inputs}: choose models without one (e.g. 'network')"
        )
    for m in models:
        needs = None
        if not m.spectral or len(models) > 1:
            if not single_output:
                needs = "one output (output=<index>, not None)"
            elif not direct_function:
                needs = f"function space with the direct solver (this fit plans {space} space, {solver})"
            elif not learn_all or fixed:
                needs = "every hyperparameter learned (optimize=True, no fixed scale or constant)"
        elif m.mean == "scaled" and solver == "iterative":
            needs = "the direct solver (the matrix-free one profiles a constant mean only)"
        if needs is not None:
            what = f"model {m.name!r}" if len(models) == 1 else f"choosing among {[x.name for x in models]}"
            raise ValueError(f"{what} needs {needs}")
    return models


def parse_models(model: object) -> list[GPModel] | None:
    """``model`` → the candidate list (None for "auto"): one name/GPModel, or a sequence of them."""
    if isinstance(model, str) and model == "auto":
        return None
    if isinstance(model, (str, GPModel)):
        return [GPModel.parse(model)]
    if isinstance(model, Sequence) and len(model) > 0:
        models = [GPModel.parse(m) for m in model]
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"gp_model: the candidates repeat a model: {names}")
        return models
    raise TypeError(
        f"gp_model must be 'auto', a model name such as 'scaled+rbf', a fntk.gp.GPModel or a non-empty "
        f"list of them, got {model!r}"
    )


__all__ = ["GPModel", "HYPERPARAMETERS", "PLAIN", "VARIANCE_LINKS", "CRITERIA", "COMPOSITE_MAX_N",
           "MIN_CHOICE_N", "default_candidates", "parse_models", "parse_optimize", "parse_options", "resolve"]
