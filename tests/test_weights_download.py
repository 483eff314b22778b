"""ImageNet weights missing from torch.hub's cache are downloaded into it: from a mirror (here
an HTTP server on loopback serving a tiny state dict under a torchvision-style name,
``<name>-<first 8 hex of its sha256>.pth``), once per node, the hash in the name checked; a
clear error offline, on a bad file, or with the offline switch."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet34_Weights, Weights, WeightsEnum

from rp2k_dist.errors import WeightsChecksumError, WeightsNotFoundError
from rp2k_dist.models import weights
from tests.ports import free_port

NAME = "tiny"  # the model name the tiny file is registered under


def tiny_weights(file_name: str) -> WeightsEnum:
    """A real torchvision weights enum member whose URL ends in ``file_name``."""
    enum = WeightsEnum("TinyWeights", [("IMAGENET1K_V1", Weights(
        url=f"https://download.pytorch.org/models/{file_name}", transforms=None, meta={}))])
    return enum.IMAGENET1K_V1


def saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@dataclass
class Tiny:
    state: dict[str, torch.Tensor]
    payload: bytes  # the file's bytes
    file_name: str  # <name>-<first 8 hex of sha256(payload)>.pth


class WeightsServer:
    """Serves ``files`` (name -> bytes) under ``/models/`` on 127.0.0.1 from a thread,
    counting accepted connections and GETs per name; each answer waits ``delay`` seconds."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0):
        self.files, self.delay = files, delay
        self.connections = 0
        self.gets: Counter[str] = Counter()
        count = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.removeprefix("/models/")
                with count:
                    outer.gets[name] += 1
                time.sleep(outer.delay)
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:
                with count:
                    outer.connections += 1
                return True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.mirror = f"http://127.0.0.1:{self.httpd.server_address[1]}/models/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny(monkeypatch) -> Tiny:
    state = {"conv.weight": torch.arange(24.0).reshape(2, 3, 2, 2), "fc.bias": torch.tensor([0.5, -1.0])}
    payload = saved(state)
    file_name = f"{NAME}-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, NAME, tiny_weights(file_name))
    return Tiny(state, payload, file_name)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """torch.hub's checkpoints folder under a fresh TORCH_HOME (not created yet)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def serve():
    servers: list[WeightsServer] = []

    def start(files: dict[str, bytes], delay: float = 0.0) -> WeightsServer:
        servers.append(WeightsServer(files, delay))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def files_in(folder: Path) -> list[str]:
    """The folder's files, less the node lock (an empty ``<file>.lock`` that stays)."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_url_is_torchvisions_or_the_same_file_under_the_mirror(cache, monkeypatch):
    assert weights.imagenet_url("resnet34") == ResNet34_Weights.IMAGENET1K_V1.url
    for mirror in ("http://weights.internal/torchvision", "http://weights.internal/torchvision/"):
        monkeypatch.setenv(weights.MIRROR_ENV, mirror)
        assert weights.imagenet_url("resnet34") == "http://weights.internal/torchvision/resnet34-b627a593.pth"


def test_a_missing_file_is_downloaded_into_the_cache_and_then_read_from_it(cache, tiny, serve, monkeypatch):
    server = serve({tiny.file_name: tiny.payload})
    monkeypatch.setenv(weights.MIRROR_ENV, server.mirror)
    assert_equal_states(weights.imagenet_state_dict(NAME), tiny.state)
    assert (cache / tiny.file_name).read_bytes() == tiny.payload
    assert files_in(cache) == [tiny.file_name]
    assert_equal_states(weights.imagenet_state_dict(NAME), tiny.state)  # from the cache now
    assert server.gets == {tiny.file_name: 1} and server.connections == 1
    assert socket.getdefaulttimeout() is None  # the download's timeout is not left behind


def _load_in_child(file_name: str, barrier, results) -> None:
    """One process of a node: registers the tiny file, waits for the other, loads."""
    weights.IMAGENET_WEIGHTS[NAME] = tiny_weights(file_name)
    barrier.wait(timeout=60)
    state = weights.imagenet_state_dict(NAME)
    results.put({key: tensor.tolist() for key, tensor in state.items()})


def test_two_processes_of_one_node_download_the_file_once(cache, tiny, serve, monkeypatch):
    server = serve({tiny.file_name: tiny.payload}, delay=1.0)  # the second asks while the first downloads
    monkeypatch.setenv(weights.MIRROR_ENV, server.mirror)  # the children inherit the environment
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_load_in_child, args=(tiny.file_name, barrier, results)) for _ in range(2)]
    for child in children:
        child.start()
    loaded = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert [child.exitcode for child in children] == [0, 0]
    expected = {key: tensor.tolist() for key, tensor in tiny.state.items()}
    assert loaded == [expected, expected]
    assert server.gets == {tiny.file_name: 1}
    assert files_in(cache) == [tiny.file_name]


def test_offline_the_error_names_the_file_and_folder_and_nothing_is_left(cache, tiny, monkeypatch):
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{free_port()}/models/")  # nothing listens there
    with pytest.raises(WeightsNotFoundError) as raised:
        weights.imagenet_state_dict(NAME)
    message = str(raised.value)
    assert f"place the file {tiny.file_name} in the folder {cache}" in message
    assert "failed" in message and "Connection refused" in message
    assert f"https://download.pytorch.org/models/{tiny.file_name}" in message  # where to fetch it by hand
    assert files_in(cache) == []


def test_a_mirror_without_the_file_is_a_404_in_the_error(cache, tiny, serve, monkeypatch):
    server = serve({})
    monkeypatch.setenv(weights.MIRROR_ENV, server.mirror)
    with pytest.raises(WeightsNotFoundError, match=rf"{server.mirror}{tiny.file_name} failed \(HTTP 404"):
        weights.imagenet_state_dict(NAME)
    assert files_in(cache) == []


def test_a_file_that_does_not_match_the_hash_in_its_name_is_refused_and_not_kept(cache, tiny, serve, monkeypatch):
    other = saved({"fc.bias": torch.tensor([1.0, 2.0])})  # served under the tiny file's name
    server = serve({tiny.file_name: other})
    monkeypatch.setenv(weights.MIRROR_ENV, server.mirror)
    with pytest.raises(WeightsChecksumError) as raised:
        weights.imagenet_state_dict(NAME)
    message = str(raised.value)
    assert tiny.file_name in message and "sha256" in message and hashlib.sha256(other).hexdigest() in message
    assert f"nothing was kept in {cache}" in message
    assert isinstance(raised.value, WeightsNotFoundError)  # still: the file is not there
    assert files_in(cache) == []  # no partial file either
    assert server.gets == {tiny.file_name: 1}


def test_the_offline_switch_never_opens_a_connection(cache, tiny, serve, monkeypatch):
    server = serve({tiny.file_name: tiny.payload})
    monkeypatch.setenv(weights.MIRROR_ENV, server.mirror)
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    expected = f"RP2K_OFFLINE=1 forbids downloading them: place the file {tiny.file_name} in the folder {cache}"
    with pytest.raises(WeightsNotFoundError, match=re.escape(expected)):
        weights.imagenet_state_dict(NAME)
    assert server.connections == 0 and not server.gets
    assert not cache.exists()  # not even a lock file
    monkeypatch.setenv(weights.OFFLINE_ENV, "0")  # 0 (or empty) allows downloads again
    assert_equal_states(weights.imagenet_state_dict(NAME), tiny.state)


def test_a_server_that_never_answers_times_out(cache, tiny, monkeypatch):
    silent = socket.create_server(("127.0.0.1", 0))  # connections complete in its backlog, nothing is sent
    try:
        monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}/models/")
        monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 0.5)
        started = time.monotonic()
        with pytest.raises(WeightsNotFoundError, match="timed out"):
            weights.imagenet_state_dict(NAME)
        assert time.monotonic() - started < 10
    finally:
        silent.close()
    assert files_in(cache) == [] and socket.getdefaulttimeout() is None
