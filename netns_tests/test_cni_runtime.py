"""The CNI under its real client (issue 3, item 5): kubelet -> containerd CRI -> our conflist.

One tenant, two lab nodes (netns VMs with their own containerd + kubelet and a CNI agent each).
- hostPort: the node's conflist is ours + the reference `portmap` declaring `portMappings`; a pod
  with a hostPort answers on its node's address, from the node and from the tenant's other node,
  and stops answering once deleted.
- restarting the node's CNI agent, then containerd, breaks no running pod, new pods still come
  up, and deleting pods leaves no OVS port or veth behind (containerd's DELs, doubled or not).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni.ovs_binding import HOST_PREFIX
from netctl.lab.lab import LAB_IMAGE, POD_PORT, Lab
from netctl.lab.topology import NodeSpec, PodSpec, TenantSpec, Topology
from netns_tests.k8s_fixtures import http_get_in_netns
from netns_tests.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

TENANT = TenantSpec("alpha", "10.33.0.0/24")
NODES = (NodeSpec("alpha-1", "alpha"), NodeSpec("alpha-2", "alpha"))
PODS = (PodSpec("steady-1", "alpha", "alpha-1"), PodSpec("steady-2", "alpha", "alpha-2"))
HOST_PORT = 18080


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "nr" + secrets.token_hex(2)
    with Lab(Topology((TENANT,), NODES, PODS), run_dir=Path("/var/lib/netctl/test") / prefix, prefix=prefix,
             services=False) as lab:
        lab.create_pods()
        lab.wait_pods_running(timeout=180)
        yield lab


def node_ns(lab: Lab, node: str) -> str:
    return f"/run/netns/{lab.node_netns(node)}"


def node_ip(lab: Lab, node: str) -> str:
    return str(lab.state.nodes[node]["tenant_ip"])


def answers(netns: str, ip: str, port: int) -> bool:
    try:
        http_get_in_netns(netns, ip, port, timeout=2.0)
        return True
    except OSError:
        return False


def pod_ips(lab: Lab) -> dict[str, str]:
    return {p["metadata"]["name"]: p["status"].get("podIP") for p in lab.pods()}


def ovs_pod_ifaces(lab: Lab) -> set[str]:
    """OVS interfaces of pod veths (the lab's node NICs are not the CNI's to count)."""
    out = subprocess.run(["ovs-vsctl", f"--db={lab.ovs.db_connection}", "--format=csv", "--no-headings",
                          "--columns=name,external_ids", "list", "Interface"],
                         check=True, capture_output=True, text=True).stdout
    return {line.split(",", 1)[0].strip('"') for line in out.splitlines() if line.split(",", 1)[0].startswith(
        (HOST_PREFIX, f'"{HOST_PREFIX}'))}


def host_veths(lab: Lab) -> set[str]:
    """Host ends of pod veths in the OVS netns (named by cni.ovs_binding.host_ifname)."""
    out = subprocess.run(["ip", "-n", lab.hv_netns, "-o", "link", "show"], check=True, capture_output=True,
                         text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n.startswith(HOST_PREFIX)}


def create_pod(lab: Lab, name: str, node: str, host_port: int | None = None) -> None:
    manifest: dict[str, Any] = lab.pod_manifest(PodSpec(name, "alpha", node))
    if host_port is not None:
        manifest["spec"]["containers"][0]["ports"] = [
            {"containerPort": POD_PORT, "hostPort": host_port, "protocol": "TCP"}]
    assert manifest["spec"]["containers"][0]["image"] == LAB_IMAGE
    path = lab.run_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    lab.cp.kubectl("apply", "-f", str(path))


def delete_pod(lab: Lab, name: str) -> None:
    lab.cp.kubectl("delete", "pod", "-n", TENANT.namespace, name, "--wait=true", "--timeout=60s")


def steady_pods_answer(lab: Lab) -> None:
    ips = pod_ips(lab)
    for pod, node in (("steady-1", "alpha-2"), ("steady-2", "alpha-1")):
        assert answers(node_ns(lab, node), ips[pod], POD_PORT), f"{pod} ({ips[pod]}) does not answer from {node}"


def test_host_port_answers_from_the_node_and_goes_away_with_the_pod(lab: Lab) -> None:
    create_pod(lab, "hostport", "alpha-1", host_port=HOST_PORT)
    lab.wait_pods_running({"hostport"}, timeout=90)
    ip1 = node_ip(lab, "alpha-1")
    wait_for(lambda: answers(node_ns(lab, "alpha-2"), ip1, HOST_PORT), f"{ip1}:{HOST_PORT} from alpha-2", 30)
    assert answers(node_ns(lab, "alpha-1"), ip1, HOST_PORT), "hostPort not answering on the node itself"
    delete_pod(lab, "hostport")
    wait_for(lambda: not answers(node_ns(lab, "alpha-2"), ip1, HOST_PORT), "hostPort gone with its pod", 30)


def test_agent_restart_breaks_nothing(lab: Lab) -> None:
    before = ovs_pod_ifaces(lab)
    node = NODES[0]
    lab.cni_agents[node.name].stop()
    lab.start_cni_agent(node)
    steady_pods_answer(lab)
    assert ovs_pod_ifaces(lab) == before
    create_pod(lab, "after-agent", node.name)
    lab.wait_pods_running({"after-agent"}, timeout=90)
    ip = pod_ips(lab)["after-agent"]
    wait_for(lambda: answers(node_ns(lab, "alpha-2"), ip, POD_PORT), "new pod after agent restart answers", 30)
    delete_pod(lab, "after-agent")
    wait_for(lambda: ovs_pod_ifaces(lab) == before, "the deleted pod's OVS port removed", 30)


def test_containerd_restart_breaks_nothing_and_leaks_nothing(lab: Lab) -> None:
    before = ovs_pod_ifaces(lab)
    rt = lab.runtimes["alpha-1"]
    rt.restart_containerd()
    steady_pods_answer(lab)
    assert ovs_pod_ifaces(lab) == before
    create_pod(lab, "after-containerd", "alpha-1")
    lab.wait_pods_running({"after-containerd"}, timeout=120)
    ip = pod_ips(lab)["after-containerd"]
    wait_for(lambda: answers(node_ns(lab, "alpha-2"), ip, POD_PORT), "new pod after containerd restart answers", 30)
    delete_pod(lab, "after-containerd")
    wait_for(lambda: ovs_pod_ifaces(lab) == before, "the deleted pod's OVS port removed", 30)
    assert host_veths(lab) == before, "a veth host end without its OVS port (or the reverse)"
