"""The ``rp2k`` command line: one subcommand per stage of the pipeline.

Every parser lives here, and every flag that sets a config key goes through one function,
:func:`run_overrides` (preset < ``--set`` < flags). The commands turn their arguments into
typed objects (:class:`~rp2k_dist.config.ExperimentConfig`, :class:`~rp2k_dist.config.SweepConfig`)
before calling the library; nothing below this module sees an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .config import RUN_FLAGS, ExperimentConfig, SweepConfig, flag_overrides, load_config
from .data.metadata import MetadataColumns
from .errors import ConfigError, Rp2kError
from .run_folder import COMPARE, TABLE2
from .storage import display


def _metadata_columns(pairs: list[str] | None) -> MetadataColumns:
    mapping = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--metadata-column wants FACT=COLUMN, got {pair!r}")
        mapping[key.strip()] = value.strip() or None
    return MetadataColumns.from_mapping(mapping)


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import SynthConfig, make_synthetic_rp2k

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
    from .data.pack import PackConfig, pack_dataset
    from .data.rp2k import scan_rp2k

    source = Path(args.source)
    from .data.metadata import describe_mapping

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
    from .data.verify import verify_shards

    problems = verify_shards(args.shards, progress=True)
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in {display(args.shards)}; repack with `rp2k pack` (finished shards are kept)")
        return 1
    print(f"{display(args.shards)}: every shard matches its manifest")
    return 0


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of ``train``/``tune``/``submit``: ``--set`` values, then the flags of
    :data:`~rp2k_dist.config.RUN_FLAGS` (so a flag wins over a ``--set`` of the same key)."""
    return list(args.set or []) + flag_overrides(vars(args))


def load_experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The config of ``train``: preset < --set overrides < flags."""
    return load_config(args.config, run_overrides(args))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset: a path or a preset name (e.g. table2_resnet34; see jobs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.05")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--workers", type=int, help="Ray Train workers (run.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; implies run.use_gpu=true")
    p.add_argument("--name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage-path", help="run storage: folder, s3:// or gs:// (run.storage_path)")
    p.add_argument("--shards", help="packed dataset folder (data.shards)")


def cmd_train(args: argparse.Namespace) -> int:
    from .launch.console import artefact_lines
    from .launch.trainer import run_training
    from .storage import RunStorage

    config = load_experiment(args)
    if args.seeds:
        return _train_seeds(args, config)
    final = run_training(config, address=args.address, verbose=args.verbose, mlflow_uri=args.mlflow_uri)
    storage = RunStorage(config.run.storage_path, config.run.name)
    print(f"run {config.run.name}: epoch {final.get('epoch')}, "
          f"val top-1 {final.get('val_top1', float('nan')):.2f} %, top-5 {final.get('val_top5', float('nan')):.2f} %")
    if storage.exists(TABLE2):
        print(storage.read_bytes(TABLE2).decode("utf-8").rstrip())
    print(f"run folder {storage.uri}:")
    print("\n".join(artefact_lines(storage)))
    return 0


def _train_seeds(args: argparse.Namespace, config: ExperimentConfig) -> int:
    """``rp2k train PRESET --seeds N``: runs <name>-s0 … -s<N-1> with run.seed 0 … N-1 (each
    resumes like any run), then their comparison with mean ± std (``rp2k compare``)."""
    from .analysis.report import compare_runs
    from .analysis.seeds import seed_names
    from .launch.trainer import run_training
    from .storage import join, read_text

    folders = []
    for seed, name in enumerate(seed_names(config.run.name, args.seeds)):
        one = load_config(args.config, run_overrides(args) + [f"run.name={name}", f"run.seed={seed}"])
        final = run_training(one, address=args.address, verbose=args.verbose, mlflow_uri=args.mlflow_uri)
        print(f"run {name} (run.seed={seed}): epoch {final.get('epoch')}, "
              f"val top-1 {final.get('val_top1', float('nan')):.2f} %")
        folders.append(join(str(one.run.storage_path), name))
    location = compare_runs(folders, join(str(config.run.storage_path), f"{config.run.name}-seeds.md"))
    print(read_text(location))
    print(f"written to {display(location)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``rp2k tune``: 0 when at least one trial finished without error."""
    from .launch.tuner import format_table, load_sweep, run_sweep

    sweep = load_sweep(args.config, run_overrides(args), args.search_space)
    settings: SweepConfig = sweep.settings.with_flags(vars(args))
    result = run_sweep(sweep.config, sweep.space, settings, address=args.address, mlflow_uri=args.mlflow_uri)
    print(format_table(result.table))
    print(f"sweep {result.path}: {len(result.table)} trials "
          f"({', '.join(f'{n} {status}' for status, n in result.table['status'].value_counts().items())}); "
          "trials.parquet, trials.csv")
    if result.best_yaml is None:
        print("no trial finished without error: no best.yaml")
        return 1
    print(f"best config: {result.best_yaml}  (train it: rp2k train {result.best_yaml})")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .evaluation.ensemble_eval import evaluate_ensemble

    result = evaluate_ensemble(args.general, args.specialist, args.shards, args.out, args.rule, args.workers,
                               args.mass_threshold)
    print(result.markdown)
    print(f"(e) thresholds: {', '.join(f'{t:.3f}' for t in result.thresholds)} ({result.threshold_source})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_demo_seeds

    if args.seeds > 1:
        return run_demo_seeds(Path(args.out), range(args.seed, args.seed + args.seeds), args.size, args.address)
    return run_demo(Path(args.out), size=args.size, address=args.address, seed=args.seed)


def cmd_umap(args: argparse.Namespace) -> int:
    from .analysis.umap_plot import embed_and_project, plot_umap, table_location
    from .run_folder import UMAP_PNG, find_run_dir
    from .storage import basename, join

    df = embed_and_project(args.run, shards=args.shards, split=args.split, max_samples=args.max_samples or None,
                           seed=args.seed, batch_size=args.batch_size, workers=args.workers)
    run_dir = find_run_dir(args.run)
    png = plot_umap(df, join(args.out or run_dir, UMAP_PNG), f"UMAP of {basename(run_dir)} features, {args.split} split")
    print(f"UMAP of {len(df)} {args.split} images: {display(png)} and {display(table_location(png))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import write_report

    md, html = write_report(args.run, args.out)
    print(f"report: {display(md)}\n        {display(html)} (self-contained)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis.report import compare_runs
    from .storage import read_text

    location = compare_runs(args.runs, args.out)
    print(read_text(location))
    print(f"written to {display(location)}")
    return 0


def _ray_init(address: str | None) -> None:
    import ray

    from .launch.trainer import ray_address

    ray.init(address=ray_address(address))


def _print_rejected(rejected: list[dict[str, str]], out: str = "") -> None:
    for problem in rejected[:20]:
        print(f"  rejected {problem['path']}: {problem['reason']}")
    if len(rejected) > 20:
        print(f"  ... and {len(rejected) - 20} more" + (f" (rows with an 'error' in {display(out)})" if out else ""))


def cmd_embed(args: argparse.Namespace) -> int:
    from .evaluation.embeddings import embed_source, embed_source_ray, write_embeddings

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
    from .evaluation.gallery import build_gallery

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
    from .evaluation.gallery import add_to_gallery

    gallery, added, rejected = add_to_gallery(args.gallery, args.images, args.label, args.checkpoint,
                                              args.batch_size, args.workers)
    print(f"added {added} images of {args.label!r} to {display(args.gallery)}: now {len(gallery)} vectors of "
          f"{len(set(gallery.skus))} SKUs")
    _print_rejected(rejected)
    return 0


def cmd_openset(args: argparse.Namespace) -> int:
    from .evaluation.openset import evaluate_openset
    from .run_folder import OPENSET, OPENSET_TABLE, find_run_dir
    from .storage import join

    result = evaluate_openset(args.run, shards=args.shards, out=args.out, seen_shots=args.seen_shots, tar=args.tar,
                              batch_size=args.batch_size, workers=args.workers)
    where = args.out or find_run_dir(args.run)
    print(f"unseen classes: {', '.join(c['name'] for c in result.unseen)}")
    print(result.full_markdown())
    print(f"threshold {result.threshold:.4f}: {result.threshold_source}")
    print(f"written to {display(join(where, OPENSET))} and {display(join(where, OPENSET_TABLE))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .evaluation.predict import predict_folder, predict_folder_ray

    if args.gallery:
        from .evaluation.gallery import predict_with_gallery

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


def cmd_export(args: argparse.Namespace) -> int:
    from .analysis.export import export_onnx, export_safetensors
    from .run_folder import MODEL_ONNX, MODEL_SAFETENSORS
    from .storage import join

    if args.format in ("onnx", "both"):
        result = export_onnx(args.checkpoint, join(args.out, MODEL_ONNX), opset=args.opset)
        print(f"ONNX (opset {result.opset}): {display(result.path)}, model card {display(result.card)}; "
              f"max |logit difference| vs PyTorch {result.max_abs_diff:.2e}")
    if args.format in ("safetensors", "both"):
        result = export_safetensors(args.checkpoint, join(args.out, MODEL_SAFETENSORS))
        print(f"safetensors: {display(result.path)}, model card {display(result.card)}")
    return 0


def _stop_hint(address: str | None, job_id: str) -> str:
    from .launch.submit import resolve_address

    return f"rp2k jobs stop --address {shlex.quote(resolve_address(address))} {shlex.quote(job_id)}"


def cmd_submit(args: argparse.Namespace) -> int:
    """``rp2k submit``: 0 when the job SUCCEEDED (or was submitted with --no-wait), 1 otherwise."""
    from .launch.submit import submit

    flags = {key: getattr(args, key, None) for key in RUN_FLAGS}
    job_id = submit(args.config, address=args.address, overrides=args.set or [], flags=flags, pip=args.pip,
                    submission_id=args.submission_id, auth_token_file=args.auth_token_file, command=args.command)
    return _follow_job(job_id, args)


def _follow_job(job_id: str, args: argparse.Namespace) -> int:
    """After a submission: print how to follow the job, or follow it to its end."""
    from .launch.submit import connect, follow, jobs_status, resolve_address

    address = resolve_address(args.address)
    print(f"submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        print(f"follow it:  rp2k jobs logs --follow --address {shlex.quote(address)} {shlex.quote(job_id)}\n"
              f"stop it:    {_stop_hint(args.address, job_id)}")
        return 0
    try:
        client = connect(args.address, args.auth_token_file)
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Stop it with: {_stop_hint(args.address, job_id)}",
              file=sys.stderr)
        return 130
    info = jobs_status(job_id, client=client)
    message = f": {info.message}" if info.message else ""
    print(f"job {job_id} {status}{message}")
    return 0 if str(status) == "SUCCEEDED" else 1


def _img_per_s(pairs: list[str] | None) -> dict[str, float]:
    rates = {}
    for pair in pairs or []:
        model, sep, value = pair.partition("=")
        try:
            rates[model.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--img-per-s wants MODEL=IMAGES_PER_SECOND, got {pair!r}") from None
        if not sep or rates[model.strip()] <= 0:
            raise ConfigError(f"--img-per-s wants MODEL=IMAGES_PER_SECOND > 0, got {pair!r}")
    return rates


def submit_reproduce(args: argparse.Namespace) -> str:
    """``rp2k reproduce --submit``: the same command (without the submission flags) as one
    Ray job, its driver on the cluster; returns the job id."""
    from .launch.submit import DEFAULT_LAUNCHER, SubmitError, find_root, resolve_address, submit_entrypoint

    resolve_address(args.address)  # no address: fail before any work
    root = find_root()
    if root is None:
        raise SubmitError("no rp2k-dist repository (pyproject.toml + rp2k_dist/) above the current directory: "
                          "run rp2k reproduce --submit from the repository")
    words = [*DEFAULT_LAUNCHER, "reproduce", "--shards", args.shards, "--storage-path", args.storage_path,
             "--umap-samples", str(args.umap_samples)]
    words += ["--only", args.only] if args.only else []
    words += ["--seeds", str(args.seeds)] if args.seeds > 1 else []
    words += [w for item in args.set or [] for w in ("--set", item)]
    return submit_entrypoint(" ".join(shlex.quote(w) for w in words), root, name="reproduce",
                             metadata={"rp2k_command": "reproduce"}, address=args.address, pip=args.pip,
                             auth_token_file=args.auth_token_file)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``rp2k reproduce``: 0 when every run finished (with --plan: after printing the plan)."""
    from .launch.reproduce import reproduce
    from .launch.reproduce.plan import plan

    only = [part.strip() for part in args.only.split(",") if part.strip()] if args.only else None
    if args.plan:
        print(plan(args.shards, only, args.set or [], args.gpus, _img_per_s(args.img_per_s), address=args.address))
        if args.seeds > 1:
            print(f"--seeds {args.seeds}: the plan above once per seed, one seed after another "
                  f"({args.seeds} x its GPU-hours and wall time)")
        return 0
    if not args.shards:
        raise ConfigError("--shards is required (the packed RP2K, e.g. s3://bucket/rp2k or "
                          "/mnt/shared/shards/rp2k; pack it with `rp2k pack`)")
    if args.submit:
        code = _follow_job(submit_reproduce(args), args)
        if args.report_dir and not args.no_wait and code == 0:
            from .launch.reproduce import copy_report

            copy_report(args.storage_path, args.report_dir)
            print(f"report copied from {display(args.storage_path)} to {args.report_dir}")
        return code
    return reproduce(args.shards, args.storage_path, only, args.set or [], address=args.address,
                     verbose=args.verbose, umap_samples=args.umap_samples, report_dir=args.report_dir,
                     seeds=args.seeds)


def cmd_jobs(args: argparse.Namespace) -> int:
    """``rp2k jobs status|logs|stop|list``."""
    from .launch.submit import jobs_list, jobs_logs, jobs_status, jobs_stop

    kwargs = {"address": args.address, "auth_token_file": args.auth_token_file}
    if args.jobs_command == "list":
        for job in jobs_list(**kwargs):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
            run = (job.metadata or {}).get("rp2k_run", "")
            print(f"{job.submission_id or job.job_id}\t{job.status}\t{started}\t{run}\t{job.entrypoint}")
        return 0
    if args.jobs_command == "status":
        info = jobs_status(args.job_id, **kwargs)
        print(f"{args.job_id}: {info.status}" + (f": {info.message}" if info.message else ""))
        return 1 if str(info.status) in ("FAILED", "STOPPED") else 0
    if args.jobs_command == "logs":
        logs = jobs_logs(args.job_id, follow_logs=args.follow, **kwargs)
        if logs is not None:
            sys.stdout.write(logs)
        return 0
    if args.jobs_command == "stop":
        stopped = jobs_stop(args.job_id, **kwargs)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "already ended"))
        return 0
    raise ValueError(f"unknown jobs command {args.jobs_command!r}")


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard / Jobs API address, e.g. http://127.0.0.1:8265 "
                   "(default: $RAY_ADDRESS)")
    p.add_argument("--auth-token-file", help="send this file's Ray auth token (default: Ray's own lookup, "
                   "active with RAY_AUTH_MODE=token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def add_submit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``rp2k submit`` to the ``rp2k`` subcommands."""
    from .launch.submit import COMMANDS

    p = sub.add_parser("submit", help="run `rp2k train` as a job on a Ray cluster (Job Submission API)",
                       description="Upload the repository (minus .venv, shards, runs, data, ...) and run "
                       "`python -m rp2k_dist.cli train PRESET ...` as a Ray job; follows its logs "
                       "unless --no-wait. Exit status 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.")
    p.add_argument("config", help="YAML preset inside the repository: a path or a preset name (see jobs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.05")
    _add_connection_options(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (run.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; implies run.use_gpu=true")
    p.add_argument("--name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage-path", help="run storage on the cluster: s3://, gs:// or a shared path (run.storage_path)")
    p.add_argument("--shards", help="packed dataset as the cluster sees it (data.shards)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    p.add_argument("--pip", action="store_true", help="install pyproject's dependencies (except ray) in the job's "
                   "runtime env; default: use what the cluster image has")
    p.add_argument("--submission-id", help="job id to use (default: rp2k-<run name>-<UTC time>-<hex>)")
    p.add_argument("--command", choices=COMMANDS, help="what the job runs: rp2k train or rp2k tune "
                   "(default: tune for a sweep preset, one with search_space:, else train)")
    p.set_defaults(func=cmd_submit)
    return p


def add_jobs_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``rp2k jobs status|logs|stop|list`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("jobs", help="status, logs, stop and list of Ray jobs")
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("status", "a job's status and message (exit 1 if FAILED/STOPPED)"),
                       ("logs", "a job's logs"), ("stop", "stop a job"), ("list", "every job of the cluster")):
        q = jobs.add_parser(name, help=text)
        _add_connection_options(q)
        if name != "list":
            q.add_argument("job_id", help="submission id printed by rp2k submit")
        if name == "logs":
            q.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    p.set_defaults(func=cmd_jobs)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rp2k", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("train", help="DDP training on Ray Train (local Ray unless --address)")
    add_run_options(p)
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own console output too (worker lines, per-report INFO); it is always in RUN/logs")
    p.add_argument("--mlflow-uri", help="also log the run (config, every epoch's metrics) to this MLflow tracking URI")
    p.add_argument("--seeds", type=_positive, metavar="N", help="train N runs <name>-s0 ... with run.seed 0 ... N-1 "
                   "and compare them (mean ± std, written to <storage>/<name>-seeds.md)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="hyperparameter sweep: one Ray Train run per trial (Ray Tune, ASHA)")
    add_run_options(p)
    p.add_argument("--search-space", help="search space YAML (default: the preset's search_space:, "
                   "else search_space.yaml next to the preset)")
    p.add_argument("--samples", type=int, help="trials per grid point (default: the preset's tune.samples, "
                   "else 1 for a pure grid and 16 otherwise)")
    p.add_argument("--scheduler", choices=["asha", "none"], help="asha: stop weak trials early (default); "
                   "none: every trial runs all epochs")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the cluster's GPUs, "
                   "or CPUs, // what one trial's workers take)")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped (default 1)")
    p.add_argument("--reduction-factor", type=int, help="ASHA: keep the best 1/R of the trials at each rung (default 2)")
    p.add_argument("--mlflow-uri", help="also log every trial to this MLflow tracking URI (needs mlflow)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("reproduce", help="every experiment of the paper as one graph of runs, then the report",
                       description="Train the paper's runs (Tables 2, 3, 4, the CBL ablation, Fig. 3) on a Ray "
                       "cluster, independent ones side by side, the specialists after the general ResNet-34; the "
                       "same command again skips finished runs and resumes interrupted ones.")
    p.add_argument("--shards", help="packed RP2K as the cluster sees it (data.shards of every run)")
    p.add_argument("--storage-path", default="runs/reproduce", help="where every run's folder, reproduce.json "
                   "and reproduce.md / reproduce.html go (a shared path or s3://, gs://)")
    p.add_argument("--report-dir", help="also copy reproduce.md, reproduce.html and their figures to this local "
                   "folder (with --submit: once the job has succeeded)")
    p.add_argument("--only", help="comma-separated parts (table2,table3,table4,cbl,fig3) or run names; the runs they need are added")
    p.add_argument("--set", action="append", metavar="[SCOPE:]KEY=VALUE",
                   help="override for every run, or for one part or run: table3:optim.epochs=50")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray); with --submit the "
                   "dashboard / Jobs API address, e.g. http://127.0.0.1:8265")
    p.add_argument("--submit", action="store_true", help="run this same command as one Ray job on the cluster "
                   "at --address (its driver on the head node) and follow its logs")
    p.add_argument("--auth-token-file", help="with --submit: send this file's Ray auth token")
    p.add_argument("--pip", action="store_true", help="with --submit: install the dependencies in the job's env")
    p.add_argument("--no-wait", action="store_true", help="with --submit: print the job id and return")
    p.add_argument("--plan", action="store_true", help="print the graph, epochs x images, GPU-hours and wall "
                   "time; train nothing (image counts from --shards, else the paper's Table 1)")
    p.add_argument("--gpus", type=float, help="--plan for this many GPUs (default: the cluster's)")
    p.add_argument("--img-per-s", action="append", metavar="MODEL=N",
                   help="--plan: measured training img/s per GPU of a model (resnet34, inception_v3, apinet)")
    p.add_argument("--umap-samples", type=int, default=20000, help="test images in the UMAP figure; 0 = all")
    p.add_argument("--seeds", type=_positive, default=1, metavar="N", help="the reproduction once per run.seed "
                   "0 ... N-1 (STORAGE_PATH/seed-<s>, one after another), then every run's figures as mean ± std "
                   "over the seeds in STORAGE_PATH/seeds.md")
    p.add_argument("--verbose", action="store_true", help="Ray's own console output too")
    p.set_defaults(func=cmd_reproduce)

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

    p = sub.add_parser("export", help="export a checkpoint as ONNX (checked with onnxruntime) and/or safetensors")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or checkpoint.pt")
    p.add_argument("out", help="output folder (model.onnx, model.safetensors, each with a .json model card)")
    p.add_argument("--format", choices=["onnx", "safetensors", "both"], default="both")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (the torch.export exporter starts at 18)")
    p.set_defaults(func=cmd_export)

    add_submit_parser(sub)
    add_jobs_parser(sub)
    return parser


def error_lines(command: str, err: Rp2kError) -> str:
    """An :class:`~rp2k_dist.errors.Rp2kError` as the user sees it: ``rp2k CMD: error: ...``
    (a message of several lines keeps them, indented) and the hint on its own line."""
    message = str(err).strip().replace("\n", "\n  ")
    lines = [f"rp2k {command}: error: {message}"]
    if err.hint:
        lines.append(f"  hint: {err.hint}")
    return "\n".join(lines)


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


if __name__ == "__main__":
    sys.exit(main())
