"""The lab's "internet": one netns on the provider network standing for the upstream router and a
host beyond it, to test the optional public NIC from outside the cluster.

It holds the provider network's gateway address on `eth0` (an OVN port `internet` with no port
security, as a router's port is) and, on `lo`, `INTERNET_HOST`: a TEST-NET-2 address that is
*not* on the provider subnet, so a pod's reply to it must take the pod's policy route (default via
the public gateway out of `net1`), not merely the on-link route.
"""

from __future__ import annotations

from typing import Any

from pyroute2 import NetNS, netns

from netctl import ipam

INTERNET_PORT = "internet"
INTERNET_HOST = "198.51.100.10"  # TEST-NET-2 (RFC 5737): exists only inside the lab's netns


def attach_internet(iaas: Any, network: Any, name: str, ovsdb: str, bridge: str, ovs_netns: str,
                    host_ifname: str) -> str:
    """Create netns `name` (if missing) plugged into `network` as its gateway; returns the gateway.

    `iaas` is the lab's OvnIaaS, `network` the provider Network (its gateway is the address taken).
    """
    from cni.ovs_binding import plug_port

    gateway = network.gateway
    if gateway is None:
        raise ValueError(f"network {network.id} has no gateway for the internet to hold")
    mac = ipam.mac_for_ip(gateway)
    iaas.ensure_uplink_port(network, INTERNET_PORT, mac, gateway)
    if name not in netns.listnetns():
        netns.create(name)
    plen = network.prefixlen
    plug_port(
        ovsdb=ovsdb, bridge=bridge, ovs_netns=ovs_netns, target_netns=f"/run/netns/{name}", ifname="eth0",
        host_ifname=host_ifname, port_id=INTERNET_PORT, mac=mac, cidr=f"{gateway}/{plen}", gateway=None,
        mtu=network.mtu, owner_tag="lab:internet",
    )
    with NetNS(name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        ns.addr("replace", index=lo, address=INTERNET_HOST, prefixlen=32)
    return str(gateway)
