"""Desired-versus-actual port reconciliation as set operations (pure: no I/O).

The three sources are the live pods (informer cache), the ports in the IaaS (every port carries
its intent: `pooled`, or `bound` with its pod's uid, tenant and node) and the pods' annotations.
A resync is a handful of set differences over in-memory indexes, so it costs the same whether one
pod changed or none. The port is the truth about which pod it serves: an annotation is only ever
repaired to match a port bound to that pod, never the other way round.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from netctl.annotations import AnnotationError, PortAnnotation
from netctl.controller.model import Obj, key_of, meta, needs_port, port_annotation_raw
from netctl.iaas.base import Port


@dataclass(frozen=True)
class SyncPlan:
    orphan_ports: tuple[str, ...] = ()  # bound port ids whose pod no longer exists (or needs none)
    pods_to_sync: tuple[str, ...] = ()  # pod keys missing a port, a binding or a correct annotation
    duplicate_ports: tuple[str, ...] = ()  # extra ports bound to a live pod that has its keeper
    pools_over_max: tuple[tuple[str, int], ...] = ()  # (tenant, pooled ports to keep)
    pool_sizes: tuple[tuple[str, int], ...] = ()  # (tenant, pooled ports) in the snapshot
    freed_tenants: tuple[tuple[str, str], ...] = ()  # (port id, tenant) of every freed port
    public_freed: tuple[str, ...] = ()  # provider-network ports no pod keeps (deleted, never pooled)

    @property
    def empty(self) -> bool:
        return not (self.orphan_ports or self.pods_to_sync or self.duplicate_ports or self.pools_over_max
                    or self.public_freed)

    @property
    def freed_ports(self) -> tuple[str, ...]:
        """Bound ports no pod should keep: returned to the pool or deleted."""
        return self.orphan_ports + self.duplicate_ports


def expected_annotation(port: Port, gateway: str | None, mtu: int) -> PortAnnotation:
    return PortAnnotation(
        port_id=port.id,
        mac=port.mac,
        ip=f"{port.ip}/{port.prefixlen}",
        gateway=gateway,
        mtu=mtu,
        tenant=port.tenant,
        network_id=port.network_id,
        vlan=port.vlan,
    )


def annotation_matches(pod: Obj, want: PortAnnotation) -> bool:
    raw = port_annotation_raw(pod)
    if raw is None:
        return False
    if raw == want.to_json():  # what this controller writes: no parse, no validation (most pods)
        return True
    try:
        return PortAnnotation.from_json(raw) == want
    except AnnotationError:
        return False


def annotated_port_id(pod: Obj) -> str | None:
    raw = port_annotation_raw(pod)
    if raw is None:
        return None
    try:
        return PortAnnotation.from_json(raw).port_id
    except AnnotationError:
        return None


def choose_port(ports: Sequence[Port], annotated: str | None) -> tuple[Port | None, list[Port]]:
    """One pod, several bound ports (two claimers raced, or a crash between a claim and its
    bookkeeping): keep the one the annotation names (the CNI may already use it), else the lowest
    id; the rest are freed."""
    if not ports:
        return None, []
    keep = next((p for p in ports if p.id == annotated), None) or min(ports, key=lambda p: p.id)
    return keep, [p for p in ports if p is not keep]


def plan_sync(
    pods: Iterable[Obj],
    tenant_of_pod: Mapping[str, str | None],
    ports: Iterable[Port],
    networks: Mapping[str, tuple[str | None, int]],
    pool_ceiling: int | None = None,
    nested_tenants: Collection[str] = (),
) -> SyncPlan:
    """Compare every pod with every netctl port.

    ``tenant_of_pod`` maps pod key -> tenant (None: namespace belongs to no tenant);
    ``networks`` maps tenant -> (gateway, mtu) for the annotation check; ``pool_ceiling`` is the
    most pooled ports a tenant may hold (None: leave pools alone). Ports of ``nested_tenants`` are
    bound by the IaaS where their VM is, not to a node by us: no node check for them.
    """
    wanted: dict[str, Obj] = {}  # pod uid -> pod
    for pod in pods:
        if needs_port(pod) and tenant_of_pod.get(key_of(pod)):
            uid = meta(pod).get("uid")
            if uid:
                wanted[str(uid)] = pod

    bound: dict[str, list[Port]] = {}  # pod uid -> ports bound to it
    pooled: dict[str, int] = {}
    for port in ports:
        if port.pooled:
            pooled[port.tenant] = pooled.get(port.tenant, 0) + 1
            continue
        uid = port.pod_uid
        if uid is not None:
            bound.setdefault(uid, []).append(port)

    # The pod is gone, was re-created under a new uid, finished, or left its tenant.
    orphans = [p.id for uid in bound.keys() - wanted.keys() for p in bound[uid]]
    by_uid: dict[str, Port] = {}
    duplicates: list[str] = []
    for uid in bound.keys() & wanted.keys():
        held = bound[uid]
        if len(held) == 1:
            by_uid[uid] = held[0]
            continue
        keep, extra = choose_port(held, annotated_port_id(wanted[uid]))
        assert keep is not None
        by_uid[uid] = keep
        duplicates.extend(p.id for p in extra)

    to_sync: list[str] = []
    for uid, pod in wanted.items():
        key = key_of(pod)
        have = by_uid.get(uid)
        tenant = tenant_of_pod.get(key)
        if have is None or tenant is None or have.tenant != tenant:
            to_sync.append(key)
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node and have.node != node and tenant not in nested_tenants:
            to_sync.append(key)
            continue
        gateway, mtu = networks.get(have.tenant, (None, 0))
        if not annotation_matches(pod, expected_annotation(have, gateway, mtu)):
            to_sync.append(key)
    over = () if pool_ceiling is None else tuple(
        (t, pool_ceiling) for t, n in sorted(pooled.items()) if n > pool_ceiling
    )
    freed = {*orphans, *duplicates}
    tenants = tuple(sorted((p.id, p.tenant) for ps in bound.values() for p in ps if p.id in freed))
    return SyncPlan(tuple(sorted(orphans)), tuple(sorted(to_sync)), tuple(sorted(duplicates)), over,
                    tuple(sorted(pooled.items())), tenants)
