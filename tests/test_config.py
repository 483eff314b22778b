"""Config: every preset loads, precedence defaults < YAML < overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rp2k_dist.config import (
    PAPER_BORDER_FRAC,
    PAPER_CROP_FRAC,
    AugmentConfig,
    ConfigError,
    ExperimentConfig,
    SweepConfig,
    config_from_dict,
    load_config,
    read_yaml,
    resolve_preset,
    sweep_config,
)
from rp2k_dist.models import input_spec, model_names

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# sweep presets (search_space: + tune:) are loaded by rp2k tune, see tests/test_tune.py
PRESETS = sorted(p for p in JOBS.glob("*.yaml") if not p.name.startswith(("search_space", "sweep_")))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_names_a_known_model(preset):
    config = load_config(preset)
    assert config.model.name in model_names()
    input_spec(config.model.name, config.model.crop_size or None)  # resolution valid for the model
    if preset.name != "base.yaml":
        assert config.run.name != ExperimentConfig().run.name, "each experiment names its run"


def test_paper_presets_encode_the_paper():
    assert load_config(JOBS / "table2_resnet34.yaml").loss.cbl_beta == 0.99
    inception = load_config(JOBS / "table2_inception_v3.yaml")
    assert inception.model.name == "inception_v3" and input_spec("inception_v3").crop_size == 299
    liquor = load_config(JOBS / "table3_apinet_liquor.yaml")
    assert (liquor.model.name, liquor.data.meta_category) == ("apinet", "type=liquor")
    assert liquor.data.classes_per_batch * liquor.data.images_per_class == 120
    for category in ("liquor", "cosmetics"):  # the official API-Net recipe
        preset = load_config(JOBS / f"table3_apinet_{category}.yaml")
        o = preset.optim
        assert (o.optimizer, o.lr, o.lr_reference_batch, o.momentum, o.weight_decay, o.warmup_epochs, o.epochs) == (
            "sgd", 0.01, 120, 0.9, 0.0005, 0.0, 100)
        assert preset.model.freeze_backbone_epochs == 8 and preset.loss.criterion == "auto"
    t4 = {name: load_config(JOBS / f"table4_{name}.yaml") for name in ("scratch", "transfer", "scratch_aug", "transfer_aug")}
    assert [t4[n].model.pretrained for n in t4] == ["", "imagenet", "", "imagenet"]
    assert [t4[n].augment.any for n in t4] == [False, False, True, True]
    assert load_config(JOBS / "cbl_off.yaml").loss.cbl_beta == 0.0


def test_precedence_defaults_yaml_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.5\n  epochs: 7\n")
    config = load_config(preset, ["optim.lr=0.25", "augment.border_fill=128", "optim.weight_decay=1e-5"])
    assert (config.optim.lr, config.optim.epochs, config.optim.momentum) == (0.25, 7, 0.9)
    assert config.augment.border_fill == 128
    assert config.optim.weight_decay == 1e-5  # PyYAML reads 1e-5 as text; still a number here


def test_base_presets_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 0.5\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  epochs: 9\n")
    assert read_yaml(tmp_path / "b.yaml") == {"optim": {"lr": 0.5, "epochs": 9}}


def test_saved_config_round_trips(tmp_path):
    config = load_config(JOBS / "table3_apinet_liquor.yaml")
    (tmp_path / "c.yaml").write_text(config.to_yaml(), encoding="utf-8")
    assert load_config(tmp_path / "c.yaml") == config
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.cbl_beta=1.0", r"cbl_beta must be in \[0, 1\)"),
        ("loss.cbl_beta=-0.5", r"cbl_beta"),
        ("optim.lrr=1", "unknown key"),
        ("optim.epochs=ten", "must be an integer"),
        ("model.channels_last=maybe", "true or false"),
        ("data.meta_category=liquor", "type=liquor"),
        ("data.batch_size=0", "batch_size"),
        ("augment.perspective_scale=2", "perspective_scale"),
        ("augment.border_max_frac=1.5", r"augment.border_max_frac must be in \[0, 1\]"),
        ("augment.crop_max_frac=-0.1", r"augment.crop_max_frac must be in \[0, 1\)"),
        ("augment.crop_max_frac=much", "augment.crop_max_frac"),
        ("run.name=a/b", "run.name"),
        ("run.select_epoch=best", "run.select_epoch must be last or holdout"),
        ("run.select_epoch=holdout", "run.select_epoch=holdout chooses the epoch on the validation split.*data.holdout"),
        ("model.pretrained=imagenet21k", "pretrained"),
        ("nonsense", "section.key=value"),
    ],
)
def test_wrong_values_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_or_broken_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_a_preset_is_found_by_name_as_well_as_by_path():
    assert resolve_preset("table2_resnet34") == JOBS / "table2_resnet34.yaml"
    assert resolve_preset("demo.yaml") == JOBS / "demo.yaml"
    assert load_config("table2_resnet34", ["optim.lr=0.05"]) == load_config(JOBS / "table2_resnet34.yaml",
                                                                             ["optim.lr=0.05"])
    with pytest.raises(ConfigError, match="not found.*table2_resnet34"):  # names the presets there are
        load_config("table2_resnet35")


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet50", "model.name 'resnet50' is not a registered model; known: apinet, inception_v3, resnet34"),
    ("data.meta_category=liquor", "data.meta_category must look like 'type=liquor'"),
    ("data.meta_category=brand=x", "data.meta_category must look like"),
])
def test_name_like_fields_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_sweep_section_is_checked_like_the_others():
    assert sweep_config({"samples": 4, "scheduler": "none"}) == SweepConfig(samples=4, scheduler="none")
    with pytest.raises(ConfigError, match="unknown key.*tune.sampels"):
        sweep_config({"sampels": 4})
    with pytest.raises(ConfigError, match="tune.grace_period must be an integer"):
        sweep_config({"grace_period": "soon"})
    assert SweepConfig().with_flags({"samples": 3, "scheduler": None}) == SweepConfig(samples=3)


def test_augmentation_magnitudes_relative_to_the_crop_resolve_to_pixels():
    paper = AugmentConfig(border_max_frac=PAPER_BORDER_FRAC, crop_max_frac=PAPER_CROP_FRAC)
    at = {crop: paper.in_pixels(crop) for crop in (48, 224, 299)}
    assert {crop: (a.border_max, a.crop_max) for crop, a in at.items()} == {48: (6, 2), 224: (30, 10), 299: (40, 13)}
    assert at[224].border_max_frac is None and at[224].crop_max_frac is None
    # pixels as given where no fraction is set, whatever the crop; a fraction overrides them
    assert AugmentConfig(border_max=7, crop_max=3).in_pixels(48) == AugmentConfig(border_max=7, crop_max=3)
    assert AugmentConfig(border_max=7, crop_max_frac=0.25).in_pixels(48) == AugmentConfig(border_max=7, crop_max=12)
    # the paper's presets stay in pixels: 30 px border and 10 px crop at their 224 px crop
    augmented = load_config(JOBS / "table4_scratch_aug.yaml")
    crop = input_spec(augmented.model.name, augmented.model.crop_size or None).crop_size
    resolved = augmented.augment.in_pixels(crop)
    assert (crop, resolved.border_max, resolved.crop_max) == (224, 30, 10)
    assert load_config(None, ["augment.border_max_frac=0.5"]).augment.border_max_frac == 0.5
