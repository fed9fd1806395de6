"""Nested-mode decisions of PortController (Tenant spec.mode nested-vlan / nested-nic), against fakes."""

from __future__ import annotations

from typing import Any

import pytest

from netctl.annotations import PORT_ANNOTATION, VM_PORT_ANNOTATION, PortAnnotation
from netctl.controller.pools import PoolConfig
from netctl.controller.ports import Caches, PortController
from netctl.iaas.base import PortNotFound, PortOwner
from tests.fakes import FakeCache, FakeIaaS, FakeRecorder, FakeWriter, namespace, node, pod, tenant


def nested_tenant(name: str, cidr: str, mode: str) -> dict[str, Any]:
    obj = tenant(name, cidr)
    obj["spec"]["mode"] = mode
    return obj


@pytest.fixture
def world():
    pods = FakeCache()
    vm_node = node("v-3", "v")
    vm_node["metadata"]["annotations"] = {VM_PORT_ANNOTATION: "vm-three"}
    caches = Caches(
        pods=pods,
        namespaces=FakeCache([namespace("tenant-v", "v"), namespace("tenant-n", "n")]),
        tenants=FakeCache([nested_tenant("v", "10.1.0.0/24", "nested-vlan"),
                           nested_tenant("n", "10.2.0.0/24", "nested-nic")]),
        nodes=FakeCache([node("v-1", "v"), node("v-2", "v"), vm_node, node("n-1", "n")]),
    )
    iaas = FakeIaaS()
    ctl = PortController(caches, iaas, FakeWriter(pods), FakeRecorder())
    for name, tenant_name in (("v-1", "v"), ("v-2", "v"), ("n-1", "n")):
        net = ctl.network_for(tenant_name)
        iaas.create_port(net, PortOwner("node", name, None, None, tenant_name), f"node-{name}", node=name)
    iaas.create_port(ctl.network_for("v"), PortOwner("node", "v-3", None, None, "v"), "vm-three", node="v-3")
    iaas.calls.clear()
    return ctl, pods, iaas


def annotation(pods: FakeCache, key: str) -> PortAnnotation | None:
    raw = pods.get(key)["metadata"]["annotations"].get(PORT_ANNOTATION)
    return PortAnnotation.from_json(raw) if raw else None


def reasons(ctl: PortController) -> list[str]:
    assert isinstance(ctl.recorder, FakeRecorder)
    return [e[2] for e in ctl.recorder.events]


def test_vlan_subport_per_pod_on_its_vms_nic_and_annotation_only_once_scheduled(world):
    ctl, pods, iaas = world
    pods.put(pod("a", ns="tenant-v", uid="ua"))
    ctl.sync_pod("tenant-v/a")
    assert iaas.get_port("pod-ua") is not None and annotation(pods, "tenant-v/a") is None  # the CNI waits
    for name, uid in (("a", "ua"), ("b", "ub")):
        pods.put(pod(name, ns="tenant-v", uid=uid, node="v-1"))
        ctl.sync_pod(f"tenant-v/{name}")
    a, b = annotation(pods, "tenant-v/a"), annotation(pods, "tenant-v/b")
    assert a is not None and b is not None and (a.vlan, b.vlan) == (1, 2)
    assert iaas.get_port("pod-ua").parent == "node-v-1" and iaas.get_port("pod-ub").parent == "node-v-1"
    assert not any(c.startswith("bind_port") for c in iaas.calls)  # bound where the parent is
    assert reasons(ctl).count("SubportAttached") == 2
    # another VM's trunk starts at 1 again; the Node's vm-port annotation names the parent
    pods.put(pod("c", ns="tenant-v", uid="uc", node="v-3"))
    ctl.sync_pod("tenant-v/c")
    assert iaas.get_port("pod-uc").parent == "vm-three" and annotation(pods, "tenant-v/c").vlan == 1
    calls = list(iaas.calls)
    for key in ("tenant-v/a", "tenant-v/b", "tenant-v/c"):
        ctl.sync_pod(key)
    assert iaas.calls == calls  # idempotent


def test_freed_vlan_id_is_reused_and_a_pooled_port_has_no_parent(world):
    ctl, pods, iaas = world
    ctl.pool = PoolConfig(min=1, max=4)
    for name in ("a", "b"):
        pods.put(pod(name, ns="tenant-v", uid=f"u{name}", node="v-1"))
        ctl.sync_pod(f"tenant-v/{name}")
    pods.remove("tenant-v/a")
    ctl.sync_pod("tenant-v/a")
    pooled = iaas.pooled_ports("v")
    assert len(pooled) == 1 and pooled[0].parent is None and pooled[0].vlan is None
    pods.put(pod("c", ns="tenant-v", uid="uc", node="v-1"))
    ctl.sync_pod("tenant-v/c")
    c = annotation(pods, "tenant-v/c")
    assert c is not None and c.port_id == pooled[0].id and c.vlan == 1  # a's VLAN, free again


def test_nic_is_hot_plugged_before_the_annotation_and_unplugged_before_the_port_goes(world):
    ctl, pods, iaas = world
    pods.put(pod("w", ns="tenant-n", uid="uw", node="n-1"))
    ctl.sync_pod("tenant-n/w")
    ann = annotation(pods, "tenant-n/w")
    assert ann is not None and ann.vlan is None and iaas.plugged == {"pod-uw": "node-n-1"}
    assert "PortHotplugged" in reasons(ctl)
    hot = iaas.calls.index("hotplug_port pod-uw node-n-1")
    assert not any(c.startswith("bind_port") for c in iaas.calls[hot:])
    ctl.sync_pod("tenant-n/w")
    assert iaas.calls.count("hotplug_port pod-uw node-n-1") == 1
    pods.remove("tenant-n/w")
    ctl.sync_pod("tenant-n/w")
    assert iaas.plugged == {} and iaas.get_port("pod-uw") is None
    assert iaas.calls.index("unplug_port pod-uw") < iaas.calls.index("delete_port pod-uw")


def test_resync_unplugs_orphans_of_nic_tenants(world):
    ctl, pods, iaas = world
    pods.put(pod("w", ns="tenant-n", uid="uw", node="n-1"))
    ctl.sync_pod("tenant-n/w")
    pods.remove("tenant-n/w")  # gone while no controller ran: an orphan for the resync
    ctl._seen_uids.clear()
    plan = ctl.resync(lambda key: None, lambda t: None)
    assert "pod-uw" in plan.orphan_ports and iaas.plugged == {} and iaas.get_port("pod-uw") is None


def test_missing_vm_port_is_an_event_and_no_annotation(world):
    ctl, pods, iaas = world
    iaas.delete_port("node-v-2")
    pods.put(pod("x", ns="tenant-v", uid="ux", node="v-2"))
    with pytest.raises(PortNotFound):
        ctl.sync_pod("tenant-v/x")
    assert annotation(pods, "tenant-v/x") is None
    ev = ctl.recorder.events[-1]
    assert ev[1:3] == ("Warning", "PortFailed") and "node-v-2" in ev[3] and "v-2" in ev[3]


def test_unknown_mode_is_ovs(world):
    ctl, _, _ = world
    ctl.caches.tenants.put(nested_tenant("z", "10.9.0.0/24", "nested-bogus"))
    assert ctl.mode_of("z") == "ovs" and ctl.mode_of("v") == "nested-vlan" and ctl.mode_of("none") == "ovs"


def test_settled_nested_pods_are_not_requeued_by_the_resync(world):
    ctl, pods, iaas = world
    for name, ns, node_name in (("a", "tenant-v", "v-1"), ("w", "tenant-n", "n-1")):
        pods.put(pod(name, ns=ns, uid=f"u{name}", node=node_name))
        ctl.sync_pod(f"{ns}/{name}")
    assert ctl.plan().pods_to_sync == ()  # no node binding to "repair": the IaaS binds nested ports
    iaas.detach_subport("pod-ua")  # the subport undone behind our back: the annotation's VLAN is stale
    assert ctl.plan().pods_to_sync == ("tenant-v/a",)
    ctl.sync_pod("tenant-v/a")
    assert iaas.get_port("pod-ua").parent == "node-v-1" and ctl.plan().pods_to_sync == ()


@pytest.mark.parametrize("ns,node_name", [("tenant-v", "v-1"), ("tenant-n", "n-1")])
def test_public_port_goes_to_the_vm_like_the_tenant_port(world, ns, node_name):
    from netctl.annotations import PUBLIC_IP_ANNOTATION, PUBLIC_PORT_ANNOTATION
    from netctl.controller.public import PublicConfig

    ctl, pods, iaas = world
    ctl.public = PublicConfig("203.0.113.0/24")
    p = pod("pub", ns=ns, uid="up", node=node_name)
    p["metadata"]["annotations"] = {PUBLIC_IP_ANNOTATION: "true"}
    pods.put(p)
    ctl.sync_pod(f"{ns}/pub")
    raw = pods.get(f"{ns}/pub")["metadata"]["annotations"][PUBLIC_PORT_ANNOTATION]
    public = PortAnnotation.from_json(raw, PUBLIC_PORT_ANNOTATION)
    tenant_port = annotation(pods, f"{ns}/pub")
    assert public.tenant == "public" and tenant_port is not None
    if ns == "tenant-v":  # a second VLAN under the same VM NIC, on the provider switch
        assert sorted([tenant_port.vlan, public.vlan]) == [1, 2]
        assert iaas.get_port(public.port_id).parent == "node-v-1"
    else:
        assert public.vlan is None and iaas.plugged == {"pod-up": "node-n-1", public.port_id: "node-n-1"}
    assert not any(c.startswith("bind_port") for c in iaas.calls)
    assert ctl.plan().pods_to_sync == ()
    pods.remove(f"{ns}/pub")
    ctl.sync_pod(f"{ns}/pub")
    assert iaas.get_port(public.port_id) is None and iaas.plugged == {}
