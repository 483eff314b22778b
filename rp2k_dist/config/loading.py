"""Loading a config: presets by path or by name, YAML, ``key=value`` overrides and the run
flags that set one key each; defaults < preset < ``--set`` < flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .coercion import _build
from .sections import ExperimentConfig


#: Command-line flags of ``rp2k train``/``tune``/``submit`` that set one config key each
#: (argparse dest -> config key); ``--gpus-per-worker`` also implies ``run.use_gpu=true``.
RUN_FLAGS: dict[str, str] = {
    "workers": "run.workers", "gpus_per_worker": "run.gpus_per_worker", "name": "run.name",
    "storage_path": "run.storage_path", "shards": "data.shards",
}


def flag_overrides(flags: Mapping[str, Any]) -> list[str]:
    """The ``key=value`` overrides of the :data:`RUN_FLAGS` in ``flags`` (None: not given)."""
    overrides = [f"{key}={flags[flag]}" for flag, key in RUN_FLAGS.items() if flags.get(flag) is not None]
    if flags.get("gpus_per_worker"):
        overrides.append("run.use_gpu=true")
    return overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.05"`` -> (["optim", "lr"], 0.05); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Defaults < YAML file (``path``; may name a ``base:`` preset to extend) < overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _deep_update(data, read_yaml(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        merge(data, keys, value)
    return _build(ExperimentConfig, data, "")


def preset_dirs() -> list[Path]:
    """Where named presets are looked up: the installed package's ``presets/``, then the
    ``jobs/`` folder of a source checkout (an editable install or ``PYTHONPATH``)."""
    package = Path(__file__).resolve().parents[1]  # rp2k_dist/, above this config/ package
    return [folder for folder in (package / "presets", package.parent / "jobs") if folder.is_dir()]


def resolve_preset(preset: str | Path) -> Path:
    """A preset file by path, or by name (``table2_resnet34`` or ``table2_resnet34.yaml``)."""
    path = Path(preset).expanduser()
    if path.is_file() or path.parent != Path("."):
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    for folder in preset_dirs():
        if (folder / name).is_file():
            return folder / name
    return path


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted({p.stem for folder in preset_dirs() for p in folder.glob("*.yaml")})


def is_sweep_preset(path: str | Path) -> bool:
    """Whether the preset (or a preset it extends) holds a ``search_space:``."""
    return "search_space" in read_yaml(path)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A preset (path, URI such as a sweep's ``s3://…/best.yaml``, or name) as a dict, with
    ``base: other.yaml`` (relative to the file) merged under it."""
    if "://" in str(path):
        from .. import storage  # pyarrow: only for presets in object storage

        try:
            text = storage.read_text(path)
        except storage.NotFoundError:
            raise ConfigError(f"config file {storage.display(path)} not found") from None
        data = _parse_preset(text, storage.display(path))
        parent = data.pop("base", None)
        return _deep_update(read_yaml(storage.join(storage.parent(path), parent)), data) if parent else data
    path = resolve_preset(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found; give a path or a preset name "
                          f"({', '.join(preset_names())})")
    data = _parse_preset(path.read_text(encoding="utf-8"), str(path))
    parent = data.pop("base", None)
    if parent:
        data = _deep_update(read_yaml(path.parent / parent), data)
    return data


def _parse_preset(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of sections")
    return data


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out
