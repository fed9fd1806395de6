"""Nested mode (pods inside tenant VMs) with real OVS/OVN, real netns, the real API server and real TCP.

The world: the session's OVS+OVN (one chassis, OVS in the hypervisor netns); two node "VMs", each
a netns whose own NIC `eth0` is its node port on the tenant switch, plugged by the lab hypervisor
(netctl.iaas.ovn_nested.Hypervisor) exactly as a pod's NIC is hot-plugged later. The CNI executable
is exec'd the way a runtime inside the VM execs it (cni_fixtures.LibCni: CNI_* env, config on stdin,
inside the VM's netns), reading the pods' `netctl.io/port` annotations from the real kube-apiserver
(reached from the VM through cni_fixtures.ApiRelay). State is checked with `ip` / `ovs-vsctl`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netctl.annotations import TENANT_LABEL, PortAnnotation
from netctl.iaas.base import Network, NetworkSpec, Port, PortOwner, PortRequest
from netctl.iaas.ovn import OvnIaaS
from netctl.iaas.ovn_nested import Hypervisor, clear_subport, close_nb, connect_nb, make_subport, tap_name
from netctl.lab.ovs import OvsStack

pytest.register_assert_rewrite("netns_tests.ovn_fixtures", "netns_tests.cni_fixtures")
from netns_tests.cni_fixtures import (  # noqa: E402
    TENANT,
    AgentProc,
    ApiRelay,
    ChainError,
    Invocation,
    LibCni,
    PodApi,
    netns_add,
    netns_del,
)
from netns_tests.ovn_fixtures import OvnEnv, PodNs, run, tcp_exchange, tcp_server  # noqa: E402
from netns_tests.waiting import wait_for  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
pytest_plugins = ("netns_tests.ovn_fixtures", "netns_tests.cni_fixtures")

CIDR, GATEWAY, MTU = "10.86.0.0/24", "10.86.0.1", 1400


@dataclass
class Vm:
    node: str  # Kubernetes node name
    netns: str  # netns name
    port: Port  # its own NIC's port
    libcni: LibCni

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"


@dataclass
class World:
    env: OvnEnv
    api: PodApi
    iaas: OvnIaaS
    net: Network
    hv: Hypervisor
    tmp: Path
    vms: list[Vm] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)

    def conflist(self, vm: Vm, **overrides: Any) -> dict[str, Any]:
        plugin = {"type": "netctl-cni", "mode": "nested-nic", "kubeconfig": self.api.kubeconfig(),
                  "nodeName": vm.node, "logFile": str(self.tmp / "cni.log"), "annotationTimeoutSeconds": 5,
                  **overrides}
        return {"cniVersion": "1.1.0", "name": f"{self.env.prefix}-nested", "plugins": [plugin]}

    def new_port(self, tag: str, owner: PortOwner, node: str | None = None) -> Port:
        pid = f"{owner.kind}-{self.env.prefix}-{tag}-{secrets.token_hex(3)}"
        (port,) = self.iaas.create_ports(self.net, [PortRequest(pid, owner, node)])
        self.ports.append(port.id)
        return port

    def pod(self, vm: Vm, tag: str, vlan: int | None = None) -> tuple[Port, Invocation, PodNs]:
        """A pod bound to `vm`'s node with its port annotated in the API, and its (empty) netns."""
        name = f"{tag}-{secrets.token_hex(2)}"
        port = self.new_port(tag, PortOwner("pod", name, self.api.namespace, None, self.net.tenant))
        ann = PortAnnotation(port.id, port.mac, port.cidr, self.net.gateway, self.net.mtu, TENANT, self.net.id, vlan)
        doc = self.api.pod_doc(name, ann.to_json())
        doc["spec"]["nodeName"] = vm.node
        self.api.apply(doc)
        ns = f"{self.env.prefix}-np{secrets.token_hex(2)}"
        path = netns_add(ns)
        self.netns.append(ns)
        cid = secrets.token_hex(32)
        return port, Invocation(cid, path, "eth0", self.api.cni_args(name, cid)), PodNs(ns, "", port)

    def cleanup(self) -> None:
        for pid in self.ports:
            with contextlib.suppress(Exception):
                self.hv.detach(pid)
        for ns in self.netns:
            netns_del(ns)
        self.netns.clear()


def links(netns: str) -> list[dict[str, Any]]:
    return json.loads(run("ip", "-n", netns, "-j", "addr", "show").stdout or "[]")


def link_by_mac(netns: str, mac: str) -> dict[str, Any] | None:
    return next((link for link in links(netns) if link.get("address") == mac), None)


def alias_of(netns: str, name: str) -> str | None:
    """The interface's alias (`ip -j addr` does not show it, `ip -j link` does)."""
    (link,) = json.loads(run("ip", "-n", netns, "-j", "link", "show", "dev", name).stdout)
    return link.get("ifalias")


def ovs_tap(env: OvnEnv, port_id: str) -> list[str]:
    return env.vsctl("--bare", "--columns=name", "find", "Interface", f"external_ids:iface-id={port_id}").split()


def wait_bound(env: OvnEnv, port_id: str) -> None:
    wait_for(lambda: env.sbctl("--bare", "--columns=chassis", "find", "Port_Binding", f"logical_port={port_id}"),
             f"ovn-controller binds {port_id}", timeout=20)


@pytest.fixture(scope="module")
def world(ovn_env: OvnEnv, cni_api: PodApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    env = ovn_env
    iaas = OvnIaaS(env.ovn.nb_connection, timeout=30, chassis_of=lambda node: env.chassis)
    tenant = f"{env.prefix}-nest"  # the OVN network's tenant; the API side is cni_fixtures' tenant
    net = iaas.ensure_network(NetworkSpec(tenant, CIDR, GATEWAY, mtu=MTU))
    w = World(env, cni_api, iaas, net, Hypervisor(env.ovs.api, env.bridge, f"/run/netns/{env.hv_netns}"),
              tmp_path_factory.mktemp("nested"))
    relays: list[ApiRelay] = []
    try:
        for i in (1, 2):
            node = cni_api.node if i == 1 else f"{cni_api.prefix}-n{i}"
            if i != 1:
                cni_api.apply({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": node, "labels": {TENANT_LABEL: TENANT}}})
            vm_ns = f"{env.prefix}-vm{i}"
            netns_add(vm_ns)
            w.netns.append(vm_ns)
            run("ip", "-n", vm_ns, "link", "set", "lo", "up")
            port = w.new_port(f"vm{i}", PortOwner("node", node, None, None, tenant), node)
            nic = w.hv.attach(port.id, port.mac, f"/run/netns/{vm_ns}", mtu=MTU, vm_ifname="eth0")
            # the guest configures its own NIC (what cloud-init would do)
            run("ip", "-n", vm_ns, "addr", "add", port.cidr, "dev", nic.vm_ifname)
            run("ip", "-n", vm_ns, "link", "set", nic.vm_ifname, "up")
            relays.append(ApiRelay(f"/run/netns/{vm_ns}", cni_api.port))
            w.vms.append(Vm(node, vm_ns, port, LibCni(f"/run/netns/{vm_ns}")))
        for vm in w.vms:
            wait_bound(env, vm.port.id)
        yield w
    finally:
        for relay in relays:
            relay.close()
        w.cleanup()
        with contextlib.suppress(Exception):
            iaas.delete_network(tenant)
        iaas.close()
        log = w.tmp / "cni.log"
        if log.exists():
            print(f"--- {log} ---\n{log.read_text()[-4000:]}")


def plugged(w: World, vm: Vm, tag: str) -> tuple[Port, Invocation, PodNs, Any]:
    """A pod on `vm` whose port the hypervisor hot-plugged, then ADDed by the CNI; returns the result too."""
    port, inv, pod = w.pod(vm, tag)
    nic = w.hv.attach(port.id, port.mac, vm.path, mtu=MTU)
    assert link_by_mac(vm.netns, port.mac) is not None, f"{nic.vm_ifname} did not appear in {vm.netns}"
    result = vm.libcni.add(w.conflist(vm), inv)
    return port, inv, pod, result


def test_hot_plugged_nics_carry_tcp_between_pods_and_nodes(world: World) -> None:
    w, env = world, world.env
    vm1, vm2 = w.vms
    pods = []
    for vm, tag in ((vm1, "a1"), (vm1, "a2"), (vm2, "b1")):
        port, inv, pod, result = plugged(w, vm, tag)
        pods.append((vm, port, inv, pod, result))
        # the result: one interface in the sandbox, the port's address and gateway
        assert result["interfaces"] == [{"name": "eth0", "mac": port.mac, "mtu": MTU, "sandbox": inv.netns}]
        assert result["ips"] == [{"address": port.cidr, "gateway": GATEWAY, "interface": 0}]
        assert {"dst": "0.0.0.0/0", "gw": GATEWAY} in result["routes"]
        # the NIC left the node namespace and is the pod's eth0 now, configured
        assert link_by_mac(vm.netns, port.mac) is None
        eth0 = link_by_mac(pod.name, port.mac)
        assert eth0 is not None and eth0["ifname"] == "eth0" and eth0["mtu"] == MTU and "UP" in eth0["flags"]
        assert alias_of(pod.name, "eth0") == f"netctl-nested {w.conflist(vm)['name']} {inv.container_id} eth0"
        assert [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["family"] == "inet"] == [port.cidr]
        routes = json.loads(run("ip", "-n", pod.name, "-j", "route", "show", "default").stdout)
        assert [(r["gateway"], r["dev"]) for r in routes] == [(GATEWAY, "eth0")]
        wait_bound(env, port.id)
        # CHECK as a runtime invokes it (prevResult = the cached ADD result)
        vm.libcni.check(w.conflist(vm), inv, result)

    servers = [tcp_server(pod, 5301, lifetime=40) for _, _, _, pod, _ in pods]
    try:
        for (_, _, _, src, _), (_, dst_port, _, _, _) in ((pods[0], pods[1]), (pods[1], pods[0]), (pods[0], pods[2]),
                                                          (pods[2], pods[1])):
            ok, err = tcp_exchange(src, dst_port.ip, 5301, 200_000, timeout=20)
            assert ok, f"TCP {src.port.ip} -> {dst_port.ip} failed: {err}"
    finally:
        for s in servers:
            s.kill()
            s.wait()

    # DEL: the NIC goes back to the node namespace under a recognisable name, unconfigured
    for vm, port, inv, pod, result in pods:
        vm.libcni.delete(w.conflist(vm), inv, result)
        back = link_by_mac(vm.netns, port.mac)
        assert back is not None and back["ifname"] == "nic" + port.mac.replace(":", "")
        assert "UP" not in back["flags"] and not back.get("addr_info") and alias_of(vm.netns, back["ifname"]) is None
        assert link_by_mac(pod.name, port.mac) is None
        # a second DEL (containerd's, without netns) changes nothing and succeeds
        vm.libcni.delete(w.conflist(vm), Invocation(inv.container_id, "", inv.ifname, inv.args), None)
        assert link_by_mac(vm.netns, port.mac) is not None
        # the IaaS detaches the port: nothing is left anywhere
        assert w.hv.detach(port.id)
        assert link_by_mac(vm.netns, port.mac) is None
        assert ovs_tap(env, port.id) == []
        assert run("ip", "-n", env.hv_netns, "link", "show", tap_name(port.id), check=False).returncode != 0


def test_add_before_the_hot_plug_is_try_again_and_leaves_nothing(world: World) -> None:
    w = world
    vm = w.vms[0]
    port, inv, pod = w.pod(vm, "early")
    before = sorted(link["ifname"] for link in links(vm.netns))
    with pytest.raises(ChainError) as err:
        vm.libcni.add(w.conflist(vm), inv)
    out = err.value.exec.out
    assert err.value.exec.rc != 0 and out["code"] == 11, out
    assert port.mac in out["details"] and port.id in out["details"], out
    assert [link["ifname"] for link in links(pod.name)] == ["lo"]
    assert sorted(link["ifname"] for link in links(vm.netns)) == before
    # once the IaaS attaches the NIC, the runtime's retry succeeds
    w.hv.attach(port.id, port.mac, vm.path, mtu=MTU)
    result = vm.libcni.add(w.conflist(vm), inv)
    assert result["interfaces"][0]["mac"] == port.mac
    vm.libcni.delete(w.conflist(vm), inv, result)
    assert link_by_mac(vm.netns, port.mac) is not None


def test_check_sees_tampering_and_del_survives_a_vanished_netns(world: World) -> None:
    w = world
    vm = w.vms[1]
    port, inv, pod, result = plugged(w, vm, "t1")
    run("ip", "-n", pod.name, "route", "del", "default")
    with pytest.raises(ChainError) as err:
        vm.libcni.check(w.conflist(vm), inv, result)
    assert err.value.exec.out["code"] == 106 and "route 0.0.0.0/0" in err.value.exec.out["details"]
    # the runtime removes the sandbox's netns before DEL: the (virtual) NIC goes with it; DEL is a no-op
    netns_del(pod.name)
    wait_for(lambda: run("ip", "-n", w.env.hv_netns, "link", "show", tap_name(port.id), check=False).returncode,
             "the lab NIC's host end goes with the netns")
    vm.libcni.delete(w.conflist(vm), inv, result)
    vm.libcni.delete(w.conflist(vm), Invocation(inv.container_id, "", inv.ifname, inv.args), None)
    # DEL of an ADD that never happened (and of a netns that never existed) succeeds too
    vm.libcni.delete(w.conflist(vm), Invocation(secrets.token_hex(32), "/run/netns/nope", "eth0", ""), None)


def test_bad_nested_config_is_a_clear_error(world: World) -> None:
    w = world
    vm = w.vms[0]
    _, inv, _ = w.pod(vm, "cfg")
    for overrides, needle in (({"mode": "nested-vlan"}, "trunkInterface is required"),
                              ({"mode": "nested"}, "mode 'nested' must be one of"),
                              ({"trunkInterface": "eth0"}, "only used with mode nested-vlan")):
        with pytest.raises(ChainError) as err:
            vm.libcni.add(w.conflist(vm, **overrides), inv)
        assert err.value.exec.out["code"] == 7 and needle in err.value.exec.out["msg"], err.value.exec.out


# ---- nested-vlan: the VM's NIC is a trunk, pods are OVN child ports (parent_name + tag) -------------


def kernel_has_8021q() -> bool:
    """Whether this kernel can create VLAN links at all (this VM's kernel has no CONFIG_VLAN_8021Q)."""
    ns = f"{RUN}-k8021q"
    netns_add(ns)
    try:
        run("ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1", check=False)
        return run("ip", "-n", ns, "link", "add", "link", "d0", "name", "d0.5", "type", "vlan", "id", "5",
                   check=False).returncode == 0
    finally:
        netns_del(ns)


RUN = f"h{secrets.token_hex(2)}"


@dataclass
class TrunkVm:
    vm: Vm
    ovs: OvsStack | None  # the VM's own OVS holding the trunk NIC (vlanBackend ovs), None for the kernel backend
    bridge: str = "br-trunk"


@pytest.fixture(scope="module")
def nb(ovn_env: OvnEnv) -> Iterator[Any]:
    api = connect_nb(ovn_env.ovn.nb_connection, timeout=30)
    try:
        yield api
    finally:
        close_nb(api)


def trunk_vm(w: World, index: int, with_ovs: bool) -> Iterator[TrunkVm]:
    """A VM whose own NIC eth0 is a trunk: its node port is the parent of its pods' ports."""
    env, api = w.env, w.api
    node = f"{api.prefix}-n{index}"
    api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {TENANT_LABEL: TENANT}}})
    vm_ns = f"{env.prefix}-vm{index}"
    netns_add(vm_ns)
    w.netns.append(vm_ns)
    run("ip", "-n", vm_ns, "link", "set", "lo", "up")
    port = w.new_port(f"vm{index}", PortOwner("node", node, None, None, w.net.tenant), node)
    w.hv.attach(port.id, port.mac, f"/run/netns/{vm_ns}", mtu=MTU, vm_ifname="eth0")
    run("ip", "-n", vm_ns, "link", "set", "eth0", "up")
    relay = ApiRelay(f"/run/netns/{vm_ns}", api.port)
    ovs = None
    try:
        if with_ovs:  # the guest runs OVS (userspace datapath) with the trunk NIC as its uplink
            ovs = OvsStack(w.tmp / f"vm{index}-ovs", netns=vm_ns, timeout=60)
            ovs.start()
            ovs.add_bridge("br-trunk", fail_mode="standalone")
            ovs.add_port("br-trunk", "eth0")
        vm = Vm(node, vm_ns, port, LibCni(f"/run/netns/{vm_ns}"))
        wait_bound(env, port.id)
        yield TrunkVm(vm, ovs)
    finally:
        relay.close()
        if ovs is not None:
            ovs.stop()


@pytest.fixture(scope="module")
def trunk_ovs(world: World) -> Iterator[TrunkVm]:
    yield from trunk_vm(world, 3, with_ovs=True)


def vlan_conf(w: World, t: TrunkVm) -> dict[str, Any]:
    if t.ovs is None:
        return w.conflist(t.vm, mode="nested-vlan", trunkInterface="eth0")
    return w.conflist(t.vm, mode="nested-vlan", trunkInterface="eth0", vlanBackend="ovs", bridge=t.bridge,
                      ovsdb=t.ovs.db_connection, ovsNetns=t.vm.path)


def subport_pod(w: World, nb: Any, t: TrunkVm, tag: int, label: str) -> tuple[Port, Invocation, PodNs]:
    """A pod on the trunk VM whose port is a child of the VM's port with VLAN `tag`, annotated with it."""
    port, inv, pod = w.pod(t.vm, label, vlan=tag)
    assert make_subport(nb, port.id, t.vm.port.id, tag) == tag
    return port, inv, pod


def test_vlan_subports_carry_tcp_to_each_other_and_to_another_node(world: World, nb: Any,
                                                                   trunk_ovs: TrunkVm) -> None:
    w, env, t = world, world.env, trunk_ovs
    # OVN side: the children of the VM's port, with their tags
    pods = [subport_pod(w, nb, t, 100 + i, f"v{i}") for i in (1, 2)]
    for port, _, _ in pods:
        assert env.nbctl("lsp-get-parent", port.id) == t.vm.port.id
    assert [env.nbctl("lsp-get-tag", p.id) for p, _, _ in pods] == ["101", "102"]
    results = []
    for port, inv, pod in pods:
        result = t.vm.libcni.add(vlan_conf(w, t), inv)
        results.append(result)
        assert result["interfaces"][-1] == {"name": "eth0", "mac": port.mac, "mtu": MTU, "sandbox": inv.netns}
        eth0 = link_by_mac(pod.name, port.mac)
        assert eth0 is not None and eth0["ifname"] == "eth0" and "UP" in eth0["flags"]
        assert [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["family"] == "inet"] == [port.cidr]
        wait_bound(env, port.id)  # a child is bound where its parent is
        t.vm.libcni.check(vlan_conf(w, t), inv, result)
    assert t.ovs is not None
    tags = {p.id: env_vsctl(t.ovs, "get", "Port", iface, "tag") for p, _, _ in pods
            for iface in env_vsctl(t.ovs, "--bare", "--columns=name", "find", "Interface",
                                   f"external_ids:iface-id={p.id}").split()}
    assert sorted(tags.values()) == ["101", "102"]
    # a pod on another node (hot-plugged NIC on VM 1)
    _, other_inv, other, other_result = plugged(w, w.vms[0], "o1")
    everyone = [pod for _, _, pod in pods] + [other]
    servers = [tcp_server(p, 5302, lifetime=40) for p in everyone]
    try:
        for src, dst in ((0, 1), (1, 0), (0, 2), (2, 1)):
            ok, err = tcp_exchange(everyone[src], everyone[dst].port.ip, 5302, 200_000, timeout=20)
            assert ok, f"TCP {everyone[src].port.ip} -> {everyone[dst].port.ip} failed: {err}"
    finally:
        for s in servers:
            s.kill()
            s.wait()
    w.vms[0].libcni.delete(w.conflist(w.vms[0]), other_inv, other_result)
    # DEL removes the pod's access port and veth; only the trunk stays on the VM's bridge
    for (port, inv, pod), result in zip(pods, results, strict=True):
        t.vm.libcni.delete(vlan_conf(w, t), inv, result)
        t.vm.libcni.delete(vlan_conf(w, t), Invocation(inv.container_id, "", inv.ifname, inv.args), None)
        assert link_by_mac(pod.name, port.mac) is None
    assert env_vsctl(t.ovs, "list-ports", t.bridge).split() == ["eth0"]
    assert {link["ifname"] for link in links(t.vm.netns)} - {"lo", "eth0", "ovs-netdev", t.bridge} == set()
    clear_subport(nb, pods[0][0].id)
    assert env.nbctl("lsp-get-parent", pods[0][0].id) == ""


def test_vlan_kernel_backend(world: World, nb: Any, trunk_ovs: TrunkVm) -> None:
    """The 802.1Q sub-interface: on a kernel without 8021q (this one) a clear error and nothing left behind."""
    w, t = world, trunk_ovs
    kernel = TrunkVm(t.vm, None)
    port, inv, pod = subport_pod(w, nb, kernel, 110, "k1")
    if kernel_has_8021q():
        result = t.vm.libcni.add(vlan_conf(w, kernel), inv)
        eth0 = link_by_mac(pod.name, port.mac)
        assert eth0 is not None and eth0["ifname"] == "eth0" and eth0.get("link_type") == "ether"
        t.vm.libcni.check(vlan_conf(w, kernel), inv, result)
        t.vm.libcni.delete(vlan_conf(w, kernel), inv, result)
        assert link_by_mac(pod.name, port.mac) is None
        return
    before = sorted(link["ifname"] for link in links(t.vm.netns))
    with pytest.raises(ChainError) as err:
        t.vm.libcni.add(vlan_conf(w, kernel), inv)
    out = err.value.exec.out
    assert out["code"] == 103 and "8021q" in out["details"] and "VLAN 110" in out["details"], out
    assert [link["ifname"] for link in links(pod.name)] == ["lo"]
    assert sorted(link["ifname"] for link in links(t.vm.netns)) == before
    # missing VLAN id in the annotation, trunk missing: clear errors naming what is missing
    _, inv2, _ = w.pod(t.vm, "k2")
    with pytest.raises(ChainError) as err:
        t.vm.libcni.add(vlan_conf(w, kernel), inv2)
    assert err.value.exec.out["code"] == 101 and "has none (vlan: null)" in err.value.exec.out["msg"]
    _, inv3, _ = w.pod(t.vm, "k3", vlan=111)
    with pytest.raises(ChainError) as err:
        t.vm.libcni.add(w.conflist(t.vm, mode="nested-vlan", trunkInterface="eth9"), inv3)
    assert err.value.exec.out["code"] == 103 and "trunk interface eth9" in err.value.exec.out["details"]
    # STATUS (libcni-style) says why the trunk cannot carry pods
    (status,) = t.vm.libcni.status(w.conflist(t.vm, mode="nested-vlan", trunkInterface="eth9"))
    assert status.rc != 0 and status.out["code"] == 50 and "eth9" in status.out["details"]
    (status,) = t.vm.libcni.status(vlan_conf(w, kernel))
    assert status.rc == 0, status.out


def env_vsctl(ovs: OvsStack, *args: str) -> str:
    return run("ovs-vsctl", f"--db={ovs.db_connection}", *args).stdout.strip()


def test_nested_nic_through_the_node_agent(world: World) -> None:
    """The thin executable forwards to the node agent, which plumbs the VM's namespace (nodeNetns)."""
    w, env = world, world.env
    vm = w.vms[0]
    (w.tmp / "agent").mkdir(exist_ok=True)
    agent = AgentProc(w.tmp / "agent", vm.node, w.api.kubeconfig(), env.ovs.db_connection,
                      f"/run/netns/{env.hv_netns}")
    agent.start()
    try:
        conf = w.conflist(vm, agentSocket=agent.socket, nodeNetns=vm.path)
        port, inv, pod = w.pod(vm, "ag")
        w.hv.attach(port.id, port.mac, vm.path, mtu=MTU)
        result = vm.libcni.add(conf, inv)
        eth0 = link_by_mac(pod.name, port.mac)
        assert eth0 is not None and eth0["ifname"] == "eth0" and result["interfaces"][0]["mac"] == port.mac
        vm.libcni.check(conf, inv, result)
        vm.libcni.delete(conf, inv, result)
        assert link_by_mac(vm.netns, port.mac) is not None and link_by_mac(pod.name, port.mac) is None
        assert "agent" in (w.tmp / "cni.log").read_text().split(f"cid={inv.container_id[:12]}")[-1]
    finally:
        agent.stop()


def test_failed_add_rolls_back_and_gc_releases_leftovers(world: World) -> None:
    w = world
    vm = w.vms[1]
    port, inv, pod = w.pod(vm, "rb")
    nic = w.hv.attach(port.id, port.mac, vm.path, mtu=MTU)
    # a route that cannot be added (it duplicates the subnet's own) fails ADD after the NIC was moved
    bad = w.conflist(vm, serviceCidr=CIDR, nodeAddress=vm.port.ip)
    with pytest.raises(ChainError) as err:
        vm.libcni.add(bad, inv)
    assert err.value.exec.out["code"] == 103, err.value.exec.out
    assert [link["ifname"] for link in links(pod.name)] == ["lo"]
    back = link_by_mac(vm.netns, port.mac)
    name = "nic" + port.mac.replace(":", "")
    assert back is not None and back["ifname"] == name and alias_of(vm.netns, name) is None
    # a NIC an interrupted ADD marked but never moved: GC of the network releases it unless still valid
    cid = secrets.token_hex(32)
    mark = f"netctl-nested {w.conflist(vm)['name']} {cid} eth0"
    run("ip", "-n", vm.netns, "link", "set", name, "alias", mark)
    vm.libcni.gc(w.conflist(vm), [(cid, "eth0")])
    assert alias_of(vm.netns, name) == mark
    vm.libcni.gc(w.conflist(vm), [])
    assert alias_of(vm.netns, name) is None
    assert w.hv.detach(nic.port_id)


# ---- nested-vlan, kernel backend, with a kernel that has 802.1Q: inside user-mode Linux -------------
#
# This machine's kernel has no CONFIG_VLAN_8021Q, so the 802.1Q sub-interface path cannot carry a
# packet here; the UML kernel (Debian's user-mode-linux, DESIGN §5) has 8021q as a module. The UML
# guest *is* the node VM: its trunk NIC eth0 is a veth whose other end sits in a netns "far" standing
# for the tenant network (VLAN 100 -> 10.9.0.0/24, VLAN 101 -> 10.9.1.0/24, routed between them), and
# the guest runs the real `netctl-cni` executable (hostfs root: the same venv) against a stub API
# server that serves the two pods' annotations, the node and the namespace.

UML = "/usr/bin/linux.uml"
UML_MODULES = "/usr/lib/uml/modules/6.1.176/kernel"

UML_GUEST = r'''
import http.server, json, os, socket, subprocess, sys, threading
BIN, OUT = sys.argv[1], {}
def sh(*a, ns=None, quiet=False):
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(a)
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode and not quiet:
        OUT.setdefault("sh_errors", []).append(" ".join(argv) + ": " + r.stderr.strip())
    return r
sh("ip", "link", "set", "lo", "up")
sh("ip", "netns", "add", "far")
sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "sw0")
sh("ip", "link", "set", "sw0", "netns", "far")
sh("ip", "link", "set", "eth0", "up")
sh("ip", "link", "set", "sw0", "up", ns="far")
for vid, gw in ((100, "10.9.0.1/24"), (101, "10.9.1.1/24")):
    sh("ip", "link", "add", "link", "sw0", "name", f"sw0.{vid}", "type", "vlan", "id", str(vid), ns="far")
    sh("ip", "addr", "add", gw, "dev", f"sw0.{vid}", ns="far")
    sh("ip", "link", "set", f"sw0.{vid}", "up", ns="far")
sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns="far")
PODS = {f"p{i}": {"portId": f"pod-p{i}", "mac": f"0a:58:0a:09:0{i}:05", "ip": f"10.9.{i}.5/24",
                  "gateway": f"10.9.{i}.1", "mtu": 1400, "tenant": "alpha", "networkId": "netctl-alpha",
                  "vlan": 100 + i} for i in (0, 1, 2)}
def obj(path):
    parts = path.split("/")
    if parts[:4] == ["", "api", "v1", "nodes"]:
        return {"metadata": {"name": "vm", "labels": {"netctl.io/tenant": "alpha"}}}
    if len(parts) == 5 and parts[3] == "namespaces":
        return {"metadata": {"name": parts[4], "labels": {"netctl.io/tenant": "alpha"}}}
    if len(parts) == 7 and parts[5] == "pods" and parts[6] in PODS:
        return {"metadata": {"name": parts[6], "namespace": "ns", "uid": "u-" + parts[6],
                             "annotations": {"netctl.io/port": json.dumps(PODS[parts[6]])}},
                "spec": {"nodeName": "vm"}}
    return None
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        o = obj(self.path.split("?")[0])
        body = json.dumps(o if o is not None else {"kind": "Status", "code": 404}).encode()
        self.send_response(200 if o is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
threading.Thread(target=srv.serve_forever, daemon=True).start()
kc = "/run/kubeconfig"
with open(kc, "w") as f:
    json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "x",
               "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{srv.server_port}"}}],
               "users": [{"name": "u", "user": {"token": "t"}}],
               "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}, f)
CONF = {"cniVersion": "1.1.0", "name": "uml", "type": "netctl-cni", "mode": "nested-vlan", "trunkInterface": "eth0",
        "kubeconfig": kc, "nodeName": "vm", "annotationTimeoutSeconds": 5, "logFile": "/run/cni.log"}
def cni(cmd, pod, cid, conf=CONF, netns=True):
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin", "CNI_NETNS": f"/run/netns/{pod}" if netns else "",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME={pod}"}
    r = subprocess.run([BIN], input=json.dumps(conf).encode(), capture_output=True, env=env)
    return {"rc": r.returncode, "out": json.loads(r.stdout) if r.stdout.strip() else None,
            "traceback": "Traceback" in (r.stdout + r.stderr).decode()}
def link(ns, name):
    r = sh("ip", "-d", "-j", "link", "show", "dev", name, ns=ns, quiet=True)
    return json.loads(r.stdout)[0] if r.returncode == 0 and r.stdout.strip() else None
adds = {}
for pod in ("p0", "p1"):
    sh("ip", "netns", "add", pod)
    adds[pod] = cni("ADD", pod, "c-" + pod)
    l = link(pod, "eth0") or {}
    info = l.get("linkinfo", {})
    OUT[pod] = {"add": adds[pod], "kind": info.get("info_kind"), "vid": info.get("info_data", {}).get("id"),
                "mac": l.get("address"), "up": "UP" in l.get("flags", [])}
    if adds[pod]["rc"] == 0:
        conf = dict(CONF, prevResult=adds[pod]["out"])
        OUT[pod]["check"] = cni("CHECK", pod, "c-" + pod, conf)
server = subprocess.Popen(["ip", "netns", "exec", "p1", sys.executable, "-c",
    "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('10.9.1.5', 5400)); s.listen(1); s.settimeout(30); print('listening', flush=True)\n"
    "c, _ = s.accept(); d = b''\nwhile (x := c.recv(65536)): d += x\nc.sendall(b'echo:' + d); c.close()"],
    stdout=subprocess.PIPE, text=True)
server.stdout.readline()
client = sh(sys.executable, "-c",
    "import socket\ns = socket.create_connection(('10.9.1.5', 5400), timeout=20); s.sendall(b'x' * 100000)\n"
    "s.shutdown(socket.SHUT_WR); g = b''\nwhile (x := s.recv(65536)): g += x\nprint(len(g))", ns="p0")
OUT["tcp"] = client.stdout.strip()
server.kill()
# a failure after the VLAN link exists (its route duplicates the subnet's): the link is deleted again
sh("ip", "netns", "add", "p2")
OUT["rollback"] = cni("ADD", "p2", "c-p2", dict(CONF, serviceCidr="10.9.2.0/24", nodeAddress="10.9.2.1"))
OUT["rollback_links"] = [x["ifname"] for x in json.loads(sh("ip", "-n", "p2", "-j", "link", "show").stdout)]
for pod in ("p0", "p1"):
    OUT[pod]["del"] = cni("DEL", pod, "c-" + pod, dict(CONF, prevResult=adds[pod]["out"]))
    OUT[pod]["del2"] = cni("DEL", pod, "c-" + pod, netns=False)
    OUT[pod]["gone"] = link(pod, "eth0") is None
OUT["vlans_left"] = [x["ifname"] for x in json.loads(sh("ip", "-d", "-j", "link", "show").stdout)
                     if x.get("linkinfo", {}).get("info_kind") == "vlan"]
print("RESULT " + json.dumps(OUT), flush=True)
'''


def test_vlan_kernel_backend_in_uml_carries_tcp(tmp_path: Path) -> None:
    """The 802.1Q sub-interface path, with real tagged TCP, on a kernel that has 8021q (UML)."""
    assert Path(UML).exists() and Path(UML_MODULES).exists(), "user-mode-linux is part of the platform (DESIGN §5)"
    guest = tmp_path / "guest.py"
    guest.write_text(UML_GUEST)
    modules = " ".join(f"{UML_MODULES}/{m}.ko" for m in
                       ("net/llc/llc", "net/802/stp", "net/802/garp", "net/802/mrp", "net/8021q/8021q",
                        "drivers/net/veth"))
    init = tmp_path / "init.sh"
    init.write_text(f"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t tmpfs tmpfs /run
for m in {modules}; do insmod $m; done
cd /tmp; {sys.executable} {guest} {Path(sys.executable).parent / "netctl-cni"}
poweroff -f
""")
    init.chmod(0o755)
    proc = run("timeout", "240", UML, "mem=384M", "rootfstype=hostfs", "rootflags=/", "rw", f"init={init}",
               "con=null", "con0=null,fd:1", check=False, timeout=260)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"the UML guest did not report (rc {proc.returncode}): {proc.stdout[-3000:]}"
    out = json.loads(line[len("RESULT "):])
    assert not out.get("sh_errors"), out["sh_errors"]
    for i, pod in enumerate(("p0", "p1")):
        p = out[pod]
        assert p["add"]["rc"] == 0 and not p["add"]["traceback"], p["add"]
        assert (p["kind"], p["vid"], p["mac"], p["up"]) == ("vlan", 100 + i, f"0a:58:0a:09:0{i}:05", True), p
        assert p["check"]["rc"] == 0, p["check"]
        assert p["del"]["rc"] == 0 and p["del2"]["rc"] == 0 and p["gone"], p
    assert out["tcp"] == str(100_000 + len("echo:")), "TCP between VLAN 100 and VLAN 101 pods failed"
    assert out["rollback"]["rc"] == 1 and out["rollback"]["out"]["code"] == 103, out["rollback"]
    assert out["rollback_links"] == ["lo"]
    assert out["vlans_left"] == []
