"""``rp2k synth``, ``rp2k pack`` and ``rp2k verify``: their handlers and their parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.metadata import MetadataColumns
from ..errors import ConfigError
from ..storage import display


def _metadata_columns(pairs: list[str] | None) -> MetadataColumns:
    mapping = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--metadata-column wants FACT=COLUMN, got {pair!r}")
        mapping[key.strip()] = value.strip() or None
    return MetadataColumns.from_mapping(mapping)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.synth import SynthConfig, make_synthetic_rp2k

    config = SynthConfig(
        classes=args.classes, images_per_class=args.images_per_class, image_size=args.image_size,
        seed=args.seed, quirks=not args.no_quirks, workers=args.workers,
    )
    summary = make_synthetic_rp2k(args.out, config, progress=True)
    print(f"synthetic RP2K in {summary.root}: {summary.classes} classes, "
          f"{summary.train_images} train + {summary.test_images} test images; metadata {summary.metadata_path}")
    return 0


def find_metadata(source: Path) -> Path | None:
    """``metadata.csv`` / ``metadata.parquet`` at the dataset root, if present."""
    for name in ("metadata.parquet", "metadata.csv"):
        if (source / name).exists():
            return source / name
    return None


def cmd_pack(args: argparse.Namespace) -> int:
    from ..data.pack import PackConfig, pack_dataset
    from ..data.rp2k import scan_rp2k

    source = Path(args.source)
    from ..data.metadata import describe_mapping

    metadata = Path(args.metadata) if args.metadata else find_metadata(source)
    columns = _metadata_columns(args.metadata_column)
    if metadata is not None:
        print("\n".join(describe_mapping(metadata, columns).lines()))
    index = scan_rp2k(source, metadata, columns)
    print(f"scanned {source} ({index.layout} layout): {index.num_classes} classes, "
          f"{len(index.records['train'])} train + {len(index.records['test'])} test files"
          + (f", metadata {metadata}" if metadata else ", no metadata table (meta-categories 'unknown')"))
    for line in index.report.lines():
        print(f"  note: {line}")
    config = PackConfig(
        shorter_side=args.shorter_side, jpeg_quality=args.quality, shard_size_mb=args.shard_size_mb,
        samples_per_shard=args.samples_per_shard, seed=args.seed, workers=args.workers,
    )
    manifest = pack_dataset(index, args.out, config, overwrite=args.overwrite, progress=True)
    for split in manifest.data["splits"]:
        shards = manifest.shards(split)
        size = sum(s.bytes for s in shards) / 1e6
        print(f"{split}: {manifest.num_samples(split)} samples in {len(shards)} shards ({size:.1f} MB)")
    for skip in manifest.data["skipped"]:
        print(f"  skipped {skip['source']}: {skip['reason']}")
    print(f"manifest: {display(manifest.location('dataset.json'))} and index.parquet")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..data.verify import verify_shards

    problems = verify_shards(args.shards, progress=True)
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in {display(args.shards)}; repack with `rp2k pack` (finished shards are kept)")
        return 1
    print(f"{display(args.shards)}: every shard matches its manifest")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k synth``, ``rp2k pack`` and ``rp2k verify`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("synth", help="write a synthetic dataset in RP2K's exact layout")
    p.add_argument("out", help="folder to create (<out>/all/{train,test}/<class>/<image>)")
    p.add_argument("--classes", type=int, default=48)
    p.add_argument("--images-per-class", type=int, default=40, help="mean; sizes are long-tailed")
    p.add_argument("--image-size", type=int, default=160, help="longer side, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quirks", action="store_true", help="a clean tree (no corrupt/empty/one-split classes)")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = all cores")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pack", help="repack an RP2K tree into WebDataset shards + manifest")
    p.add_argument("source", help="RP2K root (holding all/train, all/test) or a plain train/test tree")
    p.add_argument("out", help="output folder or URI for the shards (s3://bucket/prefix, gs://...)")
    p.add_argument("--metadata", help="CSV/Parquet class -> sku/name/brand/type/shape table "
                   "(default: SOURCE/metadata.{parquet,csv} when present)")
    p.add_argument("--metadata-column", action="append", metavar="FACT=COLUMN",
                   help="map a fact (class_folder, sku, name, brand, type, shape, size, flavour) to your column")
    p.add_argument("--shorter-side", type=int, default=320, help="resize at pack time, px (aspect kept)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--shard-size-mb", type=float, default=256.0)
    p.add_argument("--samples-per-shard", type=int, help="fixed count instead of --shard-size-mb")
    p.add_argument("--seed", type=int, default=0, help="sample order inside the shards")
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = all cores")
    p.add_argument("--overwrite", action="store_true", help="replace a different pack in OUT")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("verify", help="re-check every shard against its manifest")
    p.add_argument("shards", help="folder or URI with dataset.json")
    p.set_defaults(func=cmd_verify)
