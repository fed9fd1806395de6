"""kproxy semantics against the real kernel: NodePort, traffic policies Local, session affinity,
multi-port and multi-protocol Services (SCTP included: over raw sockets where the kernel has
no SCTP sockets, see ``SCTP_LIB``), reject — real nftables, real clients and servers.

Topology (namespaces named with a per-run prefix; the host is never touched):

    tenant network 10.243.0.0/24 on br0 in the node netns (node address 10.243.0.1):
        cli 10.243.0.100 (+ .101-.110 as extra client addresses), b1 .11, b2 .12, b3 .13
    outside network 10.244.0.0/24 on a veth of the node (node address 10.244.0.1):
        out 10.244.0.100 — a host outside the tenant, default route via the node

This node is "node-a"; the EndpointSlices put b1 and b3 on it and b2 on "node-b". The proxier
runs in this process and programs the node netns through ``NetnsBackend``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kproxy.netns import NetnsBackend
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig
from tests.test_kproxy_tracker import eps, svc

pytestmark = pytest.mark.netns

NODE_NAME = "node-a"
NODE_IP, OUT_NODE_IP = "10.243.0.1", "10.244.0.1"
CLIENT_IP, OUT_IP = "10.243.0.100", "10.244.0.100"
EXTRA_CLIENTS = [f"10.243.0.{101 + i}" for i in range(10)]
BACKENDS = {"b1": "10.243.0.11", "b2": "10.243.0.12", "b3": "10.243.0.13"}
NODES = {BACKENDS["b1"]: NODE_NAME, BACKENDS["b2"]: "node-b", BACKENDS["b3"]: NODE_NAME}
LOCAL = {"b1", "b3"}
SERVICE_CIDR = "10.98.0.0/16"
MULTI_IP, ILOCAL_IP, ELOCAL_IP, ELOCAL_EXT_IP, REMOTE_IP, STICKY_IP, EMPTY_IP = (
    "10.98.0.10", "10.98.0.20", "10.98.0.30", "10.98.0.31", "10.98.0.40", "10.98.0.50", "10.98.0.60")
NP_TCP, NP_UDP, NP_SCTP, NP_ILOCAL, NP_ELOCAL, NP_REMOTE, NP_STICKY, NP_EMPTY = (
    30080, 30053, 30090, 30081, 30082, 30084, 30085, 30086)

# SCTP without the kernel's SCTP stack (this machine's kernel has SCTP conntrack and NAT, but no
# SCTP sockets): client and servers speak the first two packets of the handshake (INIT ->
# INIT-ACK, CRC32c and verification tags as RFC 9260 wants, so conntrack tracks them) over raw
# sockets. That is all the proxy sees of a connection: DNAT of the INIT, reverse NAT of the reply.
SCTP_LIB = r"""
import socket, struct
def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
def sctp_packet(sport, dport, vtag, chunk):
    pkt = struct.pack("!HHII", sport, dport, vtag, 0) + chunk
    return pkt[:8] + struct.pack("<I", crc32c(pkt)) + pkt[12:]
def sctp_parse(data):
    sctp = data[(data[0] & 15) * 4:]
    sport, dport, vtag = struct.unpack("!HHI", sctp[:8])
    return sport, dport, vtag, sctp[12:]
def kernel_has_sctp():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        return True
    except OSError:
        return False
"""

SERVER = SCTP_LIB + r"""
import sys, threading
name = sys.argv[1]
def sctp_raw(port):
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_SCTP)
    def loop():
        while True:
            data, peer = r.recvfrom(4096)
            sport, dport, vtag, chunk = sctp_parse(data)
            if dport != port or vtag != 0 or len(chunk) < 20 or chunk[0] != 1:
                continue  # only INITs to our port
            cookie = f"{name} {peer[0]}".encode()
            cookie += b" " * (-len(cookie) % 4)
            their_tag = struct.unpack("!I", chunk[4:8])[0]
            ack = struct.pack("!BBHIIHHI", 2, 0, 20 + 4 + len(cookie), 0x5C7B0001, 65535, 1, 1, 1)
            ack += struct.pack("!HH", 7, 4 + len(cookie)) + cookie
            r.sendto(sctp_packet(dport, sport, their_tag, ack), (peer[0], 0))
    threading.Thread(target=loop, daemon=True).start()
def reply(c, peer):
    c.sendall(name.encode() + b" " + peer[0].encode()); c.close()
def stream(proto, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(512)
    def loop():
        while True:
            reply(*s.accept())
    threading.Thread(target=loop, daemon=True).start()
stream(0, 8080)
if kernel_has_sctp():
    stream(socket.IPPROTO_SCTP, 9090)
else:
    sctp_raw(9090)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(name.encode() + b" " + peer[0].encode(), peer)
"""

CLIENT = SCTP_LIB + r"""
import json, random, sys, time
proto, ip, src = sys.argv[1], sys.argv[2], sys.argv[5]
port, n, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[6])
hits, errors = {}, {}
if proto == "sctp" and not kernel_has_sctp():
    proto = "sctp-raw"
def sctp_raw_exchange():
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_SCTP)
    r.settimeout(timeout)
    if src != "-":
        r.bind((src, 0))
    sport, tag = random.randrange(20000, 60000), random.randrange(1, 2**32)
    r.sendto(sctp_packet(sport, port, 0, struct.pack("!BBHIIHHI", 1, 0, 20, tag, 65535, 1, 1, 1)), (ip, 0))
    deadline = time.monotonic() + timeout
    while True:
        r.settimeout(max(0.01, deadline - time.monotonic()))
        data, peer = r.recvfrom(4096)  # TimeoutError when nothing (more) comes
        rsport, rdport, vtag, chunk = sctp_parse(data)
        if peer[0] == ip and (rsport, rdport, vtag) == (port, sport, tag) and chunk[0] == 2:
            r.close()
            return chunk[24:].decode().strip()  # the cookie: "<backend> <source it saw>"
for _ in range(n):
    try:
        if proto == "sctp-raw":
            who, seen = sctp_raw_exchange().split()
            hits[who] = hits.get(who, 0) + 1
            hits["src:" + seen] = hits.get("src:" + seen, 0) + 1
            continue
        kind = {"tcp": (socket.SOCK_STREAM, 0), "sctp": (socket.SOCK_STREAM, socket.IPPROTO_SCTP),
                "udp": (socket.SOCK_DGRAM, 0)}[proto]
        s = socket.socket(socket.AF_INET, *kind)
        s.settimeout(timeout)
        if src != "-":
            s.bind((src, 0))
        s.connect((ip, port))
        if proto == "udp":
            s.send(b"ping")
        reply = s.recv(100).decode()
        s.close()
        who, seen = reply.split()
        hits[who] = hits.get(who, 0) + 1
        hits["src:" + seen] = hits.get("src:" + seen, 0) + 1
    except OSError as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
print(json.dumps({"hits": hits, "errors": errors}))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    prefix: str
    proxier: Proxier
    backend: NetnsBackend

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def traffic(self, proto: str, ip: str, port: int, n: int, *, src: str = "cli", bind: str = "-",
                timeout: float = 2.0) -> dict[str, Any]:
        out = subprocess.run(["ip", "netns", "exec", self.ns(src), sys.executable, "-c", CLIENT, proto, ip,
                              str(port), str(n), bind, str(timeout)],
                             check=True, capture_output=True, text=True, timeout=120)
        return dict(json.loads(out.stdout))

    def who(self, proto: str, ip: str, port: int, n: int, **kw: Any) -> Counter[str]:
        """Which backends answered; fails on any error."""
        r = self.traffic(proto, ip, port, n, **kw)
        assert r["errors"] == {}, r
        return Counter({k: v for k, v in r["hits"].items() if k in BACKENDS})

    def sync(self, expect: str) -> None:
        result = self.proxier.sync()
        assert result.error is None, result.error
        assert result.mode == expect

    def nft(self, *args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns("node"), "nft", *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout


def _topology(prefix: str) -> None:
    node = f"{prefix}-node"
    sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
    sh("ip", "-n", node, "link", "set", "br0", "up")
    sh("ip", "-n", node, "link", "set", "lo", "up")
    for knob in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.br0.send_redirects=0"):
        sh("ip", "netns", "exec", node, "sysctl", "-qw", knob)
    subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"],
                   capture_output=True, timeout=30)  # see test_kproxy_dataplane: a node routes, it is no bridge
    for i, (short, ip) in enumerate([("cli", CLIENT_IP), *BACKENDS.items()]):
        peer = f"{prefix}-{short}"
        sh("ip", "-n", node, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", peer)
        sh("ip", "-n", node, "link", "set", f"p{i}", "master", "br0", "up")
        sh("ip", "-n", peer, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", peer, "link", "set", "eth0", "up")
        sh("ip", "-n", peer, "link", "set", "lo", "up")
        sh("ip", "-n", peer, "route", "add", SERVICE_CIDR, "via", NODE_IP)
    for ip in EXTRA_CLIENTS:
        sh("ip", "-n", f"{prefix}-cli", "addr", "add", f"{ip}/24", "dev", "eth0")
    out = f"{prefix}-out"
    sh("ip", "-n", node, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", out)
    sh("ip", "-n", node, "addr", "add", f"{OUT_NODE_IP}/24", "dev", "out0")
    sh("ip", "-n", node, "link", "set", "out0", "up")
    sh("ip", "-n", out, "addr", "add", f"{OUT_IP}/24", "dev", "eth0")
    sh("ip", "-n", out, "link", "set", "eth0", "up")
    sh("ip", "-n", out, "link", "set", "lo", "up")
    sh("ip", "-n", out, "route", "add", "default", "via", OUT_NODE_IP)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "kps" + uuid.uuid4().hex[:6]
    names = [f"{prefix}-{n}" for n in ("node", "cli", "out", *BACKENDS)]
    servers: list[subprocess.Popen[str]] = []
    backend: NetnsBackend | None = None
    try:
        for n in names:
            sh("ip", "netns", "add", n)
        _topology(prefix)
        for short in BACKENDS:
            servers.append(subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{short}", sys.executable, "-c", SERVER,
                                             short], stdout=subprocess.PIPE, text=True))
        for p in servers:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        backend = NetnsBackend(f"{prefix}-node")
        proxier = Proxier(backend, RenderConfig(table=prefix, node_name=NODE_NAME))
        proxier.mark_initialized()
        yield Lab(prefix, proxier, backend)
    finally:
        for p in servers:
            p.kill()
            p.wait(5)
        if backend is not None:
            backend.close()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def service(name: str, ip: str, ports: list[dict[str, Any]], addrs: list[str] | None = None,
            **spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    slice_ports = [{"name": p["name"], "port": p["target"], "protocol": p.get("protocol", "TCP")} for p in ports]
    svc_ports = [{k: v for k, v in p.items() if k != "target"} for p in ports]
    return (svc(name=name, ip=ip, ports=svc_ports, type="NodePort", **spec),
            eps(service=name, addrs=list(BACKENDS.values()) if addrs is None else addrs, ports=slice_ports,
                nodes=NODES))


HTTP = {"name": "http", "port": 80, "target": 8080, "protocol": "TCP"}


def objects() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    multi = [HTTP | {"nodePort": NP_TCP},
             {"name": "dns", "port": 53, "target": 5353, "protocol": "UDP", "nodePort": NP_UDP},
             {"name": "sctp", "port": 90, "target": 9090, "protocol": "SCTP", "nodePort": NP_SCTP}]
    return [
        service("multi", MULTI_IP, multi),
        service("ilocal", ILOCAL_IP, [HTTP | {"nodePort": NP_ILOCAL}], internalTrafficPolicy="Local"),
        service("elocal", ELOCAL_IP, [HTTP | {"nodePort": NP_ELOCAL}], externalTrafficPolicy="Local",
                externalIPs=[ELOCAL_EXT_IP]),
        service("remote", REMOTE_IP, [HTTP | {"nodePort": NP_REMOTE}], [BACKENDS["b2"]],
                internalTrafficPolicy="Local", externalTrafficPolicy="Local"),
        service("sticky", STICKY_IP, [HTTP | {"nodePort": NP_STICKY}], sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}}),
        service("empty", EMPTY_IP, [HTTP | {"nodePort": NP_EMPTY},
                                    {"name": "dns", "port": 53, "target": 5353, "protocol": "UDP"}], []),
    ]


@pytest.fixture(scope="module")
def programmed(lab: Lab) -> Lab:
    for s, sl in objects():
        lab.proxier.on_service(s)
        lab.proxier.on_slice(sl)
    lab.sync("full")
    assert lab.backend.verify(lab.proxier.cfg) is None
    return lab


# -- NodePort -----------------------------------------------------------------------------------

def test_nodeport_from_outside_the_tenant(programmed: Lab) -> None:
    r = programmed.traffic("tcp", OUT_NODE_IP, NP_TCP, 60, src="out")
    assert r["errors"] == {}, r
    assert {k for k in r["hits"] if k in BACKENDS} == set(BACKENDS)
    assert r["hits"][f"src:{NODE_IP}"] == 60  # masqueraded: the backends answer the node


def test_nodeport_on_every_node_address_and_from_the_node(programmed: Lab) -> None:
    assert set(programmed.who("tcp", NODE_IP, NP_TCP, 30, src="out")) == set(BACKENDS)
    assert set(programmed.who("tcp", NODE_IP, NP_TCP, 30)) == set(BACKENDS)  # from inside the tenant
    assert set(programmed.who("tcp", OUT_NODE_IP, NP_TCP, 30, src="node")) == set(BACKENDS)  # output hook


def test_nodeport_udp(programmed: Lab) -> None:
    assert set(programmed.who("udp", OUT_NODE_IP, NP_UDP, 40, src="out")) == set(BACKENDS)


def test_nodeport_is_not_a_cluster_ip_port(programmed: Lab) -> None:
    r = programmed.traffic("tcp", MULTI_IP, NP_TCP, 2, timeout=1.0)  # the node port on the cluster IP: nothing
    assert not any(k in BACKENDS for k in r["hits"]) and sum(r["errors"].values()) == 2, r


# -- several ports and protocols ----------------------------------------------------------------

@pytest.mark.parametrize("proto,port", [("tcp", 80), ("udp", 53), ("sctp", 90)])
def test_multi_port_service(programmed: Lab, proto: str, port: int) -> None:
    """Every port of one Service reaches every endpoint on that port's target port (SCTP over raw
    sockets where the kernel has no SCTP sockets: see SCTP_LIB)."""
    r = programmed.traffic(proto, MULTI_IP, port, 30)
    assert r["errors"] == {}, r
    assert {k for k in r["hits"] if k in BACKENDS} == set(BACKENDS)
    assert r["hits"][f"src:{NODE_IP}"] == 30  # masqueraded
    if proto != "tcp":
        np = NP_SCTP if proto == "sctp" else NP_UDP
        assert set(programmed.who(proto, OUT_NODE_IP, np, 30, src="out")) == set(BACKENDS)


# -- traffic policies ---------------------------------------------------------------------------

def test_internal_local_uses_only_this_nodes_endpoints(programmed: Lab) -> None:
    assert set(programmed.who("tcp", ILOCAL_IP, 80, 40)) == LOCAL
    assert set(programmed.who("tcp", OUT_NODE_IP, NP_ILOCAL, 40, src="out")) == set(BACKENDS)  # external: Cluster


def test_external_local_for_nodeport_and_external_ips(programmed: Lab) -> None:
    assert set(programmed.who("tcp", OUT_NODE_IP, NP_ELOCAL, 40, src="out")) == LOCAL
    assert set(programmed.who("tcp", ELOCAL_EXT_IP, 80, 40)) == LOCAL
    assert set(programmed.who("tcp", ELOCAL_IP, 80, 40)) == set(BACKENDS)  # internal: Cluster


def test_local_without_local_endpoints_drops(programmed: Lab) -> None:
    for ip, port, src in ((REMOTE_IP, 80, "cli"), (OUT_NODE_IP, NP_REMOTE, "out")):
        r = programmed.traffic("tcp", ip, port, 2, src=src, timeout=0.5)
        assert r["hits"] == {} and r["errors"] == {"TimeoutError": 2}, (ip, r)  # dropped, not rejected


# -- session affinity ---------------------------------------------------------------------------

def test_affinity_sticks_per_client_address(programmed: Lab) -> None:
    chosen = {}
    for src in EXTRA_CLIENTS:
        hits = programmed.who("tcp", STICKY_IP, 80, 8, bind=src)
        assert len(hits) == 1, (src, hits)  # every connection of this client: the same endpoint
        chosen[src] = next(iter(hits))
    assert len(set(chosen.values())) > 1, chosen  # 10 clients all on one of 3 endpoints: p = 3**-9
    # the kernel's timed set holds the client, with the Service's timeout
    listing = programmed.nft("list", "table", "ip", programmed.prefix)
    assert EXTRA_CLIENTS[0] in listing and "timeout 5m" in listing


def test_affinity_via_nodeport(programmed: Lab) -> None:
    hits = programmed.who("tcp", OUT_NODE_IP, NP_STICKY, 20, src="out")
    assert len(hits) == 1, hits


# -- reject -------------------------------------------------------------------------------------

def test_no_endpoints_rejects_nodeport_and_cluster_ip(programmed: Lab) -> None:
    r = programmed.traffic("tcp", OUT_NODE_IP, NP_EMPTY, 5, src="out")
    assert r["errors"] == {"ConnectionRefusedError": 5}, r  # TCP reset, not a timeout
    r = programmed.traffic("tcp", EMPTY_IP, 80, 5)
    assert r["errors"] == {"ConnectionRefusedError": 5}, r
    r = programmed.traffic("udp", EMPTY_IP, 53, 3)  # ICMP port unreachable -> ECONNREFUSED on recv
    assert r["errors"] == {"ConnectionRefusedError": 3}, r


# -- incremental changes (last: they change the programmed state) -------------------------------

def test_affinity_service_added_and_removed_incrementally(programmed: Lab) -> None:
    lab = programmed
    s, sl = service("late", "10.98.0.70", [HTTP | {"nodePort": 30087}], [BACKENDS["b1"], BACKENDS["b2"]],
                    sessionAffinity="ClientIP")
    before = lab.nft("list", "chains", "ip")
    lab.proxier.on_service(s)
    lab.proxier.on_slice(sl)
    lab.sync("partial")
    assert len(lab.who("tcp", "10.98.0.70", 80, 10)) == 1
    added = lab.nft("list", "chains", "ip").count("chain affsvc_") - before.count("chain affsvc_")
    assert added == 1
    lab.proxier.on_slice(sl | {"endpoints": sl["endpoints"][:1]})  # b2 leaves: its chain and set go
    lab.sync("partial")
    assert lab.who("tcp", "10.98.0.70", 80, 10) == Counter({"b1": 10})
    lab.proxier.on_service(s, deleted=True)
    lab.sync("partial")
    assert lab.nft("list", "chains", "ip") == before  # every chain of it is gone, nothing else changed
    assert lab.backend.verify(lab.proxier.cfg) is None


def test_local_endpoint_change_applied_incrementally(programmed: Lab) -> None:
    lab = programmed
    _, sl = service("ilocal", ILOCAL_IP, [HTTP | {"nodePort": NP_ILOCAL}], [BACKENDS["b2"], BACKENDS["b3"]],
                    internalTrafficPolicy="Local")
    lab.proxier.on_slice(sl)
    lab.sync("partial")
    assert lab.who("tcp", ILOCAL_IP, 80, 20) == Counter({"b3": 20})
