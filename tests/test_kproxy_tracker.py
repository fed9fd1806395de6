"""Service/EndpointSlice parsing and the change tracker (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.model import Endpoint, ModelError, ServicePortName, parse_service, parse_slice
from kproxy.tracker import ChangeTracker


def svc(name: str = "web", ns: str = "a", ip: str | None = "10.96.0.10", ports: list[dict[str, Any]] | None = None,
        **spec: Any) -> dict[str, Any]:
    labels = spec.pop("labels", {})
    status = spec.pop("status", {})
    body: dict[str, Any] = {"clusterIP": ip, "ports": ports if ports is not None else
                            [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"}]}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": body, "status": status}


def eps(service: str = "web", ns: str = "a", name: str | None = None, addrs: list[Any] | None = None,
        ports: list[dict[str, Any]] | None = None, version: str = "v1",
        nodes: dict[str, str] | None = None) -> dict[str, Any]:
    """addrs: ip strings (ready) or (ip, conditions) tuples; nodes: ip -> node name (default n1)."""
    endpoints = []
    for a in addrs if addrs is not None else ["10.1.0.5"]:
        ip, cond = (a, {"ready": True}) if isinstance(a, str) else a
        e: dict[str, Any] = {"addresses": [ip], "conditions": cond}
        node = (nodes or {}).get(ip, "n1")
        if version == "v1":
            e["nodeName"] = node
        else:
            e["topology"] = {"kubernetes.io/hostname": node}
        endpoints.append(e)
    return {"apiVersion": f"discovery.k8s.io/{version}", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"namespace": ns, "name": name or f"{service}-abc",
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


HTTP = ServicePortName("a", "web", "http")


def test_parse_service_fields() -> None:
    s = svc(ports=[{"name": "http", "port": 80, "nodePort": 30080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            externalIPs=["192.0.2.7", "2001:db8::1"], sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}, externalTrafficPolicy="Local",
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}, {"hostname": "lb.example"}]}})
    http, dns = parse_service(s)
    assert http.name == HTTP and http.protocol == "TCP" and http.port == 80 and http.node_port == 30080
    assert http.external_ips == ("192.0.2.7",) and http.lb_ips == ("198.51.100.9",)
    assert http.session_affinity and http.affinity_timeout == 60 and http.external_traffic_local
    assert not http.internal_traffic_local
    assert http.frontend_ips == ("10.96.0.10", "192.0.2.7", "198.51.100.9")
    assert dns.protocol == "UDP" and dns.node_port is None


@pytest.mark.parametrize("obj", [
    svc(ip="None"),
    svc(ip=None, type="ExternalName", externalName="example.com"),
    svc(labels={"service.kubernetes.io/service-proxy-name": "other"}),
    svc(ip="fd00::10"),
])
def test_skipped_services(obj: dict[str, Any]) -> None:
    assert parse_service(obj) == ()


def test_proxy_name_label_matching_us_is_kept() -> None:
    s = svc(labels={"service.kubernetes.io/service-proxy-name": "kproxy"})
    assert parse_service(s, "kproxy") and not parse_service(s, None)


def test_bad_protocol_names_the_object() -> None:
    with pytest.raises(ModelError, match=r"a/web.*ICMP"):
        parse_service(svc(ports=[{"port": 1, "protocol": "ICMP"}]))


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_slice_conditions_and_node(version: str) -> None:
    sl = parse_slice(eps(version=version, addrs=[
        "10.1.0.5",
        ("10.1.0.6", {}),  # unknown -> ready
        ("10.1.0.7", {"ready": False, "serving": True, "terminating": True}),
        ("fd00::1", {"ready": True}),
    ]))
    assert sl is not None
    assert sl.endpoints == (("10.1.0.5", True, True, False, "n1"), ("10.1.0.6", True, True, False, "n1"),
                            ("10.1.0.7", False, True, True, "n1"))


def test_slice_other_address_type_or_unowned_ignored() -> None:
    assert parse_slice({**eps(), "addressType": "IPv6"}) is None
    unowned = eps()
    unowned["metadata"]["labels"] = {}
    assert parse_slice(unowned) is None


def test_endpoints_matched_by_port_name_and_protocol() -> None:
    t = ChangeTracker()
    t.update_service(svc(ports=[{"name": "http", "port": 80}, {"name": "metrics", "port": 9000}]))
    t.update_slice(eps(ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                              {"name": "metrics", "port": 9100, "protocol": "TCP"},
                              {"name": "http", "port": 8081, "protocol": "UDP"}]))
    t.apply()
    assert [e.port for e in t.state(HTTP).endpoints] == [8080]  # type: ignore[union-attr]
    assert [e.port for e in t.state(ServicePortName("a", "web", "metrics")).endpoints] == [9100]  # type: ignore[union-attr]


def test_fallback_to_serving_terminating() -> None:
    t = ChangeTracker()
    t.update_service(svc())
    t.update_slice(eps(addrs=[("10.1.0.7", {"ready": False, "serving": True, "terminating": True}),
                              ("10.1.0.8", {"ready": False, "serving": False, "terminating": True})]))
    t.apply()
    state = t.state(HTTP)
    assert state is not None
    assert [e.ip for e in state.usable_endpoints()] == ["10.1.0.7"]
    t.update_slice(eps(name="web-2", addrs=["10.1.0.9"]))
    t.apply()
    assert [e.ip for e in t.state(HTTP).usable_endpoints()] == ["10.1.0.9"]  # type: ignore[union-attr]


def test_usable_endpoints_on_one_node_fall_back_per_node() -> None:
    """Traffic policy Local: the ready/terminating fallback is decided among that node's endpoints."""
    t = ChangeTracker()
    t.update_service(svc())
    t.update_slice(eps(addrs=["10.1.0.5", ("10.1.0.6", {"ready": False, "serving": True, "terminating": True}),
                              ("10.1.0.7", {"ready": False, "serving": False, "terminating": True})],
                       nodes={"10.1.0.5": "n1", "10.1.0.6": "n2", "10.1.0.7": "n2"}))
    t.apply()
    state = t.state(HTTP)
    assert state is not None
    assert [e.ip for e in state.usable_endpoints()] == ["10.1.0.5"]
    assert [e.ip for e in state.usable_endpoints("n1")] == ["10.1.0.5"]
    assert [e.ip for e in state.usable_endpoints("n2")] == ["10.1.0.6"]  # no ready one there: serving+terminating
    assert state.usable_endpoints("n3") == ()


def test_apply_returns_changed_ports_and_moves_on() -> None:
    t = ChangeTracker()
    assert t.update_service(svc())
    assert t.update_slice(eps())
    assert t.apply() == {HTTP}
    assert t.apply() == frozenset()
    state = t.state(HTTP)
    assert state is not None and state.endpoints == (Endpoint("10.1.0.5", 8080, node_name="n1"),)
    t.update_slice(eps(addrs=["10.1.0.5", "10.1.0.6"]))
    assert t.apply() == {HTTP}


def test_changes_that_cancel_out_are_dropped() -> None:
    t = ChangeTracker()
    t.update_service(svc())
    t.update_slice(eps())
    t.apply()
    assert t.update_slice(eps(addrs=["10.1.0.6"]))
    assert not t.update_slice(eps())  # back to the applied state
    assert t.pending() == 0 and t.apply() == frozenset()
    t.update_service(svc(name="new"))
    t.update_service(svc(name="new"), deleted=True)
    assert t.pending() == 0


def test_unrelated_field_change_is_not_a_change() -> None:
    t = ChangeTracker()
    t.update_service(svc())
    t.apply()
    s = svc()
    s["metadata"]["annotations"] = {"x": "y"}
    assert not t.update_service(s)


def test_delete_service_and_port_rename() -> None:
    t = ChangeTracker()
    t.update_service(svc())
    t.update_slice(eps())
    t.apply()
    t.update_service(svc(ports=[{"name": "web", "port": 80}]))
    assert t.apply() == {HTTP, ServicePortName("a", "web", "web")}
    assert t.state(HTTP) is None
    t.update_service(svc(), deleted=True)
    assert t.apply() == {ServicePortName("a", "web", "web")}
    assert t.all_states() == {}


def test_slice_delete_and_relabel() -> None:
    t = ChangeTracker()
    t.update_service(svc())
    t.update_service(svc(name="other", ip="10.96.0.11"))
    t.update_slice(eps())
    t.apply()
    t.update_slice(eps(service="other", name="web-abc"))  # same slice name, now owned by "other"
    assert t.apply() == {HTTP, ServicePortName("a", "other", "http")}
    assert t.state(HTTP).endpoints == ()  # type: ignore[union-attr]
    t.update_slice(eps(service="other", name="web-abc"), deleted=True)
    assert t.apply() == {ServicePortName("a", "other", "http")}


def test_duplicate_address_across_slices_kept_once_preferring_ready() -> None:
    t = ChangeTracker()
    t.update_service(svc())
    t.update_slice(eps(name="s1", addrs=[("10.1.0.5", {"ready": False})]))
    t.update_slice(eps(name="s2", addrs=["10.1.0.5"]))
    t.apply()
    state = t.state(HTTP)
    assert state is not None and len(state.endpoints) == 1 and state.endpoints[0].ready
