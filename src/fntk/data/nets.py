"""Source-network architectures of the experiments and the pretrained MNIST CNN.

- :class:`LeNet5`: the MNIST CNN whose weights ship in ``pretrained_mnist_lenet5`` (written from its
  README's description; the state_dict keys match exactly). Input (N, 1, 28, 28) in [0, 1], output
  (N, 10) logits.
- :func:`mlp`: fully connected nets such as the sine 1-40-40-1 tanh or the malaria 2-500-500-2 tanh.
- Heteroscedastic Gaussian head: a 2-output net read as (mean, raw variance ρ) with
  variance = softplus(ρ) + min_variance, the convention of
  ``fntk.likelihoods.HeteroscedasticGaussian(link="softplus")`` (:func:`heteroscedastic_mean_var`,
  :func:`heteroscedastic_nll`). (The paper's code used std = softplus(ρ) + 1e-5 instead.)
- :class:`FacesCNN`: the paper's LeNet-style network for 45x45 rotated faces (2 outputs).
- :class:`DigitEncoder`: a small strided CNN mapping MNIST-format digits to a feature vector (the
  unsupervised source of ``fntk run unsup``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fntk.data.paths import data_file

LENET5_FILE = "pretrained_mnist_lenet5/mnist_lenet5_clntrained.pt"
MIN_VARIANCE = 1e-6

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
}


class LeNet5(nn.Module):
    """conv1 (1→32, k3, pad1) → ReLU → MaxPool2d(2) → conv2 (32→64, k3, pad1) → ReLU → MaxPool2d(2)
    → flatten (3136, NCHW order) → linear1 (3136→200) → ReLU → linear2 (200→10).

    648,226 parameters. forward: (N, 1, 28, 28) → (N, 10) logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.linear1 = nn.Linear(64 * 7 * 7, 200)
        self.linear2 = nn.Linear(200, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate activations (N, 200) (input of ``linear2``)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.linear1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.features(x))


def load_pretrained_lenet5(
    root: str | os.PathLike[str] | None = None, map_location: str | torch.device = "cpu"
) -> LeNet5:
    """The pretrained MNIST LeNet5 (advertorch's clean-trained weights, LGPL-3.0), in eval mode.

    Args:
        root: data root (else ``$FNTK_DATA``); reads ``pretrained_mnist_lenet5/mnist_lenet5_clntrained.pt``
            with ``torch.load(..., weights_only=True)``.
        map_location: where to put the weights (the file was saved from a CUDA device).
    """
    path = data_file(LENET5_FILE, root)
    net = LeNet5()
    try:
        net.load_state_dict(torch.load(path, map_location=map_location, weights_only=True), strict=True)
    except Exception as err:  # truncated or corrupt file, or another network's weights
        why = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"the pretrained LeNet-5 file {path} does not load ({why}); restore it from "
                         "its source (see the README in its folder)") from err
    return net.to(map_location).eval()


def mlp(
    widths: Sequence[int],
    activation: str | Callable[[], nn.Module] = "tanh",
    bias: bool = True,
) -> nn.Sequential:
    """A fully connected network: Linear(w0→w1), act, …, Linear(w_{L-1}→w_L) (no final activation).

    Args:
        widths: layer widths including input and output, e.g. ``(1, 40, 40, 1)``.
        activation: a name (``tanh``, ``relu``, ``elu``, ``gelu``, ``sigmoid``, ``softplus``, ``silu``)
            or a zero-argument module factory.
        bias: whether the Linear layers have biases.

    Returns:
        ``nn.Sequential`` mapping (n, widths[0]) → (n, widths[-1]); PyTorch's default initialisation.
    """
    widths = list(widths)
    if len(widths) < 2 or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must list at least an input and an output width >= 1, got {widths}")
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
        act = _ACTIVATIONS[activation]
    else:
        act = activation
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def heteroscedastic_mlp(
    widths: Sequence[int], activation: str | Callable[[], nn.Module] = "tanh"
) -> nn.Sequential:
    """``mlp(list(widths) + [2], activation)``: output column 0 is the mean, column 1 the raw variance.

    E.g. the malaria source net ``heteroscedastic_mlp((2, 500, 500))`` is 2-500-500-2 tanh.
    """
    return mlp(list(widths) + [2], activation)


def heteroscedastic_mean_var(output: Tensor, min_variance: float = MIN_VARIANCE) -> tuple[Tensor, Tensor]:
    """Split a (n, 2) heteroscedastic output into mean (n,) and variance (n,).

    variance = softplus(output[:, 1]) + min_variance.
    """
    if output.ndim != 2 or output.shape[1] != 2:
        raise ValueError(f"heteroscedastic output must be (n, 2), got shape {tuple(output.shape)}")
    return output[:, 0], F.softplus(output[:, 1]) + min_variance


def heteroscedastic_nll(output: Tensor, y: Tensor, min_variance: float = MIN_VARIANCE) -> Tensor:
    """Mean Gaussian negative log-likelihood of y (n,) under a (n, 2) heteroscedastic output.

    Differentiable; use as the training loss of a heteroscedastic net (also accepted as ``loss=`` by
    :func:`fntk.baselines.finetune`).
    """
    y = y.reshape(-1)
    if y.shape[0] != output.shape[0]:
        raise ValueError(f"y has {y.shape[0]} entries but output has {output.shape[0]} rows")
    mean, var = heteroscedastic_mean_var(output, min_variance)
    return 0.5 * (math.log(2 * math.pi) + var.log() + (y - mean).square() / var).mean()


class FacesCNN(nn.Module):
    """The paper's LeNet-style regression net for 45x45 faces.

    conv (1→20, k5) → ReLU → MaxPool(2) → conv (20→50, k5) → ReLU → MaxPool(2) → flatten (3200)
    → linear (3200→500) → ReLU → linear (500→outputs). forward: (N, 1, 45, 45) → (N, outputs);
    with outputs=2 it is a heteroscedastic head (see :func:`heteroscedastic_mean_var`).
    """

    def __init__(self, outputs: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.linear1 = nn.Linear(50 * 8 * 8, 500)
        self.linear2 = nn.Linear(500, outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], 1, 45, 45)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.linear2(F.relu(self.linear1(h.flatten(1))))


class DigitEncoder(nn.Module):
    """conv (1→16, k5, stride 2, pad 2) → ReLU → conv (16→32, k3, s2, p1) → ReLU → conv (32→64, k3,
    s2, p1) → ReLU → flatten (64·4·4 = 1024, NCHW order) → linear (1024→``dim``).

    forward: (N, 1, 28, 28) → (N, dim) features φ(x) (no final nonlinearity). 89,152 parameters for
    dim = 64. Strided convolutions instead of pooling: ≈ 0.66 M multiply-adds per image.
    """

    def __init__(self, dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1)
        self.linear = nn.Linear(64 * 4 * 4, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.linear(h.flatten(1))
