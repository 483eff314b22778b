"""``rp2k predict``, ``rp2k embed``, ``rp2k gallery build|add`` and ``rp2k openset``: their
handlers and their parsers."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..storage import display
from .common import _ray_init


def _print_rejected(rejected: list[dict[str, str]], out: str = "") -> None:
    for problem in rejected[:20]:
        print(f"  rejected {problem['path']}: {problem['reason']}")
    if len(rejected) > 20:
        print(f"  ... and {len(rejected) - 20} more" + (f" (rows with an 'error' in {display(out)})" if out else ""))


def cmd_embed(args: argparse.Namespace) -> int:
    from ..evaluation.embeddings import embed_source, embed_source_ray, write_embeddings

    if args.ray:
        _ray_init(args.address)
        embedded = embed_source_ray(args.checkpoint, args.source, args.split, args.batch_size, args.actors,
                                    args.gpus_per_actor, args.label)
    else:
        embedded = embed_source(args.checkpoint, args.source, args.split, args.batch_size, args.workers, args.label)
    out = write_embeddings(embedded, args.out)
    dim = len(embedded.table["embedding"].iloc[0]) if len(embedded.table) else 0
    print(f"{len(embedded.table)} embeddings ({dim}-d, unit norm, model {embedded.model_id}), "
          f"{len(embedded.rejected)} files rejected -> {display(out)}")
    _print_rejected(embedded.rejected)
    return 0


def cmd_gallery_build(args: argparse.Namespace) -> int:
    from ..evaluation.gallery_build import build_gallery

    built = build_gallery(args.checkpoint, args.source, args.out, split=args.split, per_class=args.per_class,
                          index=args.index, nlist=args.nlist, nprobe=args.nprobe, threshold=args.threshold,
                          tar=args.tar, batch_size=args.batch_size, workers=args.workers, score=args.score)
    info = built.gallery.manifest()
    threshold = "none (every query gets its best SKU)" if info["threshold"] is None else \
        f"{info['threshold']:.4f}, {info['threshold_source']}"
    score = info["score"] + (f" (k={info['k']})" if info["k"] else "")
    print(f"gallery {display(built.location)}: {info['vectors']} vectors of {info['skus']} SKUs, "
          f"{info['index']['kind']} index, model {info['model_id']}\nthreshold: {threshold}\n"
          f"open-set score: {score}, {info['score_source']}")
    _print_rejected(built.rejected)
    return 0


def cmd_gallery_add(args: argparse.Namespace) -> int:
    from ..evaluation.gallery_build import add_to_gallery

    gallery, added, rejected = add_to_gallery(args.gallery, args.images, args.label, args.checkpoint,
                                              args.batch_size, args.workers)
    print(f"added {added} images of {args.label!r} to {display(args.gallery)}: now {len(gallery)} vectors of "
          f"{len(set(gallery.skus))} SKUs")
    _print_rejected(rejected)
    return 0


def cmd_openset(args: argparse.Namespace) -> int:
    from ..evaluation.openset import evaluate_openset
    from ..run_folder import OPENSET, OPENSET_TABLE, find_run_dir
    from ..storage import join

    result = evaluate_openset(args.run, shards=args.shards, out=args.out, seen_shots=args.seen_shots, tar=args.tar,
                              batch_size=args.batch_size, workers=args.workers)
    where = args.out or find_run_dir(args.run)
    print(f"unseen classes: {', '.join(c['name'] for c in result.unseen)}")
    print(result.full_markdown())
    print(f"threshold {result.threshold:.4f}: {result.threshold_source}")
    print(f"written to {display(join(where, OPENSET))} and {display(join(where, OPENSET_TABLE))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..evaluation.predict import predict_folder, predict_folder_ray

    if args.gallery:
        from ..evaluation.gallery_build import predict_with_gallery

        if args.specialist or args.ray:
            raise ConfigError("--gallery answers from the gallery alone: leave out --specialist and --ray")
        summary = predict_with_gallery(args.checkpoint, args.folder, args.gallery, args.out,
                                       batch_size=args.batch_size, workers=args.workers)
        print(f"{summary.images} images answered from the gallery ({summary.unknown} unknown), "
              f"{len(summary.rejected)} files rejected -> {display(summary.out)}")
        _print_rejected(summary.rejected, summary.out)
        return 0
    common = dict(specialists=args.specialist or [], rule=args.rule, batch_size=args.batch_size)
    if args.ray:
        _ray_init(args.address)
        summary = predict_folder_ray(args.checkpoint, args.folder, args.out, actors=args.actors,
                                     num_gpus=args.gpus_per_actor, **common)
    else:
        summary = predict_folder(args.checkpoint, args.folder, args.out, workers=args.workers, **common)
    print(f"{summary.images} images predicted, {len(summary.rejected)} files rejected -> {display(summary.out)}")
    for problem in summary.rejected[:20]:
        print(f"  rejected {problem['path']}: {problem['reason']}")
    if len(summary.rejected) > 20:
        print(f"  ... and {len(summary.rejected) - 20} more (rows with an 'error' in {display(summary.out)})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k predict``, ``rp2k embed``, ``rp2k gallery build|add`` and ``rp2k openset`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("predict", help="top-5 SKUs for every image file under a folder")
    p.add_argument("checkpoint", help="general model: run folder, checkpoint folder or checkpoint.pt")
    p.add_argument("folder", help="folder of images (searched recursively; other files are reported)")
    p.add_argument("--out", required=True, help="output table: .parquet, .csv or .json")
    p.add_argument("--specialist", action="append", metavar="CHECKPOINT",
                   help="an API-Net specialist (trained with data.meta_category) for the ensemble; repeatable")
    p.add_argument("--rule", choices=["top1", "top5-majority"], default="top1", help="ensemble routing rule")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding threads (without --ray)")
    p.add_argument("--ray", action="store_true", help="Ray Data batch inference (large folders, several GPUs)")
    p.add_argument("--address", help="Ray cluster address with --ray (default: start a local Ray)")
    p.add_argument("--actors", type=int, default=2, help="model replicas with --ray")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--gallery", help="answer a gallery's SKU or 'unknown' (rp2k gallery build) instead of top-5 classes")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", help="L2-normalised embeddings of a packed split or an image folder -> Parquet")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or checkpoint.pt")
    p.add_argument("source", help="packed dataset (folder with dataset.json) or a folder of images (<label>/<image>)")
    p.add_argument("--out", required=True, help="output Parquet file (local or a URI)")
    p.add_argument("--split", default="test", help="split of a packed dataset")
    p.add_argument("--label", help="label of every image of an image folder (default: its sub-folder name)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding threads (without --ray)")
    p.add_argument("--ray", action="store_true", help="Ray Data batch inference over the shards or files")
    p.add_argument("--address", help="Ray cluster address with --ray (default: start a local Ray)")
    p.add_argument("--actors", type=int, default=2, help="model replicas with --ray")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("gallery", help="a searchable SKU gallery of embeddings (FAISS): build, add")
    gallery = p.add_subparsers(dest="gallery_command", required=True, metavar="{build,add}")
    q = gallery.add_parser("build", help="embed a packed split or <sku>/<image> folders into a gallery")
    q.add_argument("checkpoint", help="run folder, checkpoint folder or checkpoint.pt")
    q.add_argument("source", help="packed dataset or a folder of <sku>/<image>")
    q.add_argument("--out", required=True, help="gallery folder (local or a URI)")
    q.add_argument("--split", default="train", help="split of a packed dataset (train: less the validation share)")
    q.add_argument("--per-class", type=int, default=0, help="images per SKU, the first by a hash of the key; 0 = all")
    q.add_argument("--index", choices=["auto", "flat", "ivf"], default="auto",
                   help="FAISS index: flat (exact), ivf (IndexIVFFlat), auto = flat up to 1M vectors")
    q.add_argument("--nlist", type=int, default=0, help="IVF cells (0: about 4 sqrt(N))")
    q.add_argument("--nprobe", type=int, default=0, help="IVF cells searched per query (0: 8)")
    q.add_argument("--threshold", type=float,
                   help="similarity below which a query is unknown (default: calibrated on the run's validation split)")
    q.add_argument("--tar", type=float, default=0.95, help="share of validation images the calibrated threshold accepts")
    q.add_argument("--score", choices=["msp", "max_logit", "energy", "knn", "gallery"],
                   help="open-set score the threshold applies to (default: the run's, chosen by rp2k openset; else gallery)")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--workers", type=int, default=2, help="decoding threads")
    q.set_defaults(func=cmd_gallery_build)
    q = gallery.add_parser("add", help="add photos of one SKU to a gallery (no retraining)")
    q.add_argument("gallery", help="gallery folder (local or a URI)")
    q.add_argument("images", help="folder of photos of the product (searched recursively)")
    q.add_argument("--label", required=True, help="the SKU they show")
    q.add_argument("--checkpoint", help="the gallery's model (default: the checkpoint it was built with)")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--workers", type=int, default=2, help="decoding threads")
    q.set_defaults(func=cmd_gallery_add)

    p = sub.add_parser("openset", help="unseen classes (data.holdout_classes): recall@k, AUROC, false accepts")
    p.add_argument("run", help="run folder (or checkpoint) trained with data.holdout_classes and data.holdout")
    p.add_argument("--shards", help="packed dataset (default: the run's data.shards)")
    p.add_argument("--out", help="folder for openset.json + openset.md (default: the run folder)")
    p.add_argument("--seen-shots", type=int, default=5, help="images per seen class in the known-products gallery")
    p.add_argument("--tar", type=float, default=0.95, help="share of validation images the threshold accepts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.set_defaults(func=cmd_openset)
