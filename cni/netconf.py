"""The plugin's typed network configuration (the object the runtime passes on stdin).

Standard keys (cniVersion, name, type, dns, prevResult, runtimeConfig) sit next to ours. Unknown
keys are ignored: the runtime injects some (args, capabilities' runtimeConfig) and the spec lets
plugins ignore what they do not use. Every error here is code 7 (invalid network config) and
names the key.

Example plugin entry of a conflist::

    {"type": "netctl-cni", "kubeconfig": "/etc/netctl/cni.kubeconfig", "bridge": "br-int",
     "ovsdb": "unix:/run/openvswitch/db.sock", "logFile": "/var/log/netctl-cni.log",
     "agentSocket": "/run/netctl/cni-agent.sock"}

Nested mode (pods inside a tenant VM, cni/nested.py): `"mode": "nested-nic"` (the IaaS hot-plugs
each pod's port as a NIC, found by MAC) or `"mode": "nested-vlan"` with `"trunkInterface": "eth0"`
(a VLAN sub-interface of the VM's trunk NIC per pod); `nodeNetns` (default: the netns the verb runs
in) is where those NICs live. `"vlanBackend": "ovs"` instead plugs nested-vlan pods as access ports
(tag = the port's VLAN) of an OVS bridge in the VM that holds the trunk NIC (`bridge`, `ovsdb`,
`ovsNetns` then name the VM's OVS): for VM kernels without 802.1Q support.
The default `"mode": "ovs"` is the veth on br-int.

With `agentSocket` the executable forwards the verbs to the node agent listening there (cni/agent.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni.spec import DNS, CniError, Code, parse_dns, validate_ifname

DEFAULT_OVSDB = "unix:/run/openvswitch/db.sock"
DEFAULT_BRIDGE = "br-int"
INIT_NETNS = "/proc/1/ns/net"  # the host's netns, even when the runtime runs us inside another
OWN_NETNS = "/proc/self/ns/net"  # the netns of the process running the verb (executable or node agent)
MODES = ("ovs", "nested-nic", "nested-vlan")  # see cni/nested.py for the nested ones
VLAN_BACKENDS = ("kernel", "ovs")  # nested-vlan: an 802.1Q sub-interface, or an access port on the VM's OVS
DEFAULT_ANNOTATION_TIMEOUT_S = 20.0
MAX_ANNOTATION_TIMEOUT_S = 600.0

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class NetConf:
    """Typed view of the config; defaults are the production values on a real node."""

    cni_version: str
    name: str
    type: str
    kubeconfig: str | None = None  # required for ADD (pod, node and namespace lookups)
    node_name: str = ""  # this node; "" only before from_dict() fills the fallback
    ovsdb: str = DEFAULT_OVSDB  # unix:/path or tcp:host:port of the Open_vSwitch DB
    bridge: str = DEFAULT_BRIDGE
    ovs_netns: str = INIT_NETNS  # where ovs-vswitchd runs: host veth ends are created there
    annotation_timeout_s: float = DEFAULT_ANNOTATION_TIMEOUT_S
    service_cidr: str | None = None  # route it via node_address (kproxy data path, DESIGN §1)
    node_address: str | None = None
    log_file: str | None = None
    agent_socket: str | None = None  # hand the verbs to the node agent there (cni.main, cni.agent)
    mode: str = "ovs"  # one of MODES: ovs (veth on br-int), nested-nic, nested-vlan (cni/nested.py)
    trunk_interface: str | None = None  # nested-vlan: the VM's trunk NIC in the node namespace
    node_netns: str = OWN_NETNS  # nested modes: where hot-plugged NICs / the trunk live
    vlan_backend: str = "kernel"  # nested-vlan: one of VLAN_BACKENDS
    dns: DNS = field(default_factory=DNS)
    prev_result: Any = None  # raw; parsed by the verbs that need it
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def netlink_only(self) -> bool:
        """The verbs plumb with netlink alone (nested-nic, kernel nested-vlan), no OVSDB."""
        return self.mode == "nested-nic" or (self.mode == "nested-vlan" and self.vlan_backend == "kernel")

    @property
    def service_route(self) -> tuple[str, str] | None:
        """(serviceCidr, nodeAddress) when both are configured, else None."""
        if self.service_cidr and self.node_address:
            return self.service_cidr, self.node_address
        return None

    @classmethod
    def from_dict(cls, conf: Mapping[str, Any], cni_version: str,
                  env: Mapping[str, str] | None = None) -> NetConf:
        """Validate `conf` (already version-checked); `env` supplies the NODE_NAME fallback."""
        env = os.environ if env is None else env
        name = _req_str(conf, "name")
        if not _NAME_RE.fullmatch(name):
            raise _bad("name", f"{name!r} must start with a letter or digit, then letters, digits, '_', '.', '-'")
        ovs_netns = _opt_str(conf, "ovsNetns") or INIT_NETNS
        if not ovs_netns.startswith("/"):
            raise _bad("ovsNetns", f"{ovs_netns!r} must be an absolute path (e.g. /run/netns/<name>)")
        bridge = _opt_str(conf, "bridge") or DEFAULT_BRIDGE
        if why := validate_ifname(bridge):
            raise _bad("bridge", f"{bridge!r} {why}")
        service_cidr, node_address = _service_route(conf)
        agent_socket = _opt_str(conf, "agentSocket") or None
        if agent_socket is not None and not agent_socket.startswith("/"):
            raise _bad("agentSocket", f"{agent_socket!r} must be an absolute path to the node agent's unix socket")
        mode, trunk, node_netns, vlan_backend = _nested(conf)
        return cls(
            cni_version=cni_version,
            name=name,
            type=_req_str(conf, "type"),
            kubeconfig=_opt_str(conf, "kubeconfig") or None,
            node_name=_opt_str(conf, "nodeName") or env.get("NODE_NAME") or os.uname().nodename.lower(),
            ovsdb=_ovsdb(conf),
            bridge=bridge,
            ovs_netns=ovs_netns,
            annotation_timeout_s=_timeout(conf),
            service_cidr=service_cidr,
            node_address=node_address,
            log_file=_opt_str(conf, "logFile") or None,
            agent_socket=agent_socket,
            mode=mode,
            trunk_interface=trunk,
            node_netns=node_netns,
            vlan_backend=vlan_backend,
            dns=parse_dns(conf.get("dns"), lambda what: _bad("dns", what)),
            prev_result=conf.get("prevResult"),
            raw=conf,
        )

    def require_kubeconfig(self) -> str:
        if not self.kubeconfig:
            raise _bad("kubeconfig", "is required for ADD: the plugin checks the pod, its namespace and the node")
        return self.kubeconfig


VALID_ATTACHMENTS = "cni.dev/valid-attachments"


def valid_attachments(conf: Mapping[str, Any]) -> list[tuple[str, str]]:
    """GC's `cni.dev/valid-attachments`: (containerID, ifname) pairs; malformed is code 7."""
    value = conf.get(VALID_ATTACHMENTS)
    if value is None:
        raise _bad(VALID_ATTACHMENTS, "is required for GC (a list of {containerID, ifname}); "
                   "without it every attachment would look stale")
    if not isinstance(value, list):
        raise _bad(VALID_ATTACHMENTS, f"must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        cid = item.get("containerID") if isinstance(item, dict) else None
        ifname = item.get("ifname") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not cid or not isinstance(ifname, str) or not ifname:
            raise _bad(VALID_ATTACHMENTS, f"entry {i} must be {{\"containerID\": str, \"ifname\": str}}, "
                       f"got {item!r}"[:300])
        out.append((cid, ifname))
    return out


def _bad(key: str, why: str) -> CniError:
    return CniError(Code.INVALID_NETCONF, f"invalid network config: {key} {why}")


def _req_str(conf: Mapping[str, Any], key: str) -> str:
    value = conf.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(key, f"must be a non-empty string, got {value!r}")
    return value


def _opt_str(conf: Mapping[str, Any], key: str) -> str:
    value = conf.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(key, f"must be a string, got {type(value).__name__}")
    return value


def _ovsdb(conf: Mapping[str, Any]) -> str:
    value = _opt_str(conf, "ovsdb") or DEFAULT_OVSDB
    if value.startswith("unix:") and value[5:].startswith("/"):
        return value
    if value.startswith("tcp:") and value.count(":") >= 2:
        return value
    raise _bad("ovsdb", f"{value!r} must be unix:/absolute/path or tcp:host:port")


def _nested(conf: Mapping[str, Any]) -> tuple[str, str | None, str, str]:
    """(mode, trunkInterface, nodeNetns, vlanBackend): nested-vlan needs the trunk, the others must not
    name one."""
    mode = _opt_str(conf, "mode") or "ovs"
    if mode not in MODES:
        raise _bad("mode", f"{mode!r} must be one of {', '.join(MODES)}")
    trunk = _opt_str(conf, "trunkInterface") or None
    if mode == "nested-vlan":
        if trunk is None:
            raise _bad("trunkInterface", "is required with mode nested-vlan (the VM's trunk NIC, e.g. eth0)")
        if why := validate_ifname(trunk):
            raise _bad("trunkInterface", f"{trunk!r} {why}")
    elif trunk is not None:
        raise _bad("trunkInterface", f"is only used with mode nested-vlan, not {mode}")
    node_netns = _opt_str(conf, "nodeNetns") or OWN_NETNS
    if not node_netns.startswith("/"):
        raise _bad("nodeNetns", f"{node_netns!r} must be an absolute path (e.g. /run/netns/<name>)")
    backend = _opt_str(conf, "vlanBackend") or "kernel"
    if backend not in VLAN_BACKENDS:
        raise _bad("vlanBackend", f"{backend!r} must be one of {', '.join(VLAN_BACKENDS)}")
    if backend != "kernel" and mode != "nested-vlan":
        raise _bad("vlanBackend", f"is only used with mode nested-vlan, not {mode}")
    return mode, trunk, node_netns, backend


def _timeout(conf: Mapping[str, Any]) -> float:
    value = conf.get("annotationTimeoutSeconds", DEFAULT_ANNOTATION_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("annotationTimeoutSeconds", f"must be a number, got {value!r}")
    if not 0 < value <= MAX_ANNOTATION_TIMEOUT_S:
        raise _bad("annotationTimeoutSeconds", f"must be in (0, {MAX_ANNOTATION_TIMEOUT_S:g}], got {value}")
    return float(value)


def _service_route(conf: Mapping[str, Any]) -> tuple[str | None, str | None]:
    cidr, addr = _opt_str(conf, "serviceCidr"), _opt_str(conf, "nodeAddress")
    if not cidr and not addr:
        return None, None
    import ipaddress  # only configs that use these pay for the import

    net = None
    if cidr:
        try:
            net = ipaddress.IPv4Network(cidr)
        except ValueError as e:
            raise _bad("serviceCidr", f"{cidr!r} is not an IPv4 network: {e}") from None
        if str(net) != cidr:
            raise _bad("serviceCidr", f"{cidr!r} must be written canonically as {net}")
    node = None
    if addr:
        try:
            node = ipaddress.IPv4Address(addr)
        except ValueError as e:
            raise _bad("nodeAddress", f"{addr!r} is not an IPv4 address: {e}") from None
    return (str(net) if net else None), (str(node) if node else None)
