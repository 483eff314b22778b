"""The loader's pixel path: zero-copy decode, the 4-channel warp, batching, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rp2k_dist.data.augment import AugmentConfig, AugmentParams, apply_array, sample_params
from rp2k_dist.data.transforms import (
    EvalTransform, TrainTransform, decode, decode_array, normalize, pixels, stack_images, to_tensor,
)
from rp2k_dist.input_spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec


def _photo(width: int = 90, height: int = 70, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(90, 70), (2600, 2200)])  # the big one spans several memory blocks
def test_pixels_are_the_images_rgb_values(size):
    image = _photo(*size)
    array = pixels(image)
    assert array.dtype == np.uint8 and array.shape[:2] == (size[1], size[0]) and array.shape[2] in (3, 4)
    assert np.array_equal(array[..., :3], np.asarray(image))


def test_decode_array_equals_pillows_decode():
    jpeg = _jpeg(_photo())
    assert np.array_equal(decode_array(jpeg)[..., :3], np.asarray(decode(jpeg)))


def test_warp_of_a_padded_4_channel_image_equals_the_3_channel_warp():
    rgb = np.asarray(_photo())
    padded = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = sample_params(rng, rgb.shape[1], rgb.shape[0], AugmentConfig(perspective_p=0.5))
        out = apply_array(padded, params, 56, 48)
        assert out.shape == (48, 48, 3) and out.flags.c_contiguous
        assert np.array_equal(out, apply_array(rgb, params, 56, 48))


def test_brightness_is_a_rounded_saturating_multiply():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    for factor in (0.8, 0.93, 1.07, 1.2):
        params = AugmentParams(0, (0, 0, 0), (0, 0, 16, 16), None, factor)
        out = apply_array(levels, params).astype(int)
        expected = np.clip(np.round(levels * factor), 0, 255)
        assert np.abs(out - expected).max() <= 1  # float32 products may round a tie the other way
        assert (out == expected).mean() > 0.98


def test_stack_images_is_an_nchw_batch_stored_channels_last():
    spec = InputSpec(48, 56)
    jpegs = [_jpeg(_photo(seed=s)) for s in range(5)]
    images = [EvalTransform(spec)(j) for j in jpegs]
    batch = stack_images(images)
    assert batch.shape == (5, 3, 48, 48) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([image.contiguous() for image in images]))


def test_to_tensor_never_shares_a_read_only_buffer():
    image = _photo()
    before = np.asarray(image).copy()
    tensor = to_tensor(pixels(image))
    assert torch.equal(tensor, torch.from_numpy(before).permute(2, 0, 1))
    tensor[0] = 255 - tensor[0]  # would write into Pillow's image if the tensor were a view of it
    assert np.array_equal(np.asarray(image), before)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalize_any_layout_in_the_requested_layout_out(memory_format):
    spec = InputSpec(48, 56)
    rng = np.random.default_rng(0)
    images = [TrainTransform(spec, AugmentConfig())(_jpeg(_photo(seed=s)), rng) for s in range(4)]
    batch = stack_images(images)
    out = normalize(batch, spec, memory_format=memory_format)
    assert out.is_contiguous(memory_format=memory_format) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert torch.allclose(out, (batch.contiguous().float() - mean) / std, atol=1e-5)
    assert normalize(batch, spec, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(batch, stack_images(images))  # the input is left alone
