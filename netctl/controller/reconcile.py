"""Desired-versus-actual port reconciliation as set operations (pure: no I/O).

The three sources are the live pods (informer cache), the ports in the IaaS (every port carries
its owner's identity) and the pods' annotations. A resync is a handful of set differences over
in-memory indexes, so it costs the same whether one pod changed or none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netctl.annotations import AnnotationError, PortAnnotation
from netctl.controller.model import Obj, key_of, meta, needs_port, port_annotation_raw, port_id_for_pod
from netctl.iaas.base import Port


@dataclass(frozen=True)
class SyncPlan:
    orphan_ports: tuple[str, ...] = ()  # port ids whose pod no longer exists (or needs none)
    pods_to_sync: tuple[str, ...] = ()  # pod keys missing a port, a binding or a correct annotation

    @property
    def empty(self) -> bool:
        return not (self.orphan_ports or self.pods_to_sync)


def expected_annotation(port: Port, gateway: str | None, mtu: int) -> PortAnnotation:
    return PortAnnotation(
        port_id=port.id,
        mac=port.mac,
        ip=f"{port.ip}/{port.prefixlen}",
        gateway=gateway,
        mtu=mtu,
        tenant=port.tenant,
        network_id=port.network_id,
        vlan=None,
    )


def annotation_matches(pod: Obj, want: PortAnnotation) -> bool:
    raw = port_annotation_raw(pod)
    if raw is None:
        return False
    try:
        return PortAnnotation.from_json(raw) == want
    except AnnotationError:
        return False


def plan_sync(
    pods: Iterable[Obj],
    tenant_of_pod: Mapping[str, str | None],
    ports: Iterable[Port],
    networks: Mapping[str, tuple[str | None, int]],
) -> SyncPlan:
    """Compare every pod with every pod-owned port.

    ``tenant_of_pod`` maps pod key -> tenant (None: namespace belongs to no tenant);
    ``networks`` maps tenant -> (gateway, mtu) for the annotation check.
    """
    wanted: dict[str, Obj] = {}  # port id -> pod
    for pod in pods:
        if needs_port(pod) and tenant_of_pod.get(key_of(pod)):
            uid = meta(pod).get("uid")
            if uid:
                wanted[port_id_for_pod(uid)] = pod

    # Port ids derive from pod UIDs and are unique in the IaaS, so one pod can never hold two.
    by_id: dict[str, Port] = {}
    orphans: list[str] = []
    for port in ports:
        if port.owner is None or port.owner.kind != "pod":
            continue
        if port.id not in wanted:
            # The pod is gone, was re-created under a new uid, or left its tenant.
            orphans.append(port.id)
        else:
            by_id[port.id] = port

    to_sync: list[str] = []
    for port_id, pod in wanted.items():
        key = key_of(pod)
        have = by_id.get(port_id)
        tenant = tenant_of_pod.get(key)
        if have is None or tenant is None or have.tenant != tenant:
            to_sync.append(key)
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node and have.node != node:
            to_sync.append(key)
            continue
        gateway, mtu = networks.get(have.tenant, (None, 0))
        if not annotation_matches(pod, expected_annotation(have, gateway, mtu)):
            to_sync.append(key)
    return SyncPlan(tuple(sorted(orphans)), tuple(sorted(to_sync)))
