"""Per-pod and per-tenant work: make the IaaS and the annotations match the pods.

Each method handles one queue key and is idempotent, so a retry, a duplicate event or a
restart in the middle is harmless: a pod's port is found by the pod uid its intent carries
(`IaaS.ports_of_pod`), and that intent is written in the same transaction that claims or creates
the port, before the annotation is patched, so the next pass always sees what the last one did.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from netctl.annotations import (
    POD_MODES,
    PORT_ANNOTATION,
    PUBLIC_NETWORK,
    PUBLIC_PORT_ANNOTATION,
    VM_PORT_ANNOTATION,
)
from netctl.controller import model
from netctl.controller import public as pub
from netctl.controller.model import Obj
from netctl.controller.pools import (
    IAAS_UNAVAILABLE,
    NETWORK_FAILED,
    SUBNET_EXHAUSTED,
    PoolConfig,
    PoolStats,
    refill_batches,
    split_freed,
    tenant_conditions,
)
from netctl.controller.reconcile import (
    SyncPlan,
    annotated_port_id,
    annotation_matches,
    choose_port,
    expected_annotation,
    plan_sync,
)
from netctl.iaas.base import (
    IaaS,
    IaaSUnavailable,
    Network,
    NetworkSpec,
    Port,
    PortOwner,
    PortRequest,
    SubnetExhausted,
    pool_port_id,
)

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
        pool: PoolConfig | None = None,
        on_claim: Callable[[str, bool], None] | None = None,
        public: pub.PublicConfig | None = None,
    ) -> None:
        """``on_metric(op, result)`` counts IaaS operations; ``on_claim(tenant, hit)`` pool hits/misses;
        ``public``: the provider network of the optional public NIC (None: off)."""
        self.caches = caches
        self.iaas = iaas
        self.writer = writer
        self.recorder = recorder
        self.default_mtu = default_mtu
        self._networks: dict[str, Network] = {}
        self._seen_uids: dict[str, str] = {}  # pod key -> uid last handled (finds a re-created pod's old port)
        self._lock = threading.Lock()
        self._metric = on_metric or (lambda op, result: None)
        self._on_claim = on_claim or (lambda tenant, hit: None)
        self.pool = pool or PoolConfig()
        self.pool_stats = PoolStats()
        # tenant -> Degraded reason -> message: what keeps pods from getting ports (also not Ready),
        # and what only keeps the pool from filling (Degraded, still Ready: a miss creates a port)
        self._problems: dict[str, dict[str, str]] = {}
        self._pool_problems: dict[str, dict[str, str]] = {}
        self._port_counts: dict[str, dict[str, int]] = {}  # tenant -> last bound/node port counts
        self.public = public or pub.PublicConfig()
        self._public_net: Network | None = None

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
        if name == PUBLIC_NETWORK:
            # Its switch would be the provider network's: never let a Tenant claim (or delete) it.
            log.error('tenant name "%s" is reserved for the provider network; ignoring the Tenant', name)
            raise TenantNotReady(f'tenant name "{name}" is reserved for the provider network')
        obj = self.caches.tenants.get(name)
        if obj is None:
            # Tenant deleted: its network goes once no port is left on it (pods first).
            with self._lock:
                self._networks.pop(name, None)
            self.iaas.trim_pool(name, 0)
            if not self.iaas.list_ports(tenant=name):
                self.iaas.delete_network(name)
            raise TenantNotReady(f'tenant "{name}" was deleted')
        try:
            net = self.iaas.ensure_network(self._spec_of(name, obj))
        except Exception as exc:
            self._problem(name, exc, NETWORK_FAILED)
            self._tenant_status(name, None)
            raise
        self._clear_problem(name, NETWORK_FAILED, IAAS_UNAVAILABLE)
        with self._lock:
            self._networks[name] = net
        self._tenant_status(name, net)
        return net

    def _problem(self, tenant: str, exc: Exception, default: str | None = None, pool: bool = False) -> None:
        """Remember a failure as a Degraded reason (IaaS down, subnet full, or `default`)."""
        if isinstance(exc, IaaSUnavailable):
            reason = IAAS_UNAVAILABLE
        elif isinstance(exc, SubnetExhausted):
            reason = SUBNET_EXHAUSTED
        elif default is not None:
            reason = default
        else:
            return
        with self._lock:
            (self._pool_problems if pool else self._problems).setdefault(tenant, {})[reason] = str(exc)

    def _clear_problem(self, tenant: str, *reasons: str, pool: bool = False) -> None:
        with self._lock:
            found = (self._pool_problems if pool else self._problems).get(tenant, {})
            for r in reasons:
                found.pop(r, None)

    def _tenant_status(self, name: str, net: Network | None, count_all: bool = True) -> None:
        """Write the Tenant's status if it changed. ``count_all`` False (the frequent pool refills)
        reuses the last bound/node counts instead of listing every port of the tenant."""
        with self._lock:
            counts = self._port_counts.get(name)
        if count_all or counts is None:
            ports = self.iaas.list_ports(tenant=name) if net is not None else []
            counts = {
                "bound": sum(1 for p in ports if p.pod_uid is not None),
                "nodes": sum(1 for p in ports if p.owner is not None and p.owner.kind == "node"),
            }
            pooled = sum(1 for p in ports if p.pooled)
            with self._lock:
                self._port_counts[name] = counts
        else:
            pooled = len(self.iaas.pooled_ports(name)) if net is not None else 0
        hits, misses = self.pool_stats.of(name)
        with self._lock:
            problems = dict(self._problems.get(name, {}))
            pool_problems = dict(self._pool_problems.get(name, {}))
        status: dict[str, Any] = {
            "conditions": tenant_conditions(net is not None, problems, pooled, self.pool, pool_problems),
            "ports": dict(counts),
            "pool": {"size": pooled, "min": self.pool.min, "max": self.pool.ceiling,
                     "hits": hits, "misses": misses},
        }
        if net is not None:
            status["networkId"] = net.id
        obj = self.caches.tenants.get(name)
        if obj is None:
            return
        old = obj.get("status") or {}
        gen = model.meta(obj).get("generation")
        if gen is not None:
            status["observedGeneration"] = gen
        since = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, dict)}
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for cond in status["conditions"]:
            prev = since.get(cond["type"]) or {}
            same = prev.get("status") == cond["status"] and prev.get("lastTransitionTime")
            cond["lastTransitionTime"] = prev["lastTransitionTime"] if same else now
        if old != status:  # unchanged status is not written again (refills run every interval)
            try:
                self.writer.patch_tenant_status(name, status)
            except Exception:  # status is informative; never fail the network work on it
                log.warning("could not update status of tenant %s", name, exc_info=True)

    # -- pods ------------------------------------------------------------------------------------

    def _annotation_for(self, pod: Obj | None) -> str | None:
        return annotated_port_id(pod) if pod is not None else None

    def sync_pod(self, key: str) -> None:
        pod = self.caches.pods.get(key)
        ns, _, name = key.partition("/")
        tenant = self.tenant_of_namespace(ns) if pod is not None else None
        uid = str(model.meta(pod).get("uid")) if pod is not None else None
        old_uid = self._seen_uids.get(key)
        # Ports of an earlier pod of this name (re-created under a new uid): an indexed lookup by
        # the uid this process last handled. Ports of pods this process never saw (gone while no
        # controller ran) are orphans; the periodic resync's set difference frees them.
        stale = self.iaas.ports_of_pod(old_uid) if old_uid and old_uid != uid else []
        if pod is None or uid is None or tenant is None or not model.needs_port(pod):
            mine = self.iaas.ports_of_pod(uid) if uid else []
            self.free_ports([*stale, *mine], why=f"pod {key} is gone or needs no tenant port")
            self._seen_uids.pop(key, None)
            return
        self._seen_uids[key] = uid
        mine = self.iaas.ports_of_pod(uid)
        public_held = [p for p in mine if pub.is_public(p)]
        mine = [p for p in mine if not pub.is_public(p)]
        elsewhere = [p for p in mine if p.tenant != tenant]  # the namespace changed tenant
        port, duplicates = choose_port([p for p in mine if p.tenant == tenant], self._annotation_for(pod))
        self.free_ports([*stale, *elsewhere, *duplicates], why=f"pod {key} was re-created, changed tenant "
                        "or held more than one port")
        try:
            net = self.network_for(tenant)
        except TenantNotReady as exc:
            self.recorder.record(pod, "Warning", "TenantNotReady", str(exc))
            raise
        node = model.node_name(pod)
        node_tenant = model.tenant_label(self.caches.nodes.get(node)) if node else None
        bind_to = node if node and node_tenant == tenant else None
        # Nested tenants: the port is bound where the IaaS plugs it (the VM's chassis), not by us
        nested = self.mode_of(tenant) != "ovs"
        if port is None:
            owner = PortOwner(kind="pod", name=name, namespace=ns, uid=uid, tenant=tenant)
            try:
                claim = self.iaas.claim_port(net, owner, model.port_id_for_pod(uid),
                                              node=None if nested else bind_to)
            except Exception as exc:
                self._metric("create", "error")
                self._problem(tenant, exc)
                self.recorder.record(pod, "Warning", "PortFailed", f"getting a port for {key}: {exc}")
                self._tenant_status(tenant, net, count_all=False)
                raise
            port = claim.port
            if not claim.hit:  # the IaaS answered and the subnet had room
                self._clear_problem(tenant, IAAS_UNAVAILABLE, SUBNET_EXHAUSTED)
            if not claim.existing:
                self.pool_stats.count(tenant, claim.hit)
                self._on_claim(tenant, claim.hit)
                if claim.hit:
                    self._metric("claim", "ok")
                    self.recorder.record(pod, "Normal", "PortClaimed",
                                         f"port {port.id} ip {port.ip} from the warm pool of {net.id}")
                else:
                    self._metric("create", "ok")
                    self.recorder.record(pod, "Normal", "PortCreated", f"port {port.id} ip {port.ip} on {net.id}")
                if claim.port.node and claim.port.node == bind_to:
                    self.recorder.record(pod, "Normal", "PortBound", f"port {port.id} bound to node {node}")
        if node and bind_to is None:
            # Tenants never share VMs: never bind a port to another tenant's node. The CNI on that
            # node refuses the pod too; this Event tells the user why the pod will not start.
            self.recorder.record(
                pod, "Warning", "TenantMismatch",
                f'pod {key} belongs to tenant "{tenant}" but node "{node}" belongs to '
                f'{"tenant " + repr(node_tenant) if node_tenant else "no tenant"}; not binding its port',
            )
        elif node and port.node != node and not nested:
            try:
                self.iaas.bind_port(port.id, node)
            except Exception as exc:
                self._metric("bind", "error")
                self.recorder.record(pod, "Warning", "PortFailed", f"binding port {port.id} to {node}: {exc}")
                raise
            self._metric("bind", "ok")
            self.recorder.record(pod, "Normal", "PortBound", f"port {port.id} bound to node {node}")
        if nested:
            if bind_to is None:
                return  # no annotation before the pod's VM gives it a NIC or a VLAN: the CNI waits
            port = self._nest(pod, key, port, bind_to, self.mode_of(tenant))
        want = expected_annotation(port, net.gateway, net.mtu)
        patch: dict[str, str | None] = {}
        if not annotation_matches(pod, want):
            patch[PORT_ANNOTATION] = want.to_json()
        # The tenant annotation is written even when the public port fails (then retried): the
        # pod's own network never waits on the optional one.
        public_json, public_failure = self._sync_public(pod, key, uid, public_held, bind_to,
                                                        self.mode_of(tenant))
        if public_json is not None:
            patch[PUBLIC_PORT_ANNOTATION] = public_json
        if patch:
            self.writer.patch_pod_annotations(ns, name, patch, uid=uid)
            self._metric("annotate", "ok")
        if public_failure is not None:
            raise public_failure

    # -- nested mode -----------------------------------------------------------------------------

    def mode_of(self, tenant: str) -> str:
        """How the tenant's pods are attached (Tenant spec.mode; the CRD rejects other values)."""
        obj = self.caches.tenants.get(tenant)
        mode = str(((obj or {}).get("spec") or {}).get("mode") or "ovs")
        return mode if mode in POD_MODES else "ovs"

    def vm_port_of(self, node: str) -> str:
        """The IaaS port of the node VM's NIC: the Node's netctl.io/vm-port, else `node-<name>`."""
        named = model.annotations_of(self.caches.nodes.get(node) or {}).get(VM_PORT_ANNOTATION)
        return named or model.port_id_for_node(node)

    def _nest(self, pod: Obj, key: str, port: Port, node: str, mode: str) -> Port:
        """Give one of the pod's ports (its tenant port or its public port) to its VM, as the pod's
        tenant's `mode` says: a VLAN subport of the VM's NIC, or a hot-plugged NIC."""
        vm_port = self.vm_port_of(node)
        vlan = mode == "nested-vlan"
        try:
            if vlan:
                if port.parent != vm_port or port.vlan is None:
                    port = self.iaas.attach_subport(port.id, vm_port)
                    self.recorder.record(pod, "Normal", "SubportAttached",
                                         f"port {port.id} is VLAN {port.vlan} of {vm_port} (node {node})")
            elif self.iaas.hotplug_port(port.id, vm_port):
                self.recorder.record(pod, "Normal", "PortHotplugged",
                                     f"port {port.id} plugged as a NIC into the VM of {vm_port} (node {node})")
        except Exception as exc:
            self._metric("subport" if vlan else "hotplug", "error")
            self.recorder.record(pod, "Warning", "PortFailed",
                                 f"giving port {port.id} of {key} to the VM of node {node} ({vm_port}): {exc}")
            raise
        self._metric("subport" if vlan else "hotplug", "ok")
        return port

    def _unplug(self, ports: list[Port] | list[tuple[str, str]]) -> None:
        """Hot-plugged NICs of nested-nic tenants leave their VM before the port is pooled or deleted
        (a public port by its pod's namespace's tenant)."""
        for item in ports:
            pid, tenant = (item.id, item.tenant) if isinstance(item, Port) else item
            if tenant == PUBLIC_NETWORK:
                owner = item.owner if isinstance(item, Port) else None
                tenant = (self.tenant_of_namespace(owner.namespace) if owner and owner.namespace else None) or ""
            if self.mode_of(tenant) == "nested-nic" and self.iaas.unplug_port(pid):
                self._metric("unplug", "ok")

    # -- the optional public NIC -----------------------------------------------------------------

    def public_network(self) -> Network | None:
        """The provider network: ensured when configured, else whatever is left of it (None: none)."""
        if not self.public.enabled:
            return self.iaas.get_network(PUBLIC_NETWORK)
        with self._lock:
            net = self._public_net
        if net is None:
            net = self.ensure_public_network()
        return net

    def ensure_public_network(self) -> Network:
        cfg = self.public
        net = self.iaas.ensure_network(NetworkSpec(
            tenant=PUBLIC_NETWORK, cidr=cfg.cidr, gateway=cfg.gateway or default_gateway(cfg.cidr),
            mtu=cfg.mtu or self.default_mtu,
        ))
        with self._lock:
            self._public_net = net
        return net

    def _sync_public(self, pod: Obj, key: str, uid: str, held: list[Port], bind_to: str | None,
                     mode: str = "ovs") -> tuple[str | None, Exception | None]:
        """Give the pod its public port if it asks for one (or keep the one it has): returns (the
        `netctl.io/public-port` value to write, None if it is right already; the failure to retry)."""
        wants, malformed = pub.requested(pod)
        if malformed:
            self.recorder.record(pod, "Warning", "PublicIPInvalid", f"{malformed}; {key} gets no public IP")
        port, extra = choose_port(held, pub.annotated_public_id(pod))
        if extra:
            self.free_ports(extra, why=f"pod {key} held more than one public port")
        if port is None and (not wants or model.meta(pod).get("deletionTimestamp")):
            return None, None  # never a new public address for a pod that is going away
        nested = mode != "ovs"
        try:
            net = self.public_network()
            if net is None:
                self.recorder.record(pod, "Warning", "PublicIPUnavailable",
                                     f"{key} asks for a public IP but the controller has no provider network "
                                     "(--public-cidr)")
                return None, None
            if port is None:
                meta = model.meta(pod)
                owner = PortOwner(kind="pod", name=str(meta.get("name")), namespace=meta.get("namespace"),
                                  uid=uid, tenant=PUBLIC_NETWORK)
                port = self.iaas.create_port(net, owner, pub.public_port_id(uid), node=None if nested else bind_to)
                self._metric("public-create", "ok")
                self.recorder.record(pod, "Normal", "PublicPortCreated",
                                     f"public port {port.id} ip {port.ip} on {net.id}")
            elif bind_to and port.node != bind_to and not nested:
                port = self.iaas.bind_port(port.id, bind_to)
                self._metric("bind", "ok")
            if nested and bind_to:  # the second NIC / VLAN of the pod's VM (on the provider switch)
                port = self._nest(pod, key, port, bind_to, mode)
        except Exception as exc:
            self._metric("public-create", "error")
            self.recorder.record(pod, "Warning", "PublicPortFailed", f"public port for {key}: {exc}")
            return None, exc
        want = pub.expected_public_annotation(port, net.gateway, net.mtu)
        return (None if pub.public_annotation_matches(pod, want) else want.to_json()), None

    def free_ports(self, ports: list[Port], why: str) -> None:
        """Ports no pod should keep: back into their tenant's pool while it is below max
        (scrubbed: new name, new address, no identity), the rest deleted."""
        public_ids = [p.id for p in ports if pub.is_public(p)]
        if public_ids:  # a public address is the pod's alone: never pooled for another pod
            self._unplug([p for p in ports if pub.is_public(p)])
            log.info("deleting public ports %s: %s", public_ids, why)
            self.iaas.delete_ports(public_ids)
            self._metric("delete", "ok")
        ports = [p for p in ports if not pub.is_public(p)]
        if not ports:
            return
        self._unplug(ports)
        by_tenant: dict[str, list[str]] = {}
        for p in ports:
            by_tenant.setdefault(p.tenant, []).append(p.id)
        for tenant, ids in sorted(by_tenant.items()):
            size = len(self.iaas.pooled_ports(tenant)) if self.pool.enabled else 0
            release, delete = split_freed(size, ids, self.pool)
            if release:
                log.info("returning ports %s to the pool of %s: %s", release, tenant, why)
                self.iaas.release_ports(release)
                self._metric("release", "ok")
            if delete:
                log.info("deleting ports %s: %s", delete, why)
                self.iaas.delete_ports(delete)
                self._metric("delete", "ok")

    # -- pools -----------------------------------------------------------------------------------

    def refill_pool(self, tenant: str) -> int:
        """Bring the tenant's pool up to min in batches (one IaaS transaction each) and trim it to
        max; returns the ports created. Failures become Degraded reasons (the tenant stays Ready:
        a pod still gets a port on a miss); IaaS errors are raised (retried with back-off)."""
        if self.caches.tenants.get(tenant) is None:
            return 0
        net = self.network_for(tenant)
        size = len(self.iaas.pooled_ports(tenant))
        created = 0
        try:
            for n in refill_batches(size, self.pool):
                self.iaas.create_ports(net, [PortRequest(pool_port_id(), None) for _ in range(n)])
                created += n
                self._metric("pool-create", "ok")
            if size > self.pool.ceiling:
                self.iaas.trim_pool(tenant, self.pool.ceiling)
        except Exception as exc:
            self._metric("pool-create", "error")
            self._problem(tenant, exc, pool=True)
            self._tenant_status(tenant, net, count_all=False)
            if isinstance(exc, SubnetExhausted):
                # Not transient: no retry with back-off; the timer looks again next interval.
                log.warning("pool of %s not refilled: %s", tenant, exc)
                return created
            raise
        self._clear_problem(tenant, IAAS_UNAVAILABLE, SUBNET_EXHAUSTED, pool=True)
        self._tenant_status(tenant, net, count_all=False)
        return created

    # -- periodic resync -------------------------------------------------------------------------

    def plan(self) -> SyncPlan:
        # Ports before pods: a port created after this snapshot belongs to a pod that is in the
        # (later) pod snapshot, so it can never be mistaken for an orphan.
        everything = self.iaas.list_ports()
        ports = [p for p in everything if not pub.is_public(p)]
        public_ports = [p for p in everything if pub.is_public(p)]
        networks = {n.tenant: (n.gateway, n.mtu) for n in self.iaas.list_networks()}
        pods = self.caches.pods.list()
        tenant_of: dict[str, str | None] = {}
        ns_tenant: dict[str, str | None] = {}
        for pod in pods:
            ns = str(model.meta(pod).get("namespace"))
            if ns not in ns_tenant:
                ns_tenant[ns] = self.tenant_of_namespace(ns)
            tenant_of[model.key_of(pod)] = ns_tenant[ns]
        nested = {t for t in set(tenant_of.values()) if t is not None and self.mode_of(t) != "ovs"}
        plan = plan_sync(pods, tenant_of, ports, networks, pool_ceiling=self.pool.ceiling, nested_tenants=nested)
        gateway, mtu = networks.get(PUBLIC_NETWORK, (None, 0))
        pplan = pub.plan_public(pods, tenant_of, public_ports, gateway, mtu, self.public.enabled, nested)
        if pplan.freed or pplan.pods_to_sync:
            plan = dataclasses.replace(plan, public_freed=pplan.freed,
                                       pods_to_sync=tuple(sorted({*plan.pods_to_sync, *pplan.pods_to_sync})))
        return plan

    def resync(self, enqueue_pod: Callable[[str], None], enqueue_tenant: Callable[[str], None]) -> SyncPlan:
        """Free orphans and duplicates now (a transaction per tenant), trim pools over max; hand
        everything else to the pod workers."""
        if self.public.enabled:
            self.ensure_public_network()  # at start (the first reconcile) and repaired every resync
        plan = self.plan()
        if plan.public_freed:
            self._unplug([p for pid in plan.public_freed if (p := self.iaas.get_port(pid)) is not None])
            log.info("resync: deleting %d public ports of gone pods", len(plan.public_freed))
            self.iaas.delete_ports(plan.public_freed)
            self._metric("delete", "ok")
        if plan.freed_ports:
            log.info("resync: freeing %d orphaned and %d duplicate ports",
                     len(plan.orphan_ports), len(plan.duplicate_ports))
            tenants: dict[str, list[str]] = {}
            for pid, tenant in plan.freed_tenants:
                tenants.setdefault(tenant, []).append(pid)
            self._unplug(list(plan.freed_tenants))
            sizes = dict(plan.pool_sizes)
            for tenant, ids in sorted(tenants.items()):
                release, delete = split_freed(sizes.get(tenant, 0), ids, self.pool)
                if release:
                    self.iaas.release_ports(release)
                    self._metric("release", "ok")
                if delete:
                    self.iaas.delete_ports(delete)
                    self._metric("delete", "ok")
        for tenant, keep in plan.pools_over_max:
            self.iaas.trim_pool(tenant, keep)
            self._metric("trim", "ok")
        for key in plan.pods_to_sync:
            enqueue_pod(key)
        for obj in self.caches.tenants.list():
            enqueue_tenant(str(model.meta(obj).get("name")))
        return plan
