"""``rp2k serve CKPT``: the parser and the command (hooked into :mod:`rp2k_dist.cli` by
:func:`add_parser`).

Without ``--submit`` the command connects to ``--address`` (or ``RAY_ADDRESS``, else starts a
local Ray), runs the application (:mod:`.app`) and keeps it up until Ctrl-C. With
``--submit`` the same command, minus the submission flags, runs as a Ray job on the cluster
at ``--address`` (:func:`rp2k_dist.launch.submit.submit_entrypoint`, the upload ``rp2k
submit`` does); the job keeps running while the application serves, ``rp2k jobs stop`` ends it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import time

from ..errors import ConfigError
from .requests import MAX_BYTES, MAX_IMAGES, MAX_PIXELS

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a trained checkpoint over HTTP with Ray Serve (top-5 SKUs, "
                                            "a growing SKU gallery)")
    p.add_argument("checkpoint", help="a run folder or checkpoint file (local, s3://, gs://)")
    p.add_argument("--gallery", help="a gallery folder (rp2k gallery build): answer its SKU or 'unknown' too, "
                                     "and take POST /gallery adds")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (default: 1 when the cluster has GPUs, else 0; fractions share a GPU)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch a replica runs (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a replica waits for a batch to fill (default 10 ms)")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES, help=f"images per request (default {MAX_IMAGES})")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=f"bytes per request (default {MAX_BYTES})")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"pixels per image (default {MAX_PIXELS})")
    p.add_argument("--token-file", help="file holding the token of POST /gallery (default: $RP2K_SERVE_TOKEN; "
                                        "neither: the gallery takes no adds over HTTP)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (0.0.0.0: every "
                                                       "interface; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster to run on (ray://, HEAD:6379, or the dashboard's http:// "
                                     "with --submit; default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--submit", action="store_true", help="run `rp2k serve` as a Ray job on --address")
    p.add_argument("--pip", action="store_true", help="with --submit: install the project's dependencies in the job")
    p.add_argument("--auth-token-file", help="with --submit: the Ray cluster's auth token (see rp2k submit)")
    p.set_defaults(func=cmd_serve)
    return p


def settings_of(args: argparse.Namespace):
    from .app import ServeSettings

    if args.replicas < 1 or args.max_batch < 1 or args.max_images < 1:
        raise ConfigError("--replicas, --max-batch and --max-images must be at least 1")
    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    return ServeSettings(
        checkpoint=args.checkpoint, gallery=args.gallery, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        limits={"max_bytes": args.max_bytes, "max_images": args.max_images, "max_pixels": args.max_pixels},
        token=token)


#: ``rp2k serve`` options that the job's own command repeats (argparse dest -> flag).
FORWARDED = {"gallery": "--gallery", "replicas": "--replicas", "gpus_per_replica": "--gpus-per-replica",
             "cpus_per_replica": "--cpus-per-replica", "max_batch": "--max-batch", "batch_wait_ms": "--batch-wait-ms",
             "max_images": "--max-images", "max_bytes": "--max-bytes", "max_pixels": "--max-pixels",
             "token_file": "--token-file", "host": "--host", "port": "--port"}


def job_words(args: argparse.Namespace) -> list[str]:
    """The job's command: ``python -m rp2k_dist.cli serve CKPT ...`` with every serving
    option, without the submission flags and ``--address`` (the job's driver joins its own
    cluster). The job's proxy listens on every interface unless ``--host`` says otherwise."""
    from ..launch.submit import DEFAULT_LAUNCHER

    words = [*DEFAULT_LAUNCHER, "serve", str(args.checkpoint)]
    for dest, flag in FORWARDED.items():
        value = getattr(args, dest)
        if dest == "host" and value == "127.0.0.1":
            value = "0.0.0.0"  # on a cluster, clients are on other machines
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return words


def cmd_serve(args: argparse.Namespace) -> int:
    if args.submit:
        return submit_serve(args)
    import ray

    from . import app

    settings = settings_of(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=False) if address else ray.init()
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    url = app.start(settings, replicas=args.replicas, gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica,
                    host=args.host, port=args.port)
    print(f"serving {args.checkpoint} at {url} ({args.replicas} replica(s), {gpus:g} GPU each): "
          f"POST {url}/predict, GET {url}/model; Ctrl-C stops", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.delete(app.APP_NAME)
    print("stopped", flush=True)
    return 0


def submit_serve(args: argparse.Namespace) -> int:
    from ..launch.submit import SubmitError, find_root, resolve_address, submit_entrypoint

    address = resolve_address(args.address)
    root = find_root()
    if root is None:
        raise SubmitError("no rp2k-dist repository (pyproject.toml + rp2k_dist/) above the current directory: "
                          "run rp2k serve --submit from the repository")
    entrypoint = " ".join(shlex.quote(w) for w in job_words(args))
    job_id = submit_entrypoint(entrypoint, root, name="serve", metadata={"rp2k_command": "serve"}, address=address,
                               pip=args.pip, auth_token_file=args.auth_token_file)
    print(f"submitted job {job_id} to {address}: `rp2k jobs logs {job_id} --follow` shows the service's URL")
    return 0
