r"""The empirical NTK as a GPyTorch kernel: k(x, x') = J_c(x) J_c(x')ᵀ.

Drop-in for ``gpytorch.models.ExactGP`` (the paper's README pattern)::

    class NTKGP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood, net):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(fntk.gp.NTKKernel(net))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

``forward`` returns the matrix-free :class:`fntk.NTKOperator` (n1 × n2), so GPyTorch's Cholesky
(small n), CG + Lanczos (large n), ``ExactMarginalLogLikelihood`` and ``fast_pred_var`` all work
on it without forming J. The network's weights are *not* kernel hyperparameters: the kernel holds
a :class:`fntk.Linearized` snapshot (not an ``nn.Module``), so optimisers over ``model.parameters()``
only see GPyTorch's hyperparameters (outputscale, noise, mean), and the user's net is never touched.

Prediction (:class:`NTKPredictionStrategy`) works in weight space when that is cheaper, like
GPyTorch's ``LinearKernel``: with features F = √c·J (c the ScaleKernel's outputscale), noise
D = diag(σ²) and the Cholesky factor L of I + FᵀD⁻¹F (p × p),

    mean(x*) = μ(x*) + F* L⁻ᵀL⁻¹FᵀD⁻¹(y − μ),   cov(x*) = (L⁻¹F*ᵀ)ᵀ(L⁻¹F*ᵀ),

which costs O(n·p² + p³) instead of O(n³): chosen when p < n and the p × p matrices fit in memory.
"""

from __future__ import annotations

import math

import torch
from gpytorch.kernels import Kernel
from gpytorch.lazy import LazyEvaluatedKernelTensor
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.utils.memoize import cached
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantMulLinearOperator,
    LinearOperator,
    RootLinearOperator,
)
from torch import Tensor, nn

from fntk.errors import NTKMemoryError
from fntk.linalg import safe_cholesky
from fntk.linearize import Linearized, ParamSelection, as_linearized
from fntk.linearize.outputs import OutputFn
from fntk.ntk.costs import cheapest, cholesky_seconds
from fntk.operators import NTKOperator
from fntk.operators.base import check_output
from fntk.operators.gram import output_jacobian
from fntk.settings import available_memory
from fntk.validation import over_memory

KERNEL_SPACES = ("auto", "function", "weight")


class NTKKernel(Kernel):
    r"""k(x, x') = J_c(x) J_c(x')ᵀ, the empirical NTK of output c of a trained network.

    Args:
        model_or_lin: the trained ``nn.Module`` (copied, never modified) or a
            :class:`fntk.Linearized`.
        output: which network output c defines the kernel (an int; e.g. 0, the mean head of a
            heteroscedastic net).
        params: parameter selection when a module is given (see :class:`fntk.Linearized`).
        input_shape: per-point input shape of the network when GPyTorch's inputs are flattened
            to (n, d) (e.g. ``(1, 28, 28)``); None: the inputs are passed unchanged.
        space: prediction strategy: ``"auto"`` (weight space when p < n and it fits in memory),
            ``"function"`` or ``"weight"``.
        output_fn: output selection for tuple/dict/ModelOutput models, as in :class:`fntk.Linearized`.

    Inputs x1 (n1, d), x2 (n2, d); ``forward`` returns an (n1 × n2) :class:`fntk.NTKOperator`
    (or its exact diagonal (n,) with ``diag=True``). Batched inputs (b, n, d) are not supported.
    """

    has_lengthscale = False

    def __init__(
        self,
        model_or_lin: nn.Module | Linearized,
        output: int = 0,
        params: ParamSelection = None,
        input_shape: tuple[int, ...] | None = None,
        space: str = "auto",
        output_fn: OutputFn | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        lin = as_linearized(model_or_lin, params, output_fn=output_fn, name="model_or_lin")
        if isinstance(output, bool) or not isinstance(output, int):
            raise ValueError(f"output must be an int output index, got {output!r}")
        if space not in KERNEL_SPACES:
            raise ValueError(f"space must be one of {KERNEL_SPACES}, got {space!r}")
        # a plain attribute, not a submodule: the network's weights are not hyperparameters
        self.lin = lin
        self.output = output
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.space = space

    def _inputs(self, x: Tensor, name: str) -> Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"NTKKernel: {name} must have shape (n, d) (batched GP inputs are not supported), "
                f"got {tuple(x.shape)}"
            )
        if self.input_shape is not None:
            x = x.reshape(x.shape[0], *self.input_shape)
        return self.lin.check_input(x, name)

    def _output(self) -> int:
        return int(check_output(self.lin, self.output))

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> NTKOperator | Tensor:
        """K(x1, x2) as an NTKOperator (n1 × n2), or its diagonal (n,) when ``diag``."""
        if last_dim_is_batch:
            raise ValueError("NTKKernel does not support last_dim_is_batch")
        same = x1.shape == x2.shape and torch.equal(x1, x2)
        a = self._inputs(x1, "x1")
        c = self._output()
        if diag:
            if same:
                return NTKOperator(self.lin, a, outputs=c, _checked=True).diagonal()
            b = self._inputs(x2, "x2")
            if a.shape[0] != b.shape[0]:
                raise ValueError(
                    f"diag=True needs x1 and x2 of equal length, got {a.shape[0]} and {b.shape[0]}"
                )
            # k(a_i, b_i) = J_c(a_i)·J_c(b_i) over row blocks whose two (rows × p) Jacobians fit the budget
            rows = max(1, self.lin.memory_budget // (2 * 8 * self.lin.num_params))
            return torch.cat([
                (output_jacobian(self.lin, a[s], [c])[0] * output_jacobian(self.lin, b[s], [c])[0]).sum(-1)
                for s in self.lin.chunks(a.shape[0], rows)
            ])
        b = None if same else self._inputs(x2, "x2")
        return NTKOperator(self.lin, a, b, outputs=c, _checked=True)

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1

    def prediction_strategy(
        self, train_inputs, train_prior_dist, train_labels, likelihood
    ) -> NTKPredictionStrategy:
        return NTKPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood, kernel=self)


def _unwrap(covar) -> tuple[NTKOperator | None, Tensor | None]:
    """(NTKOperator, constant) from K or c·K (ScaleKernel), else (None, None)."""
    if isinstance(covar, LazyEvaluatedKernelTensor):
        covar = covar.evaluate_kernel()
    const = None
    if isinstance(covar, ConstantMulLinearOperator):
        const, covar = covar.expanded_constant, covar.base_linear_op
    if isinstance(covar, NTKOperator) and covar.outputs != "full":
        one = torch.ones((), dtype=covar.dtype, device=covar.device)
        return covar, (one if const is None else const.reshape(()))
    return None, None


class NTKPredictionStrategy(DefaultPredictionStrategy):
    """GPyTorch's exact prediction with the NTK, in weight space when that is cheaper.

    Function space (the default strategy, Cholesky or CG/LOVE on the matrix-free NTKOperator) is
    used when n ≤ p, when the kernel is not a plain (scaled) NTKKernel, or when the likelihood is
    not a fixed diagonal noise.
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, kernel: NTKKernel):
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood)
        self.kernel = kernel
        n, p = self.train_labels.shape[-1], kernel.lin.num_params
        train_op, _ = _unwrap(train_prior_dist.lazy_covariance_matrix)
        is_diag = isinstance(self.lik_train_train_covar, AddedDiagLinearOperator)
        if kernel.space == "function" or train_op is None or not is_diag or self.train_labels.dim() != 1:
            self.weight_space = False
        else:
            # the weight-space cache holds J (n × p), its scaled copy and three (p × p) matrices
            need, limit = (2 * n * p + 3 * p * p) * 8, available_memory() // 2
            fits = need <= limit
            if kernel.space == "weight" and not fits:
                raise NTKMemoryError(over_memory(
                    f"NTKKernel(space='weight') prediction (J of {n:,} × {p:,} and {p:,} × {p:,} factors)",
                    need, limit, "half the available memory", "use space='function' or 'auto'",
                ))
            options = {"function": cholesky_seconds(n), "weight": cholesky_seconds(p) if fits else math.inf}
            chosen = "weight" if kernel.space == "weight" else cheapest(options, "the NTK prediction")
            self.weight_space = chosen == "weight"
        self._train_op = train_op

    @property
    @cached(name="weight_space_cache")
    def weight_space_cache(self) -> tuple[Tensor, Tensor]:
        """(mean_cache (p,) = L⁻ᵀL⁻¹FᵀD⁻¹(y − μ)/√c, L (p × p) with LLᵀ = I + FᵀD⁻¹F), F = √c·J."""
        op, const = _unwrap(self.train_prior_dist.lazy_covariance_matrix)
        J = output_jacobian(op.lin, op.x1, [op.outputs])[0].to(const.dtype)  # (n, p)
        F = J * const.sqrt()
        noise = self.lik_train_train_covar._diag_tensor.diagonal(dim1=-1, dim2=-2)
        Fs = F / noise.sqrt()[:, None]
        eye = torch.eye(F.shape[1], dtype=F.dtype, device=F.device)
        L = safe_cholesky(eye + Fs.T @ Fs, "I + FᵀD⁻¹F (NTK prediction in weight space)")
        resid = (self.train_labels - self.train_prior_dist.mean) / noise
        mean_cache = torch.cholesky_solve((F.T @ resid)[:, None], L)[:, 0]
        return mean_cache, L

    def exact_prediction(
        self, test_mean: Tensor, test_test_covar, test_train_covar
    ) -> tuple[Tensor, LinearOperator]:
        if not self.weight_space:
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        op, const = _unwrap(test_test_covar)
        if op is None:
            return super().exact_prediction(test_mean, test_test_covar, test_train_covar)
        mean_cache, L = self.weight_space_cache
        Fs = output_jacobian(op.lin, op.x1, [op.outputs])[0].to(const.dtype) * const.sqrt()  # (m, p)
        mean = Fs @ mean_cache + test_mean
        root = torch.linalg.solve_triangular(L, Fs.T, upper=False).T  # (m, p)
        covar: LinearOperator = RootLinearOperator(root)
        return mean, covar


__all__ = ["NTKKernel", "NTKPredictionStrategy"]
