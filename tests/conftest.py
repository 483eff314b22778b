"""Shared fixtures: small RP2K-like trees made on the spot, and packed shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs several training processes on one machine at once (Ray workers of simulated
# nodes, trials, the test process itself), so more OpenMP threads than cores. OpenMP's default
# wait policy spins: two ResNet-34 steps side by side on 2 cores then take 30x longer (5.8 s
# against 0.19 s a step). Passive waiting yields the core instead. Every process the tests
# start (Ray nodes and their workers, `ray start`, CLI subprocesses) inherits this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# test machines reach no weights host: a missing ImageNet file is the offline error at once (the
# download path is tested against a loopback server in test_weights_download.py, which unsets it)
os.environ.setdefault("RP2K_OFFLINE", "1")

from tests.helpers import jpeg_bytes, write_image
from tests.ray_clusters import RayHead, SharedRay


@pytest.fixture(scope="session")
def quirky_tree(tmp_path_factory) -> Path:
    """An RP2K tree with every documented quirk, written file by file."""
    root = tmp_path_factory.mktemp("rp2k") / "rp2k"
    base = root / "all"
    write_image(base / "train" / "伊利纯牛奶250ml" / "0716_7768.jpg", 1)
    write_image(base / "train" / "伊利纯牛奶250ml" / "1103_74556 - 副本 (2).jpg", 2)
    write_image(base / "test" / "伊利纯牛奶250ml" / "0514_10877_0.99999917.jpg", 3)
    # duplicate basename in another class
    write_image(base / "train" / "555（冰炫）" / "0716_7768.jpg", 4)
    write_image(base / "train" / "555（冰炫）" / "截屏2019-12-10下午5.15.14.png", 5, mode="RGBA")
    write_image(base / "test" / "555（冰炫）" / "p.png", 6, mode="P")
    # a class with a space and full-width brackets, train only
    write_image(base / "train" / "青岛啤酒 经典（500ml）" / "a.jpg", 7)
    # a test-only class
    write_image(base / "test" / "东古黄豆酱750G" / "b.jpg", 8)
    # empty class folder, a zero-byte file, a non-image file, a corrupt jpg
    (base / "train" / "空的").mkdir(parents=True)
    (base / "train" / "伊利纯牛奶250ml" / "empty.jpg").write_bytes(b"")
    (base / "train" / "伊利纯牛奶250ml" / "Thumbs.db").write_bytes(b"x")
    (base / "train" / "555（冰炫）" / "broken.jpg").write_bytes(jpeg_bytes(9)[:100])
    (root / "metadata.csv").write_text(
        "\ufeffclass,sku,name,brand,type,shape,size,flavour\n"
        "伊利纯牛奶250ml,000123,Yili milk,Yili,dairy,box,250ml,\n"
        "555（冰炫）,000456,555 Ice,555,tobacco,package,,ice\n"
        "青岛啤酒 经典（500ml）,000789,Tsingtao,Tsingtao,Beer,Can,500ml,\n"
        "不存在,000999,ghost,,dairy,bag,,\n",
        encoding="utf-8",
    )
    return root


def make_tree(root: Path, classes: int = 6, per_class: int = 30, test_every: int = 5, size=(64, 80)) -> Path:
    """A clean RP2K-layout tree of noise images: ``per_class`` images per class,
    every ``test_every``-th one in test."""
    for c in range(classes):
        for i in range(per_class):
            split = "test" if i % test_every == 0 else "train"
            write_image(root / "all" / split / f"类别 {c}" / f"{i:04d}.jpg", c * 1000 + i, size=size)
    return root


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("small") / "rp2k")


@pytest.fixture(scope="session")
def many_shards(small_tree, tmp_path_factory):
    """The small tree packed into many small shards (more shards than readers)."""
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k

    out = tmp_path_factory.mktemp("packed") / "many"
    return pack_dataset(scan_rp2k(small_tree), out, PackConfig(samples_per_shard=6, shorter_side=64, workers=1))


@pytest.fixture(scope="session")
def few_shards(small_tree, tmp_path_factory):
    """The same tree in two big shards per split (fewer shards than readers)."""
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k

    out = tmp_path_factory.mktemp("packed") / "few"
    return pack_dataset(scan_rp2k(small_tree), out, PackConfig(samples_per_shard=100, shorter_side=64, workers=1))


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """A small learnable synthetic RP2K, packed: 24 classes at 64 px."""
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k

    base = tmp_path_factory.mktemp("synth")
    summary = make_synthetic_rp2k(base / "rp2k", SynthConfig(classes=24, images_per_class=16, image_size=64, workers=1))
    index = scan_rp2k(summary.root, summary.metadata_path)
    return pack_dataset(index, base / "shards", PackConfig(shorter_side=48, samples_per_shard=32, workers=1))


def tiny_run_overrides(shards, storage, name: str, epochs: int = 2) -> list[str]:
    """Overrides for a seconds-long CPU run of the real engine."""
    return [
        f"data.shards={shards}", "data.batch_size=16", "data.loader_workers=0", "data.shuffle_buffer=64",
        "data.max_corrupt_fraction=0.2",
        "model.crop_size=32", "model.channels_last=false", f"optim.epochs={epochs}",
        # AdamW: SGD with BatchNorm at batch 16 learns far slower on this tiny set
        "optim.optimizer=adamw", "optim.lr=0.016", "optim.weight_decay=0.05", "optim.warmup_epochs=0",
        "augment.border_max=4", "augment.crop_max=3",  # the paper's 30/10 px are for ~300 px images
        f"run.storage_path={storage}", f"run.name={name}", "run.workers=1",
    ]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on a free loopback port, for the whole session.

    Its credentials are exported as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (pyarrow,
    Ray workers and `rp2k` subprocesses read them); URIs carry the endpoint
    (:meth:`S3Server.uri`)."""
    from tests import s3server

    try:
        process, server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    except RuntimeError as err:
        pytest.skip(f"S3 server could not start: {err}")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3server.stop(process)


@pytest.fixture(scope="module")
def s3_endpoint(s3_server):
    """The S3 server's endpoint in ``AWS_ENDPOINT_URL`` too, as on a cluster's nodes: plain
    ``s3://bucket/...`` URIs (no query) reach it, here and in processes started from here."""
    from rp2k_dist import storage

    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = f"http://{s3_server.endpoint}"
    storage._filesystem.cache_clear()
    try:
        yield s3_server
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL")
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
        storage._filesystem.cache_clear()


# --------------------------------------------------------------------------- Ray clusters
# In each test process a cluster is started by the first test that asks for it and stopped
# after the last test of a run of consecutive modules that use it; pytest_collection_modifyitems
# puts those modules next to each other, so a process starts each cluster a few times at most.

SHARED_RAY = SharedRay()
RAY_HEAD = RayHead()
#: fixture name -> the cluster it hands out (a module on both is ordered with the first)
CLUSTERS = {"ray_head": RAY_HEAD, "ray_cluster": SHARED_RAY}
#: module node id -> names of the fixtures its tests use (set at collection)
_MODULE_FIXTURES: dict[str, set[str]] = {}


@pytest.fixture(scope="module")
def ray_cluster() -> SharedRay:
    """The shared single-node Ray cluster (``SHARED_CPUS`` CPUs, the test S3 server's
    credentials in its workers' environment), connected in this process. Tests leave it as
    they found it: their actors and placement groups gone."""
    return SHARED_RAY.start()


@pytest.fixture(scope="module")
def ray_head() -> dict:
    """The shared ``ray start`` head (tests.ray_clusters.RayHead.start)."""
    return RAY_HEAD.start()


@pytest.fixture
def no_ray() -> None:
    """A driver without Ray: the shared cluster, if up, is shut down first."""
    import ray

    SHARED_RAY.stop()
    assert not ray.is_initialized(), "these tests need a driver without Ray"


@pytest.fixture(scope="module")
def own_ray() -> None:
    """For a test that connects this process to a Ray cluster of its own (several nodes,
    a GPU): the shared cluster, if up, is shut down first."""
    import ray

    SHARED_RAY.stop()
    assert not ray.is_initialized(), "a test left a Ray of its own connected"


def _module_of(item) -> str:
    return item.nodeid.split("::")[0]


def _cluster_of(module: str) -> str | None:
    """The shared cluster a module's tests use, if any."""
    names = _MODULE_FIXTURES[module]
    return next((name for name in CLUSTERS if name in names), None)


#: The modules that take 45 s or more on two cores, longest first (measured). The suite's two
#: processes (pytest-xdist, ``--dist loadscope``) take whole modules from the front of one
#: queue, so starting with these and ending with many short ones makes both end together.
LONGEST_FIRST = ("tests/test_tune.py", "tests/test_rehearsal.py", "tests/test_ray_resume.py",
                 "tests/test_ray_multinode.py", "tests/test_reproduce.py", "tests/test_ray_elastic.py",
                 "tests/test_engine.py", "tests/test_ray_train.py", "tests/test_demo.py",
                 "tests/test_storage_seam.py", "tests/test_gpu_bundle.py", "tests/test_object_storage.py",
                 "tests/test_serving.py", "tests/test_submit.py", "tests/test_console.py", "tests/test_global_batch.py")


def _order(module: str) -> tuple[int, int]:
    if module in LONGEST_FIRST:
        return 0, LONGEST_FIRST.index(module)
    cluster = _cluster_of(module)  # then the modules of each shared cluster next to each other
    return 1, len(CLUSTERS) if cluster is None else list(CLUSTERS).index(cluster)


def pytest_collection_modifyitems(config, items):
    """Modules run whole, each in file order: the longest first (:data:`LONGEST_FIRST`), then
    the modules of each shared cluster next to each other, so that a process starts each
    cluster as few times as it can (it stops one that its next test does not use), then the
    rest."""
    for item in items:
        _MODULE_FIXTURES.setdefault(_module_of(item), set()).update(getattr(item, "fixturenames", ()))
    items.sort(key=lambda item: _order(_module_of(item)))  # stable: file order within a key


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the module's own fixtures are torn down first
    following = _MODULE_FIXTURES.get(_module_of(nextitem), set()) if nextitem is not None else set()
    for name, cluster in CLUSTERS.items():
        if name not in following:
            cluster.stop()


def pytest_sessionfinish(session, exitstatus):
    for cluster in CLUSTERS.values():
        cluster.stop()
