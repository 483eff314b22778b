"""The ``rp2k`` command line: one subcommand per stage of the pipeline.

Each command group's module (``data``, ``train``, ``ensemble``, ``demo``, ``report``,
``gallery``, ``export``, ``jobs``; ``rp2k serve`` in :mod:`rp2k_dist.serving.command`) holds
its handlers beside its ``add_parser``, and every
flag that sets a config key goes through one function, :func:`~rp2k_dist.cli.common.run_overrides`
(preset < ``--set`` < flags). The commands turn their arguments into typed objects
(:class:`~rp2k_dist.config.ExperimentConfig`, :class:`~rp2k_dist.config.SweepConfig`) before
calling the library; nothing below this package sees an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import Rp2kError
from ..serving import command as serve
from . import data, demo, ensemble, export, gallery, jobs, report, train
from .common import add_run_options, error_lines, load_experiment, run_overrides
from .jobs import add_jobs_parser, add_submit_parser

__all__ = ["add_jobs_parser", "add_run_options", "add_submit_parser", "build_parser", "error_lines",
           "load_experiment", "main", "run_overrides"]

#: The command groups, in the order ``rp2k --help`` lists their commands.
GROUPS = (data, train, ensemble, demo, report, gallery, export, jobs, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rp2k", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: the command's own (0 on success), 2 for an Rp2kError (printed as its
    message and hint; ``--traceback`` raises it instead), 130 after Ctrl-C. Any other
    exception is a bug and propagates with its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Rp2kError as err:
        if args.traceback:
            raise
        print(error_lines(args.command, err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rp2k {args.command}: interrupted", file=sys.stderr)
        return 130
