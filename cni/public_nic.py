"""The optional public NIC (`net1`): a second ovs-mode veth on the provider network (in the nested
modes the pod's second NIC or VLAN from its VM: cni.nested_verbs.plug_public), and the
source-based policy routing that makes replies from its address leave through it.

Why policy routing: the pod's default route stays on `eth0` (the tenant network: Services, peers,
the tenant's own egress). A packet from the internet to the public address arrives on `net1`;
without a rule its reply would follow the main table's default route out of `eth0`, where the
tenant port's port security drops it (wrong source address). So:
    ip rule add from <public ip> lookup <table> priority <priority>
    ip route add <public subnet> dev net1 src <public ip> table <table>   (on-link peers)
    ip route add default via <public gateway> dev net1 table <table>
The planning is pure (`plan`); `apply`/`check` are the netlink steps (pyroute2), run inside the
pod's netns on the calling thread, so the node agent runs them on its plumbing thread.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cni.spec import CniError, Code, Interface, IPConfig, Result

if TYPE_CHECKING:
    from cni.netconf import NetConf
    from cni.plugin import Log, Resources
    from cni.spec import Invocation
    from netctl.annotations import PortAnnotation

# A pod netns holds only what we put there, so fixed numbers are safe; they sit below the main
# table's rule (32766) and leave the low numbers free for anything a chained plugin adds.
TABLE = 1000
PRIORITY = 1000
SCOPE_LINK = 253
RT_TABLE_UNSPEC = 0


@dataclass(frozen=True)
class PolicyRouting:
    """What `net1` needs besides its address (which the veth plumbing configures)."""

    source: str  # the public address
    subnet: str  # its subnet, on-link through net1
    gateway: str | None  # the provider network's gateway (None: on-link peers only)
    table: int = TABLE
    priority: int = PRIORITY


def plan(port: PortAnnotation, table: int = TABLE, priority: int = PRIORITY) -> PolicyRouting:
    iface = port.interface
    return PolicyRouting(str(iface.ip), str(iface.network), port.gateway, table, priority)


def valid_with_public(valid: Iterable[tuple[str, str]], public_ifname: str) -> list[tuple[str, str]]:
    """GC's valid attachments, each container's public NIC included: the runtime only knows the
    interface it asked for (`eth0`); `net1` lives and dies with the same container."""
    pairs = list(valid)
    return pairs + [(cid, public_ifname) for cid in sorted({cid for cid, _ in pairs})]


@contextlib.contextmanager
def _in_netns(path: str) -> Iterator[Any]:
    """An IPRoute opened inside the netns at `path`; the calling thread stays there for the block."""
    from pyroute2 import IPRoute

    from netctl.netns import thread_in

    with thread_in(path):
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def apply(netns: str, ifname: str, pr: PolicyRouting) -> None:
    """Install the rule and the table's routes (idempotent: an ADD re-run replaces them).

    Raises OSError (pyroute2's NetlinkError is one) on failure; LookupError if `ifname` is missing.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    with _in_netns(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise LookupError(f"{ifname} is missing in {netns}")
        ipr.route("replace", dst=pr.subnet, oif=idx, table=pr.table, scope=SCOPE_LINK, prefsrc=pr.source)
        if pr.gateway is not None:
            ipr.route("replace", dst="0.0.0.0/0", gateway=pr.gateway, oif=idx, table=pr.table)
        try:
            ipr.rule("add", table=pr.table, priority=pr.priority, src=pr.source, src_len=32)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


def check(netns: str, ifname: str, pr: PolicyRouting) -> list[str]:
    """What differs from `apply`'s result (empty: all there), for CHECK."""
    problems: list[str] = []
    try:
        with _in_netns(netns) as ipr:
            idx = _index(ipr, ifname)
            if idx is None:
                return [f"{ifname} is missing in {netns}"]
            rules = [r for r in ipr.get_rules(family=2)
                     if r.get_attr("FRA_TABLE") == pr.table and r.get_attr("FRA_SRC") == pr.source
                     and r["src_len"] == 32]
            if not rules:
                problems.append(f"no rule 'from {pr.source} lookup {pr.table}' in {netns}")
            routes = ipr.get_routes(family=2, table=pr.table)
            have = {(_dst(r), r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF")) for r in routes}
            if (pr.subnet, None, idx) not in have:
                problems.append(f"table {pr.table} lacks {pr.subnet} dev {ifname} in {netns}")
            if pr.gateway is not None and ("0.0.0.0/0", pr.gateway, idx) not in have:
                problems.append(f"table {pr.table} lacks default via {pr.gateway} dev {ifname} in {netns}")
    except OSError as e:
        problems.append(f"netns {netns}: {e.strerror or e}")
    return problems


def _dst(route: Any) -> str:
    return f"{route.get_attr('RTA_DST') or '0.0.0.0'}/{route['dst_len']}"


# ---- the verbs' share (called by cni.plugin; ovs mode and nested-vlan on the VM's OVS) ---------------


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    ann = meta.get("annotations") if isinstance(meta, Mapping) else None
    return ann if isinstance(ann, Mapping) else {}


def requested(pod: Mapping[str, Any], pod_ref: str) -> bool:
    """Does the pod ask for a public IP (`netctl.io/public-ip: "true"`)? Malformed: code 101."""
    from netctl.annotations import AnnotationError, public_ip_requested

    try:
        return public_ip_requested(_annotations(pod).get(_public_ip_key()))
    except AnnotationError as e:
        raise CniError(Code.ANNOTATION_INVALID, f"{pod_ref}: {e}",
                       "fix the pod's annotation; the next sandbox attempt picks it up") from None


def _public_ip_key() -> str:
    from netctl.annotations import PUBLIC_IP_ANNOTATION

    return PUBLIC_IP_ANNOTATION


def awaited(pod: Mapping[str, Any], pod_ref: str) -> str | None:
    """The annotation ADD still waits for (None: none): the tenant port's, then the public port's
    if the pod asks for one. A pod that does not ask never waits for the public port."""
    from netctl.annotations import PORT_ANNOTATION, PUBLIC_PORT_ANNOTATION

    ann = _annotations(pod)
    if ann.get(PORT_ANNOTATION) is None:
        return PORT_ANNOTATION
    if ann.get(PUBLIC_PORT_ANNOTATION) is None and requested(pod, pod_ref):
        return PUBLIC_PORT_ANNOTATION
    return None


def public_port_of(pod: Mapping[str, Any], pod_ref: str, uid: str) -> PortAnnotation | None:
    """The pod's public port (None: it has none), refused unless it is on the provider network and
    is this pod's own (`pub-<uid>`: the controller's deterministic name, so an annotation copied
    from another pod can never plug that pod's public address here)."""
    from netctl.annotations import PUBLIC_NETWORK, PUBLIC_PORT_ANNOTATION, AnnotationError, PortAnnotation

    text = _annotations(pod).get(PUBLIC_PORT_ANNOTATION)
    if text is None:
        return None
    try:
        port = PortAnnotation.from_json(text if isinstance(text, str) else "", PUBLIC_PORT_ANNOTATION)
    except AnnotationError as e:
        raise CniError(Code.ANNOTATION_INVALID, f"{pod_ref} has an invalid {PUBLIC_PORT_ANNOTATION} annotation: {e}",
                       "the netctl controller wrote it; check the controller's log") from None
    if port.tenant != PUBLIC_NETWORK or port.port_id != f"pub-{uid}":
        raise CniError(Code.TENANCY, f"{pod_ref}'s {PUBLIC_PORT_ANNOTATION} annotation names port "
                       f"{port.port_id!r} of {port.tenant!r}, not this pod's public port pub-{uid}; refusing it")
    return port


def plug(inv: Invocation, conf: NetConf, port: PortAnnotation, ns: str, name: str, uid: str,
         log: Log, res: Resources) -> Result:
    """Plug `net1` like eth0 (a veth on br-int with the port's iface-id) but without a default route
    in the main table, then its policy routing; on failure nothing of `net1` is left."""
    from cni import ovs_binding as ob
    from cni.plugin import nested_vlan_id
    from netctl.annotations import PUBLIC_IFNAME

    host = ob.host_ifname(inv.container_id, PUBLIC_IFNAME)
    ids = {ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: PUBLIC_IFNAME, ob.EXT_POD: f"{ns}/{name}",
           ob.EXT_NETWORK: conf.name, ob.EXT_POD_UID: uid}
    routing = plan(port)

    vlan = nested_vlan_id(conf, port)  # nested-vlan on the VM's OVS: an access port of the public VLAN

    def plumb(ovs: Any, hns: Any) -> Any:
        done = ob.plug_port(
            ovsdb=conf.ovsdb, bridge=conf.bridge, ovs_netns=conf.ovs_netns, target_netns=inv.netns,
            ifname=PUBLIC_IFNAME, host_ifname=host, port_id=port.port_id, mac=port.mac, cidr=port.ip,
            gateway=None, mtu=port.mtu, owner_tag=f"{ob.OWNER_POD_PREFIX}{ns}/{name}", external_ids=ids,
            alias=ob.attachment_alias(conf.name, inv.container_id, PUBLIC_IFNAME), vlan=vlan, ovs=ovs, host=hns,
            wait_attached=False,  # as eth0 (DESIGN §5): vswitchd attaches it in the background; CHECK verifies
        )
        try:
            apply(inv.netns, PUBLIC_IFNAME, routing)
        except (OSError, LookupError) as e:
            ob.unplug_port(ovsdb=conf.ovsdb, ovs_netns=conf.ovs_netns, host_ifname=host,
                           match={ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: PUBLIC_IFNAME},
                           ovs=ovs, host=hns)
            raise ob.LinkError(f"policy routing for {PUBLIC_IFNAME} in {inv.netns}: {e}") from None
        return done

    done = res.plumb(conf, plumb)
    log.info(f"plugged {done.ifname} ({port.ip}, {port.mac}) <-> {done.host_ifname} "
             f"public port {port.port_id}, replies from {routing.source} via table {routing.table}")
    return Result(
        interfaces=(Interface(done.host_ifname, done.host_mac), Interface(done.ifname, done.mac, inv.netns, done.mtu)),
        ips=(IPConfig(port.ip, 1, port.gateway),),
    )


def combined(tenant: Result, public: Result) -> Result:
    """eth0's result with net1's interfaces and address appended (its `ips[].interface` shifted)."""
    shift = len(tenant.interfaces)
    ips = tuple(IPConfig(ip.address, None if ip.interface is None else ip.interface + shift, ip.gateway)
                for ip in public.ips)
    return Result(tenant.interfaces + public.interfaces, tenant.ips + ips, tenant.routes, tenant.dns)


def unplug(inv: Invocation, conf: NetConf, res: Resources) -> list[str]:
    """DEL's share: remove net1's OVS port and host veth (idempotent; nothing there is fine)."""
    from cni import ovs_binding as ob
    from netctl.annotations import PUBLIC_IFNAME

    host = ob.host_ifname(inv.container_id, PUBLIC_IFNAME)
    match = {ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: PUBLIC_IFNAME}

    def run(ovs: Any, hns: Any) -> list[str]:
        # With the agent's warm OVSDB view, a pod that never had a public NIC (most) costs one
        # lookup in its replica, not a netlink round trip. (ADD rolls a half-plugged net1 back, and
        # GC removes a veth whose OVS port is gone.)
        if ovs is not None and not ovs.find_interfaces(match):
            return []
        return list(ob.unplug_port(ovsdb=conf.ovsdb, ovs_netns=conf.ovs_netns, host_ifname=host, match=match,
                                   ovs=ovs, host=hns))

    return list(res.plumb(conf, run))


def check_from_prev(inv: Invocation, conf: NetConf, prev: Result, res: Resources) -> list[str]:
    """CHECK's share: if prevResult lists net1 in this sandbox, the same checks as eth0 plus the
    policy routing; [] when it is all in place (or the pod has no public NIC)."""
    import ipaddress

    from cni import ovs_binding as ob
    from netctl.annotations import PUBLIC_IFNAME

    index = next((i for i, itf in enumerate(prev.interfaces)
                  if itf.name == PUBLIC_IFNAME and itf.sandbox == inv.netns), None)
    if index is None:
        return []
    ips = [ip for ip in prev.ips if ip.interface == index]
    problems: list[str] = res.plumb(conf, lambda ovs, hns: ob.check_port(
        ovsdb=conf.ovsdb, bridge=conf.bridge, ovs_netns=conf.ovs_netns, target_netns=inv.netns,
        ifname=PUBLIC_IFNAME, host_ifname=ob.host_ifname(inv.container_id, PUBLIC_IFNAME),
        mac=prev.interfaces[index].mac, cidrs=[ip.address for ip in ips],
        external_ids={ob.EXT_CONTAINER_ID: inv.container_id, ob.EXT_IFNAME: PUBLIC_IFNAME}, ovs=ovs, host=hns,
        tagged=conf.mode == "nested-vlan",
    ))
    for ip in ips:
        iface = ipaddress.IPv4Interface(ip.address)
        problems += check(inv.netns, PUBLIC_IFNAME,
                          PolicyRouting(str(iface.ip), str(iface.network), ip.gateway))
    return problems
