"""Per-pod and per-tenant work: make the IaaS and the annotations match the pods.

Each method handles one queue key and is idempotent, so a retry, a duplicate event or a
restart in the middle is harmless: the port name is derived from the pod UID and every port
carries its owner's identity, so the next pass always sees what the last one did.
"""

from __future__ import annotations

import builtins
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from netctl.annotations import PORT_ANNOTATION
from netctl.controller import model
from netctl.controller.model import Obj
from netctl.controller.reconcile import SyncPlan, annotation_matches, expected_annotation, plan_sync
from netctl.iaas.base import IaaS, Network, NetworkSpec, Port, PortOwner

log = logging.getLogger(__name__)


class Cache(Protocol):
    """What the controller reads from an informer's local cache."""

    def get(self, key: str) -> Obj | None: ...

    def list(self) -> builtins.list[Obj]: ...

    def by_index(self, index: str, value: str) -> builtins.list[Obj]: ...


class Writer(Protocol):
    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str | None], uid: str | None = None
    ) -> None: ...

    def patch_tenant_status(self, name: str, status: dict[str, Any]) -> None: ...


class Recorder(Protocol):
    def record(self, obj: Obj, type_: str, reason: str, message: str) -> None: ...


def default_gateway(cidr: str) -> str | None:
    """The first host address, as the Tenant CRD documents (and as Neutron defaults a subnet's gateway)."""
    try:
        return str(next(ipaddress.ip_network(cidr, strict=False).hosts()))
    except (ValueError, StopIteration):
        return None  # NetworkSpec reports the bad CIDR


class TenantNotReady(Exception):
    """The pod's tenant has no Tenant object (yet): retried with back-off, reported as an Event."""


@dataclass
class Caches:
    pods: Cache
    namespaces: Cache
    tenants: Cache
    nodes: Cache


class PortController:
    def __init__(
        self,
        caches: Caches,
        iaas: IaaS,
        writer: Writer,
        recorder: Recorder,
        default_mtu: int = 1400,
        on_metric: Callable[[str, str], None] | None = None,
    ) -> None:
        self.caches = caches
        self.iaas = iaas
        self.writer = writer
        self.recorder = recorder
        self.default_mtu = default_mtu
        self._networks: dict[str, Network] = {}
        self._seen_uids: dict[str, str] = {}  # pod key -> uid last handled (finds a re-created pod's old port)
        self._lock = threading.Lock()
        self._metric = on_metric or (lambda op, result: None)

    # -- tenants ---------------------------------------------------------------------------------

    def tenant_of_namespace(self, namespace: str) -> str | None:
        return model.tenant_label(self.caches.namespaces.get(namespace))

    def network_for(self, tenant: str) -> Network:
        with self._lock:
            net = self._networks.get(tenant)
        if net is not None:
            return net
        obj = self.caches.tenants.get(tenant)
        if obj is None:
            raise TenantNotReady(f'tenant "{tenant}" has no Tenant object')
        return self.sync_tenant(tenant)

    def _spec_of(self, name: str, obj: Obj) -> NetworkSpec:
        spec = obj.get("spec") or {}
        cidr = str(spec.get("cidr", ""))
        return NetworkSpec(
            tenant=name,
            cidr=cidr,
            gateway=spec.get("gateway") or default_gateway(cidr),
            mtu=int(spec.get("mtu") or self.default_mtu),
        )

    def sync_tenant(self, name: str) -> Network:
        obj = self.caches.tenants.get(name)
        if obj is None:
            # Tenant deleted: its network goes once no port is left on it (pods first).
            with self._lock:
                self._networks.pop(name, None)
            if not self.iaas.list_ports(tenant=name):
                self.iaas.delete_network(name)
            raise TenantNotReady(f'tenant "{name}" was deleted')
        try:
            net = self.iaas.ensure_network(self._spec_of(name, obj))
        except Exception as exc:
            self._tenant_status(name, None, ready=False, reason="NetworkFailed", message=str(exc))
            raise
        with self._lock:
            self._networks[name] = net
        self._tenant_status(name, net, ready=True, reason="NetworkReady", message="network is ready")
        return net

    def _tenant_status(self, name: str, net: Network | None, ready: bool, reason: str, message: str) -> None:
        ports = self.iaas.list_ports(tenant=name) if net is not None else []
        status: dict[str, Any] = {
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "reason": reason, "message": message}
            ],
            "ports": {
                "bound": sum(1 for p in ports if p.owner is not None and p.owner.kind == "pod"),
                "nodes": sum(1 for p in ports if p.owner is not None and p.owner.kind == "node"),
            },
        }
        if net is not None:
            status["networkId"] = net.id
        obj = self.caches.tenants.get(name)
        if obj is not None and (obj.get("status") or {}) != status:
            gen = model.meta(obj).get("generation")
            if gen is not None:
                status["observedGeneration"] = gen
            try:
                self.writer.patch_tenant_status(name, status)
            except Exception:  # status is informative; never fail the network work on it
                log.warning("could not update status of tenant %s", name, exc_info=True)

    # -- pods ------------------------------------------------------------------------------------

    def _ports_of(self, key: str, pod: Obj | None) -> list[Port]:
        """The pod's port and that of the last pod of this name we handled, by id (an indexed lookup).

        No scan of every port per pod: ports of pods this process never saw (deleted or re-created
        while no controller ran) are orphans, and the periodic resync's set difference removes them.
        """
        uids = {self._seen_uids.get(key), str(model.meta(pod).get("uid")) if pod is not None else None}
        ns, _, name = key.partition("/")
        ports = (self.iaas.get_port(model.port_id_for_pod(u)) for u in uids if u)
        return [p for p in ports if p is not None and p.owner is not None and p.owner.kind == "pod"
                and p.owner.namespace == ns and p.owner.name == name]

    def sync_pod(self, key: str) -> None:
        pod = self.caches.pods.get(key)
        existing = self._ports_of(key, pod)
        tenant = self.tenant_of_namespace(key.partition("/")[0]) if pod is not None else None
        if pod is None or tenant is None or not model.needs_port(pod):
            self._delete(existing, why=f"pod {key} is gone or needs no tenant port")
            self._seen_uids.pop(key, None)
            return
        uid = str(model.meta(pod).get("uid"))
        self._seen_uids[key] = uid
        port_id = model.port_id_for_pod(uid)
        # Ports of an earlier pod with the same name, or from a tenant the namespace has left.
        stale = [p for p in existing if p.id != port_id or p.tenant != tenant]
        self._delete(stale, why=f"pod {key} was re-created or changed tenant")
        try:
            net = self.network_for(tenant)
        except TenantNotReady as exc:
            self.recorder.record(pod, "Warning", "TenantNotReady", str(exc))
            raise
        node = model.node_name(pod)
        node_tenant = model.tenant_label(self.caches.nodes.get(node)) if node else None
        bind_to = node if node and node_tenant == tenant else None
        port = next((p for p in existing if p.id == port_id and p.tenant == tenant), None)
        if port is None:
            owner = PortOwner(kind="pod", name=key.partition("/")[2], namespace=key.partition("/")[0],
                              uid=uid, tenant=tenant)
            try:
                port = self.iaas.create_port(net, owner, port_id, node=bind_to)
            except Exception as exc:
                self._metric("create", "error")
                self.recorder.record(pod, "Warning", "PortFailed", f"creating port {port_id}: {exc}")
                raise
            self._metric("create", "ok")
            self.recorder.record(pod, "Normal", "PortCreated", f"port {port.id} ip {port.ip} on {net.id}")
        if node and bind_to is None:
            # Tenants never share VMs: never bind a port to another tenant's node. The CNI on that
            # node refuses the pod too; this Event tells the user why the pod will not start.
            self.recorder.record(
                pod, "Warning", "TenantMismatch",
                f'pod {key} belongs to tenant "{tenant}" but node "{node}" belongs to '
                f'{"tenant " + repr(node_tenant) if node_tenant else "no tenant"}; not binding its port',
            )
        elif node and port.node != node:
            self.iaas.bind_port(port.id, node)
            self._metric("bind", "ok")
            self.recorder.record(pod, "Normal", "PortBound", f"port {port.id} bound to node {node}")
        want = expected_annotation(port, net.gateway, net.mtu)
        if not annotation_matches(pod, want):
            ns, _, name = key.partition("/")
            self.writer.patch_pod_annotations(ns, name, {PORT_ANNOTATION: want.to_json()}, uid=uid)
            self._metric("annotate", "ok")

    def _delete(self, ports: list[Port], why: str) -> None:
        if not ports:
            return
        log.info("deleting ports %s: %s", [p.id for p in ports], why)
        self.iaas.delete_ports([p.id for p in ports])
        self._metric("delete", "ok")

    # -- periodic resync -------------------------------------------------------------------------

    def plan(self) -> SyncPlan:
        # Ports before pods: a port created after this snapshot belongs to a pod that is in the
        # (later) pod snapshot, so it can never be mistaken for an orphan.
        ports = self.iaas.list_ports()
        networks = {n.tenant: (n.gateway, n.mtu) for n in self.iaas.list_networks()}
        pods = self.caches.pods.list()
        tenant_of: dict[str, str | None] = {}
        for pod in pods:
            ns = str(model.meta(pod).get("namespace"))
            tenant_of[model.key_of(pod)] = self.tenant_of_namespace(ns)
        return plan_sync(pods, tenant_of, ports, networks)

    def resync(self, enqueue_pod: Callable[[str], None], enqueue_tenant: Callable[[str], None]) -> SyncPlan:
        """Delete orphans now (one transaction); hand everything else to the pod workers."""
        plan = self.plan()
        if plan.orphan_ports:
            log.info("resync: deleting %d orphaned ports", len(plan.orphan_ports))
            self.iaas.delete_ports(plan.orphan_ports)
            self._metric("delete", "ok")
        for key in plan.pods_to_sync:
            enqueue_pod(key)
        for tenant in self.caches.tenants.list():
            enqueue_tenant(str(model.meta(tenant).get("name")))
        return plan
