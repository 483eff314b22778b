"""The Ray clusters tests share (fixtures in ``tests/conftest.py``), each started at most
once per group of tests that use it:

* :class:`SharedRay`: a local single-node cluster connected in this process (Ray Train,
  Tune and Ray Data tests);
* :class:`RayHead`: a ``ray start --head`` process with the dashboard (Jobs API), token
  authentication and ImageNet weights in its torch hub cache, for drivers and jobs started
  as other processes (``rp2k submit``, ``rp2k reproduce --address``).

Every process a head starts is killed by pid or by its temp dir; ``ray stop`` is never used
(it stops every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.ports import free_port

VENV_BIN = Path(sys.executable).parent

#: Logical CPUs of the shared single-node cluster: two 2-worker runs (or 4 Tune trials) at once.
SHARED_CPUS = 4
#: Logical CPUs of the head: two of ``rp2k reproduce``'s 2-CPU runs at once.
HEAD_CPUS = 4
START_TIMEOUT_S = 90.0


def shared_worker_env() -> dict[str, str]:
    """Environment variables of every worker on the shared cluster: the test S3 server's
    credentials (constants; each server's endpoint travels in its URIs)."""
    from tests import s3server

    return {"AWS_ACCESS_KEY_ID": s3server.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3server.SECRET_KEY}


class SharedRay:
    """The local cluster of :data:`SHARED_CPUS` CPUs, connected in this process."""

    def __init__(self) -> None:
        self.running = False

    def start(self) -> "SharedRay":
        import ray

        if not self.running:
            assert not ray.is_initialized(), "a test left a Ray of its own connected"
            # address="local": a new cluster even when another Ray runs on this machine
            ray.init(address="local", num_cpus=SHARED_CPUS, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": shared_worker_env()})
            self.running = True
        return self

    def stop(self) -> None:
        import ray

        if self.running:
            ray.shutdown()
            self.running = False


def kill_tree(root_pid: int, marker: str) -> None:
    """SIGKILL a process tree, its process group, and anything still naming ``marker`` (a temp dir)."""
    victims: dict[int, psutil.Process] = {}
    try:
        top = psutil.Process(root_pid)
        victims[top.pid] = top
        victims.update({p.pid: p for p in top.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or []):
            victims[process.pid] = process
    for process in victims.values():
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    try:
        os.killpg(root_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(list(victims.values()), timeout=10)


class RayHead:
    """``ray start --head --block`` on loopback with its own ports and temp dir, token
    authentication forced on with a token file of its own (whatever this machine's
    ``~/.ray/auth_token`` says), and random ResNet-34 "ImageNet" weights in the torch hub
    cache (``TORCH_HOME``) that its workers and the drivers given :attr:`env` see."""

    def __init__(self) -> None:
        self.info: dict[str, Any] | None = None
        self._head: subprocess.Popen | None = None
        self._log = None

    def start(self) -> dict[str, Any]:
        """Starts the head if it is not up; returns ``url`` (dashboard / Jobs API),
        ``address`` (GCS), ``token_file``, ``env`` (for drivers: this environment without
        ``RAY_*``, plus the token settings, this venv first on PATH, and TORCH_HOME) and ``base``."""
        if self.info is not None:
            return self.info
        import torch
        import torchvision

        base = Path(tempfile.mkdtemp(prefix="rp2kh", dir="/tmp"))  # short: Ray's unix sockets live under it
        torch_home = base / "torch"
        (torch_home / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(torchvision.models.resnet34().state_dict(), torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth")
        token_file = base / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), TORCH_HOME=str(torch_home),
                   PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")  # a job's `python` is this venv's
        port, dashboard = free_port(), free_port()
        command = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   f"--num-cpus={HEAD_CPUS}", "--object-store-memory=150000000", f"--temp-dir={base / 'ray'}",
                   "--disable-usage-stats"]
        self._log = open(base / "head.log", "w")
        self._head = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=base)
        info = {"url": f"http://127.0.0.1:{dashboard}", "address": f"127.0.0.1:{port}", "token_file": token_file,
                "env": env, "base": base}
        self.info = info  # from here on stop() cleans up, whatever happens
        try:
            self._wait_until_up(info)
        except BaseException:
            self.stop()
            raise
        return info

    def _wait_until_up(self, info: dict[str, Any]) -> None:
        import requests

        deadline = time.monotonic() + START_TIMEOUT_S

        def check_alive() -> None:
            if self._head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up:\n{(info['base'] / 'head.log').read_text()[-3000:]}")

        while True:  # the Jobs API answers (401: up, and asking for the token)
            try:
                if requests.get(f"{info['url']}/api/version", timeout=2).status_code in (200, 401):
                    break
            except requests.RequestException:
                pass
            check_alive()
            time.sleep(0.5)
        while subprocess.run([str(VENV_BIN / "ray"), "status", f"--address={info['address']}"], env=info["env"],
                             capture_output=True).returncode != 0:  # and the node is registered
            check_alive()
            time.sleep(1)

    def stop(self) -> None:
        if self.info is None:
            return
        if self._head is not None:
            kill_tree(self._head.pid, str(self.info["base"]))
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.info["base"], ignore_errors=True)
        self.info, self._head, self._log = None, None, None
