"""Each of the paper's augmentations stays within its stated bounds and is off when disabled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rp2k_dist.data.augment import AugmentConfig, AugmentParams, apply, homography, sample_params
from rp2k_dist.data.transforms import EvalTransform, InputSpec, TrainTransform, normalize
from rp2k_dist.errors import ConfigError

W, H = 60, 80


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def _only(**on) -> AugmentConfig:
    return AugmentConfig(**{**{"border": False, "crop": False, "perspective": False, "brightness": False}, **on})


def _draws(config: AugmentConfig, n: int = 400) -> list[AugmentParams]:
    rng = np.random.default_rng(0)
    return [sample_params(rng, W, H, config) for _ in range(n)]


def test_border_width_spans_0_to_30_and_frames_the_image_in_one_colour():
    draws = _draws(_only(border=True))
    widths = [p.border for p in draws]
    assert min(widths) == 0 and max(widths) == 30
    image = np.asarray(_image())
    params = next(p for p in draws if p.border >= 5)
    out = np.asarray(apply(_image(), params)).astype(int)
    b = params.border
    assert out.shape == (H + 2 * b, W + 2 * b, 3)
    frame = np.concatenate([out[:b].reshape(-1, 3), out[-b:].reshape(-1, 3), out[:, :b].reshape(-1, 3), out[:, -b:].reshape(-1, 3)])
    assert (frame == params.fill).all()
    assert np.abs(out[b:-b, b:-b] - image).max() <= 1


def test_fixed_border_fill_is_used():
    params = _draws(AugmentConfig(border_fill=128, crop=False, perspective=False, brightness=False))[0]
    assert params.fill == (128, 128, 128)


def test_crop_removes_at_most_10_px_per_dimension_and_keeps_a_window():
    draws = _draws(_only(crop=True))
    shrink = [(W - p.crop[2], H - p.crop[3]) for p in draws]
    assert min(min(s) for s in shrink) == 0 and max(max(s) for s in shrink) == 10
    params = next(p for p in draws if p.crop[0] > 0 and p.crop[1] > 0)
    left, top, w, h = params.crop
    out = np.asarray(apply(_image(), params)).astype(int)
    assert out.shape == (h, w, 3)
    assert np.abs(out - np.asarray(_image())[top : top + h, left : left + w]).max() <= 1


def test_perspective_moves_corners_inward_within_scale():
    config = _only(perspective=True)
    draws = _draws(config)
    warped = [p for p in draws if p.perspective is not None]
    assert 0.35 < len(warped) / len(draws) < 0.65  # probability 0.5
    for p in warped:
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = p.perspective
        mx, my = 0.2 * W / 2, 0.2 * H / 2
        assert 0 <= x0 <= mx and 0 <= y0 <= my
        assert W - 1 - mx <= x1 <= W - 1 and 0 <= y1 <= my
        assert W - 1 - mx <= x2 <= W - 1 and H - 1 - my <= y2 <= H - 1
        assert 0 <= x3 <= mx and H - 1 - my <= y3 <= H - 1
    out = np.asarray(apply(_image(), warped[0]))
    assert out.shape == (H, W, 3)
    assert not np.array_equal(out, np.asarray(_image()))


def test_homography_maps_the_four_points():
    src = np.array([(0, 0), (10, 0), (10, 10), (0, 10)], float)
    dst = np.array([(1, 2), (9, 1), (11, 12), (-1, 9)], float)
    h = homography(src, dst)
    mapped = (h @ np.c_[src, np.ones(4)].T).T
    assert np.allclose(mapped[:, :2] / mapped[:, 2:], dst)


def test_brightness_within_20_percent_and_scales_pixels():
    draws = _draws(_only(brightness=True))
    factors = [p.brightness for p in draws]
    assert 0.8 <= min(factors) < 0.82 and 1.18 < max(factors) <= 1.2
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    params = AugmentParams(0, (0, 0, 0), (0, 0, 8, 8), None, 1.15)
    assert np.asarray(apply(grey, params))[0, 0].tolist() == [115, 115, 115]


def test_everything_off_is_the_identity():
    for p in _draws(AugmentConfig.off(), 20):
        assert (p.border, p.crop, p.perspective, p.brightness) == (0, (0, 0, W, H), None, 1.0)
        assert np.array_equal(np.asarray(apply(_image(), p)), np.asarray(_image()))


def test_train_and_eval_transforms_give_model_sized_uint8():
    import io

    buffer = io.BytesIO()
    _image().save(buffer, "JPEG")
    spec = InputSpec(48, 56)
    rng = np.random.default_rng(0)
    train = TrainTransform(spec, AugmentConfig())(buffer.getvalue(), rng)
    evaluation = EvalTransform(spec)(buffer.getvalue())
    assert train.shape == evaluation.shape == (3, 48, 48)
    assert train.dtype == evaluation.dtype
    x = normalize(evaluation[None], spec)
    assert x.dtype.is_floating_point and abs(float(x.mean())) < 3


def test_config_validation():
    with pytest.raises(ConfigError, match="augment.perspective_scale"):
        AugmentConfig(perspective_scale=1.5)
    with pytest.raises(ConfigError, match="augment.brightness_max"):
        AugmentConfig(brightness_max=-0.1)
    with pytest.raises(ConfigError, match="augment.border_fill"):
        AugmentConfig(border_fill="purple")


def test_fractions_of_the_crop_are_pixels_of_the_transform_s_crop():
    relative = AugmentConfig(border_max_frac=0.25, crop_max_frac=0.125)
    assert TrainTransform(InputSpec(48, 56), relative).augment == AugmentConfig(border_max=12, crop_max=6)
    assert TrainTransform(InputSpec(224, 256), relative).augment == AugmentConfig(border_max=56, crop_max=28)
    from rp2k_dist.data.device_transforms import DeviceBatchTransform

    assert DeviceBatchTransform(InputSpec(48, 56), relative, "cpu").augment == AugmentConfig(border_max=12, crop_max=6)
    with pytest.raises(ValueError, match="in_pixels"):
        sample_params(np.random.default_rng(0), W, H, relative)
