"""The device data path (batched decode + tensor augmentations), run on the CPU here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rp2k_dist.config import DataConfig
from rp2k_dist.data.augment import AugmentConfig, AugmentParams, apply, augment_rng, augment_seed, sample_params
from rp2k_dist.data.device_transforms import DeviceBatchTransform, decode_batch, warp
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.transforms import EvalTransform, InputSpec, RawJpeg, normalize
from rp2k_dist.engine.batches import DeviceBatches

SPEC = InputSpec(48, 56)


def _jpeg(seed: int, size=(60, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth content: bilinear implementations agree closely on it
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_decode_batch_matches_pil():
    jpegs = [_jpeg(i) for i in range(3)]
    decoded = decode_batch(jpegs, torch.device("cpu"))
    for jpeg, tensor in zip(jpegs, decoded):
        pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1)
        assert tensor.shape == pil.shape
        assert np.abs(tensor.numpy().astype(int) - pil).mean() < 2


@pytest.mark.parametrize("seed", range(6))
def test_tensor_warp_matches_the_pil_warp_for_the_same_parameters(seed):
    jpeg = _jpeg(seed)
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    params = sample_params(np.random.default_rng(seed), image.width, image.height,
                           AugmentConfig(perspective_p=1.0, brightness=False))
    pil = np.asarray(apply(image, params, SPEC.resize_size, SPEC.crop_size)).astype(float).transpose(2, 0, 1)
    tensor, _ = warp(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), params, SPEC.resize_size, SPEC.crop_size)
    assert tensor.shape == pil.shape == (3, 48, 48)
    assert np.abs(tensor.numpy() - pil).mean() < 6  # same geometry; resamplers differ at edges


def test_border_is_filled_with_the_border_colour():
    image = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    params = AugmentParams(10, (7, 8, 9), (0, 0, 60, 60), None, 1.0)
    out, coverage = warp(image, params, None, None)
    assert out.shape == (3, 60, 60)
    assert torch.allclose(out[:, :, :9], torch.tensor([7.0, 8.0, 9.0]).view(3, 1, 1).expand(3, 60, 9))
    assert torch.allclose(out[:, 15:45, 15:45], torch.tensor(200.0))
    assert coverage[0, 30, 30] == 1 and coverage[0, 2, 2] == 0


def test_eval_geometry_equals_the_cpu_eval_transform():
    jpeg = _jpeg(1)
    device_batch = DeviceBatchTransform(SPEC, None, torch.device("cpu"))([jpeg])
    cpu_batch = normalize(EvalTransform(SPEC)(jpeg)[None], SPEC)
    assert device_batch.shape == cpu_batch.shape
    assert (device_batch - cpu_batch).abs().mean() < 0.1  # ~6/255 in pixels, over unit-variance inputs


def test_device_augmentations_draw_from_the_cpu_parameter_ranges():
    transform = DeviceBatchTransform(SPEC, AugmentConfig(), torch.device("cpu"))
    draws = [transform.params(60, 80, seed) for seed in range(400)]
    assert min(p.border for p in draws) == 0 and max(p.border for p in draws) == 30
    assert 0.8 <= min(p.brightness for p in draws) and max(p.brightness for p in draws) <= 1.2
    assert all(60 + 2 * p.border - p.crop[2] <= 10 for p in draws)
    batch = transform([_jpeg(i) for i in range(4)], seeds=[0, 1, 2, 3])
    assert batch.shape == (4, 3, 48, 48) and torch.isfinite(batch).all()


def test_device_path_draws_a_samples_cpu_parameters_whatever_the_batch():
    config = AugmentConfig()
    transform = DeviceBatchTransform(SPEC, config, torch.device("cpu"))
    for seed in (0, 7, 2**64 - 1):
        assert transform.params(60, 80, seed) == sample_params(augment_rng(seed), 60, 80, config)  # TrainTransform's draw
    jpegs, seeds = [_jpeg(i) for i in range(3)], [11, 12, 13]
    together = transform(jpegs, seeds)
    for i in range(3):  # an image's pixels do not depend on its batch neighbours
        assert torch.equal(transform([jpegs[i]], [seeds[i]])[0], together[i])
    with pytest.raises(ValueError, match="seed"):
        transform(jpegs)


def test_a_corrupt_jpeg_is_dropped_with_its_label_key_and_seed():
    good = [_jpeg(i) for i in range(3)]
    broken = good[1][: len(good[1]) // 2]
    prepare = DeviceBatches(SPEC, AugmentConfig(), torch.device("cpu"), channels_last=False)
    batch = {"jpeg": [good[0], broken, good[2]], "seed": [1, 2, 3], "label": torch.tensor([5, 6, 7]), "key": ["a", "b", "c"]}
    images, labels, keys = prepare(batch)
    assert images.shape[0] == 2 and labels.tolist() == [5, 7] and keys == ["a", "c"]
    assert torch.equal(images, prepare.transform([good[0], good[2]], [1, 3]))
    assert prepare.skipped == 1


def _device_augmented(manifest, world: int) -> dict[str, torch.Tensor]:
    """``{key: device-augmented image}`` of one training epoch (epoch 1) over ``world`` ranks."""
    prepare = DeviceBatches(SPEC, AugmentConfig(), torch.device("cpu"), channels_last=False)
    out = {}
    for rank in range(world):
        loader = ShardLoader(manifest, "train", RawJpeg(), LoaderConfig(DataConfig(batch_size=4, loader_workers=0)), rank, world)
        loader.set_epoch(1)
        for batch in loader:
            assert batch["seed"] == [augment_seed(0, 1, 0, key) for key in batch["key"]]
            images, _, keys = prepare(batch)
            out.update(zip(keys, images))
    return out


def test_device_augmentation_is_bit_identical_at_world_size_1_and_2(many_shards):
    one, two = _device_augmented(many_shards, 1), _device_augmented(many_shards, 2)
    assert one.keys() == two.keys() and len(one) > 100
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_raw_jpeg_rejects_truncated_bytes_in_the_worker():
    jpeg = _jpeg(0)
    assert RawJpeg()(jpeg) is jpeg
    with pytest.raises(ValueError, match="not a complete JPEG"):
        RawJpeg()(jpeg[:-50])
