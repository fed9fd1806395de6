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


def plug(inv: Invocation, conf: NetConf, port: PortAnnotation, routes: list[tuple[str, str]], log: Log,
         res: Resources) -> Result:
    """ADD: hand the pod its hot-plugged NIC, or create its VLAN sub-interface."""
    pod = nested.PodConfig(port.ip, port.gateway, port.mtu, tuple(routes))
    mark = nested.alias(conf.name, inv.container_id, inv.ifname)
    if conf.mode == "nested-vlan":
        from cni.plugin import nested_vlan_id

        vlan = nested_vlan_id(conf, port)
        assert vlan is not None
        trunk = conf.trunk_interface or ""
        done = _run(res, lambda: nested.plug_vlan(
            node_netns=conf.node_netns, trunk=trunk, target_netns=inv.netns, ifname=inv.ifname, vlan=vlan,
            mac=port.mac, pod=pod, mark=mark), "plugging the pod")
        log.info(f"plugged {done.ifname} ({port.ip}, {port.mac}) as VLAN {vlan} of {trunk}, port {port.port_id}")
    else:
        done = _run(res, lambda: nested.plug_nic(
            node_netns=conf.node_netns, target_netns=inv.netns, ifname=inv.ifname, mac=port.mac,
            port_id=port.port_id, pod=pod, mark=mark), "plugging the pod")
        log.info(f"plugged {done.ifname} ({port.ip}, {port.mac}), the hot-plugged NIC {done.node_ifname}, "
                 f"port {port.port_id}")
    return Result(
        interfaces=(Interface(done.ifname, done.mac, inv.netns, done.mtu),),
        ips=(IPConfig(port.ip, 0, port.gateway),),
        routes=((Route("0.0.0.0/0", port.gateway),) if port.gateway else ()) + tuple(Route(d, v) for d, v in routes),
        dns=conf.dns,
    )


def delete(inv: Invocation, conf: NetConf, log: Log, res: Resources) -> None:
    """DEL: give the NIC back to the node namespace / delete the VLAN link; idempotent."""
    unplug = nested.unplug_vlan if conf.mode == "nested-vlan" else nested.unplug_nic
    done = _run(res, lambda: unplug(node_netns=conf.node_netns, target_netns=inv.netns or None, ifname=inv.ifname,
                                    network=conf.name, container_id=inv.container_id), "unplugging the pod")
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
    if problems:
        raise CniError(Code.CHECK_FAILED, f"{inv.ifname} in {inv.netns} is not as ADD left it", "; ".join(problems))


def status(conf: NetConf, res: Resources) -> None:
    """STATUS: nested-vlan needs its trunk up; nested-nic needs only the node namespace."""
    if conf.mode == "nested-vlan":
        why = res.netlink(lambda: nested.trunk_problem(conf.node_netns, conf.trunk_interface or ""))
        if why:
            raise CniError(Code.PLUGIN_NOT_AVAILABLE, "the VM's trunk interface cannot carry pods", why)


def gc(conf: NetConf, valid: list[tuple[str, str]], log: Log, res: Resources) -> None:
    done = _run(res, lambda: nested.gc(node_netns=conf.node_netns, network=conf.name, valid=valid),
                "garbage-collecting attachments")
    log.info(f"GC kept {len(valid)} valid attachment(s), released {', '.join(done) or 'nothing'}")
