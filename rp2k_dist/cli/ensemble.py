"""``rp2k ensemble``: its handler and its parser."""

from __future__ import annotations

import argparse


def cmd_ensemble(args: argparse.Namespace) -> int:
    from ..evaluation.ensemble_eval import evaluate_ensemble

    result = evaluate_ensemble(args.general, args.specialist, args.shards, args.out, args.rule, args.workers,
                               args.mass_threshold)
    print(result.markdown)
    print(f"(e) thresholds: {', '.join(f'{t:.3f}' for t in result.thresholds)} ({result.threshold_source})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k ensemble`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("ensemble", help="route test images to API-Net specialists; write Table 3")
    p.add_argument("general", help="run folder (or checkpoint) of the general ResNet-34")
    p.add_argument("--specialist", action="append", required=True, help="run folder of a specialist (repeatable)")
    p.add_argument("--shards", help="packed dataset (default: the general run's data.shards)")
    p.add_argument("--out", help="output folder (default: the general run's folder)")
    p.add_argument("--rule", choices=["top1", "top5-majority"], default="top1",
                   help="routing of column (d): meta-category of the general top-1 class, or the top-5 majority")
    p.add_argument("--mass-threshold", type=float,
                   help="column (e): route when the general model's probability on a category is at least this "
                        "(default: calibrated on the general run's held-out train images, data.holdout; else 0.5)")
    p.add_argument("--workers", type=int, default=2, help="loader processes")
    p.set_defaults(func=cmd_ensemble)
