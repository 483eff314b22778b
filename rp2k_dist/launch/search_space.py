"""The search-space language of ``rp2k tune``: a YAML mapping ``config key -> distribution``
(``{loguniform: [low, high]}``, ``{choice: [...]}``, ``{grid_search: [...]}``, ...: :data:`DISTRIBUTIONS`)
parsed into Ray Tune domains, resolved against the base config, probed with a value of each
domain and checked key by key, then applied to a trial's config.

Default space (``jobs/search_space.yaml``): border and crop magnitudes are sampled as
fractions of the model's crop side (``augment.border_max_frac`` / ``crop_max_frac``, turned
into pixels by the trial's transforms), so one space means the same at 48 px and 224 px;
``optim.lr: {loguniform: auto}`` is the range of the preset's optimizer
(:data:`DEFAULT_LR_RANGES`), as SGD and AdamW learning rates differ by about 50x.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer

from ..config import ConfigError, ExperimentConfig, OptimConfig, config_from_dict, merge


#: Set by the sweep for every trial; a search space may not name them.
SWEEP_KEYS = ("run.name", "run.storage_path", "run.eval_every")

#: Log-uniform learning-rate ranges of ``optim.lr: {loguniform: auto}``, per
#: :data:`LR_RANGE_BATCH` images of global batch (the config's lr is per
#: ``optim.lr_reference_batch`` images, so the range is scaled to it). Each spans 25x (100x
#: for AdamW) around a usual value: SGD around 0.1 per 256 (Goyal et al. 2017, "Accurate,
#: Large Minibatch SGD"); AdamW around 2e-3 per 256, from DeiT's 5e-4 per 512 (Touvron et
#: al. 2021) up to the demo preset's 0.016.
DEFAULT_LR_RANGES: dict[str, tuple[float, float]] = {"sgd": (0.02, 0.5), "adamw": (2e-4, 2e-2)}
LR_RANGE_BATCH = 256
#: The argument of ``{loguniform: auto}``.
AUTO = "auto"

@dataclass(frozen=True)
class OptimizerLrRange:
    """``optim.lr: {loguniform: auto}`` before the base config is known: a log-uniform
    learning rate over the range of the config's optimizer (:func:`resolve_search_space`)."""


def lr_range(optim: OptimConfig) -> tuple[float, float]:
    """``optim.lr`` bounds for ``optim.optimizer``, per ``optim.lr_reference_batch`` images."""
    low, high = DEFAULT_LR_RANGES[optim.optimizer]
    scale = optim.lr_reference_batch / LR_RANGE_BATCH
    return low * scale, high * scale


def _number(value: Any) -> Any:
    """YAML reads ``1e-4`` (no dot) as a string: numbers written so become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _values(key: str, kind: str, args: Any) -> list[Any]:
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{key}: {kind} needs a non-empty list of values, got {args!r}")
    values = [_number(v) for v in args]
    if all(_is_number(v) for v in values) and any(isinstance(v, float) for v in values):
        values = [float(v) for v in values]  # [0, 0.9] -> one numeric type per column
    return values


def _bounds(key: str, kind: str, args: Any) -> tuple[float, float]:
    bounds = [_number(v) for v in args] if isinstance(args, list) else []
    if len(bounds) != 2 or not all(_is_number(b) for b in bounds) or not bounds[0] < bounds[1]:
        raise ConfigError(f"{key}: {kind} needs [low, high] with low < high, got {args!r}")
    if kind == "randint" and not all(float(b).is_integer() for b in bounds):
        raise ConfigError(f"{key}: randint needs integer bounds [low, high), got {args!r}")
    if kind == "loguniform" and bounds[0] <= 0:
        raise ConfigError(f"{key}: loguniform needs low > 0, got {args!r}")
    return bounds[0], bounds[1]


#: YAML distribution name -> builder of the Tune search space entry.
DISTRIBUTIONS: dict[str, Callable[[str, Any], Any]] = {
    "choice": lambda key, args: tune.choice(_values(key, "choice", args)),
    "grid_search": lambda key, args: tune.grid_search(_values(key, "grid_search", args)),
    "uniform": lambda key, args: tune.uniform(*_bounds(key, "uniform", args)),
    "loguniform": lambda key, args: tune.loguniform(*_bounds(key, "loguniform", args)),
    "randint": lambda key, args: tune.randint(*(int(b) for b in _bounds(key, "randint", args))),  # high excluded
}


def parse_search_space(spec: Any, source: str = "search space") -> dict[str, Any]:
    """``{"optim.lr": {"loguniform": [1e-4, 1e-1]}, ...}`` -> Tune's param space (same keys).

    Each value names exactly one of :data:`DISTRIBUTIONS` with its arguments: ``choice`` /
    ``grid_search`` a list of values, ``uniform`` / ``loguniform`` ``[low, high]``, ``randint``
    ``[low, high)`` (high excluded, as in Tune). ``optim.lr: {loguniform: auto}`` takes the
    range of the optimizer (:data:`DEFAULT_LR_RANGES`) once the base config is known
    (:func:`resolve_search_space`). Keys are checked by :func:`check_search_space`.
    """
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{source} must be a non-empty mapping of config keys to distributions, "
                          "e.g. optim.lr: {loguniform: [0.001, 0.1]}")
    space = {}
    for key, entry in spec.items():
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{source}: {key} must name one distribution, e.g. {{choice: [a, b]}}; got {entry!r}")
        (kind, args), = entry.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{source}: {key}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
        if args == AUTO:
            if (key, kind) != ("optim.lr", "loguniform"):
                raise ConfigError(f"{source}: {key}: {{{kind}: auto}} is only for optim.lr: {{loguniform: auto}} "
                                  "(the optimizer's learning-rate range); give this key its values")
            space[key] = OptimizerLrRange()
            continue
        space[str(key)] = DISTRIBUTIONS[kind](f"{source}: {key}", args)
    return space


def resolve_search_space(config: ExperimentConfig, space: dict[str, Any]) -> dict[str, Any]:
    """``space`` with ``optim.lr: {loguniform: auto}`` replaced by the log-uniform range of
    the base ``config``'s optimizer (:func:`lr_range`)."""
    if not any(isinstance(entry, OptimizerLrRange) for entry in space.values()):
        return space
    if "optim.optimizer" in space:
        raise ConfigError("search space: optim.lr: {loguniform: auto} follows the base config's optim.optimizer; "
                          "with optim.optimizer searched too, give optim.lr explicit bounds [low, high]")
    return {key: tune.loguniform(*lr_range(config.optim)) if isinstance(entry, OptimizerLrRange) else entry
            for key, entry in space.items()}


def load_search_space(path: str | Path) -> dict[str, Any]:
    """A search space YAML file (see ``jobs/search_space.yaml``) as Tune's param space."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} not found")
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return parse_search_space(spec, str(path))


def _probe_values(key: str, entry: Any) -> list[Any]:
    """Every value a grid or choice can take, and the bounds of a range."""
    if isinstance(entry, dict) and set(entry) == {"grid_search"}:
        return list(entry["grid_search"])
    if isinstance(entry, Categorical):
        return list(entry.categories)
    if isinstance(entry, Integer):
        return [entry.lower, entry.upper - 1]
    if isinstance(entry, Float):
        return [entry.lower, entry.upper]
    raise ConfigError(f"search space {key}: unsupported entry {entry!r} (use {', '.join(DISTRIBUTIONS)})")


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``base`` with dotted keys set (``{"optim.lr": 0.01}``)."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        merge(data, key.split("."), value)
    return data


def check_search_space(config: ExperimentConfig, space: dict[str, Any]) -> None:
    """Apply every grid/choice value and both ends of every range to ``config``: an unknown
    key or an invalid value fails here, before any trial starts."""
    if not space:
        raise ConfigError("the search space is empty")
    for name in ("border_max", "crop_max"):
        if f"augment.{name}" in space and (f"augment.{name}_frac" in space
                                           or getattr(config.augment, f"{name}_frac") is not None):
            raise ConfigError(f"search space: augment.{name} (px) has no effect while augment.{name}_frac is set or "
                              f"searched (a fraction of the crop side replaces the pixels); search one of them, and "
                              f"set augment.{name}_frac=null in the base config to search pixels")
    base = config.to_dict()
    for key, entry in space.items():
        if key in SWEEP_KEYS:
            raise ConfigError(f"search space: {key} is set by the sweep for every trial and cannot be searched")
        for value in _probe_values(key, entry):
            try:
                config_from_dict(apply_values(base, {key: value}))
            except ConfigError as err:
                raise ConfigError(f"search space {key}={value!r}: {err}") from None


def is_grid(space: dict[str, Any]) -> bool:
    """Whether every entry is a grid_search (then one sample covers the whole space)."""
    return all(isinstance(e, dict) and "grid_search" in e for e in space.values())
