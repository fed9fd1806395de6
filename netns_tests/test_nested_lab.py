"""Nested mode end to end (issue 3, item 3): pods inside tenant VMs, with the controller doing the IaaS side.

The lab with two nested tenants (Tenant spec.mode), two node VMs each, every VM running its own
kubelet + containerd + CNI agent; the VMs' own NICs are plugged by the lab's hypervisor. Nothing in
a VM can reach the hypervisor's OVS: each pod's network comes from the IaaS, asked by the controller.
- nested-nic: the controller hot-plugs each pod's port into its node's VM (`netctl.io/vm-port` or
  `node-<name>` names the VM's port; the hypervisor knows which VM holds it) and only then writes
  the annotation; the CNI in the VM finds the NIC by MAC and moves it into the pod;
- nested-vlan: the controller makes each pod's port a VLAN subport of its VM's NIC (OVN parent_name
  / tag_request, the lowest VLAN free on that VM) and writes the VLAN into the annotation; the CNI
  gives the pod an access port of that VLAN on the VM's own OVS, whose trunk is the VM's NIC.
Real TCP between pods on one VM and across VMs, never across tenants; a ClusterIP Service answers
through kproxy on the client's VM (pods route the Service CIDR via their node's address); deleting
a pod unplugs its NIC / frees its VLAN for the next pod. A pod asking for a public IP gets its
public port the same way (second NIC / second VLAN) as `net1`, reachable from the lab's internet.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netctl.annotations import PORT_ANNOTATION, PUBLIC_PORT_ANNOTATION, PortAnnotation
from netctl.iaas.ovn_nested import EXT_ATTACHED_TO, tap_name
from netctl.lab.lab import POD_PORT, VM_TRUNK_BRIDGE, Lab
from netctl.lab.probe import tcp_probe
from netctl.lab.topology import NodeSpec, PodSpec, TenantSpec, Topology
from netns_tests.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

NIC = TenantSpec("nic", "10.43.0.0/24", mode="nested-nic")
VLAN = TenantSpec("vlan", "10.44.0.0/24", mode="nested-vlan")
NODES = (NodeSpec("nic-1", "nic"), NodeSpec("nic-2", "nic"), NodeSpec("vlan-1", "vlan"), NodeSpec("vlan-2", "vlan"))
PODS = (PodSpec("n1", "nic", "nic-1"), PodSpec("n2", "nic", "nic-2"), PodSpec("n3", "nic", "nic-1"),
        PodSpec("v1", "vlan", "vlan-1"), PodSpec("v2", "vlan", "vlan-1"), PodSpec("v3", "vlan", "vlan-2"))
PUBLIC_PODS = (PodSpec("np", "nic", "nic-2", public=True), PodSpec("vp", "vlan", "vlan-2", public=True))
PUBLIC_CIDR = "203.0.113.0/24"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "nn" + secrets.token_hex(2)
    topo = Topology((NIC, VLAN), NODES, PODS + PUBLIC_PODS, public_cidr=PUBLIC_CIDR)
    with Lab(topo, run_dir=Path("/var/lib/netctl/test") / prefix, prefix=prefix) as lab:
        lab.create_pods()
        lab.wait_pods_running(timeout=240)
        yield lab


def port_of(lab: Lab, name: str, annotation: str = PORT_ANNOTATION) -> PortAnnotation:
    found = [p for p in lab.pods() if p["metadata"]["name"] == name]
    assert found, f"pod {name} not found"
    raw = (found[0]["metadata"].get("annotations") or {}).get(annotation)
    assert raw, f"pod {name} has no {annotation}"
    return PortAnnotation.from_json(raw, annotation)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def nbctl(lab: Lab, *args: str) -> str:
    return run("ovn-nbctl", f"--db={lab.ovn.nb_connection}", *args)


def hv_vsctl(lab: Lab, *args: str) -> str:
    return run("ovs-vsctl", f"--db={lab.ovs.db_connection}", *args)


def links(netns: str) -> dict[str, dict]:
    out = json.loads(run("ip", "-n", netns, "-j", "link", "show"))
    return {link["ifname"]: link for link in out}


def pod_mac(lab: Lab, spec: PodSpec, ifname: str = "eth0") -> str:
    path = lab.pod_netns(lab.topology.tenant(spec.tenant).namespace, spec.name, spec.node or "")
    out = json.loads(run("nsenter", f"--net={path}", "ip", "-j", "link", "show", ifname))
    return str(out[0]["address"])


def test_pods_reach_their_tenant_across_vms_and_never_the_other_tenant(lab: Lab) -> None:
    rows = lab.pod_table(probe=True)
    by_tenant: dict[str, set[str]] = {}
    for r in rows:
        by_tenant.setdefault(r["tenant"], set()).add(r["pod"])
        assert r["ip"] == port_of(lab, r["pod"]).ip.split("/")[0], r
    assert by_tenant == {"nic": {"n1", "n2", "n3", "np"}, "vlan": {"v1", "v2", "v3", "vp"}}
    for r in rows:
        assert set(r["reaches"]) == by_tenant[r["tenant"]] - {r["pod"]}, r


@pytest.mark.parametrize("spec", PUBLIC_PODS, ids=lambda s: s.name)
def test_public_nic_from_the_vm_answers_the_internet(lab: Lab, spec: PodSpec) -> None:
    """The public port reaches the pod the way its tenant port does (a second hot-plugged NIC / a
    second VLAN under the VM's NIC), as `net1` with its policy routing: the internet host gets in."""
    port, public = port_of(lab, spec.name), port_of(lab, spec.name, PUBLIC_PORT_ANNOTATION)
    assert public.tenant == "public" and pod_mac(lab, spec, "net1") == public.mac
    if spec.tenant == "vlan":
        assert public.vlan is not None and public.vlan != port.vlan
        assert nbctl(lab, "lsp-get-parent", public.port_id) == f"node-{spec.node}"
    else:
        assert public.vlan is None
        vm = f"/run/netns/{lab.node_netns(spec.node or '')}"
        assert hv_vsctl(lab, "get", "Interface", tap_name(public.port_id),
                        f'external_ids:"{EXT_ATTACHED_TO}"').strip('"') == vm
    internet = f"/run/netns/{lab.internet_netns}"
    ip = public.ip.split("/")[0]
    wait_for(lambda: tcp_probe(internet, ip, POD_PORT), f"internet -> {spec.name} public {ip}:{POD_PORT}", 30)
    assert not tcp_probe(internet, port.ip.split("/")[0], POD_PORT)  # the tenant address stays private


@pytest.mark.parametrize("tenant,client,server", [(NIC, "n1", "n2"), (VLAN, "v1", "v3")])
def test_cluster_ip_service_answers_through_the_clients_vm(lab: Lab, tenant: TenantSpec, client: str,
                                                           server: str) -> None:
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": tenant.namespace},
           "spec": {"selector": {"netctl.io/lab-pod": server}, "ports": [{"port": 80, "targetPort": POD_PORT}]}}
    path = lab.run_dir / f"svc-{tenant.name}.json"
    path.write_text(json.dumps(doc))
    lab.cp.kubectl("apply", "-f", str(path))
    ip = lab.cp.kubectl("get", "service", "-n", tenant.namespace, "web", "-o", "jsonpath={.spec.clusterIP}").strip()
    spec = next(p for p in PODS if p.name == client)
    src = lab.pod_netns(tenant.namespace, client, spec.node or "")
    wait_for(lambda: tcp_probe(src, ip, 80), f"{client} -> Service {ip}:80 (backend {server})", 60)
    other = next(p for p in PODS if p.tenant != tenant.name)
    assert not tcp_probe(lab.pod_netns(lab.topology.tenant(other.tenant).namespace, other.name, other.node or ""),
                         ip, 80)  # the other tenant's kproxy knows nothing of it


def test_nic_pods_got_hot_plugged_nics_in_their_vms(lab: Lab) -> None:
    for spec in PODS[:3]:
        port = port_of(lab, spec.name)
        assert port.vlan is None
        vm = f"/run/netns/{lab.node_netns(spec.node or '')}"
        ifaces = hv_vsctl(lab, "--bare", "--columns=name", "find", "Interface",
                          f"external_ids:iface-id={port.port_id}").split()
        assert ifaces == [tap_name(port.port_id)], ifaces
        assert hv_vsctl(lab, "get", "Interface", ifaces[0], f'external_ids:"{EXT_ATTACHED_TO}"').strip('"') == vm
        assert pod_mac(lab, spec) == port.mac  # the NIC the hypervisor made, moved into the pod
        assert nbctl(lab, "lsp-get-parent", port.port_id) == ""


def test_vlan_pods_are_subports_of_their_vms_nic(lab: Lab) -> None:
    got = {s.name: port_of(lab, s.name) for s in PODS[3:]}
    assert sorted([got["v1"].vlan, got["v2"].vlan]) == [1, 2] and got["v3"].vlan == 1
    for spec in PODS[3:]:
        port = got[spec.name]
        assert nbctl(lab, "lsp-get-parent", port.port_id) == f"node-{spec.node}"
        assert nbctl(lab, "lsp-get-tag", port.port_id) == str(port.vlan)  # ovn-northd confirmed it
        vm_ovs = lab.vm_ovs[spec.node or ""]
        (access,) = run("ovs-vsctl", f"--db={vm_ovs.db_connection}", "--bare", "--columns=name", "find",
                        "Interface", f"external_ids:iface-id={port.port_id}").split()
        assert run("ovs-vsctl", f"--db={vm_ovs.db_connection}", "get", "Port", access, "tag") == str(port.vlan)
        assert run("ovs-vsctl", f"--db={vm_ovs.db_connection}", "port-to-br", access) == VM_TRUNK_BRIDGE
        assert pod_mac(lab, spec) == port.mac
    # nothing of the pods is on the hypervisor's bridge: only the VMs' own NICs
    assert not hv_vsctl(lab, "--bare", "--columns=name", "find", "Interface",
                        f"external_ids:iface-id={got['v1'].port_id}")


def test_deleting_pods_unplugs_nics_and_frees_vlans(lab: Lab) -> None:
    n3, v2 = port_of(lab, "n3"), port_of(lab, "v2")
    vm = lab.node_netns("nic-1")
    lab.cp.kubectl("delete", "pod", "-n", NIC.namespace, "n3", "--wait=true")
    lab.cp.kubectl("delete", "pod", "-n", VLAN.namespace, "v2", "--wait=true")

    def gone() -> bool:
        return (not nbctl(lab, "--bare", "--columns=name", "find", "Logical_Switch_Port", f"name={n3.port_id}")
                and not nbctl(lab, "--bare", "--columns=name", "find", "Logical_Switch_Port", f"name={v2.port_id}"))

    wait_for(gone, "the deleted pods' ports to be deleted", 60)
    wait_for(lambda: not hv_vsctl(lab, "--bare", "--columns=name", "find", "Interface",
                                  f"external_ids:iface-id={n3.port_id}"), "n3's NIC to be unplugged", 30)
    assert tap_name(n3.port_id) not in links(f"{lab.prefix}hv")
    assert not [n for n, link in links(vm).items() if link.get("address") == n3.mac]  # gone from the VM too
    # the next pod on vlan-1 gets v2's VLAN back (the lowest free under the VM's NIC) and works
    lab.create_pods((PodSpec("v4", "vlan", "vlan-1"),))
    lab.wait_pods_running({"v4"}, timeout=120)
    v4 = port_of(lab, "v4")
    assert v4.vlan == v2.vlan and nbctl(lab, "lsp-get-parent", v4.port_id) == "node-vlan-1"
    reach = {r["pod"]: r["reaches"] for r in lab.pod_table(probe=True)}
    assert set(reach["v4"]) == {"v1", "v3", "vp"} and "v4" in reach["v3"]
