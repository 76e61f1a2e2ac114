"""Dense and iterative linear algebra, one implementation each: Cholesky with relative jitter, the PSD
square root, the symmetric Gram matrix, checked CG, Lanczos, L-BFGS and stochastic estimators.
Imports nothing of fntk but its errors."""

from fntk.linalg.cg import check_cg
from fntk.linalg.cholesky import safe_cholesky
from fntk.linalg.estimators import hutchinson_diagonal
from fntk.linalg.gram import gram
from fntk.linalg.lanczos import lanczos_batch, lanczos_root
from fntk.linalg.lbfgs import autograd_evaluate, minimize, polish, run_lbfgs
from fntk.linalg.roots import psd_root

__all__ = [
    "safe_cholesky",
    "psd_root",
    "gram",
    "check_cg",
    "lanczos_batch",
    "lanczos_root",
    "hutchinson_diagonal",
    "minimize",
    "polish",
    "run_lbfgs",
    "autograd_evaluate",
]
