"""`rp2k serve`: request checks as pure functions, then one real Ray Serve application on
the shared local cluster, called over HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rp2k_dist.config import load_config
from rp2k_dist.evaluation.gallery import Gallery, generation_of
from rp2k_dist.evaluation.gallery_build import build_gallery
from rp2k_dist.evaluation.predict import predict_images
from rp2k_dist.serving.requests import Limits, RequestError, check_pixels, image_size, parse_images
from tests.conftest import tiny_run_overrides
from tests.helpers import untrained_run
from tests.ports import free_port

TOKEN = "test-token-0123"
LIMITS = Limits(max_bytes=1_000_000, max_images=4, max_pixels=1_000_000)


def _jpeg(size=(64, 48), colour=(200, 30, 40), quality=90) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _multipart(files: list[tuple[str, bytes, str]], fields: dict[str, str] | None = None) -> tuple[str, bytes]:
    boundary = "xYzBoundary42"
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for n, (filename, data, kind) in enumerate(files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image{n}"; filename="{filename}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


# -- requests, without Ray ---------------------------------------------------------------------
def test_a_raw_image_and_multipart_parts_are_the_images():
    jpeg = _jpeg()
    assert parse_images("image/jpeg", jpeg, LIMITS) == [jpeg]
    kind, body = _multipart([("a.jpg", jpeg, "image/jpeg"), ("b.png", b"\x89PNG-ish", "application/octet-stream")],
                            {"sku": "X"})
    assert parse_images(kind, body, LIMITS) == [jpeg, b"\x89PNG-ish"]
    assert image_size(jpeg) == (64, 48)
    png = io.BytesIO()
    Image.new("RGB", (30, 20)).save(png, "PNG")
    assert image_size(png.getvalue()) == (30, 20)


@pytest.mark.parametrize("kind, body, status, code", [
    ("image/jpeg", b"", 400, "empty"),
    ("text/plain", b"hello", 415, "wrong_content_type"),
    (None, b"hello", 415, "wrong_content_type"),
    ("image/jpeg", b"x" * 1_000_001, 413, "too_large"),
    ("multipart/form-data", b"--a\r\n", 400, "bad_multipart"),
])
def test_bad_bodies_are_refused_with_their_status(kind, body, status, code):
    with pytest.raises(RequestError) as err:
        parse_images(kind, body, LIMITS)
    assert (err.value.status, err.value.code) == (status, code) and err.value.body()["detail"]


def test_multipart_counts_and_part_types_are_checked():
    jpeg = _jpeg()
    for files, status, code in [([("a.jpg", jpeg, "image/jpeg")] * 5, 413, "too_many_images"),
                                ([("a.txt", b"hi", "text/plain")], 415, "wrong_content_type"),
                                ([("a.jpg", b"", "image/jpeg")], 400, "empty"),
                                ([], 400, "no_images")]:
        kind, body = _multipart(files, {"sku": "X"})
        with pytest.raises(RequestError) as err:
            parse_images(kind, body, LIMITS)
        assert (err.value.status, err.value.code) == (status, code)
    with pytest.raises(RequestError, match="1200 x 1000"):
        check_pixels(_jpeg((1200, 1000)), LIMITS)


# -- a served model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(synth_shards, tmp_path_factory) -> Path:
    """An (untrained) ResNet-34 checkpoint at 32 px over the synthetic classes, as the engine writes it."""
    root = tmp_path_factory.mktemp("serve")
    config = load_config(None, tiny_run_overrides(synth_shards.root, root, "served"))
    untrained_run(config, root / "served")
    return root / "served"


def _photos(synth_shards, split: str, index: int) -> Path:
    return synth_shards.root.parent / "rp2k" / "all" / split / synth_shards.classes[index]["name"]


@pytest.fixture(scope="module")
def gallery_dir(model_dir, synth_shards, tmp_path_factory) -> Path:
    """A gallery of 4 classes' train photos (sub-folders named by class)."""
    root = tmp_path_factory.mktemp("gallery")
    source = root / "source"
    for index in range(4):
        shutil.copytree(_photos(synth_shards, "train", index), source / synth_shards.classes[index]["name"])
    build_gallery(model_dir, source, root / "g", threshold=0.5)
    return root / "g"


@pytest.fixture(scope="module")
def service(ray_cluster, model_dir, gallery_dir):
    from ray import serve

    from rp2k_dist.serving.app import ServeSettings, start

    port = free_port()
    settings = ServeSettings(str(model_dir), str(gallery_dir), max_batch=4, batch_wait_ms=5,
                             limits={"max_bytes": LIMITS.max_bytes, "max_images": LIMITS.max_images,
                                     "max_pixels": LIMITS.max_pixels}, token=TOKEN, reload_s=0.2)
    url = start(settings, replicas=1, cpus_per_replica=1, port=port)
    try:
        yield url
    finally:
        serve.shutdown()


def _post(url: str, data: bytes, kind: str | None, headers: dict | None = None):
    import requests

    return requests.post(url, data=data, headers={**({"Content-Type": kind} if kind else {}), **(headers or {})},
                         timeout=60)


def _answers(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


@pytest.mark.slow  # a Serve application starts (about a minute on 2 cores)
def test_health_and_model_describe_the_service(service, model_dir, gallery_dir):
    import requests

    assert requests.get(f"{service}/health", timeout=30).json()["status"] == "ok"
    info = requests.get(f"{service}/model", timeout=30).json()
    assert info["model"] == "resnet34" and info["num_classes"] == len(info["classes"]) > 0
    assert info["input"]["crop_size"] == 32 and info["gallery"]["vectors"] == len(Gallery.load(gallery_dir))


@pytest.mark.slow  # a Serve application starts (about a minute on 2 cores)
def test_served_predictions_equal_rp2k_predict(service, model_dir, synth_shards):
    files = [sorted(_photos(synth_shards, "test", index).iterdir())[0] for index in range(5, 10)]
    expected, rejected = predict_images(model_dir, files, workers=1)
    assert not rejected
    single = [_answers(_post(f"{service}/predict", f.read_bytes(), "image/jpeg"))[0] for f in files[:2]]
    kind, body = _multipart([(f.name, f.read_bytes(), "image/jpeg") for f in files[:4]])
    several = _answers(_post(f"{service}/predict", body, kind))
    several += _answers(_post(f"{service}/predict", files[4].read_bytes(), "image/png"))  # the type is a hint
    for served in (single, several):
        for answer, want in zip(served, expected):
            assert [e["sku"] for e in answer["top5"]] == [e["sku"] for e in want["top5"]]
            assert [e["class"] for e in answer["top5"]] == [e["class"] for e in want["top5"]]
            assert np.allclose([e["score"] for e in answer["top5"]], [e["score"] for e in want["top5"]], atol=1e-5)
            assert answer["meta_category"] == want["top5"][0]["type"]
            assert answer["gallery"]["threshold"] == 0.5 and len(answer["gallery"]["top5"]) >= 1


def _reencoded(path: Path) -> bytes:
    image = Image.open(path).convert("RGB")
    image = image.resize((int(image.width * 0.9), int(image.height * 0.9)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=70)
    return out.getvalue()


@pytest.mark.slow  # a Serve application starts (about a minute on 2 cores)
def test_a_gallery_add_is_served_without_a_restart(service, gallery_dir, synth_shards):
    photos = sorted(_photos(synth_shards, "train", 10).iterdir())
    queries = [_reencoded(p) for p in sorted(_photos(synth_shards, "train", 10).iterdir())[:4]]

    def answers() -> list[str]:
        kind, body = _multipart([(f"q{n}.jpg", q, "image/jpeg") for n, q in enumerate(queries)])
        return [a["gallery"]["answer"] for a in _answers(_post(f"{service}/predict", body, kind))]

    assert "NEW-SKU" not in answers()
    before = generation_of(gallery_dir)
    kind, body = _multipart([(p.name, p.read_bytes(), "image/jpeg") for p in photos[:4]], {"sku": "NEW-SKU"})
    assert _post(f"{service}/gallery", body, kind).status_code == 401  # no token
    assert _post(f"{service}/gallery", body, kind, {"Authorization": "Bearer wrong"}).status_code == 401
    added = _post(f"{service}/gallery", body, kind, {"Authorization": f"Bearer {TOKEN}"})
    assert added.status_code == 200, added.text
    assert added.json()["added"] == 4 and generation_of(gallery_dir) == before + 1
    assert sum(a == "NEW-SKU" for a in answers()) >= 3
    # an add written by `rp2k gallery add` on the storage location reaches the replica too
    from rp2k_dist.evaluation.gallery_build import add_to_gallery

    add_to_gallery(gallery_dir, _photos(synth_shards, "train", 11), "OTHER-SKU")
    deadline = time.monotonic() + 20
    import requests

    while requests.get(f"{service}/model", timeout=30).json()["gallery"]["generation"] != before + 2:
        assert time.monotonic() < deadline, "the replica never re-read the gallery"
        time.sleep(0.3)
    other = _reencoded(sorted(_photos(synth_shards, "train", 11).iterdir())[0])
    assert _answers(_post(f"{service}/predict", other, "image/jpeg"))[0]["gallery"]["answer"] == "OTHER-SKU"


def test_a_crashed_add_leaves_the_previous_generation_serving(model_dir, gallery_dir, monkeypatch, tmp_path):
    copy = tmp_path / "g"
    shutil.copytree(gallery_dir, copy)
    gallery = Gallery.load(copy)
    size, generation = len(gallery), gallery.generation
    from rp2k_dist import storage

    real = storage.write_text

    def crash(location, text):  # dies where gallery.json would be written
        raise OSError("disk gone")

    monkeypatch.setattr(storage, "write_text", crash)
    gallery.vectors, gallery.table = gallery.vectors[:1], gallery.table.iloc[:1]
    with pytest.raises(OSError):
        gallery.save(copy)
    monkeypatch.setattr(storage, "write_text", real)
    again = Gallery.load(copy)
    assert len(again) == size and again.generation == generation


@pytest.mark.slow  # a Serve application starts (about a minute on 2 cores)
def test_every_bad_input_gets_its_4xx_and_the_service_keeps_answering(service, synth_shards):
    good = sorted(_photos(synth_shards, "test", 3).iterdir())[0].read_bytes()
    truncated = good[: len(good) // 2]
    kind, many = _multipart([("a.jpg", good, "image/jpeg")] * 5)
    cases = [
        (b"this is not an image", "image/jpeg", 400, "not_an_image"),
        (truncated, "image/jpeg", 400, "not_an_image"),
        (_jpeg((1200, 1000)), "image/jpeg", 413, "too_many_pixels"),
        (b"\xff" * 1_000_001, "image/jpeg", 413, "too_large"),
        (b"", "image/jpeg", 400, "empty"),
        (good, "text/plain", 415, "wrong_content_type"),
        (many, kind, 413, "too_many_images"),
    ]
    for body, content_type, status, code in cases:
        response = _post(f"{service}/predict", body, content_type)
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"] == code and response.json()["detail"]
        after = _post(f"{service}/predict", good, "image/jpeg")
        assert after.status_code == 200 and len(after.json()["predictions"][0]["top5"]) == 5


def test_serve_submit_runs_the_same_command_without_the_submission_flags():
    from rp2k_dist.cli import build_parser
    from rp2k_dist.serving.command import job_words

    args = build_parser().parse_args(["serve", "runs/r", "--gallery", "s3://b/g", "--replicas", "3", "--submit",
                                      "--address", "http://head:8265", "--gpus-per-replica", "0.5"])
    words = job_words(args)
    assert words[:5] == ["python", "-m", "rp2k_dist.cli", "serve", "runs/r"]
    assert "--submit" not in words and "--address" not in words
    assert words[words.index("--replicas") + 1] == "3" and words[words.index("--gpus-per-replica") + 1] == "0.5"
    assert words[words.index("--host") + 1] == "0.0.0.0" and words[words.index("--gallery") + 1] == "s3://b/g"
    assert args.func.__name__ == "cmd_serve"


@pytest.mark.parametrize("score", ["gallery", "msp"])
def test_a_replica_answers_with_the_gallerys_score_as_predict_gallery_does(model_dir, synth_shards, tmp_path, score):
    """A gallery that records a classifier score (msp) is answered by that score and its
    threshold in the service too, not by the best similarity against the score's threshold:
    the service and `rp2k predict --gallery` give the same SKU or unknown for every photo."""
    import pandas as pd

    from rp2k_dist.evaluation.embeddings import image_features
    from rp2k_dist.evaluation.gallery_build import answers, predict_with_gallery, query_scores
    from rp2k_dist.evaluation.inference import load_trained
    from rp2k_dist.serving.model import Classifier

    source, queries = tmp_path / "source", tmp_path / "queries"
    for index in range(4):
        shutil.copytree(_photos(synth_shards, "train", index), source / synth_shards.classes[index]["name"])
        shutil.copytree(_photos(synth_shards, "test", index), queries / str(index))
    built = build_gallery(model_dir, source, tmp_path / "g", threshold=0.0, score=score)
    gallery, trained = built.gallery, load_trained(model_dir, "cpu")
    files = sorted(p for p in queries.rglob("*") if p.is_file())
    _, raw, _ = image_features(trained, files, 8, 1, normalise=False)
    _, _, known = query_scores(trained, gallery, raw)
    gallery.threshold = float(np.median(known))  # half of the queries fall below: both answers occur
    gallery.save(tmp_path / "g")
    predict_with_gallery(model_dir, queries, tmp_path / "g", tmp_path / "p.parquet", workers=1)
    expected = {str(Path(p).resolve()): a for p, a in answers(pd.read_parquet(tmp_path / "p.parquet")).items()}
    served = Classifier(model_dir, gallery=tmp_path / "g", device="cpu")
    batch = torch.stack(served.decode([f.read_bytes() for f in files]))
    got = {str(f.resolve()): a["gallery"]["answer"] for f, a in zip(files, served.predict(batch))}
    assert got == expected
    assert "unknown" in got.values() and set(got.values()) - {"unknown"}
