"""Build the folder a GPU machine without Ray and without package-index access needs.

The lent GPU machine has torch, torchvision, timm and most of the scientific stack, but no
Ray, and what travels to it is limited to 64 MiB. Ray's wheel alone is larger (about
76 MiB for CPython 3.12), so the bundle is one ``tar.xz`` of a ready site folder:

* Ray, unzipped, without what a training job never imports (:data:`RAY_STRIP`: the Java
  jars, RLlib, Serve, Ray LLM, the dashboard's web client);
* every other distribution this project and Ray Train / Tune need that the machine lacks
  (:data:`DEVICE_PACKAGES` is the machine's package list), at the versions installed here;
* this project's own wheel.

On the machine: ``mkdir -p /tmp/site && tar -xJf .gpu_bundle/site-cp312.tar.xz -C /tmp/site``
and ``PYTHONPATH=/tmp/site`` (``bench/gpu_check.sh`` does this). Wheels come from the
package index through ``pip download`` (cached in ``--cache``).

  python bench/gpu_bundle.py                      # CPython 3.12 (the GPU machine's), .gpu_bundle/
  python bench/gpu_bundle.py --python 3.11 --format dir --out /tmp/b   # this machine's, a folder
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".gpu_bundle"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rp2k-dist" / "wheels"
LIMIT_MIB = 60.0  # what travels is capped at 64 MiB, and the working tree needs some of it

# Ray's extras a training job uses; "default" (the dashboard and its metrics exporters) is left out.
RAY_EXTRAS = ("train", "tune")
# Parts of the Ray wheel nothing in ray.train / ray.tune / ray core imports.
RAY_STRIP = ("ray/jars", "ray/rllib", "ray/serve", "ray/llm", "ray/dashboard/client", "ray/cpp")
# Always the machine's own build (its CUDA); never bundled.
DEVICE_BUILDS = {"torch", "torchvision", "torchaudio", "triton"}

# The GPU machine's Python packages ('cuda' image, package list of 2026-11-17; python3 is
# CPython 3.12.3). A distribution named here is taken from the machine, not bundled.
DEVICE_PYTHON = "3.12"
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def project_requirements() -> list[Requirement]:
    """This project's runtime requirements (pyproject.toml), Ray with :data:`RAY_EXTRAS` only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = []
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "ray":
            requirement.extras = set(RAY_EXTRAS)
        requirements.append(requirement)
    return requirements


def missing_distributions(python: str, device: frozenset[str] = DEVICE_PACKAGES) -> dict[str, str]:
    """{name: version} of every distribution the project needs at ``python`` that the
    device lacks: the requirement closure through this environment's installed metadata,
    stopping at what the device has. Versions are the ones installed here (tested here)."""
    environment = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    pending = [(r, ("",)) for r in project_requirements()]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, extras = pending.pop()
        if requirement.marker and not any(requirement.marker.evaluate({**environment, "extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in device or name in DEVICE_BUILDS or (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as error:
            raise SystemExit(f"{name} is needed on the device but not installed here, so its version is unknown") from error
        found[name] = distribution.version
        wanted = ("", *sorted(requirement.extras))
        pending += [(Requirement(line), wanted) for line in distribution.requires or []]
    return dict(sorted(found.items()))


class DownloadError(RuntimeError):
    """The package index could not provide the wheels (unreachable, or no such wheel)."""


def target_tags(python: str) -> list[Tag]:
    version = tuple(int(p) for p in python.split("."))
    return [*cpython_tags(version, platforms=PLATFORMS), *compatible_tags(version, platforms=PLATFORMS)]


def find_wheel(folder: Path, name: str, version: str, tags: Iterable[Tag]) -> Path | None:
    """The best wheel of ``name==version`` in ``folder`` for ``tags`` (best first)."""
    ranked = {tag: rank for rank, tag in enumerate(tags)}
    best: tuple[int, Path] | None = None
    for path in folder.glob("*.whl"):
        wheel_name, wheel_version, _, wheel_tags = parse_wheel_filename(path.name)
        if wheel_name != canonicalize_name(name) or str(wheel_version) != version:
            continue
        rank = min((ranked[t] for t in wheel_tags if t in ranked), default=None)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, path)
    return best[1] if best else None


def download(pins: dict[str, str], python: str, cache: Path) -> list[Path]:
    """Wheels of ``pins`` for CPython ``python`` on x86-64 Linux, from ``cache`` or the index."""
    cache.mkdir(parents=True, exist_ok=True)
    tags = target_tags(python)
    absent = [f"{n}=={v}" for n, v in pins.items() if find_wheel(cache, n, v, tags) is None]
    if absent:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--python-version", python, "--implementation", "cp", *platforms, "--dest", str(cache),
                               *absent], capture_output=True, text=True)
        if done.returncode:
            raise DownloadError(f"pip download {' '.join(absent)} failed: {done.stderr.strip()[-2000:]}")
    wheels = [find_wheel(cache, n, v, tags) for n, v in pins.items()]
    if None in wheels:
        lost = [n for n, w in zip(pins, wheels) if w is None]
        raise DownloadError(f"pip download left no usable wheel for {lost} (python {python})")
    return wheels  # type: ignore[return-value]


def project_wheel(folder: Path) -> Path:
    """This project's wheel, built from a copy of the working tree's sources (setuptools
    writes build/ and egg-info next to them) without build isolation (offline)."""
    source = folder / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for package in ("rp2k_dist", "jobs"):  # jobs/ ships as rp2k_dist.presets (pyproject's package-dir)
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(folder), str(source)], check=True, cwd=folder)
    return next(folder.glob("rp2k_dist-*.whl"))


def unpack_wheel(wheel: Path, site: Path, strip: Iterable[str] = ()) -> int:
    """Extract ``wheel`` into ``site`` as an installer would place it (purelib/platlib),
    keeping file modes (Ray's raylet and GCS binaries must stay executable), leaving out
    the members under ``strip``. Returns the bytes left out."""
    prefixes = tuple(p.rstrip("/") + "/" for p in strip)
    dropped = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.filename.startswith(prefixes):
                dropped += member.file_size
                continue
            target = site / member.filename
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            mode = (member.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)
    return dropped


def build_site(site: Path, wheels: Iterable[Path]) -> dict[str, int]:
    """Unpack every wheel into ``site``; Ray without :data:`RAY_STRIP`. Returns bytes dropped per wheel."""
    site.mkdir(parents=True, exist_ok=True)
    return {w.name: unpack_wheel(w, site, RAY_STRIP if w.name.startswith("ray-") else ()) for w in wheels}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(python: str, out: Path, cache: Path, fmt: str = "tar.xz", limit_mib: float = LIMIT_MIB,
          device: frozenset[str] = DEVICE_PACKAGES, xz_preset: int = 6) -> Path:
    """Build the bundle for CPython ``python``: ``out/site-cpXY.tar.xz`` or the folder
    ``out/site-cpXY``. ``xz_preset`` trades size for time (0: about 1.2x larger, much faster)."""
    tag = "cp" + python.replace(".", "")
    pins = missing_distributions(python, device)
    print(f"bundling for CPython {python}: {', '.join(f'{n}=={v}' for n, v in pins.items())}", flush=True)
    wheels = download(pins, python, cache)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rp2k-bundle-") as tmp:
        wheels.append(project_wheel(Path(tmp)))
        site = (out if fmt == "dir" else Path(tmp)) / f"site-{tag}"
        shutil.rmtree(site, ignore_errors=True)
        dropped = build_site(site, wheels)
        print(f"site folder: {folder_bytes(site) / 2**20:.1f} MiB unpacked; stripped from Ray: "
              f"{sum(dropped.values()) / 2**20:.1f} MiB ({', '.join(RAY_STRIP)})")
        if fmt == "dir":
            return site
        archive = out / f"site-{tag}.tar.xz"
        partial = archive.with_suffix(".partial")
        # xz on every core (the core count changes the speed, barely the size)
        subprocess.run(["tar", "-C", str(site), "-cf", str(partial), "--use-compress-program", f"xz -T0 -{xz_preset}", "."],
                       check=True)
        size = partial.stat().st_size / 2**20
        if size > limit_mib:
            partial.unlink()
            raise SystemExit(f"bundle is {size:.1f} MiB, over the {limit_mib:.0f} MiB limit: strip more or bundle less")
        partial.replace(archive)
        print(f"{archive}: {size:.1f} MiB (limit {limit_mib:.0f} MiB)")
        return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=DEVICE_PYTHON, help="target CPython version (default: the GPU machine's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloaded wheels, kept between builds")
    parser.add_argument("--format", choices=("tar.xz", "dir"), default="tar.xz",
                        help="tar.xz: one archive to carry; dir: the unpacked site folder")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    parser.add_argument("--xz-preset", type=int, choices=range(10), default=6, metavar="0-9")
    args = parser.parse_args()
    try:
        build(args.python, args.out, args.cache, args.format, args.limit_mib, xz_preset=args.xz_preset)
    except DownloadError as error:
        raise SystemExit(str(error)) from error


if __name__ == "__main__":
    main()
