r"""The unsupervised source of ``fntk run unsup``: a SimCLR-style contrastive encoder trained on
MNIST images without their labels.

Model: :class:`fntk.data.nets.DigitEncoder` φ (28x28 digit → 64 features) and, during training
only, a projection head g (ReLU → Linear 64→64 → ReLU → Linear 64→32), as in SimCLR (Chen et al.,
2020). Each step takes a batch of B images, draws two random views of each
(:func:`fntk.data.unsup.augment`), and minimises the NT-Xent loss of z = g(φ(view)) normalised to
the unit sphere: with the 2B views and s_ij = z_iᵀ z_j / τ,

    L = (1 / 2B) Σ_i −log [exp(s_{i,p(i)}) / Σ_{j ≠ i} exp(s_ij)],   p(i) the other view of i's image,

i.e. a (2B − 1)-way classification of each view's partner among the batch. Adam on φ and g; the
projection head is discarded afterwards and the downstream models read φ(x).

The training curve (per epoch: mean loss and the contrastive top-1 accuracy, the fraction of
views whose most similar other view is their partner; both label-free) is kept in a buffer of
the module, so that a cached encoder comes back with its curve (:func:`fntk.experiments.common.cached_state`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fntk import distributed
from fntk.data.nets import DigitEncoder
from fntk.data.unsup import augment, unsupervised_images
from fntk.experiments.common import RunConfig, cached_state, pyplot, save_figure, seeded


class ContrastiveModel(nn.Module):
    """Encoder φ, projection head g and the training curve ``history`` (epochs, 2): mean NT-Xent
    loss and contrastive top-1 accuracy per epoch (zeros until trained)."""

    def __init__(self, epochs: int, dim: int = 64, proj_dim: int = 32):
        super().__init__()
        self.encoder = DigitEncoder(dim)
        self.projection = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        self.register_buffer("history", torch.zeros(epochs, 2))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) → (N, proj_dim) projections g(φ(x)) (not normalised)."""
        return self.projection(self.encoder(x))


def nt_xent(z1: Tensor, z2: Tensor, tau: float) -> tuple[Tensor, float]:
    """NT-Xent loss of two views (B, q) each (see the module doc) and its top-1 accuracy."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    sim = (z @ z.T) / tau
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))  # a view is not its own partner
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    acc = float((sim.argmax(1) == partner).double().mean())
    return F.cross_entropy(sim, partner), acc


def train_contrastive(
    x: Tensor, epochs: int, lr: float, tau: float, batch_size: int, seed: int, label: str = "unsup"
) -> ContrastiveModel:
    """Train a :class:`ContrastiveModel` on images x (N, 1, 28, 28) without labels (see the module
    doc): Adam, ``epochs`` passes of batches of ``batch_size`` (the last incomplete batch is
    dropped), views and batch order from a generator seeded with ``seed``. Returns it in eval mode."""
    model = seeded(seed, lambda: ContrastiveModel(epochs))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    steps = max(x.shape[0] // batch_size, 1)
    bar = tqdm(range(epochs), desc=f"{label} contrastive encoder", leave=False,
               disable=not distributed.is_main())
    model.train()
    for epoch in bar:
        order = torch.randperm(x.shape[0], generator=g)
        loss_sum = acc_sum = 0.0
        for s in range(steps):
            xb = x[order[s * batch_size : (s + 1) * batch_size]]
            loss, acc = nt_xent(model(augment(xb, g)), model(augment(xb, g)), tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, acc_sum = loss_sum + float(loss.detach()), acc_sum + acc
        model.history[epoch] = torch.tensor([loss_sum / steps, acc_sum / steps])
        bar.set_postfix(loss=f"{loss_sum / steps:.4g}", top1=f"{acc_sum / steps:.3f}", refresh=False)
    bar.close()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def source_encoder(cfg: RunConfig, spec: dict, seed: int) -> ContrastiveModel:
    """The contrastive model trained on the unsupervised MNIST images (``spec``: ``epochs``, ``lr``,
    ``tau``, ``batch_size``, ``images`` (None: all of them)); cached in ``cfg.cache``."""
    key = (
        f"unsup_simclr_seed{seed}_n{spec['images'] or 'all'}_e{spec['epochs']}_lr{spec['lr']:g}"
        f"_tau{spec['tau']:g}_b{spec['batch_size']}"
    )

    def train() -> ContrastiveModel:
        x = unsupervised_images(cfg.data, spec["images"])
        return train_contrastive(x, spec["epochs"], spec["lr"], spec["tau"], spec["batch_size"], seed)

    return cached_state(cfg.cache, key, train, ContrastiveModel(spec["epochs"])).eval()


def curve_figure(history: Tensor, out: Path, name: str = "unsup_training_curve.png") -> Path:
    """The training curve: NT-Xent loss and contrastive top-1 accuracy against the epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    epochs = torch.arange(1, history.shape[0] + 1)
    ax.plot(epochs, history[:, 0], color="tab:blue", label="NT-Xent loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, history[:, 1], color="tab:red", label="top-1 partner accuracy")
    ax2.set_ylabel("top-1 partner accuracy (in-batch)", color="tab:red")
    ax.set_title("Contrastive encoder on unlabelled MNIST")
    fig.tight_layout()
    return save_figure(fig, out, name)
