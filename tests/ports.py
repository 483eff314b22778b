"""Free TCP ports on loopback for the servers tests start (Ray heads and nodes, SeaweedFS,
torch.distributed rendezvous).

Ports come from below the kernel's ephemeral range (``ip_local_port_range``). A port taken
from inside it (``bind(("", 0))``) can be handed by the kernel to another process between
the test closing its probe socket and the server binding it. With the suite's two processes
each running Ray, a driver once got ``Failed to get cluster ID from GCS server ... rpc_code:
12`` (UNIMPLEMENTED) from a Ray head's GCS port: another gRPC server answered there (gRPC
binds with SO_REUSEPORT, so two servers can share a port). Below the range the kernel never
hands a port out on its own.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Where the search starts: above the well-known and registered ports most services use.
LOWEST = 20000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that nothing listens on now, below the ephemeral range."""
    high = _ephemeral_low()
    low = LOWEST if high - LOWEST >= 1000 else 1024  # a machine whose ephemeral range starts low
    found: list[int] = []
    for port in random.sample(range(low, high), high - low):
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        _handed_out.add(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free ports between {low} and {high}")


def free_port() -> int:
    return free_ports(1)[0]
