"""The GPU bundle (bench/gpu_bundle.py) runs Ray Train on its own.

The bundle is built for this machine's Python, unpacked with ``tar -xJf`` into a clean
folder, and a one-epoch Ray Train job runs from there in a fresh interpreter that sees
only what the GPU machine would: the bundle, plus the packages of this environment that
the GPU machine also has (:data:`gpu_bundle.DEVICE_PACKAGES`). Everything else installed
here (Ray itself, jsonschema, the dashboard's dependencies...) is made unimportable, so a
file stripped from Ray or a dependency left out fails here, not on the device.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.conftest import tiny_run_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def load_bundle_module():
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "bench" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def modules_absent_on_device(device: frozenset[str]) -> list[str]:
    """Top-level modules installed here whose every distribution the device lacks."""
    absent = []
    for module, distributions in importlib.metadata.packages_distributions().items():
        if module.isidentifier() and not any(canonicalize_name(d) in device for d in distributions):
            absent.append(module)
    return sorted(absent)


# A sitecustomize for the job's interpreter (and Ray's worker processes, which inherit
# PYTHONPATH): a module of the list is imported from the bundle or not at all.
GUARD = textwrap.dedent('''
    import importlib.machinery, json, os, sys

    _here = os.path.dirname(os.path.abspath(__file__))
    _site = os.environ["RP2K_BUNDLE_SITE"]
    with open(os.path.join(_here, "absent.json")) as f:
        _absent = frozenset(json.load(f))

    class DeviceOnly:
        """Imports a module the GPU machine lacks only from the bundle."""

        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if path is not None or name not in _absent:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, [_site])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine, not in the bundle)", name=name)
            return spec

    sys.meta_path.insert(0, DeviceOnly)
''')

JOB = textwrap.dedent('''
    import json, sys
    overrides = json.loads(sys.argv[1])
    import ray, ray.train, rp2k_dist
    from rp2k_dist.config import load_config
    from rp2k_dist.launch.trainer import run_training

    blocked = []
    for name in sys.argv[2:]:
        try:
            __import__(name)
        except ModuleNotFoundError:
            blocked.append(name)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        final = run_training(load_config(None, overrides))
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps({"ray": ray.__file__, "rp2k_dist": rp2k_dist.__file__, "blocked": blocked,
                                  "epoch": final["epoch"], "val_samples": final["val_samples"],
                                  "train_images": final["train_images"]}))
''')


def test_one_epoch_ray_train_job_runs_from_the_unpacked_bundle(synth_shards, tmp_path):
    gpu_bundle = load_bundle_module()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cache = Path(os.environ.get("RP2K_WHEEL_CACHE", gpu_bundle.DEFAULT_CACHE))
    try:
        archive = gpu_bundle.build(python, tmp_path / "bundle", cache, xz_preset=0)
    except gpu_bundle.DownloadError as error:
        pytest.skip(f"the package index cannot be reached for the bundle's wheels: {error}")

    clean = tmp_path / "clean"
    site, guard = clean / "site", clean / "guard"
    site.mkdir(parents=True)
    guard.mkdir()
    subprocess.run(["tar", "-xJf", str(archive), "-C", str(site)], check=True)
    stripped = [p for p in gpu_bundle.RAY_STRIP if (site / p).exists()]
    assert not stripped and (site / "ray" / "train").is_dir() and (site / "rp2k_dist").is_dir()

    absent = modules_absent_on_device(gpu_bundle.DEVICE_PACKAGES)
    assert "ray" in absent and "jsonschema" in absent  # the check below would prove nothing otherwise
    (guard / "absent.json").write_text(json.dumps(absent))
    (guard / "sitecustomize.py").write_text(GUARD)
    # modules installed here that the device lacks and the bundle leaves out: must fail to import
    probes = [m for m in ("aiohttp_cors", "opencensus", "colorful") if m in absent and not (site / m).exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_"))}
    env.update(PYTHONPATH=f"{guard}{os.pathsep}{site}", RP2K_BUNDLE_SITE=str(site), PYTHONNOUSERSITE="1")
    overrides = tiny_run_overrides(synth_shards.root, tmp_path / "runs", "bundle", epochs=1) + ["run.cpus_per_worker=1"]
    job = subprocess.run([sys.executable, "-c", JOB, json.dumps(overrides), *probes], cwd=clean, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    assert job.returncode == 0 and lines, job.stdout[-3000:] + job.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert Path(result["ray"]).is_relative_to(site) and Path(result["rp2k_dist"]).is_relative_to(site)
    assert result["blocked"] == probes
    assert result["epoch"] == 1 and result["train_images"] > 0
    assert result["val_samples"] == synth_shards.num_samples("test")
