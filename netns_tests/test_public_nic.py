"""The optional public NIC (issue 3, item 4), end to end: kube-apiserver, kubelet, containerd, our CNI
(agent), the controller and OVN, with the lab's "internet" netns on the provider network.

Two tenants, one node each; the provider network 203.0.113.0/24 (TEST-NET-3) is shared by both.
- a pod annotated `netctl.io/public-ip: "true"` gets `netctl.io/public-port` (its own `pub-<uid>`
  port, port security pinned to its MAC+IP), `eth0` and `net1`; a host on the internet reaches its
  public address over TCP (the reply must take the pod's policy route: the internet host is not on
  the provider subnet); a pod without the annotation has no `net1`;
- another tenant's public pod works too, on the same provider switch: public pods reach each other's
  public addresses (the provider network is the shared "internet" side) but still not each other's
  tenant addresses;
- the runtime's cached ADD result lists both NICs; CHECK (as libcni runs it) verifies net1 and its
  policy routing too; GC keeps net1 of a valid attachment;
- restarting the controller changes no public address; deleting a pod deletes its public port.
The first two tests check the OVN backend's share alone (real OVN NB, no Kubernetes).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from netctl import ipam
from netctl.annotations import (
    PORT_ANNOTATION,
    PUBLIC_IP_ANNOTATION,
    PUBLIC_NETWORK,
    PUBLIC_PORT_ANNOTATION,
    PortAnnotation,
)
from netctl.iaas.base import NetworkSpec, PortOwner
from netctl.iaas.ovn import OvnIaaS
from netctl.lab.internet import INTERNET_HOST, INTERNET_PORT
from netctl.lab.lab import POD_PORT, Lab
from netctl.lab.topology import NodeSpec, PodSpec, TenantSpec, Topology
from netns_tests.cni_fixtures import Invocation, LibCni
from netns_tests.waiting import wait_for

pytest.register_assert_rewrite("netns_tests.ovn_fixtures")
from netns_tests.ovn_fixtures import OvnEnv  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
pytest_plugins = ("netns_tests.ovn_fixtures",)  # ovn_env, iaas (as in test_ovn_backend.py)

ALPHA = TenantSpec("alpha", "10.41.0.0/24")
BETA = TenantSpec("beta", "10.42.0.0/24")
NODES = (NodeSpec("alpha-1", "alpha"), NodeSpec("beta-1", "beta"))
PUBLIC_CIDR = "203.0.113.0/24"
CLONE_NEWNET = 0x40000000


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "np" + secrets.token_hex(2)
    topo = Topology((ALPHA, BETA), NODES, (), public_cidr=PUBLIC_CIDR)
    with Lab(topo, run_dir=Path("/var/lib/netctl/test") / prefix, prefix=prefix, services=False) as lab:
        create_pod(lab, "pub-a", ALPHA, "alpha-1", public=True)
        create_pod(lab, "plain-a", ALPHA, "alpha-1", public=False)
        create_pod(lab, "pub-b", BETA, "beta-1", public=True)
        lab.wait_pods_running({"pub-a", "plain-a", "pub-b"}, timeout=180)
        yield lab


def create_pod(lab: Lab, name: str, tenant: TenantSpec, node: str, public: bool) -> None:
    manifest: dict[str, Any] = lab.pod_manifest(PodSpec(name, tenant.name, node))
    if public:
        manifest["metadata"]["annotations"] = {PUBLIC_IP_ANNOTATION: "true"}
    path = lab.run_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    lab.cp.kubectl("apply", "-f", str(path))


def pod_obj(lab: Lab, name: str) -> dict[str, Any]:
    found = [p for p in lab.pods() if p["metadata"]["name"] == name]
    assert found, f"pod {name} not found"
    return found[0]


def public_port(lab: Lab, name: str) -> PortAnnotation:
    raw = (pod_obj(lab, name)["metadata"].get("annotations") or {}).get(PUBLIC_PORT_ANNOTATION)
    assert raw, f"pod {name} has no {PUBLIC_PORT_ANNOTATION} annotation"
    return PortAnnotation.from_json(raw, PUBLIC_PORT_ANNOTATION)


def netns_of(lab: Lab, name: str, tenant: TenantSpec, node: str) -> str:
    return lab.pod_netns(tenant.namespace, name, node)


def ip_in(netns_path: str, *args: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns_path}", "ip", *args], check=True, capture_output=True,
                          text=True).stdout


def links_in(netns_path: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip_in(netns_path, "-o", "link").splitlines()}


def tcp_get(netns_path: str, ip: str, port: int, source: str | None = None, timeout: float = 3.0) -> str:
    """GET / from inside a netns (a helper thread enters it), optionally from a chosen source address."""
    out: dict[str, Any] = {}

    def worker() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}")
            finally:
                os.close(fd)
            with socket.create_connection((ip, port), timeout=timeout,
                                          source_address=(source, 0) if source else None) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                chunks = []
                while chunk := s.recv(4096):
                    chunks.append(chunk)
            out["body"] = b"".join(chunks).decode(errors="replace")
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout + 5)
    if "error" in out:
        raise out["error"]
    return str(out.get("body", ""))


def answers(netns_path: str, ip: str, source: str | None = None) -> bool:
    try:
        return "HTTP/" in tcp_get(netns_path, ip, POD_PORT, source)
    except OSError:
        return False


def internet(lab: Lab) -> str:
    return f"/run/netns/{lab.internet_netns}"


def nbctl(lab: Lab, *args: str) -> str:
    return subprocess.run(["ovn-nbctl", f"--db={lab.ovn.nb_connection}", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_ovn_public_port_is_pinned_and_never_taken_for_the_tenant_port(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    tenant = f"{ovn_env.prefix}-pub"
    net = iaas.ensure_network(NetworkSpec(tenant, "10.77.0.0/24", "10.77.0.1"))
    public = iaas.ensure_network(NetworkSpec(PUBLIC_NETWORK, PUBLIC_CIDR, "203.0.113.1"))
    try:
        uid = f"{ovn_env.prefix}-u1"
        pub = iaas.create_port(public, PortOwner("pod", "web", "ns", uid, PUBLIC_NETWORK), f"pub-{uid}")
        assert ovn_env.nbctl("lsp-get-port-security", pub.id).splitlines() == [f"{pub.mac} {pub.ip}"]
        assert pub.ip != "203.0.113.1"
        # the pod's tenant port: a new one, not its public port passed off as "the pod's existing port"
        claim = iaas.claim_port(net, PortOwner("pod", "web", "ns", uid, tenant), f"pod-{uid}")
        assert not claim.existing and claim.port.id == f"pod-{uid}" and claim.port.network_id == net.id
        assert {p.id for p in iaas.ports_of_pod(uid)} == {pub.id, claim.port.id}
    finally:
        iaas.delete_network(tenant)
        iaas.delete_network(PUBLIC_NETWORK)


def test_ovn_uplink_port_holds_the_gateway_outside_netctl_bookkeeping(ovn_env: OvnEnv, iaas: OvnIaaS) -> None:
    public = iaas.ensure_network(NetworkSpec(PUBLIC_NETWORK, "203.0.113.0/29", "203.0.113.1"))
    try:
        mac = ipam.mac_for_ip("203.0.113.1")
        iaas.ensure_uplink_port(public, f"{ovn_env.prefix}-up", mac, "203.0.113.1")
        iaas.ensure_uplink_port(public, f"{ovn_env.prefix}-up", mac, "203.0.113.1")  # idempotent
        assert ovn_env.nbctl("lsp-get-addresses", f"{ovn_env.prefix}-up").splitlines() == [f"{mac} 203.0.113.1"]
        assert ovn_env.nbctl("lsp-get-port-security", f"{ovn_env.prefix}-up") == ""
        assert iaas.list_ports(tenant=PUBLIC_NETWORK) == []  # not netctl's: no resync ever frees it
        owner = PortOwner("pod", "p", "ns", None, PUBLIC_NETWORK)
        got = {iaas.create_port(public, owner, f"pub-{i}").ip for i in range(5)}  # every free host
        assert "203.0.113.1" not in got and len(got) == 5
    finally:
        iaas.delete_network(PUBLIC_NETWORK)


def test_public_pod_has_two_nics_and_answers_the_internet(lab: Lab) -> None:
    uid = pod_obj(lab, "pub-a")["metadata"]["uid"]
    pub = public_port(lab, "pub-a")
    assert pub.port_id == f"pub-{uid}" and pub.network_id == "netctl-public" and pub.gateway == "203.0.113.1"
    tenant = PortAnnotation.from_json(pod_obj(lab, "pub-a")["metadata"]["annotations"][PORT_ANNOTATION])
    ns = netns_of(lab, "pub-a", ALPHA, "alpha-1")
    assert {"eth0", "net1"} <= links_in(ns)
    assert pub.ip in ip_in(ns, "-o", "addr", "show", "dev", "net1")
    assert tenant.ip in ip_in(ns, "-o", "addr", "show", "dev", "eth0")
    assert f"default via {tenant.gateway} dev eth0" in ip_in(ns, "route")  # eth0 keeps the default route
    # port security pins the public port to its own MAC and address (no spoofing another's)
    assert nbctl(lab, "lsp-get-port-security", pub.port_id).splitlines() == [f"{pub.mac} {pub.interface.ip}"]
    # a host beyond the gateway (not on the provider subnet): the reply needs the policy route
    ip = str(pub.interface.ip)
    wait_for(lambda: answers(internet(lab), ip, INTERNET_HOST), f"pub-a's public {ip} from the internet", 30)
    # and the tenant address is not on the internet's side
    assert not answers(internet(lab), str(tenant.interface.ip), INTERNET_HOST)


def test_pod_without_the_annotation_has_no_public_nic(lab: Lab) -> None:
    p = pod_obj(lab, "plain-a")
    assert PUBLIC_PORT_ANNOTATION not in (p["metadata"].get("annotations") or {})
    ns = netns_of(lab, "plain-a", ALPHA, "alpha-1")
    assert "eth0" in links_in(ns) and "net1" not in links_in(ns)
    assert lab.iaas.get_port(f"pub-{p['metadata']['uid']}") is None


def test_two_tenants_share_the_provider_switch(lab: Lab) -> None:
    a, b = public_port(lab, "pub-a"), public_port(lab, "pub-b")
    assert a.network_id == b.network_id == "netctl-public" and a.ip != b.ip
    switch_ports = set(nbctl(lab, "--bare", "--columns=name", "find", "Logical_Switch_Port",
                             "external_ids:netctl\\:tenant=public").split())
    assert {a.port_id, b.port_id} <= switch_ports
    assert INTERNET_PORT in nbctl(lab, "lsp-list", "netctl-public")
    b_ip = str(b.interface.ip)
    wait_for(lambda: answers(internet(lab), b_ip, INTERNET_HOST), f"pub-b's public {b_ip} from the internet", 30)
    # Public addresses reach each other, as two hosts on the internet would (the provider switch is
    # one L2 segment; port security only stops spoofing) ...
    ns_a = netns_of(lab, "pub-a", ALPHA, "alpha-1")
    assert answers(ns_a, b_ip), "pub-a cannot reach pub-b's public address"
    # ... but the tenants stay apart: beta's tenant address is not reachable from alpha's pod.
    b_tenant = PortAnnotation.from_json(pod_obj(lab, "pub-b")["metadata"]["annotations"][PORT_ANNOTATION])
    assert not answers(ns_a, str(b_tenant.interface.ip))


def test_runtime_result_check_and_gc_know_the_public_nic(lab: Lab) -> None:
    node = "alpha-1"
    rt = lab.runtimes[node]
    cid = rt.pod_sandbox(ALPHA.namespace, "pub-a").id
    netns = netns_of(lab, "pub-a", ALPHA, node)
    conflist = json.loads((lab.run_dir / "nodes" / node / "cni-conf" / "10-netctl.conflist").read_text())
    ours = {**conflist, "plugins": conflist["plugins"][:1]}
    # what containerd (libcni) cached from the chain's ADD: both NICs and both addresses
    cached = json.loads(Path(f"/var/lib/cni/results/{conflist['name']}-{cid}-eth0").read_text())["result"]
    assert [i["name"] for i in cached["interfaces"] if i.get("sandbox")] == ["eth0", "net1"]
    pub = public_port(lab, "pub-a")
    assert pub.ip in [ip["address"] for ip in cached["ips"]] and len(cached["ips"]) == 2
    cni = LibCni(f"/run/netns/{lab.node_netns(node)}", path=(str(lab.run_dir / "cni-bin"),))
    inv = Invocation(cid, netns)
    cni.check(ours, inv, cached)
    public_ip = str(pub.interface.ip)
    ip_in(netns, "rule", "del", "from", public_ip, "lookup", "1000")
    try:
        e = cni.exec_plugin("CHECK", cni.plugin_conf(ours, ours["plugins"][0], inv, cached), inv)
        assert e.rc != 0 and e.out["code"] == 106 and f"from {public_ip} lookup 1000" in json.dumps(e.out), e
    finally:
        ip_in(netns, "rule", "add", "from", public_ip, "lookup", "1000", "priority", "1000")
    cni.check(ours, inv, cached)
    # GC with every live attachment valid (the runtime knows only eth0s) leaves the net1s alone. All
    # lab nodes share one OVS, so "every" means both nodes' pods, as on a real node it means its own.
    valid = [(rt.pod_sandbox(ALPHA.namespace, n).id, "eth0") for n in ("pub-a", "plain-a")]
    valid.append((lab.runtimes["beta-1"].pod_sandbox(BETA.namespace, "pub-b").id, "eth0"))
    before = ovs_iface_ids(lab)
    assert {pub.port_id, public_port(lab, "pub-b").port_id} <= before
    (gc,) = cni.gc({**ours, "cniVersion": "1.1.0"}, valid)
    assert gc.rc == 0, gc
    assert ovs_iface_ids(lab) == before and "net1" in links_in(netns)
    assert answers(internet(lab), public_ip, INTERNET_HOST)


def test_controller_restart_keeps_public_addresses(lab: Lab) -> None:
    before = {n: public_port(lab, n) for n in ("pub-a", "pub-b")}
    raw_before = {n: pod_obj(lab, n)["metadata"]["annotations"][PUBLIC_PORT_ANNOTATION] for n in before}
    lab.stop_controller()
    lab.start_controller()
    # a new public pod getting its NIC proves the new controller serves (its resync ran first)
    create_pod(lab, "late-a", ALPHA, "alpha-1", public=True)
    lab.wait_pods_running({"late-a"}, timeout=120)
    late = public_port(lab, "late-a")
    assert "net1" in links_in(netns_of(lab, "late-a", ALPHA, "alpha-1"))
    assert late.ip not in {p.ip for p in before.values()}
    for n, port in before.items():
        assert public_port(lab, n) == port
        assert pod_obj(lab, n)["metadata"]["annotations"][PUBLIC_PORT_ANNOTATION] == raw_before[n]
        now = lab.iaas.get_port(port.port_id)
        assert now is not None and f"{now.ip}/{now.prefixlen}" == port.ip and now.mac == port.mac
    assert answers(internet(lab), str(before["pub-a"].interface.ip), INTERNET_HOST)


def test_deleting_the_pod_removes_its_public_port(lab: Lab) -> None:
    pub = public_port(lab, "pub-b")
    assert pub.port_id in ovs_iface_ids(lab)
    lab.cp.kubectl("delete", "pod", "-n", BETA.namespace, "pub-b", "--wait=true", "--timeout=60s")
    wait_for(lambda: lab.iaas.get_port(pub.port_id) is None, "pub-b's public port deleted", 30)
    wait_for(lambda: pub.port_id not in ovs_iface_ids(lab), "pub-b's net1 unplugged from OVS", 30)
    assert not answers(internet(lab), str(pub.interface.ip), INTERNET_HOST)


def ovs_iface_ids(lab: Lab) -> set[str]:
    """The iface-ids plugged into the lab's OVS."""
    out = subprocess.run(["ovs-vsctl", f"--db={lab.ovs.db_connection}", "--bare", "--columns=external_ids",
                          "list", "Interface"], check=True, capture_output=True, text=True).stdout
    return {tok.split("=", 1)[1].strip('"') for tok in out.split() if tok.startswith("iface-id=")}
