"""The first vertical slice, end to end, against a real kube-apiserver, kubelets, containerd and OVN.

Two tenants, two nodes each, two pods per node (the demo topology). Every pod is started by a
real kubelet through containerd's CRI, which runs `netctl-cni` from the node's config dir.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import pytest

from netctl.annotations import PORT_ANNOTATION, PortAnnotation
from netctl.lab.lab import POD_PORT, Lab
from netctl.lab.probe import probe_matrix, tcp_probe
from netctl.lab.topology import PodSpec, demo
from netns_tests.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    prefix = "nt" + secrets.token_hex(2)
    run_dir = Path("/var/lib/netctl/test") / prefix
    with Lab(demo(), run_dir=run_dir, prefix=prefix, controller_args=("--resync-period-s=5",)) as lab:
        lab.create_pods()
        lab.wait_pods_running(timeout=180)
        yield lab


def nbctl(lab: Lab, *args: str) -> str:
    return subprocess.run(
        ["ovn-nbctl", f"--db={lab.ovn.nb_connection}", *args], check=True, capture_output=True, text=True
    ).stdout


def vsctl(lab: Lab, *args: str) -> str:
    return subprocess.run(
        ["ovs-vsctl", f"--db={lab.ovs.db_connection}", *args], check=True, capture_output=True, text=True
    ).stdout


def pod_lsps(lab: Lab) -> list[dict[str, str]]:
    """Every pod-owned logical switch port: name plus its external_ids."""
    out = nbctl(
        lab,
        "--format=json",
        "--columns=name,external_ids",
        "find",
        "Logical_Switch_Port",
        "external_ids:netctl\\:owner=pod",
    )
    data = json.loads(out)
    rows = []
    for name, ext in data["data"]:
        ids = dict(ext[1])
        ids["name"] = name
        rows.append(ids)
    return rows


def ovs_ifaces(lab: Lab, port_id: str) -> list[str]:
    out = vsctl(lab, "--bare", "--columns=name", "find", "Interface", f"external_ids:iface-id={port_id}")
    return out.split()


def by_name(pods: list[dict]) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in pods}


def test_every_pod_has_its_port_annotation_and_address(lab: Lab) -> None:
    pods = lab.wait_pods_running()
    lsps = {p["name"]: p for p in pod_lsps(lab)}
    for pod in pods:
        ann = PortAnnotation.from_json(pod["metadata"]["annotations"][PORT_ANNOTATION])
        uid = pod["metadata"]["uid"]
        assert ann.port_id == f"pod-{uid}"
        assert pod["status"]["podIP"] == ann.ip.split("/")[0], "CNI result and annotation disagree"
        ids = lsps[ann.port_id]
        assert ids["netctl:pod-uid"] == uid
        assert ids["netctl:namespace"] == pod["metadata"]["namespace"]
        assert ids["netctl:node"] == pod["spec"]["nodeName"]
        assert ids["netctl:tenant"] == ann.tenant
        addresses = nbctl(lab, "lsp-get-addresses", ann.port_id).strip()
        security = nbctl(lab, "lsp-get-port-security", ann.port_id).strip()
        assert addresses == f"{ann.mac} {ann.ip.split('/')[0]}"
        assert security.startswith(ann.mac)
        assert ovs_ifaces(lab, ann.port_id), f"no OVS interface for {ann.port_id}"
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == len(ips)


def _pods_by_tenant(lab: Lab) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for pod in lab.wait_pods_running():
        ann = PortAnnotation.from_json(pod["metadata"]["annotations"][PORT_ANNOTATION])
        out.setdefault(ann.tenant, []).append(pod)
    return out


def test_same_tenant_pods_on_different_nodes_talk_tcp(lab: Lab) -> None:
    groups = _pods_by_tenant(lab)
    assert len(groups) == 2
    checked = 0
    for pods in groups.values():
        for a, b in combinations(pods, 2):
            if a["spec"]["nodeName"] == b["spec"]["nodeName"]:
                continue
            for src, dst in ((a, b), (b, a)):
                ns = lab.pod_netns(src["metadata"]["namespace"], src["metadata"]["name"], src["spec"]["nodeName"])
                assert tcp_probe(ns, dst["status"]["podIP"], POD_PORT, timeout=3.0), (
                    f"{src['metadata']['name']} cannot reach {dst['metadata']['name']}"
                )
                checked += 1
    assert checked == 16  # 2 tenants x (2x2 cross-node pairs) x 2 directions


def test_every_cross_tenant_pair_fails(lab: Lab) -> None:
    groups = _pods_by_tenant(lab)
    (_, pa), (_, pb) = groups.items()
    pods = pa + pb
    sources = {
        p["metadata"]["name"]: lab.pod_netns(p["metadata"]["namespace"], p["metadata"]["name"], p["spec"]["nodeName"])
        for p in pods
    }
    targets = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
    matrix = probe_matrix(sources, targets, POD_PORT, timeout=1.0)
    tenant = {p["metadata"]["name"]: t for t, ps in groups.items() for p in ps}
    cross = {k: ok for k, ok in matrix.items() if tenant[k[0]] != tenant[k[1]]}
    same = {k: ok for k, ok in matrix.items() if tenant[k[0]] == tenant[k[1]]}
    assert len(cross) == 32
    assert not any(cross.values()), [k for k, ok in cross.items() if ok]
    assert all(same.values()), [k for k, ok in same.items() if not ok]  # the probe itself works


def test_pod_of_another_tenant_is_refused_by_the_cni(lab: Lab) -> None:
    alpha_node = lab.topology.nodes_of("alpha")[0].name
    beta_ns = lab.topology.tenant("beta").namespace
    manifest = lab.pod_manifest(PodSpec("intruder", "beta"))
    manifest["spec"].pop("nodeSelector")
    manifest["spec"]["nodeName"] = alpha_node  # bypass the scheduler, as a misconfiguration would
    path = lab.run_dir / "intruder.json"
    path.write_text(json.dumps(manifest))
    lab.cp.kubectl("apply", "-f", str(path))
    try:

        def refused() -> str | None:
            out = lab.cp.kubectl(
                "get", "events", "-n", beta_ns, "--field-selector", "involvedObject.name=intruder", "-o", "json"
            )
            for ev in json.loads(out)["items"]:
                if ev["reason"] == "FailedCreatePodSandBox" and "tenants never share nodes" in ev["message"]:
                    return str(ev["message"])
            return None

        message = wait_for(refused, timeout=90, what="the CNI's refusal as a FailedCreatePodSandBox event")
        assert 'tenant "beta"' in message and alpha_node in message
        pod = json.loads(lab.cp.kubectl("get", "pod", "-n", beta_ns, "intruder", "-o", "json"))
        assert pod["status"].get("phase") == "Pending"
        assert not pod["status"].get("podIP")
        # No attachment was left behind on the hypervisor for it.
        assert ovs_ifaces(lab, f"pod-{pod['metadata']['uid']}") == []
    finally:
        # Wait for it to be gone, port included, so later tests see only the pods they expect.
        uid = (
            json.loads(lab.cp.kubectl("get", "pod", "-n", beta_ns, "intruder", "-o", "json", check=False) or "{}")
            .get("metadata", {})
            .get("uid")
        )
        lab.cp.kubectl("delete", "pod", "-n", beta_ns, "intruder", "--wait=true", "--timeout=90s", check=False)
        if uid:
            wait_for(
                lambda: f"pod-{uid}" not in {p["name"] for p in pod_lsps(lab)},
                timeout=60,
                what="the intruder's port to go",
            )


def test_deleting_a_pod_removes_its_lsp_and_ovs_port(lab: Lab) -> None:
    spec = PodSpec("short-lived", "alpha", lab.topology.nodes_of("alpha")[1].name)
    lab.create_pods((spec,))
    pod = by_name(lab.wait_pods_running({"short-lived"}))["short-lived"]
    port_id = f"pod-{pod['metadata']['uid']}"
    assert port_id in {p["name"] for p in pod_lsps(lab)}
    assert ovs_ifaces(lab, port_id)
    lab.cp.kubectl("delete", "pod", "-n", "tenant-alpha", "short-lived", "--wait=true", "--timeout=60s")
    wait_for(lambda: port_id not in {p["name"] for p in pod_lsps(lab)}, timeout=30, what="the LSP to go")
    wait_for(lambda: not ovs_ifaces(lab, port_id), timeout=30, what="the OVS port to go")


def test_controller_restart_creates_no_duplicates_and_leaves_no_orphans(lab: Lab) -> None:
    before = {p["name"] for p in pod_lsps(lab)}
    node = lab.topology.nodes_of("beta")[0].name
    lab.create_pods((PodSpec("doomed", "beta", node),))
    doomed = by_name(lab.wait_pods_running({"doomed"}))["doomed"]
    doomed_port = f"pod-{doomed['metadata']['uid']}"

    lab.stop_controller(kill=True)  # SIGKILL: no clean shutdown
    # While it is down: one pod goes, one arrives.
    lab.cp.kubectl("delete", "pod", "-n", "tenant-beta", "doomed", "--wait=true", "--timeout=60s")
    lab.create_pods((PodSpec("newcomer", "beta", node),))
    lab.start_controller()

    newcomer = by_name(lab.wait_pods_running({"newcomer"}, timeout=120))["newcomer"]
    new_port = f"pod-{newcomer['metadata']['uid']}"
    wait_for(lambda: doomed_port not in {p["name"] for p in pod_lsps(lab)}, timeout=60, what="the orphaned port to go")

    live = {f"pod-{p['metadata']['uid']}" for p in lab.pods()}
    ports = pod_lsps(lab)
    names = [p["name"] for p in ports]
    assert len(names) == len(set(names)), "duplicate ports"
    assert set(names) == live, f"orphans: {set(names) - live}, missing: {live - set(names)}"
    assert set(names) == (before - {doomed_port}) | {new_port}
    # Exactly one port per pod, one address per port, no address twice.
    ips = [nbctl(lab, "lsp-get-addresses", n).split()[1] for n in names]
    assert len(ips) == len(set(ips))
    lab.cp.kubectl("delete", "pod", "-n", "tenant-beta", "newcomer", "--wait=false")


# -- Services: pod -> ClusterIP (route via the node) -> node's kproxy -> backend pod ---------------


def _service(lab: Lab, namespace: str, name: str, selector: dict[str, str]) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": POD_PORT}]},
    }
    path = lab.run_dir / f"svc-{namespace}-{name}.json"
    path.write_text(json.dumps(doc))
    lab.cp.kubectl("apply", "-f", str(path))
    return lab.cp.kubectl("get", "service", "-n", namespace, name, "-o", "jsonpath={.spec.clusterIP}").strip()


def _node_table(lab: Lab, node: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.node_netns(node)}", "nft", "list", "table", "ip", "kproxy"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def test_clusterip_reaches_backends_within_the_tenant_only(lab: Lab) -> None:
    groups = _pods_by_tenant(lab)
    alpha_ip = _service(lab, "tenant-alpha", "web", {"app": "netctl-demo"})
    beta_ip = _service(lab, "tenant-beta", "web", {"app": "netctl-demo"})
    for node in lab.topology.nodes_of("alpha"):
        wait_for(
            lambda n=node.name: alpha_ip in _node_table(lab, n),
            timeout=60,
            what=f"{node.name}'s kproxy to program {alpha_ip}",
        )
    for node in lab.topology.nodes_of("beta"):
        wait_for(
            lambda n=node.name: beta_ip in _node_table(lab, n),
            timeout=60,
            what=f"{node.name}'s kproxy to program {beta_ip}",
        )
        assert alpha_ip not in _node_table(lab, node.name), "a beta node holds rules for alpha's service"
    # Endpoints follow the Service by a sync or two (EndpointSlice controller, then kproxy).
    for pod in groups["alpha"]:
        ns = lab.pod_netns(pod["metadata"]["namespace"], pod["metadata"]["name"], pod["spec"]["nodeName"])
        wait_for(
            lambda ns=ns: tcp_probe(ns, alpha_ip, 80, timeout=2.0),
            timeout=30,
            what=f"{pod['metadata']['name']} to reach {alpha_ip}",
        )
    for pod in groups["beta"]:
        ns = lab.pod_netns(pod["metadata"]["namespace"], pod["metadata"]["name"], pod["spec"]["nodeName"])
        wait_for(
            lambda ns=ns: tcp_probe(ns, beta_ip, 80, timeout=2.0),
            timeout=30,
            what=f"{pod['metadata']['name']} to reach {beta_ip}",
        )
        assert not tcp_probe(ns, alpha_ip, 80, timeout=1.0), "a beta pod reached alpha's service"


def test_a_pod_reaches_itself_through_its_service(lab: Lab) -> None:
    pod = _pods_by_tenant(lab)["alpha"][0]
    name = pod["metadata"]["name"]
    ip = _service(lab, "tenant-alpha", "self", {"netctl.io/lab-pod": name})
    wait_for(lambda: ip in _node_table(lab, pod["spec"]["nodeName"]), timeout=60, what="kproxy to program the service")
    ns = lab.pod_netns("tenant-alpha", name, pod["spec"]["nodeName"])
    wait_for(lambda: tcp_probe(ns, ip, 80, timeout=2.0), timeout=30, what="the pod to reach itself through its Service")
