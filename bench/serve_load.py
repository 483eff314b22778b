"""Load on `rp2k serve`: a fixed number of requests at each concurrency, on 127.0.0.1 only.

    .venv/bin/python bench/serve_load.py CKPT IMAGES_FOLDER [--requests 1000] [--concurrency 1,8,32]
        [--replicas 1] [--max-batch 16] [--batch-wait-ms 10] [--kill-replica] [--json out.json]

Starts a local Ray (``--cpus``), runs the application of ``rp2k serve`` on a free port of
127.0.0.1, and sends ``--requests`` one-image ``POST /predict`` requests (JPEG files of
``IMAGES_FOLDER``, cycled) from ``c`` client threads for each concurrency ``c``; then stops.
Reports requests/s, p50/p95/p99 latency and failures per concurrency, and the batch path's
images/s in the same run (``rp2k predict``'s :func:`~rp2k_dist.evaluation.predict.predict_images`
on the same files and model in this process, batch 64, 2 decode threads, ``--batch-threads``
torch threads: 1 by default, a replica's share of 1 CPU), measured before and
after the load, so served/batch is a ratio of figures of one machine minutes apart. The
machine's reference speed (:mod:`rp2k_dist.engine.machine_speed`) is measured before and after
too and printed with them.

``--kill-replica``: during one more round at the highest concurrency, one replica's actor is
killed (``ray.kill``) halfway; reported are the requests that failed (a client always gets an
answer or an error: each request has a timeout) and the seconds until a request succeeds again.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_machine, print_table, save_json  # noqa: E402

from rp2k_dist.engine.machine_speed import reference_line, reference_speed  # noqa: E402

TIMEOUT_S = 60.0


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_round(url: str, bodies: list[bytes], requests_n: int, concurrency: int,
              on_half=None) -> dict[str, float]:
    """``requests_n`` requests from ``concurrency`` threads; latencies of the successes."""
    import requests

    latencies: list[float] = []
    failures: list[tuple[float, str]] = []
    successes: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests_n))
    local = threading.local()

    def client() -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            if on_half is not None and n == requests_n // 2:
                threading.Thread(target=on_half, daemon=True).start()
            start = time.perf_counter()
            try:
                response = session.post(url, data=bodies[n % len(bodies)], headers={"Content-Type": "image/jpeg"},
                                        timeout=TIMEOUT_S)
                ok, why = response.status_code == 200, str(response.status_code)
            except requests.RequestException as err:
                ok, why = False, type(err).__name__
            end = time.perf_counter()
            with lock:
                (latencies.append(end - start), successes.append(end)) if ok else failures.append((end, why))

    begin = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    wall = time.perf_counter() - begin
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests_n, "ok": len(latencies), "failed": len(failures),
            "wall_s": wall, "req_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p95_ms": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "_failures": failures, "_successes": sorted(successes), "_begin": begin}


def batch_rate(checkpoint: str, files: list[Path], threads: int, repeats: int = 3) -> float:
    """Images/s of ``rp2k predict``'s loop (decode + model, batch 64, 2 decode threads) with
    ``threads`` torch threads."""
    import torch

    from rp2k_dist.evaluation.inference import load_trained
    from rp2k_dist.evaluation.predict import predict_images

    torch.set_num_threads(threads)
    trained = load_trained(checkpoint)
    predict_images(trained, files[:64], workers=1)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_images(trained, files, workers=2)
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("images", help="a folder of JPEG files (searched recursively)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--batch-threads", type=int, default=1,
                        help="torch threads of the batch path (default 1: what a replica of 1 CPU gets, "
                             "Ray sets OMP_NUM_THREADS to a worker's CPUs)")
    parser.add_argument("--kill-replica", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from rp2k_dist.serving.app import APP_NAME, ServeSettings, start

    import torch

    threads_at_start = torch.get_num_threads()
    info = machine_info()
    print_machine(info)
    speed = reference_speed()
    print(reference_line(speed), flush=True)
    files = sorted(p for p in Path(args.images).rglob("*.jpg"))
    bodies = [p.read_bytes() for p in files]
    batch_before = batch_rate(args.checkpoint, files, args.batch_threads)
    torch.set_num_threads(threads_at_start)
    print(f"batch path (rp2k predict loop, {len(files)} files): {batch_before:.1f} img/s", flush=True)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    port = free_port()
    url = start(ServeSettings(args.checkpoint, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms),
                replicas=args.replicas, cpus_per_replica=1, port=port) + "/predict"
    for body in bodies[:16]:  # warm-up
        requests.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT_S)
    results = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        result = one_round(url, bodies, args.requests, concurrency)
        results.append(result)
        print(f"concurrency {concurrency}: {result['req_per_s']:.1f} req/s, p50 {result['p50_ms']:.0f} ms", flush=True)
    kill = None
    if args.kill_replica:
        killed_at: list[float] = []

        def kill_one() -> None:
            actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                      if "SERVE_REPLICA" in a["name"]]
            handle = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
            killed_at.append(time.perf_counter())
            ray.kill(handle, no_restart=True)

        concurrency = max(int(c) for c in args.concurrency.split(","))
        result = one_round(url, bodies, args.requests, concurrency, on_half=kill_one)
        after = [t for t in result["_successes"] if killed_at and t > killed_at[0]]
        failed_after = [t for t, _ in result["_failures"]]
        recovery = (max(failed_after) - killed_at[0]) if failed_after and killed_at else 0.0
        kill = {"requests": args.requests, "concurrency": concurrency, "failed": result["failed"],
                "reasons": sorted({why for _, why in result["_failures"]}),
                "last_failure_after_kill_s": recovery, "succeeded_after_kill": len(after)}
        print(f"replica kill: {kill}", flush=True)
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    # the batch path and the reference again, after the load: the machine's speed drifts
    batch_after = batch_rate(args.checkpoint, files, args.batch_threads)
    torch.set_num_threads(threads_at_start)
    speed_after = reference_speed()
    batch = statistics.mean([batch_before, batch_after])
    rows = [[r["concurrency"], r["requests"], r["failed"], f"{r['req_per_s']:.1f}", f"{r['p50_ms']:.0f}",
             f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['req_per_s'] / batch:.2f}"] for r in results]
    print()
    print_table(rows, ["concurrency", "requests", "failed", "req/s", "p50 ms", "p95 ms", "p99 ms", "served/batch"])
    print(f"batch path: {batch_before:.1f} img/s before the load, {batch_after:.1f} after (served/batch uses "
          f"their mean, {batch:.1f}); reference {speed:.0f} img/s before, {speed_after:.0f} after")
    save_json(args.json, {"machine": info, "reference_img_per_s": [speed, speed_after],
                          "batch_img_per_s": [batch_before, batch_after],
                          "rounds": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
                          "replica_kill": kill, "args": vars(args)})


if __name__ == "__main__":
    main()
