"""``rp2k umap``, ``rp2k report`` and ``rp2k compare``: their handlers and their parsers."""

from __future__ import annotations

import argparse

from ..run_folder import COMPARE
from ..storage import display


def cmd_umap(args: argparse.Namespace) -> int:
    from ..analysis.umap_plot import embed_and_project, plot_umap, table_location
    from ..run_folder import UMAP_PNG, find_run_dir
    from ..storage import basename, join

    df = embed_and_project(args.run, shards=args.shards, split=args.split, max_samples=args.max_samples or None,
                           seed=args.seed, batch_size=args.batch_size, workers=args.workers)
    run_dir = find_run_dir(args.run)
    png = plot_umap(df, join(args.out or run_dir, UMAP_PNG), f"UMAP of {basename(run_dir)} features, {args.split} split")
    print(f"UMAP of {len(df)} {args.split} images: {display(png)} and {display(table_location(png))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..analysis.report import write_report

    md, html = write_report(args.run, args.out)
    print(f"report: {display(md)}\n        {display(html)} (self-contained)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..analysis.compare import compare_runs
    from ..storage import read_text

    location = compare_runs(args.runs, args.out)
    print(read_text(location))
    print(f"written to {display(location)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k umap``, ``rp2k report`` and ``rp2k compare`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("umap", help="UMAP of a trained model's features coloured by type and shape (paper Fig. 3)")
    p.add_argument("run", help="run folder, checkpoint folder or checkpoint.pt")
    p.add_argument("--shards", help="packed dataset (default: the run's data.shards)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-samples", type=int, default=20000, help="deterministic subsample; 0 = every image")
    p.add_argument("--seed", type=int, default=0, help="subsample and UMAP seed")
    p.add_argument("--out", help="folder for umap.png + umap.parquet (default: the run folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.set_defaults(func=cmd_umap)

    p = sub.add_parser("report", help="Markdown + self-contained HTML report of a run")
    p.add_argument("run", help="run folder (local, or s3://, gs://)")
    p.add_argument("--out", help="output folder, local or a URI (default: RUN/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="several runs side by side with the paper's Table 4")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=COMPARE, help=f"Markdown file, or a folder for {COMPARE} (local or a URI)")
    p.set_defaults(func=cmd_compare)
