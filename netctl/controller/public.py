"""The optional public NIC: which pods get a port on the shared provider network (pure: no I/O).

A pod asks with `netctl.io/public-ip: "true"`; its public port `pub-<pod uid>` lives on the provider
switch (`netctl-public`, reserved tenant name `public`) and is answered in `netctl.io/public-port`.
The address is the pod's for its whole life: the port is created once (a deterministic name, so a
re-run after a crash finds it), never re-addressed or pooled, and deleted only when the pod is gone
(or no longer networked). Withdrawing the request does not take the address away from a running
pod: its sandbox may already use it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from netctl.annotations import (
    PUBLIC_IP_ANNOTATION,
    PUBLIC_NETWORK,
    PUBLIC_PORT_ANNOTATION,
    AnnotationError,
    PortAnnotation,
    public_ip_requested,
)
from netctl.controller.model import Obj, annotations_of, key_of, meta, needs_port
from netctl.controller.reconcile import choose_port, expected_annotation
from netctl.iaas.base import Port

PUBLIC_PORT_PREFIX = "pub-"


def public_port_id(uid: str) -> str:
    """Deterministic, like `pod-<uid>`: a create re-run after a crash can never make a second one."""
    return f"{PUBLIC_PORT_PREFIX}{uid}"


def is_public(port: Port) -> bool:
    """A port on the provider network (its switch's reserved tenant name), not a tenant port."""
    return port.tenant == PUBLIC_NETWORK


def requested(pod: Obj) -> tuple[bool, str | None]:
    """(does the pod ask for a public IP, why its request is malformed or None)."""
    try:
        return public_ip_requested(annotations_of(pod).get(PUBLIC_IP_ANNOTATION)), None
    except AnnotationError as e:
        return False, str(e)


def annotated_public_id(pod: Obj) -> str | None:
    raw = annotations_of(pod).get(PUBLIC_PORT_ANNOTATION)
    if raw is None:
        return None
    try:
        return PortAnnotation.from_json(raw, PUBLIC_PORT_ANNOTATION).port_id
    except AnnotationError:
        return None


def public_annotation_matches(pod: Obj, want: PortAnnotation) -> bool:
    raw = annotations_of(pod).get(PUBLIC_PORT_ANNOTATION)
    if raw is None:
        return False
    if raw == want.to_json():
        return True
    try:
        return PortAnnotation.from_json(raw, PUBLIC_PORT_ANNOTATION) == want
    except AnnotationError:
        return False


def expected_public_annotation(port: Port, gateway: str | None, mtu: int) -> PortAnnotation:
    return expected_annotation(port, gateway, mtu)


@dataclass(frozen=True)
class PublicPlan:
    orphans: tuple[str, ...] = ()  # public ports whose pod is gone (or no longer networked): deleted
    duplicates: tuple[str, ...] = ()  # extra public ports of one pod: deleted
    pods_to_sync: tuple[str, ...] = ()  # pods missing their public port, its binding or its annotation

    @property
    def freed(self) -> tuple[str, ...]:
        return self.orphans + self.duplicates


def plan_public(
    pods: Iterable[Obj],
    tenant_of_pod: Mapping[str, str | None],
    ports: Iterable[Port],
    gateway: str | None,
    mtu: int,
    enabled: bool,
    nested_tenants: Collection[str] = (),
) -> PublicPlan:
    """Compare the pods with the provider network's ports (`ports`: only those).

    A pod keeps its public port while it is networked at all (needs a port, namespace of a tenant);
    one is missing when the pod asks for it and ``enabled`` (the provider network is configured).
    """
    wanted: dict[str, Obj] = {}
    for pod in pods:
        uid = meta(pod).get("uid")
        if uid and needs_port(pod) and tenant_of_pod.get(key_of(pod)):
            wanted[str(uid)] = pod
    held: dict[str, list[Port]] = {}
    for port in ports:
        if port.pod_uid is not None:
            held.setdefault(port.pod_uid, []).append(port)
    orphans = sorted(p.id for uid in held.keys() - wanted.keys() for p in held[uid])
    duplicates: list[str] = []
    to_sync: list[str] = []
    for uid, pod in wanted.items():
        keep, extra = choose_port(held.get(uid, []), annotated_public_id(pod))
        duplicates.extend(p.id for p in extra)
        if keep is None:
            if enabled and requested(pod)[0] and not meta(pod).get("deletionTimestamp"):
                to_sync.append(key_of(pod))
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        bound_by_us = tenant_of_pod.get(key_of(pod)) not in nested_tenants  # nested: bound where the VM is
        if (node and bound_by_us and keep.node != node) or not public_annotation_matches(
                pod, expected_public_annotation(keep, gateway, mtu)):
            to_sync.append(key_of(pod))
    return PublicPlan(tuple(orphans), tuple(sorted(duplicates)), tuple(sorted(to_sync)))


@dataclass(frozen=True)
class PublicConfig:
    """The provider network; `cidr` empty = the feature is off (requests get a Warning Event)."""

    cidr: str = ""
    gateway: str | None = None  # None: the first host address
    mtu: int | None = None  # None: the controller's default MTU

    @property
    def enabled(self) -> bool:
        return bool(self.cidr)
