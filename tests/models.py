"""Small test networks covering the cases the library must handle."""

from __future__ import annotations

import torch
from torch import nn


def tanh_mlp(d_in: int = 3, width: int = 16, k: int = 1, depth: int = 2) -> nn.Module:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, k))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + ReLU + MaxPool + Dropout, 8x8 single-channel inputs."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 4, k)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(h.flatten(1)))


class TiedMLP(nn.Module):
    """One hidden Linear layer applied twice (a shared, tied layer)."""

    def __init__(self, d: int = 4, k: int = 1):
        super().__init__()
        self.inp = nn.Linear(d, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, k)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class EmbedNet(nn.Module):
    """Embedding of integer tokens (n, L) + Linear head."""

    def __init__(self, vocab: int = 11, dim: int = 4, L: int = 3, k: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim * L, k)

    def forward(self, t):
        return self.fc(torch.tanh(self.emb(t).flatten(1)))


def make(name: str, dtype=torch.float64, seed: int = 0):
    """(model, x1, x2) for a named case; BatchNorm gets non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        m, shape = tanh_mlp(), (3,)
    elif name == "cnn":
        m, shape = SmallCNN(k=2), (1, 8, 8)
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.data.uniform_(0.5, 1.5)
        m.bn.bias.data.uniform_(-0.2, 0.2)
    elif name == "multi":
        m, shape = tanh_mlp(k=3), (3,)
    elif name == "tied":
        m, shape = TiedMLP(), (4,)
    elif name == "embed":
        m = EmbedNet().to(dtype)
        return m, torch.randint(0, 11, (6, 3), generator=g), torch.randint(0, 11, (5, 3), generator=g)
    else:
        raise KeyError(name)
    m = m.to(dtype)
    x1 = torch.randn(6, *shape, generator=g, dtype=dtype)
    x2 = torch.randn(5, *shape, generator=g, dtype=dtype)
    return m, x1, x2


CASES = ["mlp", "cnn", "multi", "tied", "embed"]
