"""What the commands share: the run options and the one flags -> overrides path
(:func:`run_overrides`: preset < ``--set`` < flags), Ray start-up, and an error as the user sees it."""

from __future__ import annotations

import argparse

from ..config import ExperimentConfig, flag_overrides, load_config
from ..errors import Rp2kError


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


def _ray_init(address: str | None) -> None:
    import ray

    from ..launch.trainer import ray_address

    ray.init(address=ray_address(address))


def error_lines(command: str, err: Rp2kError) -> str:
    """An :class:`~rp2k_dist.errors.Rp2kError` as the user sees it: ``rp2k CMD: error: ...``
    (a message of several lines keeps them, indented) and the hint on its own line."""
    message = str(err).strip().replace("\n", "\n  ")
    lines = [f"rp2k {command}: error: {message}"]
    if err.hint:
        lines.append(f"  hint: {err.hint}")
    return "\n".join(lines)
