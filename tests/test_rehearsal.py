"""A rented cluster rehearsed: ``docs/cluster-bucket.md``'s rehearsal block, run as written on
a local three-node Ray cluster (``ray start``: a head with the Jobs API and no CPUs for
work, two one-CPU worker nodes) with SeaweedFS as the only storage.

While the block's ``rp2k reproduce --submit`` runs, the node that trains the general model is
killed (every process of it, as when a rented machine vanishes) after the run's first
checkpoint, and the job is stopped once the specialist has started. The block is then run
again as it is, and must end with every run finished, nothing finished trained again, and a
report whose numbers are those of the runs' evaluation files in the bucket.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from rp2k_dist import run_folder, storage
from rp2k_dist.launch.reproduce import GENERAL
from rp2k_dist.storage import RunStorage
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cluster-bucket.md"
VENV_BIN = Path(sys.executable).parent
SPECIALIST = "table3-apinet-liquor"
#: What the doc's settings block exports: the test gives each its own value.
SETTINGS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "BUCKET"}
EPOCHS = 3  # the block's optim.epochs: the node is removed after epoch 1, so a loaded machine
#: that registers a checkpoint late still leaves an epoch to resume
#: Ray Train's record of the checkpoints it has registered: a restart resumes from those only.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def doc_block(marker: str) -> str:
    """The fenced bash block right after ``<!-- marker -->`` in docs/cluster-bucket.md."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", text, re.S)
    assert match, f"no ```bash block after <!-- {marker} --> in {DOC}"
    return match.group(1)


def test_the_doc_names_the_settings_the_rehearsal_gives_and_its_block_is_bash():
    exported = re.findall(r"^export (\w+)=", doc_block("settings"), re.M)
    assert sorted(exported) == sorted(SETTINGS)
    rehearsal = doc_block("rehearsal")
    assert subprocess.run(["bash", "-n", "-c", rehearsal]).returncode == 0
    assert f"--set optim.epochs={EPOCHS}" in rehearsal and f"--only {SPECIALIST}" in rehearsal
    assert "$BUCKET" in rehearsal and not re.search(r"s3://|/tmp/", rehearsal)  # every location from the settings


# --------------------------------------------------------------------------- the cluster


def _tree(pid: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(processes, timeout=10)


def _agent_ports() -> list[str]:
    """Ports every node of one machine needs for itself."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@pytest.fixture
def rented(s3_endpoint, tmp_path):
    """The head (Jobs API, token authentication with a token of its own, 0 CPUs) and two
    worker nodes with 1 CPU each; every node has the bucket's credentials and endpoint in
    its environment. Yields the settings the doc asks for, the nodes' processes and the env."""
    base = Path(tempfile.mkdtemp(prefix="rp2kh", dir="/tmp"))  # short: Ray's sockets live under it
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), **s3_endpoint.env, AWS_ENDPOINT_URL=f"http://{s3_endpoint.endpoint}",
               # a killed node (its port refuses) is declared dead after 3 checks 2 s apart (Ray's
               # default: 5 checks 3 s apart); a slow answer still has Ray's 10 s
               RAY_health_check_period_ms="2000", RAY_health_check_failure_threshold="3")
    port, dashboard = free_port(), free_port()
    ray = str(VENV_BIN / "ray")
    common = ["--block", "--node-ip-address=127.0.0.1", "--object-store-memory=100000000", "--disable-usage-stats"]
    logs = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        logs.append(open(base / f"{name}.log", "w"))
        return subprocess.Popen([ray, "start", *args, *common, *_agent_ports()], env=env, cwd=base,
                                stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True)

    began = time.monotonic()
    head = start("head", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=true",
                          "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                          f"--ray-client-server-port={free_port()}", f"--temp-dir={base / 'ray'}"])
    workers = []
    try:
        deadline = time.monotonic() + 360  # two cores: each node takes 20-40 s to start
        while not _status(ray, port, env):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up:\n{(base / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        # one node at a time: `ray start` gives its raylet a fixed 30 s to register, which a
        # loaded two-core machine can miss; a node that missed it is started again
        for i in range(2):
            for attempt in range(3):
                # a temp dir of its own, as on a machine of its own: nodes sharing one would
                # unpack the job's working_dir into the same folder at the same time
                node = start(f"worker{i}-{attempt}", [f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                                      f"--temp-dir={base / f'w{i}{attempt}'}"])
                while not re.search(rf"/{i + 1}(\.0)? CPU", _status(ray, port, env)) and node.poll() is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"worker node {i} did not join:\n{_status(ray, port, env)}")
                    time.sleep(1)
                if node.poll() is None:
                    workers.append(node)
                    break
                try:  # what the failed start left running (its process group)
                    os.killpg(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                raise RuntimeError(f"worker node {i} failed to start 3 times:\n"
                                   f"{(base / f'worker{i}-2.log').read_text()[-3000:]}")
        settings = {"AWS_ACCESS_KEY_ID": s3_endpoint.access_key, "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key,
                    "AWS_ENDPOINT_URL": f"http://{s3_endpoint.endpoint}", "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}",
                    "RAY_AUTH_MODE": "token", "BUCKET": f"s3://{s3_endpoint.bucket}/r{secrets.token_hex(3)}"}
        yield {"settings": settings, "token": token, "head": head, "workers": workers,
               "startup_s": round(time.monotonic() - began, 1),
               "env": {**env, **settings, "TMPDIR": str(tmp_path)}}
    finally:
        for process in [*workers, head]:
            _kill(_tree(process.pid))
        for process in psutil.process_iter(["cmdline"]):  # anything still naming the cluster's folder
            if any(str(base) in part for part in process.info["cmdline"] or []):
                _kill([process])
        for log in logs:
            log.close()
        shutil.rmtree(base, ignore_errors=True)


def _status(ray: str, port: int, env: dict) -> str:
    done = subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


# --------------------------------------------------------------------------- the rehearsal


def _wait(condition, what: str, script: subprocess.Popen, log: Path, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if script.poll() is not None:
            raise AssertionError(f"the block ended (exit {script.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def say(notes: dict, key: str, started: float) -> None:
    """Note the seconds since ``started`` under ``key``, and print it (``pytest -s`` shows it)."""
    notes[key] = round(time.monotonic() - started, 1)
    print(f"rehearsal: {key} {notes[key]}", flush=True)


def _state(runs: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(runs, run_folder.REPRODUCE_STATE)))
    except (storage.NotFoundError, json.JSONDecodeError):
        return {}


def _record(runs: str, name: str) -> dict:
    return next((r for r in _state(runs).get("runs", []) if r["name"] == name), {})


def _trained(folder: RunStorage) -> dict[str, tuple[float | None, bytes | int]]:
    """A run's training artefacts: mtime and bytes (checkpoints: size) of each."""
    names = [run_folder.CONFIG, run_folder.METRICS, run_folder.EVALUATION, run_folder.PREDICTIONS, run_folder.TABLE2]
    found = {name: (folder.mtime(name), folder.read_bytes(name)) for name in names}
    for checkpoint in run_folder.checkpoint_dirs(folder):
        location = folder.location(f"{checkpoint}/{run_folder.CHECKPOINT}")
        found[checkpoint] = (storage.mtime(location), storage.size(location))
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)  # two passes of the block and a restart: ~3 min on a quiet 2-core machine
def test_the_documented_rehearsal_survives_a_lost_node_and_a_stopped_job(rented, tmp_path):
    from rp2k_dist.analysis.run import table_from_dict
    from rp2k_dist.evaluation.table3_text import table3_markdown
    from rp2k_dist.evaluation.metrics import PAPER_TABLE2
    from rp2k_dist.launch.submit import connect, jobs_list

    block = "set -euo pipefail\n" + doc_block("rehearsal")
    env, bucket = rented["env"], rented["settings"]["BUCKET"]
    runs = f"{bucket}/rehearsal/runs"
    general, specialist = RunStorage(runs, GENERAL), RunStorage(runs, SPECIALIST)
    notes: dict = {"cluster": "head (0 CPUs, Jobs API) + 2 worker nodes x 1 CPU; SeaweedFS the only storage",
                   "cluster_start_s": rented["startup_s"]}
    started = time.monotonic()

    # First pass: the node training the general model goes after its first checkpoint; the
    # job is stopped once the specialist has been started.
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        script = subprocess.Popen(["bash", "-c", block], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        victim = {}

        def training_node() -> bool:
            for index, node in enumerate(rented["workers"]):
                tree = _tree(node.pid)
                if any("RayTrainWorker" in " ".join(p.cmdline()) for p in tree if p.is_running()):
                    victim.update(index=index, processes=tree)
                    return True
            return False

        # the node is found while the run trains its first epoch, so nothing but the
        # snapshot's read stands between the first registered checkpoint and the kill
        _wait(training_node, "the general run's training worker", script, first_log)
        first = run_folder.checkpoint_dir(1)
        _wait(lambda: general.exists(SNAPSHOT) and first in general.read_text(SNAPSHOT),
              "Ray Train to register the general run's first checkpoint", script, first_log)
        say(notes, "general_checkpointed_at_s", started)
        victim["processes"] = _tree(rented["workers"][victim["index"]].pid)  # the run's processes of now
        registered = sum(run_folder.checkpoint_dir(e) in general.read_text(SNAPSHOT) for e in range(1, EPOCHS + 1))
        assert registered < EPOCHS and not general.exists(run_folder.EVALUATION), (
            "the general run ended before its node could be removed")
        _kill(victim["processes"])
        notes["killed"] = {"what": f"worker node {victim['index']} (ray start, raylet, {len(victim['processes'])} "
                                   f"processes, SIGKILL) while it trained the general run after epoch {registered}"}
        say(notes, "killed_at_s", started)

        _wait(lambda: _record(runs, SPECIALIST).get("state") == "running", "the specialist's start", script, first_log)
        client = connect(rented["settings"]["RAY_ADDRESS"], auth_token_file=rented["token"])
        say(notes, "specialist_started_at_s", started)
        (job,) = [j for j in jobs_list(client=client) if str(j.status) == "RUNNING"]
        stop = subprocess.run([str(VENV_BIN / "rp2k"), "jobs", "stop", job.submission_id], env=env,
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        script.wait(timeout=180)
    first_output = first_log.read_text()
    assert script.returncode != 0 and f"job {job.submission_id} STOPPED" in first_output, first_output[-4000:]
    notes["stopped"] = {"what": f"driver job {job.submission_id} (rp2k jobs stop) while the specialist ran"}
    say(notes, "first_pass_s", started)

    # The general run finished on the node left, resumed from its last checkpoint registered
    # before the kill (epoch 1, or 2 where Ray Train registered it in the same moment).
    history = run_folder.read_metrics(general)
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1)), (history, first_output[-4000:])
    resumes = [(m["epoch"], m["resumed_from_epoch"]) for m in history if m.get("resumed_from_epoch")]
    assert len(resumes) == 1 and resumes[0][0] == resumes[0][1] + 1 and 1 <= resumes[0][1] <= registered, (
        history, registered, first_output[-4000:])
    assert _record(runs, GENERAL)["state"] == "finished"
    before = _trained(general)
    specialist_before = run_folder.checkpoint_dirs(specialist)

    # Second pass: the same block, as written.
    second = subprocess.run(["bash", "-c", block], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    say(notes, "wall_s", started)
    notes["second_pass_s"] = round(notes["wall_s"] - notes["first_pass_s"], 1)

    state = _state(runs)
    records = {r["name"]: r for r in state["runs"]}
    assert {name: r["state"] for name, r in records.items()} == {GENERAL: "finished", SPECIALIST: "finished"}
    assert records[GENERAL]["note"].startswith("finished before this command")
    assert _trained(general) == before  # not one artefact of the finished run written again
    assert f"start {GENERAL}" not in second.stdout and f"resume {GENERAL}" not in second.stdout
    own = run_folder.read_metrics(specialist)
    assert [m["epoch"] for m in own] == list(range(1, EPOCHS + 1))
    if specialist_before:  # it had checkpointed before the stop: resumed from there
        assert own[len(specialist_before)].get("resumed_from_epoch") == len(specialist_before)
    config = storage.read_text(specialist.location(run_folder.CONFIG))
    assert f"weights: {general.location(run_folder.checkpoint_dir(EPOCHS))}/{run_folder.CHECKPOINT}" in config
    # the ensemble and UMAP ran as a Ray task on a worker node, not in the driver on the head
    evaluate = state["steps"]["evaluate"]
    assert evaluate["state"] == "finished" and evaluate["ensemble"] == [SPECIALIST]
    assert evaluate["node"] != state["driver"]["node"]
    notes["survived"] = (f"worker node {1 - victim['index']} (trained the rest), the head (the drivers), the bucket; "
                         f"{GENERAL} kept its epochs 1-{EPOCHS} and was not trained again")

    # The report in the bucket holds the runs' own numbers, read back from the bucket.
    report = storage.read_text(f"{runs}/{run_folder.REPRODUCE}.md")
    evaluation = json.loads(general.read_bytes(run_folder.EVALUATION))
    assert table_from_dict(evaluation["table2"]).to_markdown(PAPER_TABLE2["resnet34"]).strip() in report
    ensemble = json.loads(general.read_bytes(run_folder.ENSEMBLE))
    assert table3_markdown(ensemble["table3"]).strip() in report
    assert f"![UMAP]({GENERAL}/{run_folder.UMAP_PNG})" in report
    page = storage.read_text(f"{runs}/{run_folder.REPRODUCE}.html")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "<link" not in page
    # --report-dir: the same files on this machine (the second pass's scratch folder)
    (copy,) = [p for p in tmp_path.glob("tmp.*/report") if (p / f"{run_folder.REPRODUCE}.md").exists()]
    for name in (f"{run_folder.REPRODUCE}.md", f"{run_folder.REPRODUCE}.html", f"{GENERAL}/{run_folder.UMAP_PNG}"):
        assert (copy / name).read_bytes() == storage.read_bytes(f"{runs}/{name}"), name
    assert general.exists(f"{run_folder.REPORT_DIR}/{run_folder.REPORT}.html")  # the block's `rp2k report`

    (tmp_path / "rehearsal.json").write_text(json.dumps(notes, indent=1))
    print("rehearsal:", json.dumps(notes, indent=1))
