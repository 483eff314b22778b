"""A specialist's training controls: BatchNorm (model.bn) and the backbone's learning rate
(optim.backbone_lr_scale), in one process (no Ray)."""

from __future__ import annotations

import pytest
import torch

from rp2k_dist.config import load_config
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.train import train_worker
from rp2k_dist.run_folder import CHECKPOINT, checkpoint_dir, find_checkpoint, load_checkpoint
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides


def _train(shards, tmp_path, name, extra=(), epochs=1):
    config = load_config(None, tiny_run_overrides(shards.root, tmp_path, name, epochs) + list(extra))
    storage = RunStorage(config.run.storage_path, config.run.name)
    return config, storage, train_worker(config, LocalContext(storage, "cpu"))


@pytest.fixture(scope="module")
def general(synth_shards, tmp_path_factory):
    """A general ResNet-34 trained one epoch: the specialists' starting weights."""
    _, storage, _ = _train(synth_shards, tmp_path_factory.mktemp("general"), "general")
    return find_checkpoint(storage.local_path())


def _category(shards) -> str:
    types = shards.meta_categories("type")
    counts = shards.class_counts("train")
    return max(set(types), key=lambda t: sum(1 for i, x in enumerate(types) if x == t and counts[i] >= 2))


def _specialist(shards, tmp_path, name, weights, extra=(), epochs=1):
    return _train(shards, tmp_path, name, [
        "model.name=apinet", f"model.weights={weights}", f"data.meta_category=type={_category(shards)}",
        "data.classes_per_batch=2", "data.images_per_class=2", "model.freeze_backbone_epochs=1", *extra], epochs)


def _batchnorm_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Running statistics and affine parameters of every BatchNorm layer (keys without ``prefix``)."""
    bn = {}
    for key, value in state.items():
        if key.endswith("running_mean"):
            layer = key[: -len("running_mean")]
            for part in ("running_mean", "running_var", "weight", "bias"):
                bn[(layer + part)[len(prefix):]] = state[layer + part]
    return bn


def test_a_frozen_epoch_leaves_batchnorm_running_stats_unchanged(synth_shards, tmp_path, general):
    """model.bn=frozen: the frozen-backbone epoch changes neither the BatchNorm running
    statistics nor its affine parameters (nor any conv weight); the head learns. With
    model.bn=train (the official recipe) the same epoch moves the running statistics."""
    start = _batchnorm_state(load_checkpoint(general)["model"], "net.")
    _, storage, final = _specialist(synth_shards, tmp_path, "frozen", general,
                                    ["model.bn=frozen", "optim.backbone_lr_scale=0.1"])
    assert final["backbone_lr"] == pytest.approx(0.1 * final["lr"])
    after = load_checkpoint(storage.local_path(checkpoint_dir(1)) / CHECKPOINT)["model"]
    frozen = _batchnorm_state(after, "backbone.")
    assert len(frozen) == len(start) == 4 * 36  # ResNet-34: 36 BatchNorm layers
    for key, value in start.items():
        assert torch.equal(frozen[key], value), key
    assert after["backbone.layer4.2.conv2.weight"].equal(load_checkpoint(general)["model"]["net.layer4.2.conv2.weight"])

    _, storage, _ = _specialist(synth_shards, tmp_path, "official", general, ["model.bn=train"])
    moved = _batchnorm_state(load_checkpoint(storage.local_path(checkpoint_dir(1)) / CHECKPOINT)["model"], "backbone.")
    assert not torch.equal(moved["layer1.0.bn1.running_mean"], start["layer1.0.bn1.running_mean"])
    assert torch.equal(moved["layer1.0.bn1.weight"], start["layer1.0.bn1.weight"])  # the frozen epoch keeps weights


def test_two_parameter_groups_with_their_learning_rates_before_and_after_scheduler_steps():
    from rp2k_dist.engine.optim import build_optimizer, learning_rates, warmup_cosine
    from rp2k_dist.models import create_model

    config = load_config(None, ["model.name=apinet", "optim.optimizer=sgd", "optim.lr=0.02", "optim.lr_reference_batch=32",
                                "optim.backbone_lr_scale=0.1", "optim.weight_decay=0.0005", "optim.momentum=0.9"])
    model = create_model("apinet", 3)
    optimizer, lr = build_optimizer(model, config, global_batch=64)
    assert lr == pytest.approx(0.04)  # 0.02 per 32 images, global batch 64
    backbone, head = optimizer.param_groups
    assert (backbone["name"], head["name"]) == ("backbone", "head")
    assert backbone["lr"] == pytest.approx(0.004) and head["lr"] == pytest.approx(0.04)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone_parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head_parameters()}
    for group in (backbone, head):  # weight decay and momentum apply to both groups
        assert group["weight_decay"] == 0.0005 and group["momentum"] == 0.9
    # the schedule scales both groups: half-way through a 10-step cosine, half of each rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps=10, warmup_steps=0))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert learning_rates(optimizer) == pytest.approx({"lr": 0.02, "backbone_lr": 0.002})
    # model.bn=frozen leaves BatchNorm's parameters out of the backbone group
    from rp2k_dist.engine.batchnorm import freeze_batchnorm

    freeze_batchnorm(model)
    frozen, _ = build_optimizer(model, config, global_batch=64)
    assert len(frozen.param_groups[0]["params"]) == len(backbone["params"]) - 2 * 36


@pytest.mark.parametrize("overrides, match", [
    (["optim.backbone_lr_scale=0.1"], "optim.backbone_lr_scale applies to models with a backbone / head split"),
    (["model.name=apinet", "optim.backbone_lr_scale=0"], r"optim.backbone_lr_scale must be in \(0, 1\]"),
    (["model.bn=eval"], "model.bn must be one of train, frozen, sync"),
])
def test_bad_specialist_settings_name_the_key(overrides, match):
    from rp2k_dist.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def _sync_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the SyncBatchNorm check: its half of a fixed batch through a
    GlooSyncBatchNorm; saves what the check compares."""
    import os

    import torch.distributed as dist

    from rp2k_dist.engine.batchnorm import convert_sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    images, targets, bn = _sync_case()
    bn = convert_sync_batchnorm(bn, torch.device("cpu"))
    mine = slice(rank * 6, (rank + 1) * 6)  # 6 of the 12 images
    x = images[mine].clone().requires_grad_(True)
    loss = ((bn(x) - targets[mine]) ** 2).sum()
    loss.backward()
    torch.save({"grad": x.grad, "weight_grad": bn.weight.grad,
                "mean": bn.running_mean, "var": bn.running_var, "type": type(bn).__name__}, f"{out}-{rank}.pt")
    dist.destroy_process_group()


def _sync_case():
    generator = torch.Generator().manual_seed(7)
    images = 3 + 2 * torch.randn(12, 4, 5, 5, generator=generator)
    targets = torch.randn(12, 4, 5, 5, generator=generator)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    return images, targets, bn


@pytest.mark.slow
def test_sync_batchnorm_on_two_cpu_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Two gloo ranks with 6 images each through SyncBatchNorm give the gradients and
    running statistics of one BatchNorm over all 12 (the loss summed over the ranks);
    plain BatchNorm on each half would not (the check can fail)."""
    import torch.multiprocessing as mp

    from tests.ports import free_port

    mp.start_processes(_sync_rank, args=(2, free_port(), str(tmp_path / "rank")), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    images, targets, bn = _sync_case()
    x = images.clone().requires_grad_(True)
    ((bn(x) - targets) ** 2).sum().backward()
    assert [r["type"] for r in ranks] == ["GlooSyncBatchNorm"] * 2
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], bn.weight.grad, rtol=1e-5, atol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["mean"], bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["var"], bn.running_var, rtol=1e-6, atol=1e-6)
    half = torch.nn.BatchNorm2d(4)
    half(images[:6])
    assert (half.running_mean - bn.running_mean).abs().max() > 1e-3
