"""PortController decisions, against fakes of our own interfaces (IaaS, cache, writer, recorder)."""

from __future__ import annotations

import pytest

from netctl.annotations import PORT_ANNOTATION, PortAnnotation
from netctl.controller.ports import Caches, PortController, TenantNotReady
from tests.fakes import FakeCache, FakeIaaS, FakeRecorder, FakeWriter, namespace, node, pod, tenant


@pytest.fixture
def world():
    pods = FakeCache()
    caches = Caches(
        pods=pods,
        namespaces=FakeCache([namespace("tenant-a", "a"), namespace("tenant-b", "b"), namespace("plain", None)]),
        tenants=FakeCache([tenant("a", "10.1.0.0/24"), tenant("b", "10.2.0.0/24")]),
        nodes=FakeCache([node("a-1", "a"), node("a-2", "a"), node("b-1", "b")]),
    )
    iaas = FakeIaaS()
    writer = FakeWriter(pods)
    rec = FakeRecorder()
    return PortController(caches, iaas, writer, rec), pods, iaas, writer, rec


def annotation_of(pods: FakeCache, key: str) -> PortAnnotation:
    return PortAnnotation.from_json(pods.get(key)["metadata"]["annotations"][PORT_ANNOTATION])


def test_new_pod_gets_port_before_scheduling_then_binding(world):
    ctl, pods, iaas, writer, rec = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    port = iaas.get_port("pod-u1")
    assert port is not None and port.node is None
    assert port.owner.uid == "u1" and port.owner.namespace == "tenant-a" and port.tenant == "a"
    ann = annotation_of(pods, "tenant-a/web")
    assert ann.port_id == "pod-u1" and ann.ip == f"{port.ip}/24" and ann.gateway == "10.1.0.1"
    assert ann.mtu == 1400 and ann.tenant == "a" and ann.mac == port.mac
    # scheduled: bound, annotation unchanged, no second patch
    pods.put(pod("web", uid="u1", node="a-1", metadata={**pods.get("tenant-a/web")["metadata"]}))
    pods.get("tenant-a/web")["spec"]["nodeName"] = "a-1"
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pod-u1").node == "a-1"
    assert len(writer.patches) == 1
    assert [e[2] for e in rec.events] == ["PortCreated", "PortBound"]


def test_sync_is_idempotent(world):
    ctl, pods, iaas, writer, _ = world
    pods.put(pod("web", uid="u1", node="a-1"))
    for _ in range(3):
        ctl.sync_pod("tenant-a/web")
    assert len(iaas.ports) == 1
    assert len(writer.patches) == 1
    assert sum(c.startswith("create_port") for c in iaas.calls) == 1


def test_pod_outside_tenant_namespaces_is_left_alone(world):
    ctl, pods, iaas, writer, _ = world
    pods.put(pod("x", ns="plain"))
    ctl.sync_pod("plain/x")
    assert iaas.ports == {} and writer.patches == []


def test_host_network_and_finished_pods_get_no_port(world):
    ctl, pods, iaas, _, _ = world
    hostnet = pod("h")
    hostnet["spec"]["hostNetwork"] = True
    done = pod("d")
    done["status"]["phase"] = "Succeeded"
    pods.put(hostnet)
    pods.put(done)
    ctl.sync_pod("tenant-a/h")
    ctl.sync_pod("tenant-a/d")
    assert iaas.ports == {}


def test_deleted_pod_frees_its_port(world):
    ctl, pods, iaas, _, _ = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    ip = iaas.get_port("pod-u1").ip
    pods.remove("tenant-a/web")
    ctl.sync_pod("tenant-a/web")
    assert iaas.ports == {}
    assert ip not in iaas.alloc["a"].in_use()


def test_recreated_pod_with_same_name_replaces_the_old_port(world):
    ctl, pods, iaas, _, _ = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    pods.put(pod("web", uid="u2"))
    ctl.sync_pod("tenant-a/web")
    assert set(iaas.ports) == {"pod-u2"}
    assert annotation_of(pods, "tenant-a/web").port_id == "pod-u2"


def test_pod_on_another_tenants_node_is_not_bound(world):
    ctl, pods, iaas, _, rec = world
    pods.put(pod("intruder", ns="tenant-b", uid="u9", node="a-1"))
    ctl.sync_pod("tenant-b/intruder")
    assert iaas.get_port("pod-u9").node is None
    mismatch = [e for e in rec.events if e[2] == "TenantMismatch"]
    assert mismatch and 'tenant "b"' in mismatch[0][3] and '"a-1"' in mismatch[0][3]


def test_missing_tenant_object_is_retried_with_an_event(world):
    ctl, pods, _, _, rec = world
    ctl.caches.namespaces.put(namespace("tenant-c", "c"))
    pods.put(pod("p", ns="tenant-c"))
    with pytest.raises(TenantNotReady):
        ctl.sync_pod("tenant-c/p")
    assert rec.events[-1][2] == "TenantNotReady"


def test_namespace_leaving_its_tenant_frees_ports(world):
    ctl, pods, iaas, _, _ = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    ctl.caches.namespaces.put(namespace("tenant-a", None))
    ctl.sync_pod("tenant-a/web")
    assert iaas.ports == {}


def test_tenant_status_reports_network_and_counts(world):
    ctl, pods, _, writer, _ = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    ctl.sync_tenant("a")
    st = writer.statuses["a"]
    assert st["networkId"] == "netctl-a"
    assert st["ports"]["bound"] == 1
    assert st["conditions"][0]["type"] == "Ready" and st["conditions"][0]["status"] == "True"


def test_resync_deletes_orphans_and_enqueues_repairs(world):
    ctl, pods, iaas, _, _ = world
    for i in range(3):
        pods.put(pod(f"p{i}", uid=f"u{i}", node="a-1"))
        ctl.sync_pod(f"tenant-a/p{i}")
    # while "down": p0 deleted, p3 created, p1's annotation damaged, p2 rescheduled elsewhere
    pods.remove("tenant-a/p0")
    pods.put(pod("p3", uid="u3", node="a-2"))
    pods.get("tenant-a/p1")["metadata"]["annotations"][PORT_ANNOTATION] = "{garbage"
    pods.get("tenant-a/p2")["spec"]["nodeName"] = "a-2"
    queued: list[str] = []
    plan = ctl.resync(queued.append, lambda t: None)
    assert plan.orphan_ports == ("pod-u0",)
    assert "pod-u0" not in iaas.ports
    assert sorted(queued) == ["tenant-a/p1", "tenant-a/p2", "tenant-a/p3"]
    for key in queued:
        ctl.sync_pod(key)
    assert ctl.plan().empty
    ips = [p.ip for p in iaas.ports.values()]
    assert len(ips) == len(set(ips)) == 3


def test_gateway_defaults_to_first_host_and_is_never_allocated(world):
    ctl, pods, iaas, _, _ = world
    for i in range(5):
        pods.put(pod(f"p{i}", uid=f"u{i}"))
        ctl.sync_pod(f"tenant-a/p{i}")
    assert iaas.get_network("a").gateway == "10.1.0.1"
    assert "10.1.0.1" not in {p.ip for p in iaas.ports.values()}
    assert annotation_of(pods, "tenant-a/p0").gateway == "10.1.0.1"
