"""UDP conntrack cleanup against the real kernel: a client that keeps its source port is not black-holed.

Topology (per-run names; the host is never touched):

    client 10.243.0.100 --+
    b1     10.243.0.11  --+-- br0 in the node netns (10.243.0.1); everyone routes 10.98.0.0/16 via the node
    b2     10.243.0.12  --+

A UDP client in the client netns sends from one bound socket (fixed source port) to the Service's
cluster IP every 50 ms and logs who answers. Its first packet creates a conntrack entry DNATing
the flow to one backend; every later packet follows that entry. That backend then "dies" (its
link goes down) and is removed from the EndpointSlice. The control run shows the problem: with
the cleanup failing, the entry survives the sync and the client stays black-holed. Once the
cleanup runs, the entry to the dead backend is gone (checked with the ``conntrack`` CLI) and the
client is answered by the other backend.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kproxy.conntrack import FlowFilter
from kproxy.netns import NetnsBackend
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig
from netns_tests.waiting import wait_for
from tests.test_kproxy_tracker import eps, svc

pytestmark = pytest.mark.netns

NODE_IP = "10.243.0.1"
CLIENT_IP = "10.243.0.100"
BACKENDS = {"b1": "10.243.0.11", "b2": "10.243.0.12"}
SERVICE_CIDR = "10.98.0.0/16"
DNS_IP = "10.98.0.53"
CLIENT_PORT = 40053

SERVER = r"""
import socket, sys
name = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(name.encode(), peer)
"""

# One socket, one source port, for the whole run: exactly what a stale entry black-holes.
CLIENT = r"""
import socket, sys, time
ip, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", sport)); s.settimeout(0.05)
n = 0
while True:
    n += 1
    s.sendto(str(n).encode(), (ip, port))
    deadline = time.monotonic() + 0.05
    who = "-"
    while time.monotonic() < deadline:
        try:
            data, _ = s.recvfrom(100)
            who = data.decode()
            break
        except socket.timeout:
            break
        except OSError:
            break
    print(n, who, flush=True)
    time.sleep(0.05)
"""

ONE_SHOT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[3]))); s.settimeout(2)
s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(100)[0].decode())
"""


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


@dataclass
class Switchable:
    """A conntrack cleaner that can be made to fail (the control run) — the proxier retries it."""

    backend: NetnsBackend
    enabled: bool = True
    calls: list[list[FlowFilter]] = field(default_factory=list)

    def __call__(self, filters: Sequence[FlowFilter]) -> int:
        if not self.enabled:
            raise OSError("cleanup disabled by the test")
        self.calls.append(list(filters))
        return self.backend.delete_flows(filters)


@dataclass
class Lab:
    prefix: str
    node: str
    proxier: Proxier
    cleaner: Switchable
    log: Path

    def replies(self) -> list[str]:
        lines = self.log.read_text().splitlines()
        return [ln.split()[1] for ln in lines if len(ln.split()) == 2]

    def entries(self) -> str:
        """The node's conntrack entries of the client's flow to the cluster IP (``conntrack`` CLI)."""
        out = subprocess.run(["ip", "netns", "exec", self.node, "conntrack", "-L", "-p", "udp", "--orig-dst", DNS_IP,
                              "--sport", str(CLIENT_PORT)], capture_output=True, text=True, timeout=30)
        return out.stdout

    def sync(self) -> None:
        r = self.proxier.sync()
        assert r.error is None, r.error


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    prefix = "kpc" + uuid.uuid4().hex[:6]
    names = [f"{prefix}-{n}" for n in ("node", "cli", *BACKENDS)]
    procs: list[subprocess.Popen[str]] = []
    backend: NetnsBackend | None = None
    log = tmp_path_factory.mktemp(prefix) / "client.log"
    try:
        for n in names:
            sh("ip", "netns", "add", n)
        node = f"{prefix}-node"
        sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        sh("ip", "-n", node, "link", "set", "br0", "up")
        sh("ip", "-n", node, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"],
                       capture_output=True, timeout=30)
        for short, ip in [("cli", CLIENT_IP), *BACKENDS.items()]:
            peer = f"{prefix}-{short}"
            sh("ip", "-n", node, "link", "add", f"p-{short}", "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "-n", node, "link", "set", f"p-{short}", "master", "br0", "up")
            sh("ip", "-n", peer, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
            sh("ip", "-n", peer, "link", "set", "lo", "up")
            sh("ip", "-n", peer, "route", "add", SERVICE_CIDR, "via", NODE_IP)
        servers = []
        for short in BACKENDS:
            p = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{short}", sys.executable, "-c", SERVER, short],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            servers.append(p)
        for p in servers:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        backend = NetnsBackend(node)
        cleaner = Switchable(backend)
        proxier = Proxier(backend, RenderConfig(table=prefix), conntrack=cleaner)
        proxier.mark_initialized()
        yield Lab(prefix, node, proxier, cleaner, log)
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        if backend is not None:
            backend.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def dns_slice(*addrs: str) -> dict[str, object]:
    return eps(service="dns", addrs=list(addrs), ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}])


def test_removed_udp_endpoint_does_not_black_hole_a_client_that_keeps_its_port(lab: Lab) -> None:
    lab.proxier.on_service(svc(name="dns", ip=DNS_IP, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    lab.proxier.on_slice(dns_slice(*BACKENDS.values()))
    lab.sync()
    with open(lab.log, "w") as out:
        client = subprocess.Popen(["ip", "netns", "exec", f"{lab.prefix}-cli", sys.executable, "-c", CLIENT, DNS_IP,
                                   "53", str(CLIENT_PORT)], stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        first = wait_for(lambda: next((w for w in lab.replies() if w != "-"), ""), "first UDP answer")
        dead, other = first, next(b for b in BACKENDS if b != first)
        wait_for(lambda: len(lab.replies()) >= 10, "ten more packets")
        assert set(lab.replies()) <= {first, "-"}, "one flow, one entry: every answer from the same backend"
        assert f"src={BACKENDS[dead]}" in lab.entries()  # the entry DNATs the flow to `dead`

        # The backend dies; control run: the slice update is applied but the cleanup fails.
        lab.cleaner.enabled = False
        sh("ip", "-n", lab.node, "link", "set", f"p-{dead}", "down")
        lab.proxier.on_slice(dns_slice(BACKENDS[other]))
        r = lab.proxier.sync()
        assert (r.mode, r.error) == ("partial", None)
        seen = len(lab.replies())
        wait_for(lambda: len(lab.replies()) >= seen + 15, "fifteen packets after the endpoint was removed")
        assert set(lab.replies()[seen:]) == {"-"}, "without cleanup the stale entry black-holes the flow"
        assert f"src={BACKENDS[dead]}" in lab.entries()
        assert lab.proxier.metrics.conntrack_errors._value.get() == 1

        # The cleanup runs (retried with the next sync): the entry is gone, the other backend answers.
        lab.cleaner.enabled = True
        lab.sync()
        assert lab.cleaner.calls[-1] == [FlowFilter(DNS_IP, 53, frozenset({(BACKENDS[dead], 5353)}))]
        assert lab.proxier.metrics.conntrack_deleted._value.get() >= 1
        seen = len(lab.replies())
        wait_for(lambda: other in lab.replies()[seen:], f"answers from {other} after the cleanup")
        entries = lab.entries()
        assert f"src={BACKENDS[dead]}" not in entries and f"src={BACKENDS[other]}" in entries, entries
    finally:
        client.kill()
        client.wait(5)


def test_full_sync_reconciles_stale_entries(lab: Lab) -> None:
    """After drift (here: someone flushed the ruleset) the full sync reconciles conntrack too."""
    # b1/b2 as left by the previous test (or fresh): make the flow go to a backend, then remove it
    # while the cleanup is off, then force a full sync.
    for short in BACKENDS:
        sh("ip", "-n", lab.node, "link", "set", f"p-{short}", "up")
    lab.proxier.on_service(svc(name="dns", ip=DNS_IP, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    lab.proxier.on_slice(dns_slice(BACKENDS["b1"]))
    lab.sync()
    assert sh("ip", "netns", "exec", f"{lab.prefix}-cli", sys.executable, "-c", ONE_SHOT, DNS_IP, "53",
              str(CLIENT_PORT)).strip() == "b1"
    wait_for(lambda: f"src={BACKENDS['b1']}" in lab.entries(), "an entry to b1")
    lab.cleaner.enabled = False
    lab.proxier.on_slice(dns_slice(BACKENDS["b2"]))
    lab.sync()
    assert f"src={BACKENDS['b1']}" in lab.entries()
    lab.cleaner.enabled = True
    sh("ip", "netns", "exec", lab.node, "nft", "flush", "ruleset")
    assert lab.proxier.verify() is not None
    r = lab.proxier.sync()
    assert (r.mode, r.error) == ("full", None)
    assert lab.cleaner.calls[-1] == [FlowFilter(DNS_IP, 53, frozenset({(BACKENDS["b2"], 5353)}), keep=True)]
    assert f"src={BACKENDS['b1']}" not in lab.entries()
