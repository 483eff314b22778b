"""Typed experiment configuration: defaults < YAML preset < ``--set key=value`` overrides.

One :class:`ExperimentConfig` flows from the command line to every layer (loader, model,
loss, optimiser, Ray scaling); the resolved config is saved next to every run. Each field
has a default and each section validates itself, so a typo or an out-of-range value fails
at start-up with a message naming the key, never hours into a run. A sweep preset adds a
``tune:`` section (:class:`SweepConfig`), built and checked by the same code.

Presets are found by path or by name (``table2_resnet34``): the ``jobs/`` folder of a source
checkout, or the copy shipped inside the installed package (``rp2k_dist/presets``).

Its modules: ``sections`` (the section dataclasses, a docstring per field, each validating
itself), ``loading`` (presets by path or name, YAML, ``key=value`` overrides, the run flags)
and ``coercion`` (a dict -> typed section, value by value). This package imports no heavy
library (no OpenCV, no torch): the model registry is only imported when a config is validated.
"""

from __future__ import annotations

from ..errors import ConfigError
from .loading import (
    RUN_FLAGS,
    flag_overrides,
    is_sweep_preset,
    load_config,
    merge,
    parse_override,
    preset_dirs,
    preset_names,
    read_yaml,
    resolve_preset,
)
from .sections import (
    BN_MODES,
    COSINE_HEAD_MODELS,
    HEADS,
    MARGIN_LOSSES,
    PAPER_BORDER_FRAC,
    PAPER_CROP_FRAC,
    SCHEDULERS,
    SPLIT_MODELS,
    AugmentConfig,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SweepConfig,
    config_from_dict,
    parse_meta_category,
    sweep_config,
)

__all__ = [
    "BN_MODES", "COSINE_HEAD_MODELS", "HEADS", "MARGIN_LOSSES", "PAPER_BORDER_FRAC", "PAPER_CROP_FRAC",
    "RUN_FLAGS", "SCHEDULERS", "SPLIT_MODELS", "AugmentConfig", "ConfigError", "DataConfig",
    "ExperimentConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "SweepConfig",
    "config_from_dict", "flag_overrides", "is_sweep_preset", "load_config", "merge", "parse_meta_category",
    "parse_override", "preset_dirs", "preset_names", "read_yaml", "resolve_preset", "sweep_config",
]
