"""The optional public NIC in the controller: request parsing, the pod's public port, its resync."""

from __future__ import annotations

from typing import Any

import pytest

from netctl.annotations import (
    PORT_ANNOTATION,
    PUBLIC_IP_ANNOTATION,
    PUBLIC_NETWORK,
    PUBLIC_PORT_ANNOTATION,
    AnnotationError,
    PortAnnotation,
    public_ip_requested,
)
from netctl.controller.ports import Caches, PortController
from netctl.controller.public import PublicConfig, plan_public, public_port_id
from netctl.iaas.base import Port, PortOwner
from tests.fakes import FakeCache, FakeIaaS, FakeRecorder, FakeWriter, namespace, node, pod, tenant

PUBLIC = PublicConfig("203.0.113.0/24")


def make(public: PublicConfig | None = PUBLIC) -> tuple[PortController, FakeCache, FakeIaaS, FakeWriter, FakeRecorder]:
    pods = FakeCache()
    caches = Caches(
        pods=pods,
        namespaces=FakeCache([namespace("tenant-a", "a"), namespace("tenant-b", "b")]),
        tenants=FakeCache([tenant("a", "10.1.0.0/24"), tenant("b", "10.2.0.0/24")]),
        nodes=FakeCache([node("a-1", "a"), node("b-1", "b")]),
    )
    iaas, writer, rec = FakeIaaS(), FakeWriter(pods), FakeRecorder()
    return PortController(caches, iaas, writer, rec, public=public), pods, iaas, writer, rec


def public_pod(name: str, uid: str, value: str = "true", **kw: Any) -> dict[str, Any]:
    p = pod(name, uid=uid, **kw)
    p["metadata"]["annotations"][PUBLIC_IP_ANNOTATION] = value
    return p


def anns(pods: FakeCache, key: str) -> dict[str, str]:
    return dict(pods.get(key)["metadata"]["annotations"])


@pytest.mark.parametrize(("value", "want"), [(None, False), ("false", False), ("true", True)])
def test_public_ip_request_values(value: str | None, want: bool) -> None:
    assert public_ip_requested(value) is want


@pytest.mark.parametrize("value", ["True", "yes", "1", "", " true", 1, True])
def test_malformed_public_ip_request_is_refused_with_its_value(value: object) -> None:
    with pytest.raises(AnnotationError, match=PUBLIC_IP_ANNOTATION):
        public_ip_requested(value)


def test_public_port_errors_name_the_public_annotation() -> None:
    with pytest.raises(AnnotationError, match=PUBLIC_PORT_ANNOTATION):
        PortAnnotation.from_json("{", PUBLIC_PORT_ANNOTATION)


def test_requesting_pod_gets_a_public_port_and_both_annotations_in_one_patch() -> None:
    ctl, pods, iaas, writer, rec = make()
    pods.put(public_pod("web", "u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    port = iaas.get_port(public_port_id("u1"))
    assert port is not None and port.tenant == PUBLIC_NETWORK and port.node == "a-1"
    assert port.owner == PortOwner("pod", "web", "tenant-a", "u1", PUBLIC_NETWORK) and port.state == "bound"
    a = anns(pods, "tenant-a/web")
    public = PortAnnotation.from_json(a[PUBLIC_PORT_ANNOTATION], PUBLIC_PORT_ANNOTATION)
    tenant_port = PortAnnotation.from_json(a[PORT_ANNOTATION])
    assert public.port_id == "pub-u1" and public.ip == f"{port.ip}/24" and public.gateway == "203.0.113.1"
    assert public.network_id == "netctl-public" and public.mac == port.mac
    assert tenant_port.port_id == "pod-u1" and tenant_port.tenant == "a"
    assert port.ip != "203.0.113.1"  # the gateway is never handed out
    assert len(writer.patches) == 1
    assert "PublicPortCreated" in [e[2] for e in rec.events]
    # idempotent: no second port, no second patch
    for _ in range(3):
        ctl.sync_pod("tenant-a/web")
    assert len(writer.patches) == 1 and sum(c == "create_port pub-u1" for c in iaas.calls) == 1


def test_pod_without_the_request_gets_no_public_port() -> None:
    ctl, pods, iaas, _, _ = make()
    pods.put(pod("web", uid="u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1") is None and PUBLIC_PORT_ANNOTATION not in anns(pods, "tenant-a/web")
    assert iaas.get_network(PUBLIC_NETWORK) is None  # nothing asked: the provider switch is made at resync


def test_malformed_request_is_an_event_not_a_retry_loop() -> None:
    ctl, pods, iaas, _, rec = make()
    pods.put(public_pod("web", "u1", value="yes", node="a-1"))
    ctl.sync_pod("tenant-a/web")  # does not raise: retrying cannot fix a typo
    assert iaas.get_port("pub-u1") is None
    warning = [e for e in rec.events if e[2] == "PublicIPInvalid"]
    assert warning and "'yes'" in warning[0][3] and PUBLIC_IP_ANNOTATION in warning[0][3]
    assert PORT_ANNOTATION in anns(pods, "tenant-a/web")  # the tenant NIC is unaffected


def test_request_with_the_feature_off_is_an_event() -> None:
    ctl, pods, iaas, _, rec = make(public=None)
    pods.put(public_pod("web", "u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1") is None
    assert [e[2] for e in rec.events if e[1] == "Warning"] == ["PublicIPUnavailable"]


def test_public_address_stays_when_the_request_is_withdrawn_and_goes_with_the_pod() -> None:
    ctl, pods, iaas, _, _ = make()
    pods.put(public_pod("web", "u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    ip = iaas.get_port("pub-u1").ip
    pods.get("tenant-a/web")["metadata"]["annotations"].pop(PUBLIC_IP_ANNOTATION)
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1").ip == ip
    pods.remove("tenant-a/web")
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1") is None and iaas.get_port("pod-u1") is None


def test_terminating_pod_gets_no_new_public_port() -> None:
    ctl, pods, iaas, _, _ = make()
    pods.put(pod("web", uid="u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")  # its tenant port and annotation
    p = pods.get("tenant-a/web")
    p["metadata"]["annotations"][PUBLIC_IP_ANNOTATION] = "true"
    p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1") is None
    assert plan_public([p], {"tenant-a/web": "a"}, [], "203.0.113.1", 1400, enabled=True).pods_to_sync == ()


def test_public_port_is_deleted_never_pooled() -> None:
    from netctl.controller.pools import PoolConfig

    ctl, pods, iaas, _, _ = make()
    ctl.pool = PoolConfig(min=2)
    pods.put(public_pod("web", "u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    pods.remove("tenant-a/web")
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1") is None
    assert iaas.list_ports(tenant=PUBLIC_NETWORK) == []  # nothing went into a public "pool"


def test_recreated_pod_gets_a_new_public_port_and_the_old_one_goes() -> None:
    ctl, pods, iaas, _, _ = make()
    pods.put(public_pod("web", "u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    pods.put(public_pod("web", "u2", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    assert iaas.get_port("pub-u1") is None and iaas.get_port("pub-u2") is not None


def test_two_tenants_share_the_provider_network_with_distinct_addresses() -> None:
    ctl, pods, iaas, _, _ = make()
    pods.put(public_pod("a", "ua", node="a-1"))
    pods.put(public_pod("b", "ub", ns="tenant-b", node="b-1"))
    ctl.sync_pod("tenant-a/a")
    ctl.sync_pod("tenant-b/b")
    pa, pb = iaas.get_port("pub-ua"), iaas.get_port("pub-ub")
    assert pa.network_id == pb.network_id == "netctl-public" and pa.ip != pb.ip and pa.mac != pb.mac


def test_reserved_tenant_name_is_refused() -> None:
    from netctl.controller.ports import TenantNotReady

    ctl, _, iaas, _, _ = make()
    ctl.caches.tenants.put(tenant(PUBLIC_NETWORK, "10.9.0.0/24"))
    with pytest.raises(TenantNotReady, match="reserved"):
        ctl.sync_tenant(PUBLIC_NETWORK)
    assert iaas.get_network(PUBLIC_NETWORK) is None


def test_resync_ensures_the_network_deletes_orphans_and_repairs_missing_ports() -> None:
    ctl, pods, iaas, _, _ = make()
    pods.put(public_pod("web", "u1", node="a-1"))
    pods.put(public_pod("api", "u2", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    ctl.sync_pod("tenant-a/api")
    ip = iaas.get_port("pub-u1").ip
    net = iaas.get_network(PUBLIC_NETWORK)
    # an orphan (its pod vanished while no controller ran) and a lost port
    iaas.create_port(net, PortOwner("pod", "ghost", "tenant-a", "gone", PUBLIC_NETWORK), "pub-gone")
    iaas.delete_ports(["pub-u2"])
    queued: list[str] = []
    plan = ctl.resync(queued.append, lambda t: None)
    assert plan.public_freed == ("pub-gone",) and iaas.get_port("pub-gone") is None
    assert queued == ["tenant-a/api"]
    for key in queued:
        ctl.sync_pod(key)
    assert iaas.get_port("pub-u1").ip == ip  # untouched
    assert iaas.get_port("pub-u2") is not None
    # tenant ports are not mistaken for duplicates of the public ones (or the other way round)
    assert iaas.get_port("pod-u1") is not None and ctl.plan().empty


def test_plan_public_keeps_the_annotated_one_of_duplicates() -> None:
    def port(pid: str, ip: str) -> Port:
        return Port(pid, "netctl-public", PUBLIC_NETWORK, "0a:58:cb:00:71:05", ip, 24,
                    PortOwner("pod", "web", "tenant-a", "u1", PUBLIC_NETWORK), "a-1", (), "bound")

    keep, extra = port("pub-u1", "203.0.113.5"), port("pub-zz", "203.0.113.6")
    p = public_pod("web", "u1", node="a-1")
    from netctl.controller.reconcile import expected_annotation

    p["metadata"]["annotations"][PUBLIC_PORT_ANNOTATION] = expected_annotation(keep, "203.0.113.1", 1400).to_json()
    plan = plan_public([p], {"tenant-a/web": "a"}, [extra, keep], "203.0.113.1", 1400, enabled=True)
    assert plan.duplicates == ("pub-zz",) and plan.orphans == () and plan.pods_to_sync == ()
    # the namespace left its tenant: the pod is no longer networked, its public port goes
    plan = plan_public([p], {"tenant-a/web": None}, [keep], "203.0.113.1", 1400, enabled=True)
    assert plan.orphans == ("pub-u1",)
