"""Turn a cloud's spot reclaim notice into a Ray node drain with a deadline.

Runs in the background on every spot/preemptible worker node (started by the spot node
types' ``worker_setup_commands`` in aws-gpu.yaml / gcp-gpu.yaml). It polls the instance
metadata server; when the provider announces the reclaim (AWS: ``spot/instance-action``,
two minutes ahead; GCP: ``instance/preempted``, about 30 s ahead) it runs

    ray drain-node --node-id <this node> --reason DRAIN_NODE_REASON_PREEMPTION
        --reason-message ... --deadline-remaining-seconds <time left>

so Ray Train tells the run (``ray.train.get_preemption_info``) and rp2k-dist writes a
mid-epoch checkpoint before the instance goes. Only the standard library and the ``ray``
command are used; it exits after one drain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

AWS_TOKEN = "http://169.254.169.254/latest/api/token"
AWS_ACTION = "http://169.254.169.254/latest/meta-data/spot/instance-action"
GCP_PREEMPTED = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
GCP_NOTICE_S = 30  # GCE's preemption notice


def _get(url: str, headers: dict[str, str], method: str = "GET") -> str | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=2) as r:
            return r.read().decode()
    except urllib.error.HTTPError as err:
        if err.code == 404:  # AWS: no interruption scheduled
            return None
        raise


def aws_seconds_left() -> float | None:
    """Seconds until AWS reclaims this spot instance, or None (IMDSv2)."""
    token = _get(AWS_TOKEN, {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, method="PUT") or ""
    body = _get(AWS_ACTION, {"X-aws-ec2-metadata-token": token})
    if not body:
        return None
    when = datetime.fromisoformat(json.loads(body)["time"].replace("Z", "+00:00"))
    return (when - datetime.now(timezone.utc)).total_seconds()


def gcp_seconds_left() -> float | None:
    """Seconds until GCE stops this preemptible/spot VM, or None."""
    body = _get(GCP_PREEMPTED, {"Metadata-Flavor": "Google"})
    return GCP_NOTICE_S if body and body.strip() == "TRUE" else None


def this_node_id() -> str:
    """The Ray node id of this machine (its raylet must be up)."""
    code = "import ray; ray.init(address='auto', logging_level='ERROR'); print(ray.get_runtime_context().get_node_id())"
    return subprocess.run(["python", "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=["aws", "gcp"], required=True)
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    args = parser.parse_args()
    seconds_left = aws_seconds_left if args.provider == "aws" else gcp_seconds_left
    while True:
        try:
            left = seconds_left()
        except (OSError, ValueError, KeyError) as err:  # metadata server hiccup: keep watching
            print(f"metadata poll failed: {err}", flush=True)
            left = None
        if left is not None:
            break
        time.sleep(args.poll_seconds)
    node = this_node_id()
    command = ["ray", "drain-node", "--node-id", node, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
               "--reason-message", f"{args.provider} spot reclaim", "--deadline-remaining-seconds", str(max(1, int(left)))]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
