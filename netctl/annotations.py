"""The `netctl.io/port` pod annotation: the controller writes it, the CNI plugin reads it.

It is the only channel between the two, and the CNI trusts nothing it cannot check, so
`from_json` validates everything and fails with an `AnnotationError` naming the problem
(never a KeyError/TypeError from deep inside). Unknown keys are ignored so a newer controller
can add fields without breaking an older CNI.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

PORT_ANNOTATION = "netctl.io/port"
TENANT_LABEL = "netctl.io/tenant"
# Optional public NIC (CONVENTIONS.md): the user asks with PUBLIC_IP_ANNOTATION="true"; the controller
# answers with PUBLIC_PORT_ANNOTATION, a port on the shared provider network in the PortAnnotation format.
PUBLIC_IP_ANNOTATION = "netctl.io/public-ip"
PUBLIC_PORT_ANNOTATION = "netctl.io/public-port"
PUBLIC_NETWORK = "public"  # the provider network's reserved tenant name (switch netctl-public)
PUBLIC_IFNAME = "net1"  # the public NIC inside the pod (eth0 stays the tenant NIC)
# Nested mode (pods inside tenant VMs): a Node's annotation naming the IaaS port of its VM's NIC,
# the parent of its pods' VLAN subports and the VM its pods' NICs are hot-plugged into.
# Default: the port the IaaS made for the node, `node-<node name>` (CONVENTIONS "Names").
VM_PORT_ANNOTATION = "netctl.io/vm-port"
# How a tenant's pods are attached (Tenant spec.mode, the CNI conflist's `mode`): a veth on the
# hypervisor's integration bridge, or inside the tenant's VMs, a hot-plugged NIC / a VLAN subport.
POD_MODES = ("ovs", "nested-nic", "nested-vlan")

MTU_MIN = 576
MTU_MAX = 9216
VLAN_MIN = 1
VLAN_MAX = 4094

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

# JSON key -> attribute name, in output order; `vlan` may be absent (null).
_KEYS = {
    "portId": "port_id",
    "mac": "mac",
    "ip": "ip",
    "gateway": "gateway",
    "mtu": "mtu",
    "tenant": "tenant",
    "networkId": "network_id",
    "vlan": "vlan",
}
_OPTIONAL = {"vlan"}


class AnnotationError(ValueError):
    """The annotation is malformed; the message says which field and why."""


def public_ip_requested(value: object) -> bool:
    """The pod's `netctl.io/public-ip` value: absent or "false" = no, "true" = yes; anything else is
    refused (AnnotationError) rather than guessed, so a typo never silently means "no public IP"."""
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise AnnotationError(f'{PUBLIC_IP_ANNOTATION} must be "true" or "false", got {value!r}')


def _nonempty_str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise AnnotationError(f"{name} must be a non-empty string without surrounding blanks, got {value!r}")
    return value


def _int_in(name: str, value: object, lo: int, hi: int) -> int:
    # bool is an int subclass; `true` is never a valid MTU or VLAN.
    if not isinstance(value, int) or isinstance(value, bool):
        raise AnnotationError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise AnnotationError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


@dataclass(frozen=True)
class PortAnnotation:
    """One pod's port: what the CNI configures inside the pod (static, no DHCP)."""

    port_id: str
    mac: str
    ip: str  # "a.b.c.d/len"
    gateway: str | None
    mtu: int
    tenant: str
    network_id: str
    vlan: int | None = None

    def __post_init__(self) -> None:
        _nonempty_str("portId", self.port_id)
        _nonempty_str("tenant", self.tenant)
        _nonempty_str("networkId", self.network_id)
        self._check_mac()
        iface = self._check_ip()
        self._check_gateway(iface)
        _int_in("mtu", self.mtu, MTU_MIN, MTU_MAX)
        if self.vlan is not None:
            _int_in("vlan", self.vlan, VLAN_MIN, VLAN_MAX)

    def _check_mac(self) -> None:
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            raise AnnotationError(f"mac must look like 0a:58:0a:01:00:05 (lower case), got {self.mac!r}")
        first = int(self.mac[:2], 16)
        if first & 1:
            raise AnnotationError(f"mac must be unicast, got {self.mac}")
        if self.mac == "00:00:00:00:00:00":
            raise AnnotationError("mac must not be all zeros")

    def _check_ip(self) -> ipaddress.IPv4Interface:
        if not isinstance(self.ip, str) or "/" not in self.ip:
            raise AnnotationError(f"ip must be an IPv4 address/prefix like 10.1.0.5/24, got {self.ip!r}")
        try:
            iface = ipaddress.IPv4Interface(self.ip)
        except ValueError as e:
            raise AnnotationError(f"ip {self.ip!r} is not a valid IPv4 address/prefix: {e}") from None
        if str(iface) != self.ip:
            raise AnnotationError(f"ip must be in canonical form {iface}, got {self.ip!r}")
        net = iface.network
        if net.prefixlen == 0:
            raise AnnotationError(f"ip prefix length must be 1..32, got {self.ip}")
        if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
            raise AnnotationError(f"ip {self.ip} is the network or broadcast address of {net}")
        return iface

    def _check_gateway(self, iface: ipaddress.IPv4Interface) -> None:
        if self.gateway is None:
            return
        if not isinstance(self.gateway, str):
            raise AnnotationError(f"gateway must be an IPv4 address or null, got {self.gateway!r}")
        try:
            gw = ipaddress.IPv4Address(self.gateway)
        except ValueError as e:
            raise AnnotationError(f"gateway {self.gateway!r} is not a valid IPv4 address: {e}") from None
        if str(gw) != self.gateway:
            raise AnnotationError(f"gateway must be in canonical form {gw}, got {self.gateway!r}")
        if gw not in iface.network:
            raise AnnotationError(f"gateway {gw} is outside the pod subnet {iface.network}")
        if gw == iface.ip:
            raise AnnotationError(f"gateway {gw} equals the pod address")

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The pod address with its subnet."""
        return ipaddress.IPv4Interface(self.ip)

    def to_json(self) -> str:
        """Compact JSON with the camelCase keys of CONVENTIONS.md."""
        return json.dumps({key: getattr(self, attr) for key, attr in _KEYS.items()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, name: str = PORT_ANNOTATION) -> PortAnnotation:
        """Parse and validate; any problem raises AnnotationError (`name`: the annotation's key, for
        the messages: the public NIC's `netctl.io/public-port` has the same format)."""
        if not isinstance(text, str | bytes | bytearray):
            raise AnnotationError(f"annotation must be JSON text, got {type(text).__name__}")
        try:
            data: Any = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise AnnotationError(f"annotation {name} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise AnnotationError(f"{name} must be a JSON object, not {type(data).__name__}")
        missing = [k for k in _KEYS if k not in data and k not in _OPTIONAL]
        if missing:
            raise AnnotationError(f"annotation {name} lacks {', '.join(missing)}")
        fields: dict[str, Any] = {attr: data.get(key) for key, attr in _KEYS.items()}
        return cls(**fields)
