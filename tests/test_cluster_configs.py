"""Static checks of the cluster configuration folder (cluster/).

No cloud account, Kubernetes cluster or network is needed: the launcher YAMLs are
checked with the schema and validator shipped in the installed ray package, the
KubeRay manifests with the field rules KubeRay and this project rely on.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = CLUSTER / "kuberay"
SHARED_MOUNT = "/mnt/shared"

# GPUs per instance for the EC2 types a config may name (AWS autodetects the
# resources from the instance type; this table only says which types have GPUs).
AWS_GPU_INSTANCES = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.4xlarge": 1, "g4dn.8xlarge": 1,
    "g4dn.12xlarge": 4, "g4dn.16xlarge": 1, "g4dn.metal": 8,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1,
    "g5.12xlarge": 4, "g5.16xlarge": 1, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1,
    "g6.12xlarge": 4, "g6.16xlarge": 1, "g6.24xlarge": 4, "g6.48xlarge": 8,
    "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.4xlarge": 1, "g6e.8xlarge": 1,
    "g6e.12xlarge": 4, "g6e.16xlarge": 1, "g6e.24xlarge": 4, "g6e.48xlarge": 8,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}
# GCE accelerator-optimized machine types carry their GPUs with the machine type.
GCP_BUNDLED_GPUS = {
    "a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8,
    "a2-megagpu-16g": 16, "a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2,
    "a2-ultragpu-4g": 4, "a2-ultragpu-8g": 8, "a3-highgpu-8g": 8,
    "g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1,
    "g2-standard-24": 2, "g2-standard-32": 1, "g2-standard-48": 4, "g2-standard-96": 8,
}


def _load_all(path: Path) -> list:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _load_one(path: Path) -> dict:
    docs = _load_all(path)
    assert len(docs) == 1, f"{path} should hold exactly one YAML document"
    return docs[0]


def _all_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _expected_image() -> str:
    import ray

    return f"rayproject/ray:{ray.__version__}-py311-gpu"


# ---------------------------------------------------------------- every YAML


def test_cluster_folder_has_the_expected_files():
    names = {p.relative_to(CLUSTER).as_posix() for p in _all_yaml_files()}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob.yaml", "kuberay/rayservice.yaml", "kuberay/storage.yaml"} <= names
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", _all_yaml_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    docs = _load_all(path)
    assert docs, f"{path} has no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_every_image_is_the_same_ray_gpu_image():
    """Client and cluster must run the same ray and Python versions."""
    images = set()
    for name in LAUNCHER_FILES:
        images.add(_load_one(CLUSTER / name)["docker"]["image"])
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        text = (KUBERAY / name).read_text(encoding="utf-8")
        images.update(re.findall(r"^\s*image:\s*(\S+)", text, flags=re.M))
    assert images == {_expected_image()}


# ------------------------------------------------------- cluster launcher YAMLs


@pytest.fixture(params=LAUNCHER_FILES)
def launcher(request):
    return request.param, _load_one(CLUSTER / request.param)


def test_launcher_matches_shipped_json_schema(launcher):
    import jsonschema
    import ray.autoscaler

    _, config = launcher
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(config, schema)


def test_launcher_passes_rays_own_validation(launcher):
    """What `ray up` does before it talks to the cloud: merge defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    _, config = launcher
    validate_config(prepare_config(copy.deepcopy(config)))


def test_schema_validation_can_fail(launcher):
    """The validator in use rejects a misspelt key and a fractional resource."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    _, config = launcher
    bad = copy.deepcopy(config)
    bad["head_start_ray_command"] = ["ray start --head"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(config)
    bad["available_node_types"][bad["head_node_type"]]["resources"] = {"CPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_launcher_node_types(launcher):
    name, config = launcher
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    # No training on the head.
    assert types[head]["resources"].get("CPU") == 0
    assert types[head]["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != head}
    assert workers, "no worker node type"
    assert sum(w.get("min_workers", 0) for w in workers.values()) <= config["max_workers"]
    for key, node in workers.items():
        assert node.get("max_workers", config["max_workers"]) <= config["max_workers"]
        assert node["max_workers"] >= 1, f"{key} can never start"
        assert _gpus_of(config["provider"]["type"], key, node) >= 1, f"{name}: {key} has no GPU"


def _gpus_of(provider: str, key: str, node: dict) -> int:
    nc = node["node_config"]
    if provider == "aws":
        itype = nc["InstanceType"]
        assert itype in AWS_GPU_INSTANCES, f"{key}: {itype} is not a known GPU instance type"
        declared = node["resources"].get("GPU")
        # {} = autodetect from the instance type; an explicit count must be right.
        assert declared in (None, AWS_GPU_INSTANCES[itype]), f"{key}: GPU {declared} != {itype}"
        return AWS_GPU_INSTANCES[itype]
    if provider == "gcp":
        attached = sum(a["acceleratorCount"] for a in nc.get("guestAccelerators", []))
        attached += GCP_BUNDLED_GPUS.get(nc["machineType"], 0)
        assert attached >= 1, f"{key}: {nc['machineType']} has no GPU and no guestAccelerators"
        # GCP does not autodetect: the declared Ray resources must equal the hardware.
        assert node["resources"].get("GPU") == attached, f"{key}: resources GPU != {attached}"
        # GPU VMs cannot live-migrate; `scheduling` is an object in the GCE API.
        assert isinstance(nc.get("scheduling"), dict), f"{key}: scheduling must be a mapping"
        assert nc["scheduling"].get("onHostMaintenance") == "TERMINATE"
        return attached
    raise AssertionError(f"unexpected provider {provider}")


def test_gcp_project_id_is_not_a_made_up_name():
    # A wrong string makes ray try to create that project; null stops with a clear error.
    provider = _load_one(CLUSTER / "gcp-gpu.yaml")["provider"]
    assert provider["type"] == "gcp"
    assert provider["project_id"] is None


def test_aws_provider():
    provider = _load_one(CLUSTER / "aws-gpu.yaml")["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", provider["region"])
    assert isinstance(provider["cache_stopped_nodes"], bool)
    assert "security_group" not in provider  # ray's default group opens SSH only


def _dashboard_hosts(commands: list[str]) -> list[str]:
    hosts = []
    for cmd in commands:
        hosts += re.findall(r"--dashboard-host(?:=|\s+)(\S+)", cmd)
    return hosts


def test_dashboard_is_not_exposed(launcher):
    _, config = launcher
    start = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    hosts = _dashboard_hosts(start)
    assert hosts, "the head should pin --dashboard-host explicitly"
    assert set(hosts) <= {"127.0.0.1", "localhost"}, hosts
    every_command = json.dumps(config)
    assert "0.0.0.0" not in every_command
    for opt in config["docker"].get("run_options", []):
        assert not re.match(r"\s*(-p|--publish)\b", opt), opt


def test_start_commands(launcher):
    _, config = launcher
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert config["head_start_ray_commands"][0].strip() == "ray stop"
    assert config["worker_start_ray_commands"][0].strip() == "ray stop"
    assert "ray start --head" in head
    assert "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--num-cpus=0" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "--head" not in worker


def test_token_authentication(launcher):
    """Same token file on every node, token mode on for ray and for shell CLI calls."""
    _, config = launcher
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cmds)
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in config["setup_commands"])


def test_project_is_shipped_and_installed(launcher):
    _, config = launcher
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert remote == ["~/rp2k-dist"], "the repository (run `ray up` from its root)"
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any(shlex.split(c)[-1] == "~/rp2k-dist" for c in installs), installs


def _rsync_excluded(rel: str, patterns: list[str]) -> bool:
    """Whether rsync `--exclude PATTERN` drops the path `rel` (relative to the
    transfer root), for the pattern forms used here: "/x" anchored at the root,
    "a/b" against the full path, "x" against any path component."""
    parts = rel.split("/")
    for raw in patterns:
        pat = raw.rstrip("/")
        if pat.startswith("/"):
            if any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pat[1:]) for i in range(len(parts))):
                return True
        elif "/" in pat:
            if any(fnmatch.fnmatchcase("/".join(parts[i:]), pat) for i in range(len(parts))):
                return True
        elif any(fnmatch.fnmatchcase(part, pat) for part in parts):
            return True
    return False


def test_rsync_excludes_keep_the_package(launcher):
    _, config = launcher
    patterns = config["rsync_exclude"]
    shipped = ["pyproject.toml", "jobs/table2_resnet34.yaml"]
    shipped += [p.relative_to(ROOT).as_posix() for p in (ROOT / "rp2k_dist").rglob("*.py")]
    assert any(s.startswith("rp2k_dist/data/") for s in shipped)
    for rel in shipped:
        assert not _rsync_excluded(rel, patterns), f"rsync_exclude drops {rel}"
    for rel in (".venv/bin/python", "shards/train-000000.tar", "runs/x/checkpoint", "data/all/a.jpg", ".git/HEAD"):
        assert _rsync_excluded(rel, patterns), f"{rel} would be uploaded"


# ------------------------------------------------------------------ KubeRay


@pytest.fixture(scope="module")
def storage():
    docs = _load_all(KUBERAY / "storage.yaml")
    pvcs = [d for d in docs if d.get("kind") == "PersistentVolumeClaim"]
    assert pvcs, "storage.yaml defines no PersistentVolumeClaim"
    return {p["metadata"]["name"]: p for p in pvcs}


@pytest.fixture(scope="module")
def raycluster():
    return _load_one(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob():
    return _load_one(KUBERAY / "rayjob.yaml")


def test_pvc_is_shared(storage):
    for name, pvc in storage.items():
        assert pvc["apiVersion"] == "v1"
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert pvc["spec"]["resources"]["requests"]["storage"]


def test_kinds(raycluster, rayjob):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"


def _cluster_specs(raycluster, rayjob):
    return {"RayCluster": raycluster["spec"], "RayJob": rayjob["spec"]["rayClusterSpec"]}


def _check_cluster_spec(kind: str, spec: dict, pvc_names: set[str]) -> int:
    """Checks one RayCluster spec; returns the GPUs of its worker groups."""
    import ray

    assert spec["rayVersion"] == ray.__version__, kind
    assert spec.get("authOptions", {}).get("mode") == "token", kind

    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{kind}: head Service must stay internal"
    params = head["rayStartParams"]
    assert isinstance(params, dict) and params, f"{kind}: head needs rayStartParams"
    assert params.get("num-cpus") == "0", f"{kind}: no training on the head"
    _check_pod(f"{kind} head", head["template"]["spec"], pvc_names, needs_gpu=False)

    groups = spec["workerGroupSpecs"]
    assert groups, f"{kind}: no worker group"
    gpus = 0
    for group in groups:
        label = f"{kind} worker group {group['groupName']}"
        assert "rayStartParams" in group, label
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
        pod = group["template"]["spec"]
        per_pod = _check_pod(label, pod, pvc_names, needs_gpu=True)
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), label
        gpus += per_pod * group["replicas"]
    return gpus


def _check_pod(label: str, pod: dict, pvc_names: set[str], needs_gpu: bool) -> int:
    # KubeRay takes rayStartParams as map[string]string and derives the Ray
    # resources from the first container's limits.
    containers = pod["containers"]
    ray_container = containers[0]
    assert ray_container["image"] == _expected_image(), label
    res = ray_container.get("resources", {})
    req, lim = res.get("requests", {}), res.get("limits", {})
    gpu = 0
    if needs_gpu:
        assert "nvidia.com/gpu" in req, f"{label}: requests no nvidia.com/gpu"
        assert "nvidia.com/gpu" in lim, f"{label}: limits no nvidia.com/gpu"
        assert str(req["nvidia.com/gpu"]) == str(lim["nvidia.com/gpu"]), label
        gpu = int(lim["nvidia.com/gpu"])
        assert gpu >= 1, label
    else:
        assert "nvidia.com/gpu" not in lim, f"{label}: the head should not hold a GPU"
    assert req.get("cpu") and lim.get("cpu") and req.get("memory") and lim.get("memory"), label

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert claims, f"{label}: no PersistentVolumeClaim volume"
    assert claims <= pvc_names, f"{label}: {claims - pvc_names} not defined in storage.yaml"
    mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
    assert SHARED_MOUNT in mounts, f"{label}: {SHARED_MOUNT} not mounted"
    assert "persistentVolumeClaim" in volumes[mounts[SHARED_MOUNT]], label
    for name in mounts.values():
        assert name in volumes, f"{label}: mount of undefined volume {name}"
    return gpu


def test_cluster_specs(raycluster, rayjob, storage):
    for kind, spec in _cluster_specs(raycluster, rayjob).items():
        assert _check_cluster_spec(kind, spec, set(storage)) >= 1


def test_ray_start_params_are_strings(raycluster, rayjob):
    for kind, spec in _cluster_specs(raycluster, rayjob).items():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            for key, value in g["rayStartParams"].items():
                assert isinstance(value, str), f"{kind}: rayStartParams.{key} must be a quoted string"


def test_rayjob(rayjob, storage):
    spec = rayjob["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("rp2k ")
    args = shlex.split(entry)
    assert args[:3] == ["rp2k", "train", "jobs/table2_resnet34.yaml"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"

    # Data and checkpoints on the shared volume.
    sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
    assert sets["data.shards"].startswith(SHARED_MOUNT + "/")
    assert sets["run.storage_path"].startswith(SHARED_MOUNT + "/")

    # The Train workers fit the cluster the RayJob creates.
    workers = int(args[args.index("--workers") + 1])
    per_worker = int(args[args.index("--gpus-per-worker") + 1])
    gpus = _check_cluster_spec("RayJob", spec["rayClusterSpec"], set(storage))
    assert workers * per_worker <= gpus


def test_rayjob_runtime_env(rayjob):
    from ray._common.runtime_env_uri import Protocol, parse_uri
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict)
    runtime_env = RuntimeEnv(**env)  # ray's own validation of the fields

    # working_dir: the repository on the shared volume, used in place on every node.
    protocol, path = parse_uri(runtime_env.working_dir())
    assert protocol == Protocol.LOCAL
    assert path.startswith(SHARED_MOUNT + "/")

    # pip: the wheel of this very version of the project, from the shared volume.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wheel = f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"
    packages = runtime_env.pip_config()["packages"]
    assert any(p.startswith(SHARED_MOUNT + "/") and p.endswith("/" + wheel) for p in packages), packages


@pytest.fixture(scope="module")
def rayservice():
    return _load_one(KUBERAY / "rayservice.yaml")


def test_rayservice(rayservice, storage):
    """`rp2k serve` on KubeRay: a RayService whose cluster passes the RayCluster checks and
    whose Serve config passes Serve's own schema and builds the application."""
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeDeploySchema

    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    gpus = _check_cluster_spec("RayService", rayservice["spec"]["rayClusterConfig"], set(storage))
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(config)
    (app,) = config["applications"]
    assert app["import_path"] == "rp2k_dist.serving.app:from_config"
    args = app["args"]
    assert args["checkpoint"].startswith(SHARED_MOUNT + "/") and args["gallery"].startswith(SHARED_MOUNT + "/")
    assert args["replicas"] * args["gpus_per_replica"] <= gpus
    env = RuntimeEnv(**app["runtime_env"])
    assert env.working_dir().startswith(f"local://{SHARED_MOUNT}/")
    # the builder accepts these args (binding needs no running Ray)
    from ray.serve import Application

    from rp2k_dist.serving.app import from_config

    assert isinstance(from_config(args), Application)
    # the gallery token reaches the replicas from a Secret, never written here
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in workers:
        env_vars = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env_vars["RP2K_SERVE_TOKEN"]["valueFrom"]


def test_readme_commands_name_real_files():
    text = (CLUSTER / "README.md").read_text(encoding="utf-8")
    for ref in set(re.findall(r"cluster/[\w./-]+\.ya?ml", text)):
        assert (ROOT / ref).is_file(), ref
    raycluster_name = _load_one(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    assert f"svc/{raycluster_name}-head-svc" in text
    job_name = _load_one(KUBERAY / "rayjob.yaml")["metadata"]["name"]
    assert job_name in text


def _spot_types(config: dict) -> dict:
    def is_spot(node: dict) -> bool:
        nc = node["node_config"]
        return (nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or nc.get("scheduling", {}).get("provisioningModel") == "SPOT")

    return {k: v for k, v in config["available_node_types"].items() if is_spot(v)}


def test_launchers_have_a_spot_gpu_group_next_to_the_on_demand_one(launcher):
    name, config = launcher
    spot = _spot_types(config)
    assert len(spot) == 1, f"{name}: one spot/preemptible worker type"
    (key, node), = spot.items()
    on_demand = {k: v for k, v in config["available_node_types"].items()
                 if k not in spot and k != config["head_node_type"]}
    assert on_demand, f"{name}: the on-demand GPU group stays"
    machine = lambda n: n["node_config"].get("InstanceType") or n["node_config"].get("machineType")  # noqa: E731
    assert {machine(n) for n in on_demand.values()} == {machine(node)}  # the same GPUs, cheaper capacity
    if config["provider"]["type"] == "gcp":
        assert node["node_config"]["scheduling"]["automaticRestart"] is False  # GCE requires it for Spot VMs
    # the reclaim notice becomes a Ray drain with a deadline
    watcher = " ".join(node.get("worker_setup_commands", []))
    assert f"cluster/spot_drain.py --provider {config['provider']['type']}" in watcher
    assert (CLUSTER / "spot_drain.py").is_file()


def test_kuberay_cluster_has_a_spot_group_that_drains_before_it_goes(raycluster):
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    assert {"gpu", "gpu-spot"} <= set(groups)
    pod = groups["gpu-spot"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert keys == {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType"}
    stop = " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    assert "ray drain-node" in stop and "DRAIN_NODE_REASON_PREEMPTION" in stop
    deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", stop).group(1))
    assert deadline < pod["terminationGracePeriodSeconds"] <= 30


def test_spot_watcher_reads_the_aws_notice(monkeypatch):
    import importlib.util
    from datetime import datetime, timedelta, timezone

    spec = importlib.util.spec_from_file_location("spot_drain", CLUSTER / "spot_drain.py")
    spot_drain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spot_drain)
    when = (datetime.now(timezone.utc) + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    answers = {spot_drain.AWS_TOKEN: "token", spot_drain.AWS_ACTION: json.dumps({"action": "terminate", "time": when})}
    monkeypatch.setattr(spot_drain, "_get", lambda url, headers, method="GET": answers.get(url))
    assert 100 < spot_drain.aws_seconds_left() <= 120
    answers.pop(spot_drain.AWS_ACTION)
    assert spot_drain.aws_seconds_left() is None
    monkeypatch.setattr(spot_drain, "_get", lambda url, headers, method="GET": "TRUE")
    assert spot_drain.gcp_seconds_left() == spot_drain.GCP_NOTICE_S
