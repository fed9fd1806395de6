"""What kproxy knows about Services and endpoints, parsed from API JSON into immutable values.

Pure: no I/O, no Kubernetes client. Input dicts are the API server's JSON (camelCase keys, as an
informer or ``kubectl get -o json`` delivers them). Values are frozen and hashable so the change
tracker can compare "before" and "after" with ``==`` and drop no-op updates.

Only IPv4 is modelled: the table is family ``ip`` (see ``render``); IPv6 cluster IPs, external
IPs and endpoint addresses are ignored here rather than half-handled later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HOSTNAME_TOPOLOGY_KEY = "kubernetes.io/hostname"
PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_AFFINITY_TIMEOUT = 10800


class ModelError(ValueError):
    """An object that cannot be parsed; the message names the object and the field."""


@dataclass(frozen=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class ServicePortName:
    """Identity of one port of one Service: ``namespace/name:port-name`` (port name may be empty)."""

    namespace: str
    name: str
    port_name: str

    @property
    def service(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name}"


@dataclass(frozen=True)
class ServicePort:
    name: ServicePortName
    cluster_ip: str
    protocol: str  # "TCP" | "UDP" | "SCTP"
    port: int
    node_port: int | None = None
    session_affinity: bool = False
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    external_traffic_local: bool = False
    internal_traffic_local: bool = False

    @property
    def frontend_ips(self) -> tuple[str, ...]:
        """Every destination address this port is reachable at: cluster IP, externalIPs, LB IPs."""
        seen: dict[str, None] = {self.cluster_ip: None}
        for ip in (*self.external_ips, *self.lb_ips):
            seen.setdefault(ip, None)
        return tuple(seen)


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None


@dataclass(frozen=True)
class ServicePortState:
    """One service port with the endpoints that back it (sorted, de-duplicated)."""

    port: ServicePort
    endpoints: tuple[Endpoint, ...] = ()

    def usable_endpoints(self, node: str | None = None) -> tuple[Endpoint, ...]:
        """Ready endpoints; when none are ready, serving+terminating ones (graceful shutdown).

        With ``node``, only the endpoints on that node (traffic policy ``Local``), the fallback to
        terminating ones applied to that subset alone, as kube-proxy does.
        """
        pool = self.endpoints if node is None else tuple([e for e in self.endpoints if e.node_name == node])
        ready = [e for e in pool if e.ready]  # list comprehensions: this runs per port on every full sync
        if len(ready) == len(pool) and pool:
            return pool
        if ready:
            return tuple(ready)
        return tuple([e for e in pool if e.serving and e.terminating])


@dataclass(frozen=True)
class SlicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class Slice:
    """The parts of an EndpointSlice (v1 or v1beta1) kproxy uses."""

    namespace: str
    name: str
    service: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[tuple[str, bool, bool, bool, str | None], ...]  # (ip, ready, serving, terminating, node)

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service)


def _is_ipv4(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def _ipv4s(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(sorted({v for v in values if _is_ipv4(v)}))


def object_key(obj: Mapping[str, Any]) -> ServiceKey:
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace"), meta.get("name")
    if not isinstance(ns, str) or not isinstance(name, str) or not ns or not name:
        raise ModelError("object has no metadata.namespace/metadata.name")
    return ServiceKey(ns, name)


def is_proxied(service: Mapping[str, Any], proxy_name: str | None) -> bool:
    """Whether this proxy handles the Service at all.

    Skipped, as kube-proxy does: Services labelled for another proxy
    (``service.kubernetes.io/service-proxy-name``), headless Services and ExternalName Services.
    """
    labels = (service.get("metadata") or {}).get("labels") or {}
    if PROXY_NAME_LABEL in labels and labels[PROXY_NAME_LABEL] != proxy_name:
        return False
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return False
    return _is_ipv4(spec.get("clusterIP"))


def parse_service(service: Mapping[str, Any], proxy_name: str | None = None) -> tuple[ServicePort, ...]:
    """Service JSON -> its ports; empty when the proxy must not handle it (see ``is_proxied``)."""
    key = object_key(service)
    if not is_proxied(service, proxy_name):
        return ()
    spec = service.get("spec") or {}
    status_lb = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    lb_ips = _ipv4s(i.get("ip") for i in status_lb if isinstance(i, Mapping))
    affinity = spec.get("sessionAffinity") == "ClientIP"
    timeout = DEFAULT_AFFINITY_TIMEOUT
    if affinity:
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        timeout = int(cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT)
    out = []
    for i, p in enumerate(spec.get("ports") or []):
        protocol = p.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            raise ModelError(f"service {key}: ports[{i}].protocol {protocol!r} is not one of {PROTOCOLS}")
        port = p.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ModelError(f"service {key}: ports[{i}].port {port!r} is not a port number")
        out.append(
            ServicePort(
                name=ServicePortName(key.namespace, key.name, p.get("name") or ""),
                cluster_ip=spec["clusterIP"],
                protocol=protocol,
                port=port,
                node_port=p.get("nodePort") or None,
                session_affinity=affinity,
                affinity_timeout=timeout,
                external_ips=_ipv4s(spec.get("externalIPs") or []),
                lb_ips=lb_ips,
                external_traffic_local=spec.get("externalTrafficPolicy") == "Local",
                internal_traffic_local=spec.get("internalTrafficPolicy") == "Local",
            )
        )
    return tuple(out)


def parse_slice(obj: Mapping[str, Any]) -> Slice | None:
    """EndpointSlice JSON (``discovery.k8s.io/v1`` or ``v1beta1``) -> ``Slice``.

    None when the slice is of no use to an IPv4 proxy (another address type, or not owned by a
    Service). Differences handled: v1beta1 names the node in ``topology["kubernetes.io/hostname"]``,
    v1 in ``nodeName``. Missing conditions follow the API's rules: ``ready`` unknown means ready,
    ``serving`` unknown means ``ready``, ``terminating`` unknown means not terminating.
    """
    key = object_key(obj)
    if obj.get("addressType") != "IPv4":
        return None
    labels = (obj.get("metadata") or {}).get("labels") or {}
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        return None
    ports = []
    for p in obj.get("ports") or []:
        if p.get("port") is None:
            continue  # "all ports" slices are not used by Services with ports
        ports.append(SlicePort(p.get("name") or "", int(p["port"]), p.get("protocol") or "TCP"))
    endpoints = []
    for e in obj.get("endpoints") or []:
        cond = e.get("conditions") or {}
        ready = cond.get("ready") is not False
        serving = cond["serving"] is not False if cond.get("serving") is not None else ready
        terminating = cond.get("terminating") is True
        node = e.get("nodeName") or (e.get("topology") or {}).get(HOSTNAME_TOPOLOGY_KEY)
        for addr in e.get("addresses") or []:
            if _is_ipv4(addr):
                endpoints.append((addr, ready, serving, terminating, node))
    return Slice(key.namespace, key.name, service, tuple(ports), tuple(endpoints))


def build_states(ports: Iterable[ServicePort], slices: Iterable[Slice]) -> dict[ServicePortName, ServicePortState]:
    """Join one Service's ports with its slices: endpoints per port, matched by port name and protocol.

    Named target ports need no work here: the EndpointSlice controller already resolved them per
    pod into the slice's port numbers, under the Service port's name. An address present in several
    slices (possible during slice churn) is kept once, preferring the ready copy.
    """
    slices = list(slices)
    out: dict[ServicePortName, ServicePortState] = {}
    for sp in ports:
        best: dict[tuple[str, int], Endpoint] = {}
        for sl in slices:
            for p in sl.ports:
                if p.name != sp.name.port_name or p.protocol != sp.protocol:
                    continue
                for ip, ready, serving, terminating, node in sl.endpoints:
                    ep = Endpoint(ip, p.port, ready, serving, terminating, node)
                    old = best.get((ip, p.port))
                    if old is None or (ep.ready and not old.ready):
                        best[(ip, p.port)] = ep
        out[sp.name] = ServicePortState(sp, tuple(sorted(best.values())))
    return out
