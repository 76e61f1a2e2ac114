"""What users compare linearized adaptation with: fine-tuning, last-layer logistic regression,
ABLR, and an ARD RBF-kernel GP on the target data only (multi-start evidence), one module each.

Fine-tuning (:func:`finetune`, :func:`finetune_cv`) always works on a deep copy: the given model is
never modified. Classification baselines: :func:`last_layer_logreg` on :func:`penultimate_features`.
Regression baselines return a :class:`GaussianPrediction` (latent mean and variance plus the
observation-noise variance): :class:`ABLR` (Perrone et al., 2018) and :func:`rbf_gp`.

Shapes: n training points, m test points, d input features, D ABLR features, C classes.
"""

from fntk.baselines.bayesian import ABLR, GaussianPrediction, blr_log_marginal_likelihood, blr_predict
from fntk.baselines.finetune import LossSpec, ParamSpec, finetune, finetune_cv, last_layer_names
from fntk.baselines.gp import rbf_gp
from fntk.baselines.logreg import LogRegFit, last_layer_logreg, penultimate_features

__all__ = [
    "ABLR",
    "GaussianPrediction",
    "LogRegFit",
    "LossSpec",
    "ParamSpec",
    "blr_log_marginal_likelihood",
    "blr_predict",
    "finetune",
    "finetune_cv",
    "last_layer_logreg",
    "last_layer_names",
    "penultimate_features",
    "rbf_gp",
]
