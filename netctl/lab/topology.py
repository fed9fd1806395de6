"""What a lab contains, described apart from building it (Mininet-style).

Names give defaults: node ``alpha-1`` belongs to tenant ``alpha``; pods are placed by the
scheduler through a nodeSelector on the tenant label (and, for the demo, the node's hostname).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netctl.annotations import POD_MODES


@dataclass(frozen=True)
class TenantSpec:
    name: str
    cidr: str
    gateway: str | None = None
    # how its pods attach (Tenant spec.mode): ovs, or inside its node VMs nested-nic / nested-vlan
    mode: str = "ovs"

    def __post_init__(self) -> None:
        if self.mode not in POD_MODES:
            raise ValueError(f"tenant {self.name}: mode {self.mode!r} is not one of {', '.join(POD_MODES)}")

    @property
    def namespace(self) -> str:
        return f"tenant-{self.name}"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    tenant: str


@dataclass(frozen=True)
class PodSpec:
    name: str
    tenant: str
    node: str | None = None  # pin to a node (through a nodeSelector); None lets the scheduler choose
    public: bool = False  # ask for a public NIC (netctl.io/public-ip; needs Topology.public_cidr)


@dataclass(frozen=True)
class Topology:
    tenants: tuple[TenantSpec, ...]
    nodes: tuple[NodeSpec, ...] = ()
    pods: tuple[PodSpec, ...] = ()
    service_cidr: str = "10.96.0.0/16"
    mgmt_cidr: str = "10.254.0.0/24"
    # The optional public NIC's provider network (the controller's --public-cidr) and the lab's
    # "internet" netns on it; None = off. TEST-NET-3 (203.0.113.0/24) is fine inside namespaces.
    public_cidr: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {t.name for t in self.tenants}
        for n in self.nodes:
            if n.tenant not in names:
                raise ValueError(f"node {n.name}: unknown tenant {n.tenant}")
        nodes = {n.name for n in self.nodes}
        for p in self.pods:
            if p.tenant not in names:
                raise ValueError(f"pod {p.name}: unknown tenant {p.tenant}")
            if p.node is not None and p.node not in nodes:
                raise ValueError(f"pod {p.name}: unknown node {p.node}")
        for t in self.tenants:
            ipaddress.ip_network(t.cidr)
        if self.public_cidr is not None:
            ipaddress.ip_network(self.public_cidr)

    def tenant(self, name: str) -> TenantSpec:
        return next(t for t in self.tenants if t.name == name)

    def nodes_of(self, tenant: str) -> list[NodeSpec]:
        return [n for n in self.nodes if n.tenant == tenant]


def demo(tenants: int = 2, nodes_per_tenant: int = 2, pods_per_node: int = 2) -> Topology:
    """Two tenants, two nodes each, two pods per node: the smallest lab that shows isolation."""
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"][:tenants]
    ts = tuple(TenantSpec(n, f"10.{10 + i}.0.0/24") for i, n in enumerate(names))
    ns = tuple(NodeSpec(f"{t.name}-{j + 1}", t.name) for t in ts for j in range(nodes_per_tenant))
    ps = tuple(
        PodSpec(f"{n.name}-p{k + 1}", n.tenant, n.name) for n in ns for k in range(pods_per_node)
    )
    return Topology(ts, ns, ps)
