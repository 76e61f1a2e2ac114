r"""The Laplace precision of a last-layer model, factorised exactly through its Kronecker structure.

For a final linear layer fed by fixed features φ̃_i (n points, d̃ = d (+1 with the bias)) and k
outputs, J_i = I_k ⊗ φ̃_iᵀ, so with per-point output Hessians H_i (k × k) the precision is

    P = Σ_i H_i ⊗ φ̃_i φ̃_iᵀ + λ I      (p × p, p = k·d̃; vector order c·d̃ + j, i.e. W.reshape(-1)
                                        for the weight matrix W (k × d̃) with the bias as last column).

Two exact factorisations (float64), both with

- ``logdet()`` = log det P, ``solve(B)`` = P⁻¹ B for B (r, k, d̃),
- ``precondition(B)`` ≈ ``solve(B)``, the form used inside preconditioned CG,
- ``blocks(Φ_x)`` = S_i = J(x_i) P⁻¹ J(x_i)ᵀ (m, k, k) for features Φ_x (m, d̃): the predictive
  covariances of the logits (test points) and, at the training points, the pieces of the
  evidence's slope and of γ = tr(G P⁻¹) = Σ_i tr(H_i S_i).

:class:`KronFactor` (any H_i): P formed block by block, P_cc' = Φ̃ᵀ diag(H_:,cc') Φ̃ (k(k+1)/2
products of (n × d̃) matrices, ≈ k² n d̃² flops), one Cholesky (p³/3); S from Σ = P⁻¹.

:class:`SoftmaxFactor` (categorical, H_i = diag(π_i) − π_iπ_iᵀ): P = D − W Wᵀ with the block
diagonal D = diag_c(Φ̃ᵀ diag(π_:c) Φ̃ + λI) and W = [π_i ⊗ φ̃_i]_i (p × n). With D_c = R_c R_cᵀ and
Ỹ = R⁻¹ W (block c: R_c⁻¹ Φ̃ᵀ diag(π_:c)), P = R (I − ỸỸᵀ) Rᵀ, so (Sylvester, Woodbury)

    log det P = Σ_c log det D_c + log det C,   C = I_n − ỸᵀỸ,   P⁻¹ = R⁻ᵀ (I + Ỹ C⁻¹ Ỹᵀ) R⁻¹:

k Cholesky factors of d̃ × d̃ and one of n × n instead of one of p × p (≈ 2k n d̃² + 2 n² p flops
instead of k² n d̃² + p³/3): the cheaper one when n is below a few d̃. Which one a fit takes is
priced by :func:`fntk.classify.cost.last_layer_plan`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fntk import persist
from fntk.classify.objective import chol
from fntk.linalg import gram

#: numbers of float64 kept per block of points in ``blocks`` (sets the chunk size)
BLOCK_NUMBERS = 2**23


def kron_ggn(Phi: Tensor, X: Tensor) -> Tensor:
    """Σ_i X_i ⊗ φ̃_i φ̃_iᵀ (k·d̃ × k·d̃) for features Phi (n, d̃) and symmetric X (n, k, k): the
    upper block row c from one product Φ̃ᵀ [X_:,cc' φ̃]_c'≥c, mirrored (exactly symmetric)."""
    n, d = Phi.shape
    k = X.shape[1]
    P = Phi.new_empty(k, d, k, d)
    for c in range(k):
        Z = (X[:, c, c:, None] * Phi[:, None, :]).reshape(n, -1)  # (n, (k − c)·d̃)
        blk = (Phi.T @ Z).reshape(d, k - c, d)  # blk[j, c', l] = P[c, j, c + c', l]
        P[c, :, c:, :] = blk
        P[c + 1 :, :, c, :] = blk[:, 1:, :].permute(1, 2, 0)
        P[c, :, c, :] = 0.5 * (blk[:, 0] + blk[:, 0].T)
    return P.reshape(k * d, k * d)


def _chunks(m: int, per_point: int) -> list[slice]:
    size = max(1, BLOCK_NUMBERS // max(per_point, 1))
    return [slice(i, min(i + size, m)) for i in range(0, m, size)]


@persist.register("classify.KronFactor")
class KronFactor:
    """Dense Cholesky of P = Σ_i H_i ⊗ φ̃_iφ̃_iᵀ + λI (see the module docstring)."""

    def __init__(self, Phi: Tensor, H: Tensor, lam: float):
        self.k, self.d, self.lam, self.Phi = H.shape[1], Phi.shape[1], lam, Phi
        P = kron_ggn(Phi, H)
        P.diagonal().add_(lam)
        self.R = chol(P)
        self.Sigma: Tensor | None = None  # P⁻¹, formed when first needed

    def logdet(self) -> float:
        return 2.0 * float(torch.log(self.R.diagonal()).sum())

    def solve(self, B: Tensor) -> Tensor:
        """P⁻¹ B for B (r, k, d̃)."""
        r = B.shape[0]
        X = torch.cholesky_solve(B.reshape(r, -1).T, self.R)
        return X.T.reshape(r, self.k, self.d)

    def precondition(self, B: Tensor) -> Tensor:
        return self.solve(B)

    def blocks(self, Phi_x: Tensor | None = None) -> Tensor:
        """S_i[c, c'] = φ̃_iᵀ Σ_cc' φ̃_i: (m, k, k) (``None``: at the training points)."""
        Phi_x = self.Phi if Phi_x is None else Phi_x
        if self.Sigma is None:
            self.Sigma = torch.cholesky_inverse(self.R)
        k, d = self.k, self.d
        S4 = self.Sigma.reshape(k, d, k, d).permute(1, 0, 2, 3).reshape(d, k * k * d)
        out = []
        for s in _chunks(Phi_x.shape[0], k * k * d):
            A = (Phi_x[s] @ S4).reshape(-1, k, k, d)
            out.append(torch.einsum("mckl,ml->mck", A, Phi_x[s]))
        return torch.cat(out)


@persist.register("classify.SoftmaxFactor")
class SoftmaxFactor:
    """P = D − W Wᵀ for the softmax Hessians H_i = diag(π_i) − π_iπ_iᵀ, by the block-diagonal D and
    an n × n capacitance matrix (see the module docstring). ``pi``: (n, k) class probabilities."""

    def __init__(self, Phi: Tensor, pi: Tensor, lam: float):
        n, d = Phi.shape
        k = pi.shape[1]
        self.k, self.d, self.n, self.lam, self.Phi, self.pi = k, d, n, lam, Phi, pi
        Z = (pi[:, :, None] * Phi[:, None, :]).reshape(n, k * d)  # one GEMM for all k blocks
        Dg = (Phi.T @ Z).reshape(d, k, d).permute(1, 0, 2)  # (k, d̃, d̃): Φ̃ᵀ diag(π_:c) Φ̃
        Dg = 0.5 * (Dg + Dg.mT)
        Dg.diagonal(dim1=1, dim2=2).add_(lam)
        self.Rc = chol(Dg)
        # R_c⁻¹ Φ̃ᵀ (k, d̃, n), and Ỹ = R⁻¹ W (p × n): block c = R_c⁻¹ Φ̃ᵀ diag(π_:c); solved as
        # Φ̃ R_c⁻ᵀ, whose column-major LAPACK result transposes to row-major blocks without a copy
        X = torch.linalg.solve_triangular(self.Rc.mT, Phi.expand(k, n, d), upper=True, left=False)
        self.Y = X.mT.contiguous()
        self.Yt = (self.Y * pi.T[:, None, :]).reshape(k * d, n)
        C = gram(self.Yt).neg_()
        C.diagonal().add_(1.0)
        self.Rn = chol(C)
        self.F: Tensor | None = None  # R_C⁻¹ Ỹᵀ (n × p), formed when first needed
        self.pre32: tuple[Tensor, ...] | None = None  # float32 D⁻¹, C⁻¹, Φ̃, π (preconditioning)

    def logdet(self) -> float:
        logdet_d = torch.log(self.Rc.diagonal(dim1=1, dim2=2)).sum()
        return 2.0 * float(logdet_d + torch.log(self.Rn.diagonal()).sum())

    def _r_solve(self, B: Tensor, transpose: bool) -> Tensor:
        """R⁻¹ B (or R⁻ᵀ B) for B (k, d̃, r), R = diag_c(R_c)."""
        R = self.Rc.mT if transpose else self.Rc
        return torch.linalg.solve_triangular(R, B, upper=transpose)

    def solve(self, B: Tensor) -> Tensor:
        """P⁻¹ B = R⁻ᵀ (I + Ỹ C⁻¹ Ỹᵀ) R⁻¹ B for B (r, k, d̃)."""
        r, k, d = B.shape[0], self.k, self.d
        Yt = self.Yt
        z = self._r_solve(B.permute(1, 2, 0), False).reshape(k * d, r)
        z = z + Yt @ torch.cholesky_solve(Yt.T @ z, self.Rn)
        return self._r_solve(z.reshape(k, d, r), True).permute(2, 0, 1)

    def precondition(self, B: Tensor) -> Tensor:
        """≈ P⁻¹ B = D⁻¹B + D⁻¹W C⁻¹ Wᵀ D⁻¹B (B (r, k, d̃)) from explicit D⁻¹ and C⁻¹ and the
        structured W (Wᵀv = Σ_c π_:c ⊙ Φ̃ v_c, W s = [Φ̃ᵀ(π_:c ⊙ s)]_c): a fifth of the memory traffic
        of :meth:`solve`, for the many products of preconditioned CG. The inverses (formed once in
        float64) and Φ̃, π are kept in float32, whose rounding only affects how fast CG converges
        (its residuals are float64): 0.45 instead of 0.70 ms per product at n = 500, k = 10,
        d̃ = 201, the same CG iterations on the digit transfer."""
        if getattr(self, "pre32", None) is None:  # (absent from factors saved before it existed)
            inv = (torch.cholesky_inverse(self.Rc), torch.cholesky_inverse(self.Rn), self.Phi, self.pi)
            self.pre32 = tuple(t.float() for t in inv)
        Dinv, Cinv, Phi, pi = self.pre32
        k, d, n, r = self.k, self.d, self.n, B.shape[0]
        u = Dinv @ B.permute(1, 2, 0).float()  # (k, d̃, r)
        Pu = (Phi @ u.permute(1, 0, 2).reshape(d, k * r)).view(n, k, r)
        s = Cinv @ (Pu * pi[:, :, None]).sum(1)  # C⁻¹ Wᵀu: (n, r)
        z = (Phi.T @ (pi[:, :, None] * s[:, None, :]).reshape(n, k * r)).view(d, k, r)
        return (u + Dinv @ z.permute(1, 0, 2)).permute(2, 0, 1).to(B.dtype)  # W s: z

    def blocks(self, Phi_x: Tensor | None = None) -> Tensor:
        """S_i[c, c'] = δ_cc' ‖y_ic‖² + e_icᵀ e_ic', y_ic = R_c⁻¹ φ̃_i, e_ic = R_C⁻¹ Ỹ_cᵀ y_ic: (m, k, k);
        ``None``: at the training points (their y are kept from the factorisation)."""
        k, d, n = self.k, self.d, self.n
        if self.F is None:
            self.F = torch.linalg.solve_triangular(self.Rn, self.Yt.T, upper=False)
        Fc = self.F.reshape(n, k, d).permute(1, 0, 2)  # (k, n, d̃), strided: bmm reads it as is
        m = n if Phi_x is None else Phi_x.shape[0]
        out = []
        for s in _chunks(m, 2 * k * n + k * d):
            if Phi_x is None:
                y = self.Y[:, :, s]
            else:
                rhs = Phi_x[s].T.expand(k, d, s.stop - s.start)
                y = torch.linalg.solve_triangular(self.Rc, rhs, upper=False)
            E = torch.bmm(y.mT, Fc.mT).transpose(0, 1)  # (m, k, n), each (k × n) row-major
            S = E @ E.mT
            S.diagonal(dim1=1, dim2=2).add_(y.square().sum(1).T)
            out.append(S)
        return torch.cat(out)


def flops(n: int, k: int, d: int, softmax: bool, m: int = 0) -> tuple[float, float]:
    """(flops of one factorisation plus S blocks at the n training points, flops of S blocks at
    m test points): the cost model of :func:`fntk.classify.cost.last_layer_plan`."""
    p = k * d
    if softmax:
        fact = 2 * k * n * d * d + k * d**3 / 3 + k * d * d * n + 2 * n * n * p + n**3 / 3 + n * n * p
        per = k * d * d + 2 * k * n * d + 2 * k * k * n
    else:
        fact = k * (k + 1) * n * d * d + p**3 / 3 + 2 * p**3 / 3
        per = 2 * k * k * d * d
    return fact + n * per, m * per


def memory_numbers(n: int, k: int, d: int, softmax: bool) -> int:
    """float64 numbers a factorisation keeps (the cost model's memory test)."""
    p = k * d
    if softmax:
        return k * d * d + 2 * n * p + 2 * n * n + n * k * k
    return 3 * p * p + n * k * k


__all__ = ["kron_ggn", "KronFactor", "SoftmaxFactor", "flops", "memory_numbers"]
