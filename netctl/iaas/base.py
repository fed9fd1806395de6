"""The IaaS interface every backend (embedded OVN now, OpenStack Neutron later) implements.

Kept small and backend-neutral on purpose: a tenant network with one IPv4 subnet, ports on it
with a fixed MAC/IP (known synchronously, so the controller can annotate the pod at once) and
port binding to a node. Every port carries its owner's identity so a resync can find and delete
orphans after a crash (DESIGN §2).
"""

from __future__ import annotations

import ipaddress
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from netctl import ipam

OwnerKind = Literal["pod", "node"]
# A pod port's intent, stored on the port itself (CONVENTIONS.md): "pooled" = warm and unowned,
# "bound" = owned by the pod named in its identity. Node NICs carry no state.
PortState = Literal["pooled", "bound"]
POOL_PREFIX = "pool-"

MTU_MIN = 576
MTU_MAX = 9216


class IaaSError(Exception):
    """Base of everything a backend raises on purpose."""


class NetworkNotFound(IaaSError):
    """The tenant has no network (ensure_network was not called, or it was deleted)."""


class PortNotFound(IaaSError):
    """No port with that id."""


class IaaSConflict(IaaSError):
    """The request contradicts what already exists (e.g. same tenant, different CIDR)."""


class NestingUnsupported(IaaSError):
    """The backend cannot attach ports to VMs (hot-plug) or make trunk subports."""


class IaaSUnavailable(IaaSError):
    """The IaaS API/DB cannot be reached or did not answer in time; retry with backoff."""


class SubnetExhausted(IaaSError, ipam.SubnetExhausted):
    """No free address in the tenant subnet (both an IaaSError and an ipam.SubnetExhausted)."""


@dataclass(frozen=True)
class NetworkSpec:
    """What a tenant's network should look like. `reserved` addresses/CIDRs are never allocated."""

    tenant: str
    cidr: str
    gateway: str | None
    mtu: int = 1400
    reserved: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tenant or any(c.isspace() for c in self.tenant):
            raise ValueError(f"tenant must be a non-empty name without blanks, got {self.tenant!r}")
        net = ipaddress.IPv4Network(self.cidr)
        if net.prefixlen > 30:
            raise ValueError(f"cidr {self.cidr} has no room for hosts")
        if self.gateway is not None:
            gw = ipaddress.IPv4Address(self.gateway)
            if gw not in net or gw in (net.network_address, net.broadcast_address):
                raise ValueError(f"gateway {self.gateway} is not a host address of {self.cidr}")
        if not MTU_MIN <= self.mtu <= MTU_MAX:
            raise ValueError(f"mtu must be in {MTU_MIN}..{MTU_MAX}, got {self.mtu}")
        for r in self.reserved:
            ipaddress.IPv4Network(r, strict=False)


@dataclass(frozen=True)
class Network:
    """A tenant network as the IaaS has it; `id` is the backend's (switch name, Neutron UUID)."""

    id: str
    tenant: str
    cidr: str
    gateway: str | None
    mtu: int
    reserved: tuple[str, ...] = ()

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.cidr).prefixlen


@dataclass(frozen=True)
class PortOwner:
    """Who a port belongs to: a pod (name/namespace/uid) or a node's own NIC (name)."""

    kind: OwnerKind
    name: str
    namespace: str | None
    uid: str | None
    tenant: str


@dataclass(frozen=True)
class Port:
    """A port with its fixed address. `ip` is the address only; `extra_ips` are additional
    allowed addresses/CIDRs in port security (a node NIC carries the Service CIDR there)."""

    id: str
    network_id: str
    tenant: str
    mac: str
    ip: str
    prefixlen: int
    owner: PortOwner | None
    node: str | None
    extra_ips: tuple[str, ...] = ()
    state: PortState | None = None
    # nested mode, VLAN subports: the VM NIC's port this one is a child of, and its VLAN id
    parent: str | None = None
    vlan: int | None = None

    @property
    def pooled(self) -> bool:
        return self.state == "pooled"

    @property
    def pod_uid(self) -> str | None:
        """The uid of the pod the port is bound to (None for pooled ports and node NICs)."""
        if self.owner is None or self.owner.kind != "pod" or self.state == "pooled":
            return None
        return self.owner.uid

    @property
    def cidr(self) -> str:
        """The address with its prefix length, as the annotation carries it."""
        return f"{self.ip}/{self.prefixlen}"


@dataclass(frozen=True)
class PortRequest:
    """One port for `IaaS.create_ports`."""

    port_id: str
    owner: PortOwner | None
    node: str | None = None
    extra_allowed_cidrs: tuple[str, ...] = field(default=())

    @property
    def state(self) -> PortState | None:
        """Pod ports are created bound, owner-less ones pooled (node NICs have no state)."""
        if self.owner is None:
            return "pooled"
        return "bound" if self.owner.kind == "pod" else None


@dataclass(frozen=True)
class Claim:
    """What `IaaS.claim_port` did: `hit` = a pooled port was taken, else one was created
    (`existing` = the pod already had a bound port, returned unchanged)."""

    port: Port
    hit: bool
    existing: bool = False


def port_id_for(owner: PortOwner) -> str:
    """The deterministic port id of CONVENTIONS.md (`pod-<uid>`, `node-<name>`), so a port re-created
    after a crash can never be a duplicate."""
    if owner.kind == "pod":
        if not owner.uid:
            raise ValueError(f"pod {owner.namespace}/{owner.name} has no uid")
        return f"pod-{owner.uid}"
    return f"node-{owner.name}"


def pool_port_id() -> str:
    """A fresh name for a pooled port: random, since a pooled port belongs to nobody yet."""
    return POOL_PREFIX + secrets.token_hex(8)


class IaaS(ABC):
    """Tenant networks and ports. All methods are thread-safe; create/delete are idempotent."""

    @abstractmethod
    def ensure_network(self, spec: NetworkSpec) -> Network:
        """Create the tenant's network, or return it if it exists (IaaSConflict if it differs in
        CIDR or gateway; MTU and reserved ranges are updated)."""

    @abstractmethod
    def get_network(self, tenant: str) -> Network | None: ...

    @abstractmethod
    def delete_network(self, tenant: str) -> None:
        """Delete the tenant's network and its ports; no error if it does not exist."""

    @abstractmethod
    def list_networks(self) -> list[Network]: ...

    @abstractmethod
    def create_port(
        self,
        network: Network,
        owner: PortOwner | None,
        port_id: str,
        node: str | None = None,
        extra_allowed_cidrs: Sequence[str] = (),
    ) -> Port:
        """Create a port with a fresh address; an existing port with that id is returned unchanged."""

    @abstractmethod
    def create_ports(self, network: Network, requests: Iterable[PortRequest]) -> list[Port]:
        """Create many ports in one transaction, each with a distinct address; results are in
        request order (existing ids are returned unchanged)."""

    @abstractmethod
    def claim_port(self, network: Network, owner: PortOwner, fallback_id: str, node: str | None = None) -> Claim:
        """Give the pod a port in ONE transaction, intent included: the pod's bound port if it
        has one; else a pooled port of the network, its identity (state=bound, pod, node) written
        only if it is still pooled (two claimers can never take the same one); else a new port
        `fallback_id` created bound."""

    @abstractmethod
    def release_ports(self, port_ids: Iterable[str]) -> list[Port]:
        """Scrub ports back into their network's pool in one transaction per network: identity
        and binding cleared, state=pooled, a fresh name and a fresh address (see CONVENTIONS.md).
        Missing ports are skipped; returns the pooled ports."""

    @abstractmethod
    def trim_pool(self, tenant: str, keep: int) -> int:
        """Delete the tenant's pooled ports beyond `keep` (only ports still pooled when the
        transaction runs); returns how many went."""

    @abstractmethod
    def ports_of_pod(self, uid: str) -> list[Port]:
        """Every port bound to the pod with this uid (normally one; an indexed lookup)."""

    @abstractmethod
    def pooled_ports(self, tenant: str) -> list[Port]:
        """The tenant network's pooled ports (an indexed lookup)."""

    @abstractmethod
    def bind_port(self, port_id: str, node: str) -> Port:
        """Bind the port to `node` (the data path comes up there); PortNotFound if it is gone."""

    @abstractmethod
    def delete_port(self, port_id: str) -> None:
        """Delete the port; no error if it does not exist."""

    @abstractmethod
    def delete_ports(self, port_ids: Iterable[str]) -> None:
        """Delete many ports in one transaction; missing ones are skipped."""

    @abstractmethod
    def get_port(self, port_id: str) -> Port | None: ...

    @abstractmethod
    def list_ports(self, tenant: str | None = None) -> list[Port]:
        """netctl's ports (all tenants, or one)."""

    # -- nested mode (pods inside tenant VMs, DESIGN §1): optional capabilities -------------------

    def attach_subport(self, port_id: str, parent_id: str) -> Port:
        """Make `port_id` a VLAN child of the VM NIC's port `parent_id` (a Neutron trunk subport),
        with the lowest VLAN id free under that parent; idempotent (a child of `parent_id` already
        keeps its VLAN). Returns the port with `parent` and `vlan` set."""
        raise NestingUnsupported(f"{type(self).__name__} cannot make trunk subports")

    def detach_subport(self, port_id: str) -> None:
        """Make `port_id` a plain port again (no parent, no VLAN); no-op if it is one or is gone."""
        raise NestingUnsupported(f"{type(self).__name__} cannot make trunk subports")

    def hotplug_port(self, port_id: str, vm_port_id: str) -> bool:
        """Attach `port_id` as a new NIC to the VM that holds the port `vm_port_id` (Nova
        interface-attach); idempotent: True if it was plugged now, False if it was already. The
        guest may see it asynchronously (the CNI answers "try again later" until it does)."""
        raise NestingUnsupported(f"{type(self).__name__} cannot hot-plug ports into VMs")

    def unplug_port(self, port_id: str) -> bool:
        """Detach `port_id` from whatever VM holds it; idempotent; True if something was unplugged."""
        raise NestingUnsupported(f"{type(self).__name__} cannot hot-plug ports into VMs")

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold a connection
        """Release connections; the object is unusable afterwards."""

    def __enter__(self) -> IaaS:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = [
    "Claim",
    "IaaS",
    "IaaSConflict",
    "IaaSError",
    "IaaSUnavailable",
    "NestingUnsupported",
    "Network",
    "NetworkNotFound",
    "NetworkSpec",
    "OwnerKind",
    "Port",
    "PortNotFound",
    "PortOwner",
    "PortRequest",
    "PortState",
    "SubnetExhausted",
    "pool_port_id",
    "port_id_for",
]
