"""The CNI verbs in the nested modes (conflist `mode` nested-nic / nested-vlan), called by cni/plugin.py.

Same contract as the ovs-mode verbs: ADD after the pod's port was resolved against the API, DEL
idempotent without the API or the pod netns, CHECK against prevResult, STATUS and GC without a
container. The netlink work is cni/nested.py; here its errors become the spec's error objects
and its outcome the CNI result. The plumbing runs through `Resources.netlink` (the node agent
serialises it on its plumbing thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cni import nested
from cni.netconf import NetConf
from cni.spec import CniError, Code, Interface, Invocation, IPConfig, Result, Route

if TYPE_CHECKING:
    from cni.plugin import Log, Resources
    from netctl.annotations import PortAnnotation

T = TypeVar("T")


def _run(res: Resources, fn: Callable[[], T], doing: str) -> T:
    try:
        return res.netlink(fn)
    except nested.NotAttached as e:
        raise CniError(Code.TRY_AGAIN_LATER, f"{doing}: the pod's NIC is not attached to this node yet",
                       str(e)) from None
    except nested.NestedError as e:
        raise CniError(Code.LINK_FAILURE, f"{doing}: interface setup failed", str(e)) from None


def _plug_one(inv: Invocation, conf: NetConf, port: PortAnnotation, ifname: str, pod: nested.PodConfig,
              res: Resources) -> nested.Plugged:
    """Hand `port` to the pod as `ifname`: its hot-plugged NIC, or a VLAN sub-interface of the trunk."""
    mark = nested.alias(conf.name, inv.container_id, ifname)
    if conf.mode == "nested-vlan":
        from cni.plugin import nested_vlan_id

        vlan = nested_vlan_id(conf, port)
        assert vlan is not None
        trunk = conf.trunk_interface or ""
        return _run(res, lambda: nested.plug_vlan(
            node_netns=conf.node_netns, trunk=trunk, target_netns=inv.netns, ifname=ifname, vlan=vlan,
            mac=port.mac, pod=pod, mark=mark), f"plugging {ifname}")
    return _run(res, lambda: nested.plug_nic(
        node_netns=conf.node_netns, target_netns=inv.netns, ifname=ifname, mac=port.mac,
        port_id=port.port_id, pod=pod, mark=mark), f"plugging {ifname}")


def _plugged(conf: NetConf, port: PortAnnotation, done: nested.Plugged) -> str:
    if conf.mode == "nested-vlan":
        return f"VLAN {port.vlan} of {conf.trunk_interface}"
    return f"the hot-plugged NIC {done.node_ifname}"


def plug(inv: Invocation, conf: NetConf, port: PortAnnotation, routes: list[tuple[str, str]], log: Log,
         res: Resources) -> Result:
    """ADD: hand the pod its hot-plugged NIC, or create its VLAN sub-interface."""
    pod = nested.PodConfig(port.ip, port.gateway, port.mtu, tuple(routes))
    done = _plug_one(inv, conf, port, inv.ifname, pod, res)
    log.info(f"plugged {done.ifname} ({port.ip}, {port.mac}) as {_plugged(conf, port, done)}, port {port.port_id}")
    return Result(
        interfaces=(Interface(done.ifname, done.mac, inv.netns, done.mtu),),
        ips=(IPConfig(port.ip, 0, port.gateway),),
        routes=((Route("0.0.0.0/0", port.gateway),) if port.gateway else ()) + tuple(Route(d, v) for d, v in routes),
        dns=conf.dns,
    )


def plug_public(inv: Invocation, conf: NetConf, port: PortAnnotation, log: Log, res: Resources) -> Result:
    """ADD's public NIC (`net1`): the pod's second NIC / VLAN from its VM, no route in the main table,
    then its policy routing (cni.public_nic); undone if the routing fails."""
    from cni import public_nic
    from netctl.annotations import PUBLIC_IFNAME

    done = _plug_one(inv, conf, port, PUBLIC_IFNAME, nested.PodConfig(port.ip, None, port.mtu), res)
    routing = public_nic.plan(port)
    try:
        res.netlink(lambda: public_nic.apply(inv.netns, PUBLIC_IFNAME, routing))
    except (OSError, LookupError) as e:
        _unplug(inv, conf, PUBLIC_IFNAME, res)
        raise CniError(Code.LINK_FAILURE, f"plugging {PUBLIC_IFNAME}: policy routing failed", str(e)) from None
    log.info(f"plugged {done.ifname} ({port.ip}, {port.mac}) as {_plugged(conf, port, done)}, public port "
             f"{port.port_id}, replies from {routing.source} via table {routing.table}")
    return Result(interfaces=(Interface(done.ifname, done.mac, inv.netns, done.mtu),),
                  ips=(IPConfig(port.ip, 0, port.gateway),))


def _unplug(inv: Invocation, conf: NetConf, ifname: str, res: Resources) -> list[str]:
    unplug = nested.unplug_vlan if conf.mode == "nested-vlan" else nested.unplug_nic
    return _run(res, lambda: unplug(node_netns=conf.node_netns, target_netns=inv.netns or None, ifname=ifname,
                                    network=conf.name, container_id=inv.container_id), f"unplugging {ifname}")


def delete(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> None:
    """DEL: give the NICs back to the node namespace / delete the VLAN links (eth0, and net1 if the
    pod had a public NIC); idempotent."""
    from netctl.annotations import PUBLIC_IFNAME

    done = _unplug(inv, conf, inv.ifname, res) + _unplug(inv, conf, PUBLIC_IFNAME, res)
    verb = "deleted" if conf.mode == "nested-vlan" else "returned to the node"
    log.info(f"{verb} {', '.join(done)}" if done else "nothing to remove")


def check(inv: Invocation, conf: NetConf, prev: Result, index: int, res: Resources) -> None:
    """CHECK: the interface has the MAC, addresses and routes ADD reported (and is a VLAN link in nested-vlan)."""
    mac = prev.interfaces[index].mac
    cidrs = [ip.address for ip in prev.ips if ip.interface == index]
    routes = [(r.dst, r.gw) for r in prev.routes]
    kind = "vlan" if conf.mode == "nested-vlan" else None
    mark = nested.alias(conf.name, inv.container_id, inv.ifname)
    problems = _run(res, lambda: nested.check(target_netns=inv.netns, ifname=inv.ifname, mac=mac, cidrs=cidrs,
                                              routes=routes, mark=mark, kind=kind), "checking the pod")
    problems += _check_public(inv, conf, prev, kind, res)
    if problems:
        raise CniError(Code.CHECK_FAILED, f"{inv.ifname} in {inv.netns} is not as ADD left it", "; ".join(problems))


def _check_public(inv: Invocation, conf: NetConf, prev: Result, kind: str | None, res: Resources) -> list[str]:
    """net1, if prevResult lists it in this sandbox: the interface as ADD left it, and its policy routing."""
    import ipaddress

    from cni import public_nic
    from netctl.annotations import PUBLIC_IFNAME

    index = next((i for i, itf in enumerate(prev.interfaces)
                  if itf.name == PUBLIC_IFNAME and itf.sandbox == inv.netns), None)
    if index is None:
        return []
    ips = [ip for ip in prev.ips if ip.interface == index]
    mark = nested.alias(conf.name, inv.container_id, PUBLIC_IFNAME)
    problems: list[str] = _run(res, lambda: nested.check(
        target_netns=inv.netns, ifname=PUBLIC_IFNAME, mac=prev.interfaces[index].mac,
        cidrs=[ip.address for ip in ips], routes=[], mark=mark, kind=kind), "checking the public NIC")
    for ip in ips:
        iface = ipaddress.IPv4Interface(ip.address)
        problems += public_nic.check(inv.netns, PUBLIC_IFNAME,
                                     public_nic.PolicyRouting(str(iface.ip), str(iface.network), ip.gateway))
    return problems


def status(conf: NetConf, res: Resources) -> None:
    """STATUS: nested-vlan needs its trunk up; nested-nic needs only the node namespace."""
    if conf.mode == "nested-vlan":
        why = res.netlink(lambda: nested.trunk_problem(conf.node_netns, conf.trunk_interface or ""))
        if why:
            raise CniError(Code.PLUGIN_NOT_AVAILABLE, "the VM's trunk interface cannot carry pods", why)


def gc(conf: NetConf, valid: list[tuple[str, str]], log: Log, res: Resources) -> None:
    from cni import public_nic
    from netctl.annotations import PUBLIC_IFNAME

    valid = public_nic.valid_with_public(valid, PUBLIC_IFNAME)  # net1 lives as long as its container's eth0
    done = _run(res, lambda: nested.gc(node_netns=conf.node_netns, network=conf.name, valid=valid),
                "garbage-collecting attachments")
    log.info(f"GC kept {len(valid)} valid attachment(s), released {', '.join(done) or 'nothing'}")
