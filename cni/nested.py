"""Nested mode: pods inside a tenant VM, plugged with an interface the IaaS gave the VM.

Two variants (conflist `mode`, see cni/netconf.py):

- nested-nic: the IaaS hot-plugged the pod's port into the VM as a NIC of its own. We find it
  by the port's MAC in the node's namespace (its name is whatever the guest kernel chose), move
  it into the pod netns, rename it to CNI_IFNAME and configure address, routes and MTU. DEL moves
  it back to the node namespace under the recognisable name `nic<mac without colons>` (the IaaS
  detaches it when the controller frees the port). A NIC that is not there yet is "try again
  later": the IaaS attaches asynchronously.
- nested-vlan: the VM's NIC is a trunk; the pod gets a VLAN sub-interface of it (the port's
  segmentation id, the port's MAC), created under a temporary name in the node namespace and moved
  into the pod netns as CNI_IFNAME. DEL deletes it.

Everything we move or create carries the alias `netctl-nested <network> <container id> <ifname>`,
so DEL and GC recognise our own interfaces without local state. A failed ADD undoes its work
(a moved NIC goes back, a created VLAN link is deleted) before the error is raised.
Netlink only (pyroute2), no `ip` subprocesses; the handles are opened per call on the calling
thread (ovs_binding.Netns).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from cni.ovs_binding import Netns, attachment_alias
from cni.ovs_binding import parse_alias as parse_ovs_alias

ALIAS_TAG = "netctl-nested"
RETURNED_PREFIX = "nic"
IFF_UP = 1


class NestedError(Exception):
    """Plugging or unplugging failed; the message says what and where."""


class NotAttached(NestedError):
    """The NIC the IaaS is to hot-plug is not in the node namespace (yet): try again later."""


class KernelUnsupported(NestedError):
    """The node's kernel lacks what the mode needs (e.g. 802.1Q VLAN support)."""


@dataclass(frozen=True)
class Plugged:
    """What plug_nic / plug_vlan left in the pod netns (for the CNI result)."""

    ifname: str
    mac: str
    sandbox: str
    mtu: int
    node_ifname: str  # the NIC's name in the node namespace before the move ("" for VLAN)


@dataclass(frozen=True)
class PodConfig:
    """The L3 configuration of the pod interface (from the port annotation + netconf)."""

    cidr: str
    gateway: str | None
    mtu: int
    routes: tuple[tuple[str, str], ...] = ()


def alias(network: str, container_id: str, ifname: str) -> str:
    """The alias of an interface the nested modes moved or created (the ovs-mode format, own tag)."""
    return attachment_alias(network, container_id, ifname, ALIAS_TAG)


def parse_alias(text: str | None) -> tuple[str, str, str] | None:
    """(network, container id, ifname) of one of our nested aliases, None for anything else."""
    return parse_ovs_alias(text, ALIAS_TAG)


def returned_name(mac: str) -> str:
    """The name a NIC gets back in the node namespace: `nic` + 12 hex digits (15 bytes, fits IFNAMSIZ)."""
    return RETURNED_PREFIX + mac.replace(":", "").lower()


# ---- netlink helpers --------------------------------------------------------------------------


def _err(what: str, e: BaseException) -> NestedError:
    if isinstance(e, NetlinkError):
        return NestedError(f"{what}: {e.args[1] if len(e.args) > 1 else e} (errno {e.code})")
    return NestedError(f"{what}: {e}")


@contextlib.contextmanager
def _open(path: str, what: str, missing_ok: bool = False) -> Iterator[Netns | None]:
    try:
        ns: Netns | None = Netns(path)
    except FileNotFoundError:
        if not missing_ok:
            raise NestedError(f"the {what} {path} does not exist") from None
        ns = None
    except OSError as e:
        raise NestedError(f"cannot open the {what} {path}: {e.strerror or e}") from None
    try:
        yield ns
    finally:
        if ns is not None:
            ns.close()


def _links(ns: Netns) -> list[Any]:
    try:
        return list(ns.ipr.get_links())
    except NetlinkError as e:
        raise _err(f"listing links in {ns.path}", e) from None


def _by_mac(ns: Netns, mac: str) -> list[Any]:
    return [link for link in _links(ns) if (link.get_attr("IFLA_ADDRESS") or "").lower() == mac.lower()]


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _configure(ns: Netns, idx: int, ifname: str, pod: PodConfig) -> None:
    """Address, up, routes (default via the gateway, extra routes); `lo` up."""
    iface = ipaddress.IPv4Interface(pod.cidr)
    try:
        ns.ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ns.ipr.link("set", index=idx, state="up")
        lo = ns.index("lo")
        if lo is not None:
            ns.ipr.link("set", index=lo, state="up")
        if pod.gateway:
            ns.ipr.route("add", dst="default", gateway=pod.gateway, oif=idx)
        for dst, via in pod.routes:
            ns.ipr.route("add", dst=dst, gateway=via, oif=idx)
    except (NetlinkError, OSError) as e:
        raise _err(f"configuring {ifname} ({pod.cidr}, gateway {pod.gateway}) in {ns.path}", e) from None


# ---- nested-nic ---------------------------------------------------------------------------------


def plug_nic(*, node_netns: str, target_netns: str, ifname: str, mac: str, port_id: str, pod: PodConfig,
             mark: str) -> Plugged:
    """Move the hot-plugged NIC with `mac` from the node namespace into the pod netns as `ifname`.

    NotAttached if no interface has that MAC in the node namespace. On any later failure the NIC is
    moved back (named returned_name(mac)) before the error is raised.
    """
    with _open(node_netns, "node namespace") as node, _open(target_netns, "pod netns") as target:
        assert node is not None and target is not None
        if target.index(ifname) is not None:
            raise NestedError(f"{ifname} already exists in {target_netns}")
        found = _by_mac(node, mac)
        if not found:
            raise NotAttached(f"no interface with MAC {mac} in the node namespace {node_netns} — has the IaaS "
                              f"attached port {port_id} to this VM yet?")
        if len(found) > 1:
            names = ", ".join(sorted(str(link.get_attr("IFLA_IFNAME")) for link in found))
            raise NestedError(f"several interfaces have MAC {mac} in the node namespace {node_netns}: {names}")
        nic = found[0]
        old_name, idx = str(nic.get_attr("IFLA_IFNAME")), int(nic["index"])
        if nic["flags"] & IFF_UP and _has_ipv4(node, idx):
            raise NestedError(f"{old_name} (MAC {mac}) in the node namespace is up with an address: it is in use "
                              f"by the node, refusing to take it for port {port_id}")
        try:
            node.ipr.link("set", index=idx, state="down")
            node.ipr.link("set", index=idx, ifalias=mark)
            node.ipr.link("set", index=idx, net_ns_fd=target.fd)
        except (NetlinkError, OSError) as e:
            with contextlib.suppress(Exception):
                _release_in(node, idx, mac)
            raise _err(f"moving {old_name} (MAC {mac}) from {node_netns} into {target_netns}", e) from None
        try:
            moved = _by_mac(target, mac)
            if len(moved) != 1:
                raise NestedError(f"{old_name} (MAC {mac}) did not arrive in {target_netns}")
            pidx = int(moved[0]["index"])
            try:
                target.ipr.link("set", index=pidx, ifname=ifname, mtu=pod.mtu)
            except (NetlinkError, OSError) as e:
                raise _err(f"renaming {old_name} to {ifname} (MTU {pod.mtu}) in {target_netns}", e) from None
            _configure(target, pidx, ifname, pod)
        except BaseException:
            with contextlib.suppress(Exception):
                _return_nic(target, node, mac)
            raise
    return Plugged(ifname, mac, target_netns, pod.mtu, old_name)


def _has_ipv4(ns: Netns, idx: int) -> bool:
    try:
        return bool(ns.ipr.get_addr(index=idx, family=2))
    except NetlinkError:
        return False


def _release_in(node: Netns, idx: int, mac: str) -> None:
    """A NIC back in the node namespace: down, recognisable name, no alias of ours."""
    node.ipr.link("set", index=idx, state="down")
    with contextlib.suppress(NetlinkError):
        node.ipr.link("set", index=idx, ifname=returned_name(mac))
    node.ipr.link("set", index=idx, ifalias="")


def _return_nic(target: Netns, node: Netns, mac: str) -> str | None:
    """Move the NIC with `mac` from the pod netns back to the node namespace; its new name, or None."""
    found = _by_mac(target, mac)
    if not found:
        return None
    idx = int(found[0]["index"])
    target.ipr.link("set", index=idx, state="down")
    # renamed first (in the pod netns) so it cannot collide with a node interface of the same name
    target.ipr.link("set", index=idx, ifname=returned_name(mac))
    target.ipr.link("set", index=idx, net_ns_fd=node.fd)
    back = _by_mac(node, mac)
    if not back:
        return None
    _release_in(node, int(back[0]["index"]), mac)
    return returned_name(mac)


def unplug_nic(*, node_netns: str, target_netns: str | None, ifname: str, network: str,
               container_id: str) -> list[str]:
    """Return this attachment's NIC to the node namespace; idempotent.

    The pod netns may be gone (a virtual NIC goes with it, a real one returns to the node by
    itself) and the ADD may never have completed; both are no-ops. Also releases a NIC left in the
    node namespace with our alias by an ADD killed mid-way. Returns the names it released.
    """
    want = (network, container_id, ifname)
    done: list[str] = []
    with _open(node_netns, "node namespace") as node:
        assert node is not None
        if target_netns:
            with _open(target_netns, "pod netns", missing_ok=True) as target:
                if target is not None:
                    link = target.link(ifname)
                    if link is not None and parse_alias(link.get_attr("IFLA_IFALIAS")) == want:
                        mac = str(link.get_attr("IFLA_ADDRESS"))
                        try:
                            name = _return_nic(target, node, mac)
                        except (NetlinkError, OSError) as e:
                            raise _err(f"moving {ifname} (MAC {mac}) from {target_netns} back to {node_netns}",
                                       e) from None
                        if name:
                            done.append(name)
        for link in _links(node):
            if parse_alias(link.get_attr("IFLA_IFALIAS")) == want:
                mac = str(link.get_attr("IFLA_ADDRESS"))
                try:
                    _release_in(node, int(link["index"]), mac)
                except (NetlinkError, OSError) as e:
                    raise _err(f"releasing {link.get_attr('IFLA_IFNAME')} in {node_netns}", e) from None
                done.append(returned_name(mac))
    return done


# ---- nested-vlan --------------------------------------------------------------------------------


def temp_name(mark: str) -> str:
    """The VLAN link's name between its creation in the node namespace and its move (`nv` + 12 hex)."""
    return "nv" + hashlib.sha1(mark.encode(), usedforsecurity=False).hexdigest()[:12]


def plug_vlan(*, node_netns: str, trunk: str, target_netns: str, ifname: str, vlan: int, mac: str,
              pod: PodConfig, mark: str) -> Plugged:
    """Create the VLAN `vlan` sub-interface of `trunk` and move it into the pod netns as `ifname`.

    It is created under a temporary name in the node namespace (the kernel looks a new link's name
    up there, where `ifname` is often the trunk's own name) and carries our alias from the start, so
    a DEL or GC finds it even if we die before the move. On any failure it is deleted before the
    error is raised.
    """
    with _open(node_netns, "node namespace") as node, _open(target_netns, "pod netns") as target:
        assert node is not None and target is not None
        link = node.link(trunk)
        if link is None:
            raise NestedError(f"trunk interface {trunk} (trunkInterface) does not exist in the node namespace "
                              f"{node_netns}")
        if not link["flags"] & IFF_UP:
            raise NestedError(f"trunk interface {trunk} is down in the node namespace {node_netns}")
        if target.index(ifname) is not None:
            raise NestedError(f"{ifname} already exists in {target_netns}")
        temp = temp_name(mark)
        if node.index(temp) is not None:
            with contextlib.suppress(NetlinkError):
                node.delete(temp)  # left by an ADD of this attachment that died before the move
        try:
            node.ipr.link("add", ifname=temp, kind="vlan", link=int(link["index"]), vlan_id=vlan,
                          address=mac, mtu=pod.mtu)
        except NetlinkError as e:
            if e.code == errno.EOPNOTSUPP:
                raise KernelUnsupported(f"the node's kernel cannot create VLAN interfaces (no 802.1Q support: "
                                        f"load the 8021q module) for VLAN {vlan} on {trunk}") from None
            if e.code == errno.EEXIST:
                raise NestedError(f"VLAN {vlan} on trunk {trunk} is already in use (another pod's sub-interface "
                                  f"not yet deleted?)") from None
            raise _err(f"creating VLAN {vlan} on {trunk} as {temp}", e) from None
        try:
            tidx = node.index(temp)
            if tidx is None:
                raise NestedError(f"{temp} (VLAN {vlan} on {trunk}) did not appear in {node_netns}")
            node.ipr.link("set", index=tidx, ifalias=mark)
            node.ipr.link("set", index=tidx, net_ns_fd=target.fd)
        except (NetlinkError, OSError, NestedError) as e:
            with contextlib.suppress(Exception):
                node.delete(temp)
            if isinstance(e, NestedError):
                raise
            raise _err(f"moving {temp} (VLAN {vlan} on {trunk}) into {target_netns}", e) from None
        try:
            idx = target.index(temp)
            if idx is None:
                raise NestedError(f"{temp} did not arrive in {target_netns}")
            try:
                target.ipr.link("set", index=idx, ifname=ifname)
            except (NetlinkError, OSError) as e:
                raise _err(f"renaming {temp} to {ifname} in {target_netns}", e) from None
            _configure(target, idx, ifname, pod)
        except BaseException:
            with contextlib.suppress(Exception):
                if not target.delete(ifname):
                    target.delete(temp)
            raise
    return Plugged(ifname, mac, target_netns, pod.mtu, "")


def unplug_vlan(*, node_netns: str, target_netns: str | None, ifname: str, network: str,
                container_id: str) -> list[str]:
    """Delete this attachment's VLAN interface; idempotent (netns gone, never created: no-op)."""
    want = (network, container_id, ifname)
    done: list[str] = []
    if target_netns:
        with _open(target_netns, "pod netns", missing_ok=True) as target:
            if target is not None:
                link = target.link(ifname)
                if link is not None and parse_alias(link.get_attr("IFLA_IFALIAS")) == want:
                    try:
                        if target.delete(ifname):
                            done.append(ifname)
                    except NetlinkError as e:
                        raise _err(f"deleting {ifname} in {target_netns}", e) from None
    with _open(node_netns, "node namespace", missing_ok=True) as node:
        for link in _links(node) if node is not None else ():
            if parse_alias(link.get_attr("IFLA_IFALIAS")) == want and _kind(link) == "vlan":
                name = str(link.get_attr("IFLA_IFNAME"))
                assert node is not None
                try:
                    if node.delete(name):
                        done.append(name)
                except NetlinkError as e:
                    raise _err(f"deleting {name} in {node_netns}", e) from None
    return done


# ---- CHECK / STATUS / GC --------------------------------------------------------------------------


def check(*, target_netns: str, ifname: str, mac: str, cidrs: Iterable[str], routes: Iterable[tuple[str, str | None]],
          mark: str, kind: str | None) -> list[str]:
    """Everything about the pod interface that differs from what ADD left; [] when all is in place.

    `routes`: (destination, gateway) pairs ADD reported ("0.0.0.0/0" is the default route);
    `kind`: "vlan" for nested-vlan, None to not check the link kind.
    """
    problems: list[str] = []
    try:
        ns = Netns(target_netns)
    except OSError as e:
        return [f"netns {target_netns}: {e.strerror or e}"]
    with ns:
        link = ns.link(ifname)
        if link is None:
            return [f"{ifname} is missing in {target_netns}"]
        where = f"{ifname} in {target_netns}"
        if not link["flags"] & IFF_UP:
            problems.append(f"{where} is down")
        if (link.get_attr("IFLA_ADDRESS") or "").lower() != mac.lower():
            problems.append(f"{where} has MAC {link.get_attr('IFLA_ADDRESS')}, expected {mac}")
        if link.get_attr("IFLA_IFALIAS") != mark:
            problems.append(f"{where} is not this attachment's (alias {link.get_attr('IFLA_IFALIAS')!r})")
        if kind is not None and _kind(link) != kind:
            problems.append(f"{where} is a {_kind(link) or 'plain'} link, expected {kind}")
        have = ns.addresses(int(link["index"]))
        problems += [f"{where} lacks address {c}" for c in cidrs if c not in have]
        try:
            table = [(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
                     for r in ns.ipr.get_routes(family=2, oif=int(link["index"]))]
        except NetlinkError as e:
            return [*problems, f"cannot read the routes of {where}: {e}"]
        for dst, gw in routes:
            net = ipaddress.IPv4Network(dst)
            want_dst = None if net.prefixlen == 0 else str(net.network_address)
            if not any(d == want_dst and plen == net.prefixlen and g == gw for d, plen, g in table):
                problems.append(f"{where} lacks the route {dst}" + (f" via {gw}" if gw else ""))
    return problems


def trunk_problem(node_netns: str, trunk: str) -> str | None:
    """STATUS of nested-vlan: why the trunk cannot carry pods now (None: it can)."""
    try:
        with _open(node_netns, "node namespace") as node:
            assert node is not None
            link = node.link(trunk)
    except NestedError as e:
        return str(e)
    if link is None:
        return f"trunk interface {trunk} does not exist in the node namespace {node_netns}"
    if not link["flags"] & IFF_UP:
        return f"trunk interface {trunk} is down in the node namespace {node_netns}"
    return None


def gc(*, node_netns: str, network: str, valid: Iterable[tuple[str, str]]) -> list[str]:
    """Release what an attachment of `network` not in `valid` left in the node namespace.

    Only node-namespace leftovers can be found (interfaces in pod netns go with the netns):
    NICs still carrying our alias are released, VLAN links with our alias deleted.
    """
    keep = set(valid)
    done: list[str] = []
    with _open(node_netns, "node namespace", missing_ok=True) as node:
        if node is None:
            return done
        for link in _links(node):
            mark = parse_alias(link.get_attr("IFLA_IFALIAS"))
            if mark is None or mark[0] != network or (mark[1], mark[2]) in keep:
                continue
            name = str(link.get_attr("IFLA_IFNAME"))
            try:
                if _kind(link) == "vlan":
                    if node.delete(name):
                        done.append(name)
                else:
                    mac = str(link.get_attr("IFLA_ADDRESS"))
                    _release_in(node, int(link["index"]), mac)
                    done.append(returned_name(mac))
            except (NetlinkError, OSError) as e:
                raise _err(f"releasing {name} in {node_netns}", e) from None
    return done
