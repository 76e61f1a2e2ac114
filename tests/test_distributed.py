"""Two gloo ranks on loopback give the single-process results (float64, 1e-10)."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from models import make
from reference import rel_err


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, out, case="mlp", world=2, join=True):
    return mp.spawn(fn, args=(world, _port(), str(out), case), nprocs=world, join=join)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_two_ranks_match_single_process(tmp_path, case):
    out = tmp_path / "res.pt"
    _spawn(dist_worker.products, out, case)
    got = torch.load(out, weights_only=True)
    ref = dist_worker.all_products(*make(case))
    for key, value in ref.items():
        assert rel_err(got[key], value) <= 1e-10, key


def test_dict_inputs_under_two_ranks_match_single_process(tmp_path):
    """Dict batches (int64 ids and padding masks) are sharded by rows under two ranks: products,
    kernels, a GGN product and a Laplace classifier give the single-process numbers, and a key
    that differs between ranks is named on every rank."""
    out = tmp_path / "dict.pt"
    _spawn(dist_worker.dict_inputs, out)
    got = torch.load(out, weights_only=True)
    ref = dist_worker.dict_products(*dist_worker.dict_case())
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert rel_err(got[key], value) <= 1e-10, key
    for r in (0, 1):
        msg = (tmp_path / f"dict.pt.{r}").read_text()
        assert "x['attention_mask'] differs between ranks" in msg, msg


def test_mismatched_inputs_are_reported_on_every_rank(tmp_path):
    out = tmp_path / "err"
    _spawn(dist_worker.mismatched, out)
    for r in (0, 1):
        assert "differs between ranks" in (tmp_path / f"err.{r}").read_text()


def test_failing_rank_ends_the_group_quickly(tmp_path):
    """Rank 1 raises while rank 0 waits in an all-reduce: the group ends with an error, no hang.

    Whichever rank's failure is reported first wins the race: rank 1's own exception, or rank 0's
    collective failing because its peer closed the connection.
    """
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:  # torch.multiprocessing.ProcessRaisedException or ...Exited...
        _spawn(dist_worker.failing, tmp_path / "x")
    assert time.monotonic() - t0 < 60
    msg = str(info.value)
    assert "deliberate failure on rank 1" in msg or "process 0" in msg or "Connection" in msg, msg


@pytest.mark.parametrize("space", ["function", "weight"])
def test_regressor_and_classifier_under_two_ranks(tmp_path, space):
    out = tmp_path / "inf.pt"
    _spawn(dist_worker.inference, out, space)
    got = torch.load(out, weights_only=True)
    ref = dist_worker.inference_results(space)
    for key, value in ref.items():
        # learned hyperparameters: the optimiser amplifies the last-bit differences of sums taken
        # in another order across shards, so those agree to 1e-6 rather than 1e-10
        tol = 1e-6 if key in ("mean", "variance", "lml") else 1e-10
        assert rel_err(got[key], value) <= tol, (key, rel_err(got[key], value))


def test_cli_under_torchrun_matches_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m fntk run linearity --quick` gives the single-process
    numbers, exits 0 and closes its process group (no teardown warning from torch)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "fntk", "run", "linearity", "--quick", "--out"]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_port()),
            *run[1:],
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert "destroy_process_group" not in two.stderr
    one = subprocess.run([*run, str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    got, ref = (json.loads((tmp_path / d / "results.json").read_text())["summary"] for d in ("two", "one"))
    assert len(got) == len(ref) == 6
    for g, r in zip(got, ref):
        for key, value in r.items():
            if isinstance(value, float):
                assert abs(g[key] - value) <= 1e-8 * (1 + abs(value)), key
            else:
                assert g[key] == value, key
