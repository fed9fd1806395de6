"""The lab's real Kubernetes: control plane, RBAC, service-account tokens, a kubelet node, a pod, teardown.

The node's CNI here is the reference bridge + host-local chain (not ours): this tests the runtime
path — kubelet → containerd CRI → CNI in the node netns → a pod that answers — on its own.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from pyroute2 import NetNS

from netctl.lab import runtime as lab_runtime
from netctl.lab.k8s import CNI, CONTROLLER, SA_ISSUER
from netctl.lab.runtime import NodeRuntime

pytest.register_assert_rewrite("netns_tests.k8s_fixtures")
from netns_tests.k8s_fixtures import (  # noqa: E402
    POD_PORT,
    TENANT_LABEL,
    BridgeLab,
    bridge_lab,
    host_leftovers,
    http_get_in_netns,
    other_kubelet_holders,
    pod_manifest,
    read_sysctls,
    require_k8s_binaries,
    wait_pod_running,
)

# the fixtures (k8s_lab) live in k8s_fixtures.py; conftest.py is not ours to extend
pytest_plugins = ("netns_tests.k8s_fixtures",)
pytestmark = [pytest.mark.netns, pytest.mark.e2e]


def _baseline() -> tuple[dict[str, str], dict[str, bool]]:
    """Host values as they were before any kubelet: the shared snapshot if a kubelet runs, else live."""
    try:
        state = json.loads(lab_runtime.HOST_STATE.read_text())
    except (OSError, ValueError):
        state = {}
    if "sysctls" in state:
        missing = set(state.get("missing_dirs", []))
        return dict(state["sysctls"]), {d: d not in missing for d in lab_runtime.KUBELET_HOST_DIRS}
    return read_sysctls(), {d: Path(d).exists() for d in lab_runtime.KUBELET_HOST_DIRS}


def _create_pod(cp_core: Any, namespace: str, name: str, node: str, text: str) -> tuple[Any, float]:
    t = time.monotonic()
    cp_core.create_namespaced_pod(namespace, pod_manifest(name, namespace, node, text))
    pod = wait_pod_running(cp_core, namespace, name)
    return pod, time.monotonic() - t


def _tenant_namespace(lab: BridgeLab, name: str) -> None:
    lab.core().create_namespace({"metadata": {"name": name, "labels": {TENANT_LABEL: lab.tenant}}})
    lab.cp.wait_service_account(name)


def _cgroup_pids(cgroup_root: str) -> set[int]:
    pids: set[int] = set()
    for h in lab_runtime.cgroup_hierarchies():
        for dirpath, _dirs, files in os.walk(h / cgroup_root):
            if "cgroup.procs" in files:
                pids |= {int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()}
    return pids


# Runs first, before the session lab exists, so that its kubelets are the only ones of this
# process and the restored sysctls can be checked exactly. Node n1 is torn down normally; n2's
# CNI is broken first, so CNI DEL fails and its sandbox cannot be removed through the CRI (the
# state a failed ADD leaves too): teardown must still leave nothing.
def test_teardown_leaves_nothing_behind() -> None:
    require_k8s_binaries()
    sysctls_before, dirs_before = _baseline()
    shims_before = set(lab_runtime.SHIM_SOCKET_DIR.iterdir()) if lab_runtime.SHIM_SOCKET_DIR.exists() else set()
    with bridge_lab(nodes=("n1", "n2")) as lab:
        prefix, run_dir = lab.prefix, lab.run_dir
        _tenant_namespace(lab, "web")
        pod_logs, pod_pids = [], set()
        for node in ("n1", "n2"):
            rt = lab.nodes[node]
            pod, _ = _create_pod(lab.core(), "web", f"p-{node}", node, "bye")
            assert Path(rt.pod_netns("web", f"p-{node}")).exists()
            pod_logs.append(Path("/var/log/pods") / f"web_p-{node}_{pod.metadata.uid}")
            assert pod_logs[-1].is_dir()
            pod_pids |= _cgroup_pids(rt.cgroup_root)
        assert pod_pids, "no container processes found in the nodes' cgroups"
        assert read_sysctls()["kernel/panic"] == "10", "kubelet did not set kernel.panic: the restore check is moot"

        broken = {"cniVersion": "0.4.0", "name": "broken", "plugins": [{"type": "no-such-plugin"}]}
        (run_dir / "cni-conf-n2" / "10-bridge.conflist").write_text(json.dumps(broken))  # in place: reloaded
        time.sleep(2)
        for node in ("n2", "n1"):
            rt = lab.nodes[node]
            # the way `netctl lab down` does it from another process: from the node's node.json
            NodeRuntime.attach(node, lab.node_netns[node], rt.run_dir, prefix=prefix, control_plane=lab.cp).stop()
            with pytest.raises(k8s.ApiException) as e:
                lab.core().read_node(node)
            assert e.value.status == 404
            assert rt.leftovers() == {"processes": [], "mounts": [], "cgroups": [], "dirs": []}
        assert not [p for p in pod_logs if p.exists()]
        assert not [pid for pid in pod_pids if Path(f"/proc/{pid}").exists()]

    left = host_leftovers(prefix, run_dir)
    assert left == {k: [] for k in left}, left
    shims_after = set(lab_runtime.SHIM_SOCKET_DIR.iterdir()) if lab_runtime.SHIM_SOCKET_DIR.exists() else set()
    assert shims_after <= shims_before | lab_runtime.live_shim_sockets()  # only other runs' live shims
    holders = other_kubelet_holders()
    if holders:
        # another run's kubelet is still up on this machine: it restores when it stops; ours are released
        assert not any(str(run_dir) in h for h in holders)
        assert _baseline()[0] == sysctls_before
    else:
        assert read_sysctls() == sysctls_before
        assert {d: Path(d).exists() for d in lab_runtime.KUBELET_HOST_DIRS} == dirs_before


def test_apiserver_ready_and_namespace_create(k8s_lab: BridgeLab) -> None:
    cp = k8s_lab.cp
    assert cp.ready()
    assert cp.timings["apiserver_ready"] < 60
    core = k8s_lab.core()
    core.create_namespace({"metadata": {"name": "smoke"}})
    assert core.read_namespace("smoke").status.phase == "Active"
    admin = yaml.safe_load(cp.kubeconfig().read_text())
    assert admin["clusters"][0]["cluster"]["server"] == f"https://{k8s_lab.mgmt.address}:{cp.port}"
    assert "smoke" in cp.kubectl("get", "namespaces", "-o", "name")
    assert not (Path.home() / ".kube" / "cache" / "discovery" / f"{k8s_lab.mgmt.address}_{cp.port}").exists()


def _allowed(
    lab: BridgeLab, user: str, verb: str, resource: str, group: str = "", namespace: str | None = None,
    name: str | None = None, subresource: str | None = None, groups: list[str] | None = None,
) -> bool:  # fmt: skip
    attrs = {"verb": verb, "resource": resource, "group": group}
    for key, value in (("namespace", namespace), ("name", name), ("subresource", subresource)):
        if value is not None:
            attrs[key] = value
    review = {"spec": {"user": user, "groups": groups or [], "resourceAttributes": attrs}}
    api: Any = k8s.AuthorizationV1Api(lab.cp.api_client())
    return bool(api.create_subject_access_review(review).status.allowed)


def test_rbac_cni_reads_but_cannot_create_pods(k8s_lab: BridgeLab) -> None:
    assert not _allowed(k8s_lab, CNI, "create", "pods", namespace="default")
    for resource in ("pods", "nodes", "namespaces"):
        assert _allowed(k8s_lab, CNI, "watch", resource)
    assert not _allowed(k8s_lab, CNI, "get", "secrets", namespace="kube-system")
    # and for real, with the CNI's own credentials
    cni: Any = k8s.CoreV1Api(k8s_lab.cp.api_client(CNI))
    cni.list_pod_for_all_namespaces(limit=1)
    with pytest.raises(k8s.ApiException) as e:
        cni.create_namespaced_pod("default", pod_manifest("forbidden", "default", "n1", "no"))
    assert e.value.status == 403


def test_rbac_controller_least_privilege(k8s_lab: BridgeLab) -> None:
    def ok(*args: Any, **kw: Any) -> bool:
        return _allowed(k8s_lab, CONTROLLER, *args, **kw)

    assert ok("patch", "pods", namespace="any")
    assert ok("watch", "namespaces") and ok("watch", "nodes")
    assert ok("create", "events", namespace="any")
    assert ok("update", "tenants", "netctl.io", subresource="status", name="alpha")
    assert ok("create", "leases", "coordination.k8s.io", namespace="kube-system")
    assert ok("update", "leases", "coordination.k8s.io", namespace="kube-system", name="netctl")
    assert not ok("update", "leases", "coordination.k8s.io", namespace="kube-system", name="kube-scheduler")
    assert not ok("delete", "pods", namespace="any")
    assert not ok("create", "pods", namespace="any")
    assert not ok("get", "secrets", namespace="kube-system")
    assert not ok("delete", "tenants", "netctl.io", name="alpha")


def test_token_request_for_a_service_account(k8s_lab: BridgeLab) -> None:
    core = k8s_lab.core()
    core.create_namespace({"metadata": {"name": "sa-test"}})
    core.create_namespaced_service_account("sa-test", {"metadata": {"name": "probe"}})
    req = {"spec": {"audiences": [SA_ISSUER], "expirationSeconds": 600}}
    token = core.create_namespaced_service_account_token("probe", "sa-test", req).status.token
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["iss"] == SA_ISSUER
    assert claims["sub"] == "system:serviceaccount:sa-test:probe"
    authn: Any = k8s.AuthenticationV1Api(k8s_lab.cp.api_client())
    review = authn.create_token_review({"spec": {"token": token}})
    assert review.status.authenticated, review.status.error
    assert review.status.user.username == "system:serviceaccount:sa-test:probe"


def test_node_added_after_start_gets_a_client_certificate(k8s_lab: BridgeLab) -> None:
    kubeconfig = k8s_lab.cp.add_node("late")
    user = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]
    assert "client-certificate" in user and "token" not in user
    node: Any = k8s.CoreV1Api(k8s_lab.cp.api_client("system:node:late"))
    with pytest.raises(k8s.ApiException) as e:
        node.read_node("late")  # authenticated and authorized as the node; the Node just does not exist
    assert e.value.status == 404
    assert not _allowed(k8s_lab, "system:node:late", "list", "secrets", groups=["system:nodes"])


def test_node_ready_with_tenant_label(k8s_lab: BridgeLab) -> None:
    rt = k8s_lab.nodes["n1"]
    node = k8s_lab.core().read_node("n1")
    assert node.metadata.labels[TENANT_LABEL] == k8s_lab.tenant
    ready = [c for c in node.status.conditions if c.type == "Ready"]
    assert ready and ready[0].status == "True", node.status.conditions
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == k8s_lab.mgmt.hosts[k8s_lab.node_netns["n1"]]
    print(f"\nnode timings: {rt.timings}; control plane: {k8s_lab.cp.timings}")


def test_pod_runs_and_answers_from_the_node_netns(k8s_lab: BridgeLab) -> None:
    rt = k8s_lab.nodes["n1"]
    _tenant_namespace(k8s_lab, "demo")
    core = k8s_lab.core()
    pod, took = _create_pod(core, "demo", "web", "n1", "hello-from-web")
    print(f"\npod create -> Running: {took:.2f} s")
    assert pod.spec.node_name == "n1"
    path = rt.pod_netns("demo", "web")
    assert path.startswith(str(rt.run_dir)), path
    with NetNS(path) as ns:  # enter the pod's netns: its eth0 holds the pod IP
        addrs = {a.get("IFA_ADDRESS") for a in ns.get_addr(family=2, label="eth0")}
    assert pod.status.pod_ip in addrs
    node_ns = f"/run/netns/{k8s_lab.node_netns['n1']}"
    assert http_get_in_netns(node_ns, pod.status.pod_ip, POD_PORT).strip() == "hello-from-web"
    assert http_get_in_netns(path, "127.0.0.1", POD_PORT).strip() == "hello-from-web"
    # the API server reaches the kubelet over the management network (logs/exec path)
    assert "serving" in core.read_namespaced_pod_log("web", "demo")
