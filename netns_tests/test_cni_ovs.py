"""The ovs-mode binding (cni/ovs_binding.py) against a real OVS (netdev datapath) and OVN.

Pods are netns created here with per-run names; the OVS stack is the session's (ovn_fixtures).
State is checked independently with `ip`, `ethtool` and `ovs-vsctl`, never with the code under test.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cni import ovs_binding as ob
from netctl.iaas.base import NetworkSpec, Port, PortOwner, PortRequest
from netctl.iaas.ovn import OvnIaaS

pytest.register_assert_rewrite("netns_tests.ovn_fixtures")
from netns_tests.ovn_fixtures import OvnEnv, PodNs, run, tcp_exchange, tcp_server  # noqa: E402

pytestmark = pytest.mark.netns
pytest_plugins = ("netns_tests.ovn_fixtures",)


@dataclass
class Sandboxes:
    """Per-run pod netns, and everything plugged into them; all removed at the end."""

    env: OvnEnv
    netns: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    @property
    def hv(self) -> str:
        return f"/run/netns/{self.env.hv_netns}"

    def new(self, tag: str) -> str:
        name = f"{self.env.prefix}-c{tag}"
        run("ip", "netns", "add", name)
        self.netns.append(name)
        return name

    def plug(self, ns: str, host: str, **kw: Any) -> ob.PlugResult:
        self.hosts.append(host)
        args: dict[str, Any] = {
            "ovsdb": self.env.ovs.db_connection, "bridge": self.env.bridge, "ovs_netns": self.hv,
            "target_netns": f"/run/netns/{ns}", "ifname": "eth0", "host_ifname": host,
            "port_id": f"{self.env.prefix}-port-{host}", "mac": "0a:58:0a:4f:00:05", "cidr": "10.79.0.5/24",
            "gateway": "10.79.0.1", "mtu": 1400,
        }
        args.update(kw)
        return ob.plug_port(**args)

    def cleanup(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                ob.unplug_port(ovsdb=self.env.ovs.db_connection, ovs_netns=self.hv, host_ifname=host)
        for ns in self.netns:
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def boxes(ovn_env: OvnEnv) -> Iterator[Sandboxes]:
    s = Sandboxes(ovn_env)
    try:
        yield s
    finally:
        s.cleanup()


def host_name(env: OvnEnv, tag: str) -> str:
    return f"{env.prefix}x{tag}"[:15]


def ip_json(*argv: str) -> Any:
    return json.loads(run("ip", "-j", *argv).stdout or "[]")


def link(ns: str, name: str) -> dict[str, Any] | None:
    res = run("ip", "-n", ns, "-j", "addr", "show", "dev", name, check=False)
    return json.loads(res.stdout)[0] if res.returncode == 0 and res.stdout.strip() else None


def tx_offload(ns: str, name: str) -> str:
    out = run("ip", "netns", "exec", ns, "ethtool", "-k", name).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("tx-checksumming:"))


def ovs_iface(env: OvnEnv, name: str) -> dict[str, Any] | None:
    out = env.vsctl("--format=json", "--columns=name,ofport,external_ids", "find", "Interface", f"name={name}")
    rows = json.loads(out)["data"]
    if not rows:
        return None
    name_, ofport, ext = rows[0]
    return {"name": name_, "ofport": ofport, "external_ids": dict(ext[1])}


def assert_nothing_left(env: OvnEnv, ns: str, host: str, ifname: str = "eth0") -> None:
    assert link(env.hv_netns, host) is None, f"host veth {host} left behind"
    assert ovs_iface(env, host) is None, f"OVS port {host} left behind"
    assert link(ns, ifname) is None, f"{ifname} left behind in {ns}"


def wait_bound(env: OvnEnv, port_id: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not env.sbctl("--bare", "--columns=chassis", "find", "Port_Binding", f"logical_port={port_id}"):
        assert time.monotonic() < deadline, f"ovn-controller did not bind {port_id} within {timeout}s"
        time.sleep(0.1)


def test_two_pods_plugged_talk_tcp_over_ovn(ovn_env: OvnEnv, iaas: OvnIaaS, boxes: Sandboxes) -> None:
    env = ovn_env
    tenant = f"{env.prefix}-cni"
    net = iaas.ensure_network(NetworkSpec(tenant, "10.78.0.0/24", "10.78.0.1", mtu=1400))
    try:
        ports: list[Port] = iaas.create_ports(net, [
            PortRequest(f"pod-{env.prefix}-cni{i}", PortOwner("pod", f"p{i}", "ns", f"u{i}", tenant))
            for i in (1, 2)])
        pods = []
        for i, port in enumerate(ports, start=1):
            ns, host = boxes.new(f"t{i}"), host_name(env, f"t{i}")
            res = boxes.plug(ns, host, port_id=port.id, mac=port.mac, cidr=port.cidr, gateway=net.gateway,
                             mtu=net.mtu, owner_tag=f"pod:ns/p{i}", external_ids={ob.EXT_CONTAINER_ID: f"c{i}"})
            assert (res.host_ifname, res.ifname, res.mac, res.mtu) == (host, "eth0", port.mac, 1400)
            assert res.ofport > 0 and res.sandbox == f"/run/netns/{ns}"
            pods.append(PodNs(ns, host, port))

            eth0 = link(ns, "eth0")
            assert eth0 is not None and eth0["address"] == port.mac and eth0["mtu"] == 1400
            assert "UP" in eth0["flags"]
            assert [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["family"] == "inet"] == [port.cidr]
            assert "UP" in (link(ns, "lo") or {}).get("flags", [])
            routes = ip_json("-n", ns, "route", "show", "default")
            assert [(r["dst"], r["gateway"], r["dev"]) for r in routes] == [("default", net.gateway, "eth0")]
            host_link = link(env.hv_netns, host)
            assert host_link is not None and "UP" in host_link["flags"] and host_link["mtu"] == 1400
            assert res.host_mac == host_link["address"]
            # DESIGN §5: TCP through the netdev datapath needs TX checksum offload off on both ends
            assert tx_offload(ns, "eth0") == "off"
            assert tx_offload(env.hv_netns, host) == "off"
            row = ovs_iface(env, host)
            assert row is not None and row["ofport"] == res.ofport
            ours = {k: v for k, v in row["external_ids"].items() if not k.startswith("ovn-")}  # ovn-installed
            assert ours == {
                "iface-id": port.id, "attached-mac": port.mac, "iface-status": "active",
                "netctl:owner": f"pod:ns/p{i}", ob.EXT_CONTAINER_ID: f"c{i}",
            }
            assert env.vsctl("iface-to-br", host) == env.bridge
            wait_bound(env, port.id)
            assert ob.check_port(ovsdb=env.ovs.db_connection, bridge=env.bridge, ovs_netns=boxes.hv,
                                 target_netns=res.sandbox, ifname="eth0", host_ifname=host, mac=port.mac,
                                 cidrs=[port.cidr], external_ids={ob.EXT_CONTAINER_ID: f"c{i}"}) == []
        server = tcp_server(pods[0], 5101, lifetime=30)
        try:
            ok, err = tcp_exchange(pods[1], ports[0].ip, 5101, 500_000, timeout=20)
            assert ok, f"TCP between two plugged pods failed: {err}"
        finally:
            server.kill()
            server.wait()
    finally:
        boxes.cleanup()
        iaas.delete_network(tenant)


def test_unplug_is_idempotent(ovn_env: OvnEnv, boxes: Sandboxes) -> None:
    env = ovn_env
    db = env.ovs.db_connection
    ns, host = boxes.new("u1"), host_name(env, "u1")
    boxes.plug(ns, host)
    assert ob.unplug_port(ovsdb=db, ovs_netns=boxes.hv, host_ifname=host) == [host]
    assert_nothing_left(env, ns, host)
    assert ob.unplug_port(ovsdb=db, ovs_netns=boxes.hv, host_ifname=host) == []

    # found by its external_ids even under another name; and the pod netns may already be gone
    ns2, other = boxes.new("u2"), host_name(env, "u2")
    boxes.plug(ns2, other, external_ids={ob.EXT_CONTAINER_ID: "cid-u2", ob.EXT_IFNAME: "eth0"})
    run("ip", "netns", "del", ns2)  # takes the veth pair with it (asynchronously); the OVS port stays
    deadline = time.monotonic() + 10
    while link(env.hv_netns, other) is not None:
        assert time.monotonic() < deadline, "the veth outlived its netns by 10 s"
        time.sleep(0.05)
    assert ovs_iface(env, other) is not None
    match = {ob.EXT_CONTAINER_ID: "cid-u2", ob.EXT_IFNAME: "eth0"}
    assert ob.unplug_port(ovsdb=db, ovs_netns=boxes.hv, host_ifname="ncdoesnotexist", match=match) == [other]
    assert ovs_iface(env, other) is None
    assert ob.unplug_port(ovsdb=db, ovs_netns=boxes.hv, host_ifname="ncdoesnotexist", match=match) == []

    # the OVS netns gone entirely: nothing to do, no error
    assert ob.unplug_port(ovsdb=db, ovs_netns=f"/run/netns/{env.prefix}-gone", host_ifname=host) == []
    # OVSDB down: an error the CNI maps to "try again later", and nothing touched
    with pytest.raises(ob.OvsUnavailable):
        ob.unplug_port(ovsdb=f"unix:{env.base}/nope.sock", ovs_netns=boxes.hv, host_ifname=host)


@pytest.mark.parametrize("failure", ["no-bridge", "bad-gateway", "ifname-taken", "no-ovsdb", "no-netns"])
def test_failed_plug_rolls_back(ovn_env: OvnEnv, boxes: Sandboxes, failure: str) -> None:
    env = ovn_env
    ns, host = boxes.new(f"f{failure[:4]}"), host_name(env, f"f{failure[:4]}")
    kw: dict[str, Any] = {}
    expected: type[Exception] = ob.LinkError
    if failure == "no-bridge":
        kw["bridge"], expected = f"{env.prefix}-nobr", ob.OvsError
    elif failure == "bad-gateway":
        kw["gateway"] = "192.0.2.1"  # off-link: the default route cannot be added
    elif failure == "ifname-taken":
        run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "theirs0")
    elif failure == "no-ovsdb":
        kw["ovsdb"], expected = f"unix:{env.base}/nope.sock", ob.OvsUnavailable
    elif failure == "no-netns":
        kw["target_netns"] = f"/run/netns/{env.prefix}-missing"
    with pytest.raises(expected) as e:
        boxes.plug(ns, host, **kw)
    print(f"{failure}: {e.value}")
    assert link(env.hv_netns, host) is None and ovs_iface(env, host) is None
    if failure == "ifname-taken":
        # someone else's interface (a veth pair of its own) survives untouched
        assert link(ns, "eth0") is not None and link(ns, "theirs0") is not None
    else:
        assert link(ns, "eth0") is None


def test_leftover_of_a_killed_plug_is_replaced(ovn_env: OvnEnv, boxes: Sandboxes) -> None:
    env = ovn_env
    ns, host = boxes.new("r1"), host_name(env, "r1")
    boxes.plug(ns, host)
    run("ip", "-n", ns, "link", "set", "eth0", "name", "old0")  # the runtime retries into the same netns
    res = boxes.plug(ns, host, mac="0a:58:0a:4f:00:06")
    assert ovs_iface(env, host) is not None and res.mac == "0a:58:0a:4f:00:06"
    assert link(ns, "old0") is None  # the stale pair was removed, not duplicated
    assert env.vsctl("--bare", "--columns=name", "find", "Interface", f"name={host}") == host


def test_leftover_veth_of_a_plug_killed_before_its_port_is_replaced(ovn_env: OvnEnv, boxes: Sandboxes) -> None:
    """The host end exists but OVS has no port for it (killed between the veth and the commit): the
    plug removes the stale pair and goes on, without a lookup on the normal path."""
    env = ovn_env
    ns, host = boxes.new("r2"), host_name(env, "r2")
    stale_peer = f"{host[:-2]}zz"
    run("ip", "-n", env.hv_netns, "link", "add", host, "type", "veth", "peer", "name", stale_peer)
    assert ovs_iface(env, host) is None
    res = boxes.plug(ns, host)
    assert ovs_iface(env, host) is not None and link(ns, "eth0") is not None
    assert link(env.hv_netns, stale_peer) is None  # the stale pair went, peer included
    now = link(env.hv_netns, host)
    assert now is not None and res.host_mac == now["address"]


def test_check_reports_what_differs(ovn_env: OvnEnv, boxes: Sandboxes) -> None:
    env = ovn_env
    ns, host = boxes.new("k1"), host_name(env, "k1")
    res = boxes.plug(ns, host)
    args: dict[str, Any] = {"ovsdb": env.ovs.db_connection, "bridge": env.bridge, "ovs_netns": boxes.hv,
                            "target_netns": res.sandbox, "ifname": "eth0", "host_ifname": host, "mac": res.mac,
                            "cidrs": ["10.79.0.5/24"]}
    assert ob.check_port(**args) == []
    run("ip", "-n", ns, "link", "set", "eth0", "down")
    run("ip", "netns", "exec", env.hv_netns, "ethtool", "-K", host, "tx", "on")
    problems = ob.check_port(**args)
    assert any("eth0" in p and "down" in p for p in problems), problems
    assert any(host in p and "TX checksum" in p for p in problems), problems
    assert any("lacks address 10.79.0.9/24" in p for p in ob.check_port(**{**args, "cidrs": ["10.79.0.9/24"]}))
    env.vsctl("del-port", host)
    assert any(f"OVS has no interface {host}" in p for p in ob.check_port(**args))


def test_service_cidr_route_via_node_address(ovn_env: OvnEnv, boxes: Sandboxes) -> None:
    env = ovn_env
    ns, host = boxes.new("s1"), host_name(env, "s1")
    res = boxes.plug(ns, host, routes=[("10.96.0.0/16", "10.79.0.2")])
    routes = ip_json("-n", ns, "route", "show", "10.96.0.0/16")
    assert [(r["dst"], r["gateway"], r["dev"]) for r in routes] == [("10.96.0.0/16", "10.79.0.2", "eth0")]
    # CHECK verifies the routes ADD set up, and names a missing one
    args: dict[str, Any] = {"ovsdb": env.ovs.db_connection, "bridge": env.bridge, "ovs_netns": boxes.hv,
                            "target_netns": res.sandbox, "ifname": "eth0", "host_ifname": host, "mac": res.mac,
                            "cidrs": [], "routes": [("10.96.0.0/16", "10.79.0.2")]}
    assert ob.check_port(**args) == []
    run("ip", "-n", ns, "route", "del", "10.96.0.0/16")
    assert any("lacks route 10.96.0.0/16 via 10.79.0.2" in p for p in ob.check_port(**args)), ob.check_port(**args)


def test_host_ifname_is_deterministic_and_short() -> None:
    a = ob.host_ifname("0123456789abcdef" * 4, "eth0")
    assert a == ob.host_ifname("0123456789abcdef" * 4, "eth0") and len(a) <= 15 and a.startswith("nc")
    assert a != ob.host_ifname("0123456789abcdef" * 4, "net1")
