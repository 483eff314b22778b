"""The default search space of `rp2k tune` fits the model and the optimizer it tunes:
augmentation magnitudes are shares of the crop (the same space at 48 px and 224 px) and the
learning-rate range is the optimizer's. No Ray cluster: the sweeps themselves are in
tests/test_tune.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from ray.tune.search.sample import Float

from rp2k_dist.config import ConfigError, load_config
from rp2k_dist.data.transforms import TrainTransform
from rp2k_dist.launch.search_space import (
    DEFAULT_LR_RANGES,
    check_search_space,
    load_search_space,
    parse_search_space,
    resolve_search_space,
)
from rp2k_dist.launch.tuner import load_sweep, trial_config
from rp2k_dist.models import input_spec

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _lr_bounds(space) -> tuple[float, float]:
    entry = space["optim.lr"]
    assert isinstance(entry, Float) and type(entry.get_sampler()).__name__ == "_LogUniform"
    return entry.lower, entry.upper


def test_the_learning_rate_range_follows_the_optimizer():
    assert load_config(JOBS / "demo.yaml").optim.optimizer == "adamw"
    assert _lr_bounds(load_sweep(JOBS / "demo.yaml").space) == DEFAULT_LR_RANGES["adamw"] == (2e-4, 2e-2)
    assert _lr_bounds(load_sweep(JOBS / "table2_resnet34.yaml").space) == DEFAULT_LR_RANGES["sgd"] == (0.02, 0.5)
    switched = load_sweep(JOBS / "table2_resnet34.yaml", ["optim.optimizer=adamw"])
    assert _lr_bounds(switched.space) == (2e-4, 2e-2)
    # API-Net's lr is per 120 images: the per-256 range is scaled to it, its 0.01 inside
    apinet = load_sweep(JOBS / "table3_apinet_liquor.yaml")
    low, high = _lr_bounds(apinet.space)
    assert (low, high) == pytest.approx((0.02 * 120 / 256, 0.5 * 120 / 256))
    assert low < apinet.config.optim.lr < high
    # each base lr lies near the geometric middle of its range (log-uniform around it)
    for preset in ("demo.yaml", "table2_resnet34.yaml"):
        sweep = load_sweep(JOBS / preset)
        low, high = _lr_bounds(sweep.space)
        samples = sweep.space["optim.lr"].sample(size=4000, random_state=0)
        assert low <= min(samples) and max(samples) < high
        assert math.log(np.median(samples)) == pytest.approx(math.log(math.sqrt(low * high)), abs=0.1)
        assert abs(math.log(sweep.config.optim.lr / math.sqrt(low * high))) < math.log(high / low) / 2


def test_explicit_learning_rate_bounds_stay_as_written():
    space = parse_search_space({"optim.lr": {"loguniform": [0.001, 0.01]}})
    resolved = resolve_search_space(load_config(JOBS / "demo.yaml"), space)
    assert _lr_bounds(resolved) == (0.001, 0.01)


@pytest.mark.parametrize("spec, message", [
    ({"augment.border_max_frac": {"uniform": "auto"}}, r"only for optim.lr: \{loguniform: auto\}"),
    ({"optim.lr": {"uniform": "auto"}}, r"only for optim.lr: \{loguniform: auto\}"),
])
def test_auto_is_only_the_learning_rate_s_log_uniform_range(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_search_space(spec)


def test_auto_with_the_optimizer_searched_too_asks_for_explicit_bounds():
    space = parse_search_space({"optim.lr": {"loguniform": "auto"}, "optim.optimizer": {"choice": ["sgd", "adamw"]}})
    with pytest.raises(ConfigError, match="give optim.lr explicit bounds"):
        resolve_search_space(load_config(JOBS / "demo.yaml"), space)


def _pixels(preset: str, overrides: list[str], values: dict[str, float]) -> tuple[int, int, int]:
    """(crop side, border_max, crop_max) in pixels that a trial with ``values`` trains with."""
    base = load_config(JOBS / preset, overrides)
    trial = trial_config(base.to_dict(), values, "/tmp/unused", "trial")
    spec = input_spec(trial.model.name, trial.model.crop_size or None)
    augment = TrainTransform(spec, trial.augment).augment
    return spec.crop_size, augment.border_max, augment.crop_max


def test_sampled_magnitudes_scale_with_the_model_s_crop():
    space = load_sweep(JOBS / "demo.yaml").space
    borders = space["augment.border_max_frac"].sample(size=500, random_state=0)
    crops = space["augment.crop_max_frac"].sample(size=500, random_state=1)
    at = {size: [_pixels("demo.yaml", [f"model.crop_size={size}"], {"augment.border_max_frac": b,
                                                                       "augment.crop_max_frac": c})
                 for b, c in zip(borders, crops)] for size in (48, 224)}
    assert {px[0] for px in at[48]} == {48} and {px[0] for px in at[224]} == {224}
    for size, paper_border, paper_crop in ((224, 30, 10), (48, 6, 2)):
        border, crop = [px[1] for px in at[size]], [px[2] for px in at[size]]
        # the whole range up to the paper's 30 px / 10 px at 224, scaled down at 48
        assert (min(border), max(border), min(crop), max(crop)) == (0, paper_border, 0, paper_crop)
        assert border == [round(b * size) for b in borders] and crop == [round(c * size) for c in crops]
    assert np.mean([px[1] for px in at[224]]) / np.mean([px[1] for px in at[48]]) == pytest.approx(224 / 48, rel=0.03)
    # the paper's presets at their own 224 px crop: pixels as configured
    assert _pixels("table4_scratch_aug.yaml", [], {}) == (224, 30, 10)


def test_pixels_and_a_fraction_of_one_magnitude_are_not_searched_together():
    config = load_config(JOBS / "demo.yaml")
    both = parse_search_space({"augment.border_max": {"randint": [0, 7]}, "augment.border_max_frac": {"uniform": [0, 0.1]}})
    with pytest.raises(ConfigError, match="augment.border_max \\(px\\) has no effect"):
        check_search_space(config, both)
    pixels = parse_search_space({"augment.crop_max": {"randint": [0, 3]}})
    check_search_space(config, pixels)  # the demo preset gives pixels: searching them is fine
    with pytest.raises(ConfigError, match="augment.crop_max \\(px\\) has no effect"):
        check_search_space(load_config(JOBS / "demo.yaml", ["augment.crop_max_frac=0.04"]), pixels)


def test_the_default_space_searches_shares_of_the_crop_and_the_optimizer_s_learning_rate():
    text = (JOBS / "search_space.yaml").read_text(encoding="utf-8")
    assert "optim.lr: {loguniform: auto}" in text
    space = load_search_space(JOBS / "search_space.yaml")
    assert {"augment.border_max_frac", "augment.crop_max_frac"} <= set(space)
    assert not {"augment.border_max", "augment.crop_max"} & set(space)
    for preset in ("demo.yaml", "table2_resnet34.yaml", "table4_transfer_aug.yaml"):
        sweep = load_sweep(JOBS / preset)
        check_search_space(sweep.config, sweep.space)
