"""The lab's management network: how simulated node "VMs" (network namespaces) reach the API server.

A real tenant VM has a management NIC on which its kubelet talks to the control plane. Here that
is a Linux bridge in the root namespace holding the first address of a small CIDR (the control
plane binds there) and one veth per node whose far end is ``mgmt0`` inside the node's netns. Only
the connected route of the CIDR exists in a node: no default route, so nothing a node does can
leak onto the host's real networks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from types import TracebackType

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

IFNAMSIZ = 15
HOST_IFNAME = "mgmt0"


def used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """Networks of every IPv4 address in the root namespace (to pick a CIDR nobody uses)."""
    nets = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2):
            nets.append(ipaddress.IPv4Network(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}", strict=False))
    return nets


def pick_free_cidr(pool: str = "10.254.0.0/16", prefixlen: int = 24) -> str:
    """First ``/prefixlen`` of ``pool`` that overlaps no address in the root namespace.

    Tests use this so that a running lab (on the default 10.254.0.0/24) and a test run never
    share a subnet, whose duplicate connected routes would misroute one of them.
    """
    used = used_ipv4_networks()
    for net in ipaddress.IPv4Network(pool).subnets(new_prefix=prefixlen):
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError(f"no free /{prefixlen} left in {pool}")


class MgmtNetwork:
    """Root-namespace bridge ``<prefix>mg`` plus one veth per host; ``remove()`` undoes all of it."""

    def __init__(self, prefix: str, cidr: str = "10.254.0.0/24") -> None:
        if len(prefix) + len("mg") > IFNAMSIZ or len(prefix) + len("m999") > IFNAMSIZ:
            raise ValueError(f"prefix {prefix!r} too long for interface names (max {IFNAMSIZ - 4} chars)")
        self.prefix = prefix
        self.network = ipaddress.IPv4Network(cidr)
        self.bridge = f"{prefix}mg"
        hosts = self.network.hosts()
        self.address = str(next(hosts))
        self._free = hosts
        self.hosts: dict[str, str] = {}  # netns -> address
        self._veths: dict[str, str] = {}  # netns -> root-side veth name
        self._created_netns: list[str] = []
        self._created_bridge = False
        self._lock = threading.Lock()  # the lab adds its nodes from a thread pool

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def create(self) -> MgmtNetwork:
        """Create the bridge (idempotent) with the first address of the CIDR, up."""
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.bridge)
            if not idx:
                ipr.link("add", ifname=self.bridge, kind="bridge")
                self._created_bridge = True
                idx = ipr.link_lookup(ifname=self.bridge)
            with contextlib.suppress(NetlinkError):  # EEXIST on a second create()
                ipr.addr("add", index=idx[0], address=self.address, prefixlen=self.prefixlen)
            ipr.link("set", index=idx[0], state="up")
        return self

    def add_host(self, ns: str) -> str:
        """Give netns ``ns`` (created if missing) a ``mgmt0`` on the bridge; returns its address."""
        with self._lock:
            return self._add_host(ns)

    def _add_host(self, ns: str) -> str:
        if ns in self.hosts:
            return self.hosts[ns]
        if ns not in netns.listnetns():
            netns.create(ns)
            self._created_netns.append(ns)
        address = str(next(self._free))
        veth = f"{self.prefix}m{len(self._veths)}"
        with IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname=self.bridge)
            if not bridge:
                raise RuntimeError(f"management bridge {self.bridge} does not exist: call create() first")
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": HOST_IFNAME, "net_ns_fd": ns})
            self._veths[ns] = veth
            (root_end,) = ipr.link_lookup(ifname=veth)
            ipr.link("set", index=root_end, master=bridge[0], state="up")
        with NetNS(ns) as nsr:
            (lo,) = nsr.link_lookup(ifname="lo")
            nsr.link("set", index=lo, state="up")
            (nic,) = nsr.link_lookup(ifname=HOST_IFNAME)
            nsr.addr("add", index=nic, address=address, prefixlen=self.prefixlen)
            nsr.link("set", index=nic, state="up")
        self.hosts[ns] = address
        return address

    def remove(self) -> None:
        """Delete every veth, netns and the bridge this object created (safe to call twice)."""
        with IPRoute() as ipr:
            for veth in self._veths.values():
                for idx in ipr.link_lookup(ifname=veth):
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=idx)
            if self._created_bridge:
                for idx in ipr.link_lookup(ifname=self.bridge):
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=idx)
        existing = set(netns.listnetns())
        for ns in self._created_netns:
            if ns in existing:
                netns.remove(ns)
        self._veths.clear()
        self._created_netns.clear()
        self.hosts.clear()
        self._created_bridge = False
        self._free = self.network.hosts()
        next(self._free)

    def __enter__(self) -> MgmtNetwork:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
