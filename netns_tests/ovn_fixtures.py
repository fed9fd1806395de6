"""Fixtures for tests that need a real OVS + OVN stack and netns "pods".

Import the fixtures into a test module (`from ovn_fixtures import ovn_env, iaas  # noqa: F401`).
The stack runs in its own hypervisor netns with a per-run prefix, so it shares nothing with a
running lab or another test run, and it is torn down even when a test or the start-up fails.
CLIs (`ip`, `ethtool`, `ovn-nbctl`) are used here on purpose: tests check state independently
of the library code under test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netctl.iaas.base import Port
from netctl.iaas.ovn import OvnIaaS
from netctl.lab.ovs import OvnStack, OvsStack

# Short: link names are limited to 15 characters and unix socket paths to 107.
RUN_PREFIX = f"t{secrets.token_hex(2)}"
BRIDGE = "br-int"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, OVS)"
    missing = [t for t in ("ovsdb-server", "ovs-vswitchd", "ovn-northd", "ovn-controller", "ovsdb-tool")
               if shutil.which(t) is None]
    return f"missing binaries: {', '.join(missing)}" if missing else None


@dataclass
class OvnEnv:
    prefix: str
    base: Path
    ovs: OvsStack
    ovn: OvnStack
    bridge: str
    chassis: str
    start_seconds: float

    @property
    def hv_netns(self) -> str:
        assert self.ovs.netns is not None
        return self.ovs.netns

    def nbctl(self, *args: str) -> str:
        return _ctl("ovn-nbctl", f"--db={self.ovn.nb_connection}", *args)

    def sbctl(self, *args: str) -> str:
        return _ctl("ovn-sbctl", f"--db={self.ovn.sb_connection}", *args)

    def vsctl(self, *args: str) -> str:
        return _ctl("ovs-vsctl", f"--db={self.ovs.db_connection}", *args)


def _ctl(*argv: str) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip()


@pytest.fixture(scope="session")
def ovn_env() -> Iterator[OvnEnv]:
    """One OVS (netdev datapath, own netns) + OVN stack for the session."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}-", dir="/tmp"))
    ovs = OvsStack(base / "ovs", netns=f"{RUN_PREFIX}-hv", timeout=60)
    ovn = OvnStack(base / "ovn", ovs, BRIDGE, system_id=f"{RUN_PREFIX}-chassis", timeout=60)
    try:
        t0 = time.monotonic()
        ovs.start()
        ovs.add_bridge(BRIDGE)
        ovn.start()
        yield OvnEnv(RUN_PREFIX, base, ovs, ovn, BRIDGE, ovn.system_id, time.monotonic() - t0)
    finally:
        ovn.stop()
        ovs.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def iaas(ovn_env: OvnEnv) -> Iterator[OvnIaaS]:
    """A fresh OvnIaaS client; all test chassis map to the one local chassis."""
    client = OvnIaaS(ovn_env.ovn.nb_connection, timeout=30, chassis_of=lambda node: ovn_env.chassis)
    try:
        yield client
    finally:
        client.close()


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class PodNs:
    """A netns "pod" whose eth0 is a veth; the host end sits on the OVS bridge in the hv netns."""

    name: str
    host_if: str
    port: Port
    plugged_at: float = 0.0  # time.monotonic() when the host end joined the bridge

    def exec(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *argv, timeout=timeout, check=check)


class Pods:
    """Creates PodNs objects and removes all of them (and their OVS ports) at the end."""

    def __init__(self, env: OvnEnv) -> None:
        self.env = env
        self.pods: list[PodNs] = []

    def plug(self, port: Port, idx: int) -> PodNs:
        env = self.env
        ns = f"{env.prefix}-p{idx}"
        host = f"{env.prefix}h{idx}"
        run("ip", "netns", "add", ns)
        pod = PodNs(ns, host, port)
        self.pods.append(pod)
        run("ip", "-n", env.hv_netns, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
        pod.exec("ip", "link", "set", "lo", "up")
        pod.exec("ip", "link", "set", "eth0", "address", port.mac, "mtu", "1400")
        pod.exec("ip", "addr", "add", port.cidr, "dev", "eth0")
        pod.exec("ip", "link", "set", "eth0", "up")
        run("ip", "-n", env.hv_netns, "link", "set", host, "up")
        # DESIGN §5: TCP through a netdev bridge needs TX checksum offload off on both ends.
        pod.exec("ethtool", "-K", "eth0", "tx", "off")
        run("ip", "netns", "exec", env.hv_netns, "ethtool", "-K", host, "tx", "off")
        env.ovs.add_port(env.bridge, host, {"iface-id": port.id})
        pod.plugged_at = time.monotonic()
        return pod

    def cleanup(self) -> None:
        for pod in self.pods:
            try:
                self.env.ovs.del_port(pod.host_if)
            except Exception as e:  # the stack may be gone after a failure; go on deleting
                print(f"cleanup: del_port {pod.host_if}: {e}", file=sys.stderr)
            run("ip", "netns", "del", pod.name, check=False)
        self.pods.clear()


@pytest.fixture
def pods(ovn_env: OvnEnv) -> Iterator[Pods]:
    p = Pods(ovn_env)
    try:
        yield p
    finally:
        p.cleanup()


TCP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
while True:
    try:
        c, _ = s.accept()
    except socket.timeout:
        break
    with c:
        c.settimeout(30)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
        c.sendall(b"echo:" + data)
"""

TCP_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
    payload = b"x" * int(sys.argv[4])
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
print(len(got))
"""


def tcp_server(pod: PodNs, port: int, lifetime: float) -> subprocess.Popen[str]:
    """A one-line echo server in `pod` (accepting for `lifetime` seconds); waits until it listens."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.name, sys.executable, "-c", TCP_SERVER, pod.port.ip, str(port), str(lifetime)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "listening", proc.stderr.read() if proc.stderr else line
    return proc


def tcp_exchange(client: PodNs, ip: str, port: int, size: int, timeout: float) -> tuple[bool, str]:
    """Connect from `client` to ip:port, send `size` bytes; (True, "") if the echo came back whole."""
    res = client.exec(sys.executable, "-c", TCP_CLIENT, ip, str(port), str(timeout), str(size),
                      check=False, timeout=timeout + 20)
    ok = res.returncode == 0 and res.stdout.strip() == str(size + len("echo:"))
    return ok, (res.stderr.strip().splitlines() or [""])[-1]
