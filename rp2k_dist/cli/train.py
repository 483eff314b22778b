"""``rp2k train``, ``rp2k tune`` and ``rp2k reproduce``: their handlers and their parsers."""

from __future__ import annotations

import argparse
import shlex

from ..config import ExperimentConfig, SweepConfig, load_config
from ..errors import ConfigError
from ..run_folder import TABLE2
from ..storage import display
from .common import _positive, add_run_options, load_experiment, run_overrides
from .jobs import _follow_job


def cmd_train(args: argparse.Namespace) -> int:
    from ..launch.console import artefact_lines
    from ..launch.trainer import run_training
    from ..storage import RunStorage

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
    from ..analysis.compare import compare_runs
    from ..analysis.seeds import seed_names
    from ..launch.trainer import run_training
    from ..storage import join, read_text

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
    from ..launch.tuner import format_table, load_sweep, run_sweep

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
    from ..launch.submit import DEFAULT_LAUNCHER, SubmitError, find_root, resolve_address, submit_entrypoint

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
    from ..launch.reproduce import reproduce
    from ..launch.reproduce.plan import plan

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
            from ..launch.reproduce import copy_report

            copy_report(args.storage_path, args.report_dir)
            print(f"report copied from {display(args.storage_path)} to {args.report_dir}")
        return code
    return reproduce(args.shards, args.storage_path, only, args.set or [], address=args.address,
                     verbose=args.verbose, umap_samples=args.umap_samples, report_dir=args.report_dir,
                     seeds=args.seeds)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k train``, ``rp2k tune`` and ``rp2k reproduce`` to the ``rp2k`` subcommands."""
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
