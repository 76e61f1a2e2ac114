"""Worker functions run in spawned processes by tests/test_distributed.py (gloo, loopback)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def _init(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only; the default interface may not route
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )


def kernels(lin, x1, x2) -> dict:
    """fntk.ntk in every output mode, x2 = x1 and x2 != x1 (rows sharded under distributed)."""
    import fntk

    return {
        "ntk_full": fntk.ntk(lin, x1, x2),
        "ntk_sym": fntk.ntk(lin, x1),
        "ntk_indep": fntk.ntk(lin, x1, outputs="independent"),
        "ntk_out0": fntk.ntk(lin, x1[:1], x2, outputs=0),  # one point: a rank with no rows
    }


def first_order(lin, x, r: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """f(x), J V, J(x) and Jᵀ U for r random columns V, U drawn from g: (results, V)."""
    V = torch.randn(lin.num_params, r, generator=g, dtype=torch.float64)
    res = {"forward": lin.forward(x), "jvp": lin.jvp(x, V), "jacobian": lin.jacobian(x)}
    U = torch.randn(*res["forward"].shape, r, generator=g, dtype=torch.float64)
    res["vjp"] = lin.vjp(x, U)
    return res, V


def all_products(model, x1, x2) -> dict:
    """Every product of Linearized and the operators, and :func:`kernels`, with fixed random
    tangents (a generator seeded 3): what the ranks compute and the single-process reference."""
    import fntk

    lin = fntk.Linearized(model)
    g = torch.Generator().manual_seed(3)
    res, _ = first_order(lin, x1, 5, g)
    K = fntk.NTKOperator(lin, x1, x2)
    W = torch.randn(K.shape[1], 3, generator=g, dtype=torch.float64)
    res["ntk_matmul"] = K @ W
    res["ntk_diag"] = fntk.NTKOperator(lin, x1).diagonal()
    res["ntk_dense"] = K.to_dense()
    res.update(kernels(lin, x1, x2))
    return res


def dict_case():
    """The Hugging Face-style text transformer of tests/zoo.py on dict batches (int64 ids and
    padding masks), with labels."""
    from zoo import DictTextClassifier, TextConfig, text_batch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DictTextClassifier(TextConfig()).to(torch.float64).eval()
    return model, text_batch(g, 7), text_batch(g, 4), torch.tensor([0, 1, 2, 0, 1, 2, 1])


def dict_products(model, x1, x2, y) -> dict:
    """Products, kernels, a GGN product and a classifier on dict inputs (7 rows: 4 + 3 per rank)."""
    import fntk
    from fntk.likelihoods import Categorical

    lin = fntk.Linearized(model)
    g = torch.Generator().manual_seed(3)
    res, V = first_order(lin, x1, 3, g)
    K = fntk.NTKOperator(lin, x1, x2)
    res["ntk_matmul"] = K @ torch.randn(K.shape[1], 2, generator=g, dtype=torch.float64)
    res["ntk_full"] = fntk.ntk(lin, x1, x2)
    res["ntk_one"] = fntk.ntk(lin, {k: v[:1] for k, v in x1.items()}, x2, outputs=0)  # a rank with no rows
    res["ggn"] = fntk.GGNOperator(lin, x1, Categorical(), y=y) @ V
    clf = fntk.LinearizedClassifier(model, inference="laplace", prior_precision=2.0).fit(x1, y)
    res["proba"] = clf.predict_proba(x2)
    return res


def dict_inputs(rank: int, world: int, port: int, out: str, case: str) -> None:
    """:func:`dict_products` on every rank, saved by rank 0; then rank 1 changes one key's
    values, and every rank must refuse it naming that key."""
    _init(rank, world, port)
    try:
        model, x1, x2, y = dict_case()
        res = dict_products(model, x1, x2, y)
        if rank == 0:
            torch.save(res, out)
        import fntk

        bad = dict(x1, attention_mask=x1["attention_mask"].clone())
        if rank == 1:
            bad["attention_mask"][0, -1] = 1 - bad["attention_mask"][0, -1]
        _save_refusal(lambda: fntk.Linearized(model).forward(bad), out, rank)
    finally:
        _finish()
    _exit_ok()


def _save_refusal(call, out: str, rank: int) -> None:
    """Run call(); the message of the ValueError it raises goes to the file ``{out}.{rank}``."""
    try:
        call()
    except ValueError as err:
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(str(err))


def _finish() -> None:
    """Wait for every rank before tearing the group down (gloo aborts a rank whose peer has
    already destroyed its side mid-teardown)."""
    dist.barrier()
    dist.destroy_process_group()


def _exit_ok() -> None:
    """End a worker that succeeded without interpreter finalization: gloo's C++ threads can
    outlive destroy_process_group and, destroyed during finalization, abort the process now and
    then ("terminate called without an active exception", SIGABRT), failing a run whose results
    are already saved. Only reached on success, so exceptions still reach spawn."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def products(rank: int, world: int, port: int, out: str, case: str) -> None:
    """Every product of Linearized and the operators, saved by rank 0."""

    from models import make

    _init(rank, world, port)
    try:
        res = all_products(*make(case))
        if rank == 0:
            torch.save(res, out)
    finally:
        _finish()
    _exit_ok()


def mismatched(rank: int, world: int, port: int, out: str, case: str) -> None:
    """Ranks pass different x: every rank must raise the same clear ValueError."""
    import fntk

    from models import make

    _init(rank, world, port)
    try:
        model, x1, _ = make(case)
        _save_refusal(lambda: fntk.Linearized(model).forward(x1 + rank), out, rank)
    finally:
        _finish()
    _exit_ok()


def failing(rank: int, world: int, port: int, out: str, case: str) -> None:
    """Rank 1 raises mid-way while rank 0 waits in a collective."""
    import fntk

    from models import make

    _init(rank, world, port)
    model, x1, _ = make(case)
    lin = fntk.Linearized(model)
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    lin.vjp(x1, torch.ones(x1.shape[0], 1, dtype=torch.float64))


def inference_results(space: str) -> dict:
    """NTKRegressor (fixed and learned hyperparameters) and LinearizedClassifier results."""
    import fntk

    from models import make, tanh_mlp

    torch.manual_seed(0)
    model, x1, x2 = make("mlp")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(24, generator=g, dtype=torch.float64)
    fixed = fntk.NTKRegressor(model, space=space, noise=0.05, optimize=False).fit(x, y)
    post_fixed = fixed.predict(x2)
    reg = fntk.NTKRegressor(model, space=space).fit(x, y)
    post = reg.predict(x2)
    torch.manual_seed(1)
    clf_net = tanh_mlp(k=3).double()
    labels = torch.randint(0, 3, (24,), generator=g)
    clf = fntk.LinearizedClassifier(clf_net, inference="laplace", prior_precision=1.0).fit(x, labels)
    # the `space` case also picks the MAP solver and the VI family of two more classifiers
    extra = dict(solver="lbfgs", batch_size=7) if space == "weight" else dict(vi_family="meanfield")
    other = fntk.LinearizedClassifier(
        clf_net, inference="map" if space == "weight" else "vi", prior_precision=1.0, **extra
    ).fit(x, labels)
    return {
        "fixed_mean": post_fixed.mean,
        "fixed_variance": post_fixed.variance,
        "fixed_lml": torch.as_tensor(fixed.log_marginal_likelihood()),
        "mean": post.mean,
        "variance": post.variance,
        "lml": torch.as_tensor(reg.log_marginal_likelihood()),
        "proba": clf.predict_proba(x2),
        "proba_other": other.predict_proba(x2),
    }


def inference(rank: int, world: int, port: int, out: str, space: str) -> None:
    _init(rank, world, port)
    try:
        res = inference_results(space)
        if rank == 0:
            torch.save(res, out)
    finally:
        _finish()
    _exit_ok()
