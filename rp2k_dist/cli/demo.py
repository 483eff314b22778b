"""``rp2k demo``: its handler and its parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import _positive


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo, run_demo_seeds

    if args.seeds > 1:
        return run_demo_seeds(Path(args.out), range(args.seed, args.seed + args.seeds), args.size, args.address)
    return run_demo(Path(args.out), size=args.size, address=args.address, seed=args.seed)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k demo`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("demo", help="synthetic RP2K -> shards -> training -> evaluation report")
    p.add_argument("--out", default="runs/demo", help="working folder of the demo")
    p.add_argument("--size", choices=["tiny", "small", "default"], default="default",
                   help="dataset size and epochs (tiny: a smoke run of ~1 minute)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every run (initialisation, data order, "
                   "augmentation); the dataset stays the same, so seeds show the training's own spread")
    p.add_argument("--seeds", type=_positive, default=1, metavar="N", help="run the demo for seeds SEED ... SEED+N-1 "
                   "(each in OUT/seed-<s>) and print its figures as mean ± std over them (OUT/seeds.md)")
    p.set_defaults(func=cmd_demo)
