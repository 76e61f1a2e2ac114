"""The ``fntk`` command line: ``fntk demo``, ``fntk run EXPERIMENT``, ``fntk bench``.

Works under ``torchrun`` (``torchrun --nproc-per-node 2 -m fntk run malaria``): the process group
is initialised from torchrun's environment, the data rows are sharded across ranks, and rank 0
alone prints and writes files.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch.distributed as dist

from fntk import distributed, experiments
from fntk.experiments import EXPERIMENTS
from fntk.experiments.common import RunConfig

#: errors that are the user's (paths, permissions, unreadable or corrupt files, bad values): one
#: line on stderr and exit code 2; anything else is a bug and keeps its traceback
USER_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


def _config(args: argparse.Namespace):
    out = Path(args.out) if args.out else Path("results") / args.experiment
    data = Path(args.data) if args.data else None
    cfg = RunConfig(out=out, data=data, seed=args.seed, quick=args.quick)
    cfg.check()  # before anything is trained: --out, the cache and --data are usable folders
    return cfg


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    module = experiments.load(args.experiment)
    module.run(cfg)
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.experiment = "sine"
    args.out = args.out or "results/demo"
    args.data, args.seed = None, args.seed
    return _run(args)


def _bench(args: argparse.Namespace) -> int:
    args.experiment, args.data = "speed", None
    args.out = args.out or "results/bench"
    return _run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fntk", description="Analytic transfer through linearized networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: sine-wave transfer, a table and a figure")
    demo.add_argument("--out", default=None, help="output folder (default results/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="fewer tasks and seeds")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    run.add_argument("--out", default=None, help="output folder (default results/EXPERIMENT)")
    run.add_argument("--data", default=None, help="folder laid out like shared/data (default: $FNTK_DATA)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quick", action="store_true", help="a reduced run (seconds to a minute)")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="kernel/product/inference speed versus baselines")
    bench.add_argument("--out", default=None, help="output folder (default results/bench)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--quick", action="store_true", help="a reduced grid in under a minute")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ours = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if ours:
        distributed.init()
    ok = False
    try:
        code = int(args.func(args))
        ok = True
        return code
    except USER_ERRORS as err:
        # expected user errors (missing data path, bad option, corrupt file): one line, no traceback
        if distributed.is_main():
            print(f"fntk: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if distributed.is_main():
            print("fntk: interrupted (files already written are complete: fntk writes atomically)",
                  file=sys.stderr)
        return 130
    finally:
        if ours:  # a group we opened is closed cleanly (torch warns, gloo may abort, otherwise)
            distributed.shutdown(ok)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
