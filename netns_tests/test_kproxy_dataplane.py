"""kproxy against the real kernel: nftables in a "node" netns, real TCP/UDP clients and servers.

Topology (all in namespaces named with a per-run prefix; the host is never touched):

    client 10.241.0.100 --+
    b1     10.241.0.11  --+-- br0 in the node netns, node address 10.241.0.1
    b2     10.241.0.12  --+   (client and backends route the Service CIDR 10.97.0.0/16 via the node)
    b3     10.241.0.13  --+

The proxier runs in this process; its backend (``NetnsBackend``) runs libnftables in a child
process that entered the node netns. Services are fed as API JSON, exactly as informers would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kproxy.netns import NetnsBackend
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig
from tests.test_kproxy_tracker import eps, svc

pytestmark = pytest.mark.netns

NODE_IP = "10.241.0.1"
CLIENT_IP = "10.241.0.100"
BACKENDS = {"b1": "10.241.0.11", "b2": "10.241.0.12", "b3": "10.241.0.13"}
SERVICE_CIDR = "10.97.0.0/16"
WEB_IP, EMPTY_IP, SELF_IP = "10.97.0.10", "10.97.0.20", "10.97.0.30"

SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 8080)); t.listen(512)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
def udp():
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(name.encode() + b" " + peer[0].encode(), peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, peer = t.accept()
    c.sendall(name.encode() + b" " + peer[0].encode()); c.close()
"""

CLIENT = r"""
import json, socket, sys, time
proto, ip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hits, errors, seconds = {}, {}, []
for _ in range(n):
    start = time.monotonic()
    try:
        if proto == "tcp":
            s = socket.create_connection((ip, port), timeout=2)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect((ip, port))
            s.send(b"ping")
        reply = s.recv(100).decode()
        s.close()
        who, src = reply.split()
        hits[who] = hits.get(who, 0) + 1
        hits["src:" + src] = hits.get("src:" + src, 0) + 1
    except OSError as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    seconds.append(time.monotonic() - start)
print(json.dumps({"hits": hits, "errors": errors, "max_seconds": max(seconds)}))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    prefix: str
    node: str
    client: str
    proxier: Proxier
    backend: NetnsBackend

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def traffic(self, proto: str, ip: str, port: int, n: int, src: str = "cli") -> dict:
        out = subprocess.run(["ip", "netns", "exec", self.ns(src), sys.executable, "-c", CLIENT, proto, ip,
                              str(port), str(n)], check=True, capture_output=True, text=True, timeout=60)
        return dict(json.loads(out.stdout))

    def sync(self, expect: str) -> None:
        result = self.proxier.sync()
        assert result.error is None, result.error
        assert result.mode == expect


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "kpx" + uuid.uuid4().hex[:6]
    names = [f"{prefix}-{n}" for n in ("node", "cli", *BACKENDS)]
    servers: list[subprocess.Popen[str]] = []
    backend: NetnsBackend | None = None
    try:
        for n in names:
            sh("ip", "netns", "add", n)
        node = f"{prefix}-node"
        sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        sh("ip", "-n", node, "link", "set", "br0", "up")
        sh("ip", "-n", node, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.conf.all.send_redirects=0")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.conf.br0.send_redirects=0")
        # A real node is a VM routing on its NIC, not a bridge: keep br_netfilter (per netns) out of
        # the way, or DNAT back out of the port a frame came in on (hairpin) is refused by the bridge.
        subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"],
                       capture_output=True, timeout=30)
        for i, (short, ip) in enumerate([("cli", CLIENT_IP), *BACKENDS.items()]):
            peer = f"{prefix}-{short}"
            sh("ip", "-n", node, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "-n", node, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", peer, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
            sh("ip", "-n", peer, "link", "set", "lo", "up")
            sh("ip", "-n", peer, "route", "add", SERVICE_CIDR, "via", NODE_IP)
        for short in BACKENDS:
            p = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{short}", sys.executable, "-c", SERVER, short],
                                 stdout=subprocess.PIPE, text=True)
            servers.append(p)
        for p in servers:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        backend = NetnsBackend(node)
        proxier = Proxier(backend, RenderConfig(table=prefix, buckets=64))
        proxier.mark_initialized()
        yield Lab(prefix, node, f"{prefix}-cli", proxier, backend)
    finally:
        for p in servers:
            p.kill()
            p.wait(5)
        if backend is not None:
            backend.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def web_objects(addrs: list[str]) -> tuple[dict, dict]:
    return (svc(name="web", ip=WEB_IP, ports=[{"name": "http", "port": 80, "protocol": "TCP"},
                                              {"name": "dns", "port": 53, "protocol": "UDP"}]),
            eps(service="web", addrs=addrs, ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                                   {"name": "dns", "port": 5353, "protocol": "UDP"}]))


@pytest.fixture(scope="module")
def programmed(lab: Lab) -> Lab:
    s, sl = web_objects(list(BACKENDS.values()))
    lab.proxier.on_service(s)
    lab.proxier.on_slice(sl)
    lab.proxier.on_service(svc(name="empty", ip=EMPTY_IP, ports=[{"name": "http", "port": 80},
                                                                 {"name": "dns", "port": 53, "protocol": "UDP"}]))
    lab.proxier.on_service(svc(name="self", ip=SELF_IP))
    lab.proxier.on_slice(eps(service="self", addrs=[BACKENDS["b1"]]))
    lab.sync("full")
    assert lab.backend.verify(lab.proxier.cfg) is None
    return lab


def test_clusterip_tcp_spreads_over_endpoints_and_masquerades(programmed: Lab) -> None:
    r = programmed.traffic("tcp", WEB_IP, 80, 300)
    assert r["errors"] == {}
    counts = Counter({k: v for k, v in r["hits"].items() if k in BACKENDS})
    assert set(counts) == set(BACKENDS), counts
    assert all(60 <= c <= 150 for c in counts.values()), counts  # ~100 each; binomial sd ~8
    assert r["hits"][f"src:{NODE_IP}"] == 300  # backends saw the node: replies return through it


def test_clusterip_udp(programmed: Lab) -> None:
    r = programmed.traffic("udp", WEB_IP, 53, 60)
    assert r["errors"] == {}
    assert {k for k in r["hits"] if k in BACKENDS} == set(BACKENDS)


def test_no_endpoints_rejects_quickly(programmed: Lab) -> None:
    r = programmed.traffic("tcp", EMPTY_IP, 80, 5)
    assert r["errors"] == {"ConnectionRefusedError": 5}, r
    assert r["max_seconds"] < 0.5
    r = programmed.traffic("udp", EMPTY_IP, 53, 3)  # ICMP port unreachable -> ECONNREFUSED on recv
    assert r["errors"] == {"ConnectionRefusedError": 3}, r


def test_hairpin(programmed: Lab) -> None:
    r = programmed.traffic("tcp", SELF_IP, 80, 5, src="b1")
    assert r["errors"] == {} and r["hits"]["b1"] == 5 and r["hits"][f"src:{NODE_IP}"] == 5


def test_one_endpoint_change_applied_incrementally(programmed: Lab) -> None:
    lab = programmed
    _, sl = web_objects([BACKENDS["b2"]])
    lab.proxier.on_slice(sl)
    start = time.monotonic()
    lab.sync("partial")
    took = time.monotonic() - start
    r = lab.traffic("tcp", WEB_IP, 80, 40)
    assert r["errors"] == {} and r["hits"]["b2"] == 40, r
    _, sl = web_objects(list(BACKENDS.values()))
    lab.proxier.on_slice(sl)
    lab.sync("partial")
    r = lab.traffic("tcp", WEB_IP, 80, 60)
    assert {k for k in r["hits"] if k in BACKENDS} == set(BACKENDS)
    assert took < 1.0  # generous: the benchmark measures it; this only catches a full reload


def test_flush_ruleset_detected_and_restored(programmed: Lab) -> None:
    lab = programmed
    sh("ip", "netns", "exec", lab.node, "nft", "flush", "ruleset")  # another agent
    r = lab.traffic("tcp", WEB_IP, 80, 3)
    assert not r["hits"].get("b1") and sum(r["errors"].values()) == 3  # Service traffic is gone
    assert lab.proxier.verify() == "table missing"
    lab.sync("full")
    assert lab.proxier.verify() is None
    r = lab.traffic("tcp", WEB_IP, 80, 30)
    assert r["errors"] == {} and sum(r["hits"][b] for b in BACKENDS if b in r["hits"]) == 30
