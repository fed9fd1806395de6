"""TCP connect latency to a ClusterIP with few vs many services programmed, same run, same topology.

Usage (root):  .venv/bin/python bench/kproxy_latency.py [--small 100] [--large 30000] [--connects 2000]

Topology (namespaces with a per-run prefix, deleted at the end; the host is never touched):

    client 10.244.0.100 --+-- br0 in the node netns (10.244.0.1); the client routes 10.96.0.0/16 via the node
    server 10.244.0.11  --+   (a real TCP server, the one endpoint of the measured Service)

The node's table is fully synced by a ``Proxier`` with ``--small`` services, then ``--large``,
alternating for ``--rounds`` rounds (drift on a shared machine then hits both sizes alike);
every other service has ``--endpoints`` endpoints that are never contacted. In each phase the
client makes ``--connects`` sequential TCP connects to the measured Service's cluster IP (each
DNATed by the node to the server) and times each ``connect()``. DESIGN §7 target: the median at
``--large`` at most 5 % above the one at ``--small``.

Prints median and p99 per phase, pooled per size, and the growth; never fails on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kproxy_sync import endpoint_slice, service

from kproxy.netns import NetnsBackend
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig, full_script

NODE_IP, CLIENT_IP, SERVER_IP = "10.244.0.1", "10.244.0.100", "10.244.0.11"
TARGET_IP = "10.96.250.1"  # outside service(i)'s range for i < 62,500

SERVER = r"""
import socket
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 8080)); t.listen(4096)
print("ready", flush=True)
while True:
    c, _ = t.accept(); c.close()
"""

CLIENT = r"""
import json, socket, sys, time
ip, n = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(n):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    t0 = time.perf_counter(); s.connect((ip, 80)); out.append(time.perf_counter() - t0)
    s.close()
print(json.dumps(out))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def target_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    svc = {"kind": "Service", "metadata": {"namespace": "bench", "name": "target"},
           "spec": {"clusterIP": TARGET_IP, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
    sl = {"kind": "EndpointSlice", "addressType": "IPv4",
          "metadata": {"namespace": "bench", "name": "target-x", "labels": {"kubernetes.io/service-name": "target"}},
          "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": [SERVER_IP], "conditions": {"ready": True}}]}
    return svc, sl


def program(backend: NetnsBackend, cfg: RenderConfig, services: int, endpoints: int) -> float:
    """Full sync of ``services`` services (the measured one among them); returns its seconds."""
    proxier = Proxier(backend, cfg)
    for i in range(services - 1):
        proxier.on_service(service(i))
        proxier.on_slice(endpoint_slice(i, endpoints))
    svc, sl = target_objects()
    proxier.on_service(svc)
    proxier.on_slice(sl)
    proxier.mark_initialized()
    r = proxier.sync()
    if r.error or r.mode != "full":
        raise RuntimeError(f"full sync failed: {r}")
    return r.seconds


def connects(prefix: str, n: int) -> list[float]:
    # pinned to one CPU: the veth/bridge/NAT work runs in the sender's context, so every phase then
    # pays the same cache and scheduling conditions (unpinned, the median jumps between CPUs)
    out = subprocess.run(["taskset", "-c", "0", "ip", "netns", "exec", f"{prefix}-cli", sys.executable, "-c", CLIENT,
                          TARGET_IP, str(n)],
                         check=True, capture_output=True, text=True, timeout=600)
    return list(json.loads(out.stdout))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=30000)
    ap.add_argument("--endpoints", type=int, default=3, help="endpoints of every other service")
    ap.add_argument("--connects", type=int, default=1000, help="per size and round")
    ap.add_argument("--rounds", type=int, default=3, help="small/large alternations (drift shows, not hides)")
    args = ap.parse_args()
    prefix = "kpxl" + uuid.uuid4().hex[:6]
    names = [f"{prefix}-{n}" for n in ("node", "cli", "srv")]
    server: subprocess.Popen[str] | None = None
    backend: NetnsBackend | None = None
    try:
        for n in names:
            sh("ip", "netns", "add", n)
        node = names[0]
        sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        sh("ip", "-n", node, "link", "set", "br0", "up")
        sh("ip", "-n", node, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"],
                       capture_output=True, timeout=30)
        for short, ip in (("cli", CLIENT_IP), ("srv", SERVER_IP)):
            peer = f"{prefix}-{short}"
            sh("ip", "-n", node, "link", "add", f"p-{short}", "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "-n", node, "link", "set", f"p-{short}", "master", "br0", "up")
            sh("ip", "-n", peer, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
            sh("ip", "-n", peer, "link", "set", "lo", "up")
            sh("ip", "-n", peer, "route", "add", "10.96.0.0/16", "via", NODE_IP)
        server = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-srv", sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        backend = NetnsBackend(node)
        cfg = RenderConfig(table=prefix)
        backend.apply(full_script([], cfg))  # first NAT chain in the netns: one-off start of conntrack/NAT
        pooled: dict[int, list[float]] = {args.small: [], args.large: []}
        for r in range(args.rounds):
            for size in (args.small, args.large):
                sync_s = program(backend, cfg, size, args.endpoints)
                connects(prefix, min(50, args.connects))  # warm-up: ARP, caches
                times = connects(prefix, args.connects)
                pooled[size] += times
                print(f"round {r + 1}: {size} services (full sync {sync_s:.2f} s): connect median "
                      f"{statistics.median(times) * 1e6:.0f} us, p99 {p99(times) * 1e6:.0f} us ({len(times)} connects)")
        (sm, sp), (lm, lp) = ((statistics.median(pooled[n]), p99(pooled[n])) for n in (args.small, args.large))
        print(f"all rounds: {args.small} services median {sm * 1e6:.0f} us p99 {sp * 1e6:.0f} us; "
              f"{args.large} services median {lm * 1e6:.0f} us p99 {lp * 1e6:.0f} us")
        print(f"growth {args.small} -> {args.large} services: median {(lm / sm - 1) * 100:+.1f} %, "
              f"p99 {(lp / sp - 1) * 100:+.1f} % (target: median <= +5 %)")
        return 0
    finally:
        if server is not None:
            server.kill()
            server.wait(5)
        if backend is not None:
            backend.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


if __name__ == "__main__":
    sys.exit(main())
