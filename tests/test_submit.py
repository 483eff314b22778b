"""`rp2k submit` / `rp2k jobs`: entrypoint, upload excludes, errors, and a real Ray head.

The integration tests run against the session's ``ray start`` head (tests.ray_clusters.RayHead:
own ports and temp dir, the dashboard's Jobs API, token authentication forced on with a
token file of its own).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rp2k_dist.cli import main
from rp2k_dist.errors import ConfigError
from rp2k_dist.launch.submit import (
    EXCLUDES,
    SubmitError,
    build_entrypoint,
    build_runtime_env,
    connect,
    follow,
    is_excluded,
    jobs_list,
    jobs_status,
    jobs_stop,
    project_dependencies,
    resolve_address,
    submit,
    wait,
)
from tests.ray_clusters import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- unit tests


def test_entrypoint_survives_shell_quoting():
    overrides = ["run.name=青岛啤酒 经典（500ml） 'x\" $HOME", "optim.lr=0.05", "data.meta_category=type=liquor"]
    entrypoint = build_entrypoint("jobs/smoke.yaml", overrides,
                                  {"workers": 4, "gpus_per_worker": 1.0, "name": None, "storage_path": "/mnt/s p"})
    assert shlex.split(entrypoint) == [
        "python", "-m", "rp2k_dist.cli", "train", "jobs/smoke.yaml",
        "--set", overrides[0], "--set", overrides[1], "--set", overrides[2],
        "--workers", "4", "--gpus-per-worker", "1.0", "--storage-path", "/mnt/s p",
    ]
    # and the real `rp2k train` parser reads it back unchanged
    from rp2k_dist.cli import build_parser

    args = build_parser().parse_args(shlex.split(entrypoint)[3:])
    assert args.set == overrides and args.workers == 4 and args.storage_path == "/mnt/s p" and args.name is None
    with pytest.raises(ValueError, match="unknown rp2k train flag"):
        build_entrypoint("jobs/smoke.yaml", [], {"epochs": 3})


def _write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_upload_excludes_drop_venv_shards_runs_but_keep_the_data_package(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "repo"
    keep = ["pyproject.toml", "rp2k_dist/__init__.py", "rp2k_dist/data/__init__.py", "rp2k_dist/data/synth.py",
            "jobs/smoke.yaml", "bench/run.py", "tests/shards_helper.py"]
    drop = [".venv/lib/python3.11/site-packages/torch/__init__.py", ".venv/bin/python", "shards/train-000000.tar",
            "shards/dataset.json", "runs/demo/metrics.jsonl", "data/rp2k/all/train/a/1.jpg", ".git/HEAD",
            "bench/out/result.json", "rp2k_dist/__pycache__/cli.cpython-311.pyc", "rp2k_dist/data/extra/pack.tar"]
    for name in keep + drop:
        _write(root / name)
    env = build_runtime_env(root)
    assert env["working_dir"] == str(root.resolve()) and env["excludes"] == EXCLUDES and "pip" not in env
    # Ray's own packaging of a working_dir (what JobSubmissionClient uploads), gitignore off:
    package = tmp_path / "pkg.zip"
    create_package(str(root), package, include_gitignore=False, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert names == set(keep)
    assert not any(is_excluded(root, name) for name in keep)
    assert all(is_excluded(root, name) for name in drop)
    # the trap the anchors avoid: a bare `data` (or `data/`) drops the package folder too
    for bare in ("data", "data/"):
        bare_package = tmp_path / f"bare{len(bare)}.zip"  # create_package keeps an existing file
        create_package(str(root), bare_package, include_gitignore=False, excludes=[bare])
        assert "rp2k_dist/data/synth.py" not in zipfile.ZipFile(bare_package).namelist()


def test_repository_upload_is_small_and_has_the_code(tmp_path):
    """The real repo as Ray packs it for the job (with .gitignore, as Ray's client does)."""
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "repo.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=build_runtime_env(REPO)["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "rp2k_dist/data/synth/writer.py" in names and "rp2k_dist/launch/submit.py" in names and "pyproject.toml" in names
    assert not any(n.startswith((".venv/", ".git/", "shards/", "runs/", "data/")) or "__pycache__" in n for n in names)
    assert package.stat().st_size < 20e6


def test_pip_is_opt_in_and_never_reinstalls_ray():
    assert "pip" not in build_runtime_env(REPO)
    deps = build_runtime_env(REPO, pip=True)["pip"]
    assert deps == project_dependencies(REPO)
    assert "torch" in deps and not any(re.match(r"ray\b", d) for d in deps)


def test_auth_mode_is_passed_through_but_never_the_token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-value")
    env = build_runtime_env(REPO)
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token"}
    assert "secret-token-value" not in json.dumps(env)


def test_preset_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # never reached: the checks come first
    with pytest.raises(ConfigError, match="no_such_preset.yaml not found"):
        submit(REPO / "jobs" / "no_such_preset.yaml")
    outside = tmp_path / "elsewhere" / "preset.yaml"
    _write(outside, "run: {name: x}\n")
    monkeypatch.chdir(REPO)
    with pytest.raises(SubmitError, match="outside the uploaded working dir"):
        submit(outside)
    repo = tmp_path / "repo"
    _write(repo / "pyproject.toml", "[project]\nname = 'x'\n")
    _write(repo / "rp2k_dist" / "__init__.py", "")
    _write(repo / "runs" / "preset.yaml", "run: {name: x}\n")
    with pytest.raises(SubmitError, match="not uploaded"):
        submit(repo / "runs" / "preset.yaml")


def test_missing_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(SubmitError, match="--address"):
        resolve_address(None)
    with pytest.raises(SubmitError, match="--address"):
        submit(REPO / "pyproject.toml")  # before even reading the preset
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    assert resolve_address("https://head:8265/") == "https://head:8265"


# --------------------------------------------------------------------------- a real Ray head


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k

    base = tmp_path_factory.mktemp("submit_data")
    summary = make_synthetic_rp2k(base / "rp2k", SynthConfig(classes=8, images_per_class=8, image_size=64, workers=1))
    index = scan_rp2k(summary.root, summary.metadata_path)
    manifest = pack_dataset(index, base / "shards", PackConfig(shorter_side=48, samples_per_shard=32, workers=1))
    return manifest.root


@pytest.fixture(scope="module")
def smoke_preset():
    """jobs/smoke.yaml when the repo has it, else a temporary preset inside jobs/ (removed after)."""
    preset = REPO / "jobs" / "smoke.yaml"
    if preset.exists():
        yield preset
        return
    preset = REPO / "jobs" / f"_test_smoke_{os.getpid()}.yaml"
    preset.parent.mkdir(exist_ok=True)
    preset.write_text("model: {name: resnet34}\noptim: {epochs: 1}\nrun: {name: smoke, workers: 1}\n")
    try:
        yield preset
    finally:
        preset.unlink(missing_ok=True)


TINY = ["data.batch_size=8", "data.loader_workers=0", "model.crop_size=32", "model.channels_last=false",
        "optim.epochs=1", "optim.optimizer=adamw", "optim.lr=0.016", "run.workers=1", "run.cpus_per_worker=1"]


def _module_cli(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`rp2k submit/jobs ...`, run as `python -m rp2k_dist.cli`."""
    return subprocess.run([sys.executable, "-m", "rp2k_dist.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _client_env(ray_head, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def test_submit_runs_rp2k_train_as_a_job_and_follows_it(ray_head, tiny_shards, smoke_preset, tmp_path):
    storage = tmp_path / "runs"
    # Token the way Ray reads it (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH); a wrong RAY_ADDRESS
    # in the environment must not beat --address.
    env = _client_env(ray_head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_head["token_file"]),
                      RAY_ADDRESS="http://127.0.0.1:1")
    args = [str(smoke_preset.relative_to(REPO)), "--address", ray_head["url"], "--name", "submit-smoke",
            "--shards", str(tiny_shards), "--storage-path", str(storage)]
    for override in TINY:
        args += ["--set", override]
    started = time.monotonic()
    done = _module_cli("submit", *args, env=env, timeout=240)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    job_id = re.search(r"^submitted job (\S+) to ", done.stdout, re.M).group(1)
    assert job_id.startswith("rp2k-submit-smoke-")
    assert f"job {job_id} SUCCEEDED" in done.stdout
    # the driver (`rp2k train` without --address) attached to the job's cluster
    assert "joined the Ray cluster at " in done.stdout
    assert "started a local Ray" not in done.stdout
    assert "run submit-smoke: epoch " in done.stdout  # cmd_train's summary, streamed back
    metrics = [json.loads(line) for line in (storage / "submit-smoke" / "metrics.jsonl").read_text().splitlines() if line]
    assert [m["epoch"] for m in metrics] == [1]

    status = _module_cli("jobs", "status", "--address", ray_head["url"], job_id, env=env, timeout=60)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stderr
    # in-process, with the token sent as an explicit header (--auth-token-file)
    info = jobs_status(job_id, ray_head["url"], auth_token_file=ray_head["token_file"])
    assert str(info.status) == "SUCCEEDED"
    assert info.metadata["rp2k_run"] == "submit-smoke"
    assert info.runtime_env["working_dir"].startswith("gcs://")  # uploaded, not a path on this machine
    listed = jobs_list(ray_head["url"], auth_token_file=ray_head["token_file"])
    assert job_id in [job.submission_id for job in listed]
    print(f"rp2k submit end to end: {elapsed:.1f} s")


def test_jobs_commands_and_a_failing_job(ray_head, tiny_shards, smoke_preset, tmp_path, capsys):
    """In-process CLI (`main`), token as --auth-token-file: a job that fails on the cluster
    (its shards do not exist there) makes `submit` exit 1 with Ray's message."""
    connection = ["--address", ray_head["url"], "--auth-token-file", str(ray_head["token_file"])]
    code = main(["submit", str(smoke_preset), *connection, "--name", "submit-fails", "--shards", str(tmp_path / "nope"),
                 "--storage-path", str(tmp_path / "runs"), "--submission-id", f"rp2k-test-fail-{secrets.token_hex(3)}",
                 "--set", "run.max_failures=0",
                 *[w for o in TINY for w in ("--set", o)]])
    out = capsys.readouterr().out
    assert code == 1, out[-3000:]
    job_id = re.search(r"^submitted job (\S+) to ", out, re.M).group(1)
    assert re.search(rf"^job {job_id} FAILED: ", out, re.M)
    assert str(tmp_path / "nope") in out  # the driver's error, streamed back
    assert main(["jobs", "status", *connection, job_id]) == 1
    assert capsys.readouterr().out.startswith(f"{job_id}: FAILED")
    assert main(["jobs", "logs", *connection, job_id]) == 0
    assert f"Running entrypoint for job {job_id}" in capsys.readouterr().out
    assert main(["jobs", "list", *connection]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [job_id, "FAILED"] == [row[:2] for row in rows if row[0] == job_id][0]
    assert "submit-fails" in [row[3] for row in rows if row[0] == job_id]


def test_no_wait_then_stop(ray_head, tiny_shards, smoke_preset, tmp_path):
    client = connect(ray_head["url"], auth_token_file=ray_head["token_file"])
    job_id = submit(smoke_preset, overrides=TINY + ["optim.epochs=50"],
                    flags={"name": "submit-stop", "shards": str(tiny_shards), "storage_path": str(tmp_path)},
                    client=client, submission_id=f"rp2k-test-stop-{secrets.token_hex(3)}")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id)) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs_stop(job_id, client=client)
    assert str(wait(client, job_id, timeout_s=60)) == "STOPPED"
    with open(os.devnull, "w") as sink:
        assert str(follow(client, job_id, out=sink)) == "STOPPED"


def test_reproduce_submits_itself_as_one_job(ray_head, tiny_shards, tmp_path, capsys):
    """`rp2k reproduce --submit`: the same command runs as the job's driver on the cluster,
    whose pre-flight then names every run that wants GPUs the head does not have."""
    connection = ["--address", ray_head["url"], "--auth-token-file", str(ray_head["token_file"])]
    code = main(["reproduce", "--submit", "--no-wait", *connection, "--shards", str(tiny_shards),
                 "--storage-path", str(tmp_path / "runs"), "--only", "table2", "--set", "optim.epochs=1"])
    assert code == 0
    job_id = re.search(r"^submitted job (\S+) to ", capsys.readouterr().out, re.M).group(1)
    assert job_id.startswith("rp2k-reproduce-")
    client = connect(ray_head["url"], auth_token_file=ray_head["token_file"])
    info = jobs_status(job_id, client=client)
    assert shlex.split(info.entrypoint)[3:] == [
        "reproduce", "--shards", str(tiny_shards), "--storage-path", str(tmp_path / "runs"), "--umap-samples", "20000",
        "--only", "table2", "--set", "optim.epochs=1"]
    assert str(wait(client, job_id, timeout_s=180)) == "FAILED"
    logs = client.get_job_logs(job_id)
    for run in ("table2-resnet34", "table2-inception-v3"):
        assert f"{run} (table2_" in logs and "GPUs, the cluster has 0" in logs


def test_auth_errors_say_what_to_do(ray_head, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    with pytest.raises(SubmitError, match="refused the token") as err:
        connect(ray_head["url"], auth_token_file=wrong)
    assert "RAY_AUTH_MODE=token" in str(err.value) and "RAY_AUTH_TOKEN" in str(err.value)
    # no token at all (client without RAY_AUTH_MODE): the CLI exits 2 with the advice
    env = _client_env(ray_head, RAY_AUTH_MODE="disabled")
    done = _module_cli("jobs", "list", "--address", ray_head["url"], env=env, timeout=60)
    assert done.returncode == 2
    assert "requires an authentication token" in done.stderr and "RAY_AUTH_MODE=token" in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(SubmitError, match="cannot reach the Ray Jobs API"):
        connect(f"http://127.0.0.1:{free_port()}")


def test_serve_submits_itself_as_a_job_that_answers_over_http(ray_head, tiny_shards, tmp_path, capsys):
    """`rp2k serve --submit`: the job's driver starts the Serve application on the cluster,
    which answers /health and /predict on its port; stopping the job stops the service."""
    import urllib.request

    from rp2k_dist.config import load_config
    from tests.conftest import tiny_run_overrides
    from tests.helpers import jpeg_bytes, untrained_run

    config = load_config(None, tiny_run_overrides(tiny_shards, tmp_path / "runs", "served"))
    untrained_run(config, tmp_path / "runs" / "served")
    port = free_port()
    connection = ["--address", ray_head["url"], "--auth-token-file", str(ray_head["token_file"])]
    assert main(["serve", str(tmp_path / "runs" / "served"), "--submit", *connection, "--port", str(port),
                 "--max-batch", "2"]) == 0
    job_id = re.search(r"^submitted job (\S+) to ", capsys.readouterr().out, re.M).group(1)
    client = connect(ray_head["url"], auth_token_file=ray_head["token_file"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.monotonic() + 240, None
        while time.monotonic() < deadline and str(client.get_job_status(job_id)) in ("PENDING", "RUNNING"):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    health = response.status
                break
            except OSError:
                time.sleep(1.0)
        assert health == 200, client.get_job_logs(job_id)[-3000:]
        request = urllib.request.Request(f"{url}/predict", data=jpeg_bytes(0, (64, 64)),
                                         headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert len(answer["predictions"][0]["top5"]) == 5
    finally:
        jobs_stop(job_id, client=client)
    assert str(wait(client, job_id, timeout_s=90)) == "STOPPED"
