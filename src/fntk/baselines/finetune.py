"""Fine-tuning baselines: :func:`finetune` and
:func:`finetune_cv`, Adam on a deep copy of the model (the given model is never modified), and
the helpers the last-layer logistic regression shares (last parametrised module, k-fold splits).

Shapes: n training points.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fntk.linearize import select

LossSpec = str | Callable[[Tensor, Tensor], Tensor]
ParamSpec = str | Iterable[str] | Callable[[str, Tensor], bool]


def last_module(model: nn.Module) -> str:
    last = None
    for name, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError("the model has no trainable parameters")
    return last


def last_layer_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the last module (in ``named_modules`` order) owning trainable
    parameters, e.g. ``["linear2.weight", "linear2.bias"]`` for LeNet5."""
    last = last_module(model)
    prefix = f"{last}." if last else ""
    return [
        f"{prefix}{n}"
        for n, p in model.get_submodule(last).named_parameters(recurse=False)
        if p.requires_grad
    ]


def _selected(model: nn.Module, params: ParamSpec) -> list[str]:
    """"all" (every trainable parameter), "last" (:func:`last_layer_names`), or a selection as
    :class:`~fntk.Linearized` takes it (names or a predicate; :func:`fntk.linearize.select`)."""
    if params == "all":
        return select(model, None)
    if params == "last":
        return last_layer_names(model)
    if isinstance(params, str):
        raise ValueError(f"params must be 'all', 'last', names or a predicate, got {params!r}")
    return select(model, params)


def _loss_fn(loss: LossSpec) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    if loss == "mse":

        def mse(out: Tensor, y: Tensor) -> Tensor:
            if out.ndim == 2 and out.shape[1] == 1 and y.ndim == 1:
                out = out[:, 0]
            if out.shape != y.shape:
                raise ValueError(f"mse: output {tuple(out.shape)} and y {tuple(y.shape)} differ")
            return (out - y).square().mean()

        return mse
    if loss == "ce":

        def ce(out: Tensor, y: Tensor) -> Tensor:
            return nn.functional.cross_entropy(out, y)

        return ce
    raise ValueError(f"loss must be 'mse', 'ce' or a callable(output, y) -> scalar, got {loss!r}")


def _prepare_xy(model: nn.Module, x: Tensor, y: Tensor, loss: LossSpec) -> tuple[Tensor, Tensor]:
    ref = next(model.parameters())
    x = torch.as_tensor(x).to(ref.device, ref.dtype if torch.as_tensor(x).is_floating_point() else None)
    y = torch.as_tensor(y).to(ref.device)
    if loss == "ce":
        if y.dtype.is_floating_point or y.ndim != 1:
            raise ValueError(f"loss='ce' needs integer labels of shape (n,), got {tuple(y.shape)} {y.dtype}")
        y = y.long()
    elif y.is_floating_point():
        y = y.to(ref.dtype)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} points but y has {y.shape[0]}")
    return x, y


def _train(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    names: list[str],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    batch_size: int | None,
    train_mode: bool,
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """Adam on the selected parameters of ``net`` (in place); ``on_epoch(epoch, mean_loss)`` after each."""
    chosen = set(names)
    for n, p in net.named_parameters():
        p.requires_grad_(n in chosen)
    params = [p for n, p in net.named_parameters() if n in chosen]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    bs = n if batch_size is None or batch_size >= n else int(batch_size)
    g = torch.Generator().manual_seed(int(seed))
    net.train(train_mode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n, generator=g).to(x.device) if bs < n else None
            total = 0.0
            for start in range(0, n, bs):
                idx = order[start : start + bs] if order is not None else slice(None)
                opt.zero_grad(set_to_none=True)
                value = loss_fn(net(x[idx]), y[idx])
                value.backward()
                opt.step()
                total += float(value.detach()) * (min(start + bs, n) - start)
            if on_epoch is not None:
                on_epoch(epoch, total / n)


def finetune(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    params: ParamSpec = "all",
    loss: LossSpec = "mse",
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    train_mode: bool = False,
    history: list[float] | None = None,
) -> nn.Module:
    """Fine-tune a copy of ``model`` with Adam; the given model is left untouched.

    Args:
        model: the source network (any ``nn.Module``).
        x: (n, *input_shape) inputs.
        y: targets: (n,) or (n, k) floats for ``"mse"``; (n,) integer labels for ``"ce"``.
        params: ``"all"`` trainable parameters, ``"last"`` (the last module with parameters, see
            :func:`last_layer_names`), an iterable of parameter names, or a predicate (name, p).
        loss: ``"mse"``, ``"ce"`` (cross-entropy on logits) or a callable ``(output, y) -> scalar``
            (e.g. :func:`fntk.data.nets.heteroscedastic_nll`).
        epochs: passes over the data (one Adam step each when full batch).
        lr, weight_decay: Adam's learning rate and L2 penalty.
        seed: seeds batch order and (with ``train_mode``) dropout; the global RNG is not disturbed.
        batch_size: ``None`` (full batch, the default for small n) or a mini-batch size.
        train_mode: run the copy in train mode (dropout, batch statistics); default eval mode, the
            project's convention (BatchNorm uses running statistics).
        history: if given, the mean training loss of every epoch is appended to it.

    Returns:
        A new module (deep copy) with the fine-tuned parameters, in the original's train/eval
        mode and ``requires_grad`` flags, with no ``.grad``.
    """
    net = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    names = _selected(net, params)
    x, y = _prepare_xy(net, x, y, loss)
    record = (lambda e, v: history.append(v)) if history is not None else None
    _train(net, x, y, names, _loss_fn(loss), epochs, lr, weight_decay, seed, batch_size, train_mode, record)
    for n, p in net.named_parameters():
        p.requires_grad_(flags[n])
        p.grad = None
    return net.train(model.training)


def kfold_splits(n: int, folds: int, seed: int, y: Tensor | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-fold splits; for labels y, stratified with k = min(folds, smallest class count) when that
    is at least 2, else plain shuffled k-fold."""
    from sklearn.model_selection import KFold, StratifiedKFold

    k = min(folds, n)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 points, got {n}")
    if y is not None and not y.dtype.is_floating_point:
        counts = torch.bincount(y.cpu())
        smallest = int(counts[counts > 0].min())
        if smallest >= 2:
            strat = StratifiedKFold(min(k, smallest), shuffle=True, random_state=seed)
            return list(strat.split(np.zeros(n), y.cpu().numpy()))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(n)))


def finetune_cv(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    params: ParamSpec = "all",
    loss: LossSpec = "ce",
    lrs: Sequence[float] = (1e-4, 1e-3, 1e-2),
    epochs: Sequence[int] = (10, 30, 100),
    weight_decay: float = 0.0,
    folds: int = 3,
    seed: int = 0,
    batch_size: int | None = None,
    metric: Callable[[Tensor, Tensor], float] | None = None,
) -> tuple[nn.Module, dict]:
    """:func:`finetune` with the learning rate and number of epochs chosen by k-fold cross-validation.

    For every fold and learning rate one run of ``max(epochs)`` epochs is made, scored on the
    held-out fold after each epoch count in ``epochs`` (so the grid costs folds·len(lrs)·max(epochs)
    epochs). The pair with the lowest mean held-out score is refit on all the data.

    Args:
        metric: held-out score ``(output, y) -> float``, lower is better (default: the loss itself,
            i.e. mean cross-entropy / MSE). Diverged runs (non-finite scores) count as +inf.
        folds: k (reduced to n when n < k); stratified when every class has at least k items.
        Other arguments as :func:`finetune`.

    Returns:
        ``(model, info)`` with ``info = {"lr", "epochs", "scores": {(lr, epochs): mean score}}``.
    """
    epochs = sorted({int(e) for e in epochs})
    net0 = copy.deepcopy(model)
    names = _selected(net0, params)
    xx, yy = _prepare_xy(net0, x, y, loss)
    loss_fn = _loss_fn(loss)
    score_fn = metric or (lambda out, t: float(loss_fn(out, t)))
    scores: dict[tuple[float, int], list[float]] = {(lr, e): [] for lr in lrs for e in epochs}
    for f, (tr, va) in enumerate(kfold_splits(xx.shape[0], folds, seed, yy if loss == "ce" else None)):
        tr_t, va_t = torch.as_tensor(tr, device=xx.device), torch.as_tensor(va, device=xx.device)
        for lr in lrs:
            net = copy.deepcopy(net0)

            def check(epoch: int, _v: float, net=net, lr=lr, va_t=va_t) -> None:
                if epoch in epochs:
                    net.eval()
                    with torch.no_grad():
                        s = score_fn(net(xx[va_t]), yy[va_t])
                    scores[(lr, epoch)].append(s if math.isfinite(s) else math.inf)
                    net.train(False)

            _train(
                net,
                xx[tr_t],
                yy[tr_t],
                names,
                loss_fn,
                epochs[-1],
                lr,
                weight_decay,
                seed + f,
                batch_size,
                False,
                check,
            )
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    best = min(mean, key=lambda k: (mean[k], k[1], -k[0]))
    tuned = finetune(model, x, y, params, loss, best[1], best[0], weight_decay, seed, batch_size)
    return tuned, {"lr": best[0], "epochs": best[1], "scores": mean}
