"""Model registry (smoke tests over every registered model) and offline weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from rp2k_dist.data.transforms import InputSpec
from rp2k_dist.errors import ConfigError, WeightsMismatchError
from rp2k_dist.models import (
    MODELS,
    ApiNet,
    WeightsNotFoundError,
    create_model,
    imagenet_state_dict,
    input_spec,
    load_weights_file,
    model_names,
)

FEATURE_DIMS = {"resnet34": 512, "inception_v3": 2048, "apinet": 512}
LABELS = torch.tensor([0, 0, 1, 1])  # every class twice: API-Net needs intra-class pairs


def smoke_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """64 px images, or the model's smallest training crop (InceptionV3: 299 px, 2 images)."""
    size = max(64, MODELS[name].min_crop_size)
    labels = LABELS if size == 64 else LABELS[1:3]
    return torch.randn(len(labels), 3, size, size), labels


def test_registry_lists_the_papers_models():
    assert model_names() == ["apinet", "inception_v3", "resnet34"]
    assert set(FEATURE_DIMS) == set(model_names())


@pytest.mark.parametrize("name", model_names())
def test_model_protocol(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    images, labels = smoke_batch(name)

    model.train()
    output = model(images, labels)
    loss = model.loss(output, labels, F.cross_entropy)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.logits(output).shape == (len(labels), 7)

    model.eval()
    with torch.no_grad():
        logits = model(images)
        assert isinstance(logits, torch.Tensor) and logits.shape == (len(labels), 7)
        assert torch.allclose(model.loss(logits, labels, F.cross_entropy), F.cross_entropy(logits, labels))
        features = model.forward_features(images)
        assert features.shape == (len(labels), FEATURE_DIMS[name])
        assert torch.allclose(model.classifier(features), logits, atol=1e-4)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7


def test_inception_loss_adds_four_tenths_of_the_auxiliary_loss():
    model = create_model("inception_v3", num_classes=3)
    main, aux = torch.randn(4, 3), torch.randn(4, 3)
    output = torchvision.models.inception.InceptionOutputs(main, aux)
    expected = F.cross_entropy(main, LABELS) + 0.4 * F.cross_entropy(aux, LABELS)
    assert torch.allclose(model.loss(output, LABELS, F.cross_entropy), expected)
    assert model.logits(output) is main


def test_input_specs():
    assert input_spec("resnet34") == InputSpec(224, 256)
    assert input_spec("inception_v3") == InputSpec(299, 342)
    assert input_spec("apinet") == InputSpec(224, 256)
    assert input_spec("apinet", crop_size=448) == InputSpec(448, 512)
    with pytest.raises(ConfigError, match="299"):
        input_spec("inception_v3", crop_size=224)


def test_unknown_names_and_sources_are_errors():
    with pytest.raises(ConfigError, match="apinet, inception_v3, resnet34"):
        create_model("resnet50", num_classes=3)
    with pytest.raises(ConfigError, match="known"):
        input_spec("vit")
    with pytest.raises(ValueError, match="imagenet"):
        create_model("resnet34", num_classes=3, pretrained="imagenet21k")


def test_state_dict_keys_are_torchvision_names_under_documented_prefixes():
    resnet_keys = create_model("resnet34", num_classes=3).state_dict().keys()
    assert {"net.conv1.weight", "net.layer4.2.bn2.bias", "net.fc.weight"} <= resnet_keys
    apinet_keys = create_model("apinet", num_classes=3).state_dict().keys()
    assert {"backbone.conv1.weight", "backbone.layer4.2.bn2.bias", "fc.weight", "map1.weight"} <= apinet_keys
    assert "net.AuxLogits.fc.weight" in create_model("inception_v3", num_classes=3).state_dict()


def test_resnet_runs_channels_last_and_compiles_without_graph_breaks():
    model = create_model("resnet34", num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(images), expected, atol=1e-4)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(images), expected, atol=1e-4)


# --- weights ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory) -> Path:
    """A torch hub cache holding torchvision-format ImageNet files under the official names."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34().state_dict(), checkpoints / "resnet34-b627a593.pth")
    inception = torchvision.models.inception_v3(aux_logits=True, init_weights=False)
    torch.save(inception.state_dict(), checkpoints / "inception_v3_google-0cc3c7bd.pth")
    return torch_home


@pytest.fixture
def torch_home(hub_files, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(hub_files))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return hub_files


def _file_tensors(torch_home: Path, file_name: str) -> dict[str, torch.Tensor]:
    return torch.load(torch_home / "hub" / "checkpoints" / file_name, weights_only=True)


def test_imagenet_resnet34_loads_from_the_hub_cache_and_gets_a_new_head(torch_home):
    reference = _file_tensors(torch_home, "resnet34-b627a593.pth")
    model = create_model("resnet34", num_classes=7, pretrained="imagenet")
    state = model.state_dict()
    for key, tensor in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"net.{key}"], tensor), key
    assert model.classifier.weight.shape == (7, 512)


def test_imagenet_inception_replaces_both_heads(torch_home):
    reference = _file_tensors(torch_home, "inception_v3_google-0cc3c7bd.pth")
    model = create_model("inception_v3", num_classes=7, pretrained="imagenet")
    state = model.state_dict()
    assert torch.equal(state["net.Mixed_7c.branch_pool.conv.weight"], reference["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(state["net.AuxLogits.conv1.conv.weight"], reference["AuxLogits.conv1.conv.weight"])
    assert state["net.fc.weight"].shape == (7, 2048)
    assert state["net.AuxLogits.fc.weight"].shape == (7, 768)


def test_imagenet_apinet_backbone_is_resnet34(torch_home):
    reference = _file_tensors(torch_home, "resnet34-b627a593.pth")
    model = create_model("apinet", num_classes=4, pretrained="imagenet")
    assert torch.equal(model.state_dict()["backbone.layer3.1.conv2.weight"], reference["layer3.1.conv2.weight"])
    assert model.fc.out_features == 4


def test_missing_imagenet_file_names_file_folder_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("RP2K_OFFLINE", "1")  # an online machine would download it
    with pytest.raises(WeightsNotFoundError) as error:
        imagenet_state_dict("inception_v3")
    message = str(error.value)
    assert "inception_v3_google-0cc3c7bd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth" in message
    with pytest.raises(WeightsNotFoundError, match="resnet34-b627a593.pth"):
        create_model("resnet34", num_classes=3, pretrained="imagenet")


def test_project_checkpoint_loads_and_a_head_of_another_size_is_reported(tmp_path):
    source = create_model("resnet34", num_classes=5)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "epoch": 3, "config": {"lr": 0.1}, "classes": ["a", "b"]}, path)

    same = create_model("resnet34", num_classes=5, weights=path)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))

    other = create_model("resnet34", num_classes=7)
    report = load_weights_file(other, path)  # no class table to map rows by: the head stays new
    assert report.new == ["net.fc.weight", "net.fc.bias"] and report.sliced == []
    assert "2 left new (net.fc.weight, net.fc.bias)" in report.summary()
    assert torch.equal(other.state_dict()["net.layer1.0.conv1.weight"], source.state_dict()["net.layer1.0.conv1.weight"])


def test_plain_torchvision_and_compiled_state_dicts_load(tmp_path):
    net = torchvision.models.resnet34(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    model = create_model("resnet34", num_classes=3)
    assert load_weights_file(model, tmp_path / "plain.pth").new == []
    assert torch.equal(model.net.conv1.weight, net.conv1.weight)

    compiled_keys = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
    torch.save({"model": compiled_keys}, tmp_path / "compiled.pt")
    assert load_weights_file(create_model("resnet34", num_classes=3), tmp_path / "compiled.pt").new == []


def test_apinet_backbone_and_fc_load_from_a_resnet34_checkpoint(tmp_path):
    resnet = create_model("resnet34", num_classes=4)
    torch.save({"model": resnet.state_dict(), "epoch": 10}, tmp_path / "r34.pt")
    apinet = create_model("apinet", num_classes=4)
    report = load_weights_file(apinet, tmp_path / "r34.pt")
    assert sorted(report.new) == ["map1.bias", "map1.weight", "map2.bias", "map2.weight"]
    assert isinstance(apinet, ApiNet)
    for key, tensor in resnet.state_dict().items():
        assert torch.equal(apinet.state_dict()[key.replace("net.", "backbone.", 1).replace("backbone.fc.", "fc.")], tensor)


def test_weights_file_errors(tmp_path):
    model = create_model("resnet34", num_classes=3)
    with pytest.raises(WeightsNotFoundError, match="nowhere.pt"):
        load_weights_file(model, tmp_path / "nowhere.pt")

    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "alien.pt")
    with pytest.raises(WeightsMismatchError, match="nothing matched"):
        load_weights_file(model, tmp_path / "alien.pt")

    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("net.layer4.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WeightsMismatchError, match=r"net\.layer4\.0\.conv1\.weight \(missing\).*partial"):
        load_weights_file(model, tmp_path / "partial.pt")
    report = load_weights_file(model, tmp_path / "partial.pt", partial=True)
    assert report.new and all(key.startswith("net.layer4.") for key in report.new)

    reshaped = dict(model.state_dict(), **{"net.conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(reshaped, tmp_path / "reshaped.pt")
    with pytest.raises(WeightsMismatchError, match=r"net\.conv1\.weight \(file \(64, 3, 3, 3\), model \(64, 3, 7, 7\)\)"):
        load_weights_file(model, tmp_path / "reshaped.pt")


def _general_checkpoint(path: Path, num_classes: int = 9) -> nn.Module:
    """A general ResNet-34 of this project (BatchNorm statistics moved off their defaults)
    saved as a checkpoint with its class table, as the engine writes it."""
    torch.manual_seed(0)
    general = create_model("resnet34", num_classes=num_classes)
    with torch.no_grad():
        general.train()(torch.randn(8, 3, 64, 64))
    general.eval()
    classes = [{"index": i, "global_index": i, "name": f"c{i}"} for i in range(num_classes)]
    torch.save({"model": general.state_dict(), "classes": classes, "class_subset": None}, path)
    return general


@pytest.mark.parametrize("name", ["resnet34", "apinet"])
def test_a_specialist_from_a_general_checkpoint_starts_as_the_general_model_on_its_classes(tmp_path, name):
    general = _general_checkpoint(tmp_path / "general.pt")
    subset = [7, 2, 5]  # not in global order
    specialist = create_model(name, num_classes=len(subset))
    report = load_weights_file(specialist, tmp_path / "general.pt", classes=subset)
    fc = "net.fc." if name == "resnet34" else "fc."
    assert report.sliced == [f"{fc}weight", f"{fc}bias"]
    assert f"2 sliced by class ({fc}weight, {fc}bias)" in report.summary()
    assert report.new == ([] if name == "resnet34" else ["map1.weight", "map1.bias", "map2.weight", "map2.bias"])
    images = torch.randn(5, 3, 64, 64)
    state, general_state = specialist.state_dict(), general.state_dict()
    assert torch.equal(state[f"{fc}weight"], general_state["net.fc.weight"][subset])
    with torch.no_grad():
        # the same weights; a 3-row matmul may round differently from an 8-row one, so not bit-equal
        torch.testing.assert_close(specialist.eval()(images), general(images)[:, subset], rtol=1e-5, atol=1e-5)


def test_inception_specialist_slices_both_classifiers(tmp_path):
    general = create_model("inception_v3", num_classes=6)
    classes = [{"index": i, "global_index": i} for i in range(6)]
    torch.save({"model": general.state_dict(), "classes": classes}, tmp_path / "general.pt")
    specialist = create_model("inception_v3", num_classes=2)
    report = load_weights_file(specialist, tmp_path / "general.pt", classes=[4, 1])
    assert sorted(report.sliced) == ["net.AuxLogits.fc.bias", "net.AuxLogits.fc.weight", "net.fc.bias", "net.fc.weight"]
    assert torch.equal(specialist.net.AuxLogits.fc.weight, general.net.AuxLogits.fc.weight[[4, 1]])


def test_classes_the_checkpoint_does_not_know_are_an_error_unless_partial(tmp_path):
    _general_checkpoint(tmp_path / "general.pt", num_classes=4)
    same_count = create_model("resnet34", num_classes=4)
    # the same class count but other classes: the rows are still taken by class
    assert load_weights_file(same_count, tmp_path / "general.pt", classes=[3, 2, 1, 0]).sliced == ["net.fc.weight", "net.fc.bias"]
    identity = load_weights_file(same_count, tmp_path / "general.pt", classes=[0, 1, 2, 3])
    assert identity.sliced == [] and identity.new == []
    model = create_model("resnet34", num_classes=2)
    with pytest.raises(WeightsMismatchError, match=r"net\.fc\.weight \(general\.pt has no row for global classes \[9\]\)"):
        load_weights_file(model, tmp_path / "general.pt", classes=[1, 9])
    report = load_weights_file(model, tmp_path / "general.pt", classes=[1, 9], partial=True)
    assert report.new == ["net.fc.weight", "net.fc.bias"] and report.sliced == []
