"""Nested mode on the OVN backend: ports as hot-plugged VM NICs, and trunk subports.

Pods inside a tenant VM (DESIGN §1, "nested mode") get their port in one of two ways, and this
module is the IaaS side of both, written against what OVN (and Neutron ML2/OVN) really does:

- *NIC hot-plug*: the hypervisor plugs a new virtual NIC into the VM whose host side is an OVS
  interface on `br-int` with `external_ids:iface-id=<port>`; ovn-controller then binds the port to
  this chassis. `Hypervisor.attach` does exactly that for the lab's VMs, which are network
  namespaces on the lab's one chassis: a veth whose host end joins `br-int` in the hypervisor
  netns and whose other end (with the port's MAC) appears in the VM's netns, as a NIC the guest
  did not create. `detach` is the unplug (both ends go).
- *VLAN subport*: the VM's own NIC is a trunk; a pod's port becomes a child of the VM's port
  (`parent_name` = the VM NIC's logical switch port, `tag_request` = the VLAN id), and OVN then
  delivers the child's traffic tagged with that VLAN on the parent's VIF (ovn-nb(5),
  Logical_Switch_Port `parent_name`/`tag`). ovn-northd reports the tag in use in `tag`.

The NB side takes an ovsdbapp Northbound API object (`connect_nb` opens one the way the OVN
backend does); the hypervisor side an ovsdbapp Open_vSwitch API object (e.g. OvsStack.api) and
netlink through pyroute2, never the CLIs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

from ovsdbapp.backend.ovs_idl import command as ovsdb_command
from ovsdbapp.backend.ovs_idl import connection as ovsdb_connection
from ovsdbapp.schema.open_vswitch.impl_idl import OvsdbIdl as OvsIdlImpl
from ovsdbapp.schema.ovn_northbound.impl_idl import OvnNbApiIdlImpl
from pyroute2 import IPRoute
from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink.exceptions import NetlinkError

from netctl.iaas.base import IaaSError, IaaSUnavailable, PortNotFound
from netctl.netns import thread_in
from netctl.ovsdb import per_instance_connection

LSP = "Logical_Switch_Port"
EXT_ATTACHED_TO = "netctl:attached-to"  # OVS Interface external_ids: the VM (netns path) a NIC is plugged into
TAP_PREFIX = "tap"
VLAN_MIN, VLAN_MAX = 1, 4094

_NbApi = per_instance_connection(OvnNbApiIdlImpl)
_OvsApi = per_instance_connection(OvsIdlImpl)


def connect_nb(remote: str, timeout: float = 10.0) -> Any:
    """An ovsdbapp Northbound API on `remote` (its own connection; stop it with close_nb)."""
    try:
        idl = ovsdb_connection.OvsdbIdl.from_server(remote, "OVN_Northbound")
        return _NbApi(ovsdb_connection.Connection(idl, timeout))
    except Exception as e:  # ovs raises plain Exception when the schema cannot be fetched
        raise IaaSUnavailable(f"OVN NB {remote} unreachable: {e}") from e


def close_nb(nb: Any) -> None:
    with contextlib.suppress(Exception):
        nb.ovsdb_connection.stop(timeout=5)


# ---- VLAN subports (OVN child ports) ------------------------------------------------------------


def make_subport(nb: Any, port_id: str, parent: str, tag: int, timeout: float = 10.0) -> int:
    """Make existing port `port_id` a VLAN `tag` child of `parent` (the VM NIC's port); returns the tag
    ovn-northd put in use (waits for it). IaaSError if a port is missing or the tag is taken."""
    if not VLAN_MIN <= tag <= VLAN_MAX:
        raise IaaSError(f"VLAN tag {tag} for {port_id} is outside {VLAN_MIN}..{VLAN_MAX}")
    if port_id == parent:
        raise IaaSError(f"port {port_id} cannot be its own parent")
    for name in (port_id, parent):
        if nb.lookup(LSP, name, default=None) is None:
            raise PortNotFound(f"no logical switch port {name}")
    for lsp in list(nb.tables[LSP].rows.values()):
        if lsp.name != port_id and parent in lsp.parent_name and tag in lsp.tag_request:
            raise IaaSError(f"VLAN {tag} under {parent} is already used by {lsp.name}")
    nb.db_set(LSP, port_id, ("parent_name", parent), ("tag_request", tag)).execute(check_error=True)
    deadline = time.monotonic() + timeout
    while True:
        row = nb.lookup(LSP, port_id, default=None)
        if row is None:
            raise PortNotFound(f"logical switch port {port_id} vanished")
        if list(row.tag) == [tag]:
            return tag
        if time.monotonic() > deadline:
            raise IaaSUnavailable(f"ovn-northd did not confirm tag {tag} on {port_id} within {timeout:g}s "
                                  f"(tag is {list(row.tag)})")
        time.sleep(0.05)


class MakeSubport(ovsdb_command.BaseCommand):
    """Make `port_id` a child of `parent` with the lowest VLAN free under it, chosen inside the
    transaction (`verify` on the children's tag_request makes a concurrent writer's choice abort
    ours instead of duplicating it). An existing child of `parent` keeps its VLAN. `result` is
    the VLAN."""

    def __init__(self, api: Any, port_id: str, parent: str) -> None:
        super().__init__(api)
        self.port_id = port_id
        self.parent = parent

    def run_idl(self, txn: Any) -> None:
        lsp = self.api.lookup(LSP, self.port_id)
        if list(lsp.parent_name) == [self.parent] and lsp.tag_request:
            self.result = int(lsp.tag_request[0])
            return
        used: set[int] = set()
        for row in self.api.tables[LSP].rows.values():
            if row is not lsp and list(row.parent_name) == [self.parent]:
                row.verify("tag_request")
                used.update(int(t) for t in row.tag_request)
        tag = next((t for t in range(VLAN_MIN, VLAN_MAX + 1) if t not in used), None)
        if tag is None:
            raise IaaSError(f"no VLAN id is free under {self.parent} ({len(used)} subports)")
        lsp.verify("parent_name")
        lsp.parent_name = self.parent
        lsp.tag_request = tag
        self.result = tag


def clear_subport(nb: Any, port_id: str) -> None:
    """Make `port_id` a plain port again (no parent, no tag); no-op if it is gone."""
    if nb.lookup(LSP, port_id, default=None) is None:
        return
    nb.db_clear(LSP, port_id, "parent_name").execute(check_error=True)
    nb.db_clear(LSP, port_id, "tag_request").execute(check_error=True)


# ---- the lab hypervisor: hot-plug a port as a VM NIC -------------------------------------------


@dataclass(frozen=True)
class Nic:
    """A port plugged into a VM: the OVS/host end `tap` and the guest's `vm_ifname` in `vm_netns`."""

    port_id: str
    mac: str
    tap: str
    vm_netns: str
    vm_ifname: str


def tap_name(port_id: str) -> str:
    """Deterministic host-end name of a port's NIC (14 bytes)."""
    return TAP_PREFIX + hashlib.sha1(port_id.encode(), usedforsecurity=False).hexdigest()[:11]


class _Ns:
    """IPRoute + ethtool handles inside one netns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with thread_in(path):
            self.ipr = IPRoute()
            self.ethtool = IoctlEthtool()

    def close(self) -> None:
        self.ethtool.close()
        self.ipr.close()
        os.close(self.fd)

    def index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def tx_off(self, name: str) -> None:
        self.ethtool.change_ifname(name)
        self.ethtool.set_offload_flag("tx-checksumming", 0)


class Hypervisor:
    """Plugs ports into lab VMs (netns) as NICs, as the hypervisor of the lab's one chassis.

    `ovs` is an ovsdbapp Open_vSwitch API; `hv_netns` the path of the netns where OVS runs.
    TX checksum offload is off on both veth ends (DESIGN §5: TCP through the netdev datapath
    needs it), as a hypervisor's virtual NIC computes checksums itself.
    """

    def __init__(self, ovs: Any, bridge: str, hv_netns: str) -> None:
        self.ovs = ovs
        self.bridge = bridge
        self.hv_netns = hv_netns

    def attach(self, port_id: str, mac: str, vm_netns: str, *, mtu: int = 1400,
               vm_ifname: str | None = None) -> Nic:
        """Hot-plug `port_id` into the VM `vm_netns`; the NIC appears there as `vm_ifname` (default:
        the first free ethN), down and unconfigured, as a fresh NIC does. Undone on failure."""
        tap = tap_name(port_id)
        hv, vm = _Ns(self.hv_netns), _Ns(vm_netns)
        try:
            if hv.index(tap) is not None:
                raise IaaSError(f"port {port_id} is already plugged ({tap} exists in {self.hv_netns})")
            name = vm_ifname or next(f"eth{i}" for i in range(1, 4096) if vm.index(f"eth{i}") is None)
            try:
                hv.ipr.link("add", ifname=tap, kind="veth", mtu=mtu,
                            peer={"ifname": name, "net_ns_fd": vm.fd, "address": mac, "mtu": mtu})
            except NetlinkError as e:
                raise IaaSError(f"cannot plug {port_id} into {vm_netns} as {name}: {e}") from None
            try:
                hv.tx_off(tap)
                vm.tx_off(name)
                hv.ipr.link("set", index=hv.index(tap), state="up")
                ids = {"iface-id": port_id, "attached-mac": mac, "iface-status": "active", EXT_ATTACHED_TO: vm_netns}
                with self.ovs.transaction(check_error=True) as txn:
                    txn.add(self.ovs.add_port(self.bridge, tap, may_exist=False))
                    txn.add(self.ovs.db_set("Interface", tap, ("external_ids", ids)))
                self._wait_ofport(tap)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.ovs.del_port(tap, if_exists=True).execute(check_error=True)
                with contextlib.suppress(Exception):
                    hv.ipr.link("del", ifname=tap)
                raise
            return Nic(port_id, mac, tap, vm_netns, name)
        finally:
            hv.close()
            vm.close()

    @classmethod
    def connect(cls, ovsdb: str, bridge: str, hv_netns: str, timeout: float = 10.0) -> Hypervisor:
        """A hypervisor on the Open_vSwitch DB `ovsdb` (its own connection; `close` stops it)."""
        try:
            idl = ovsdb_connection.OvsdbIdl.from_server(ovsdb, "Open_vSwitch")
            api = _OvsApi(ovsdb_connection.Connection(idl, timeout))
        except Exception as e:  # ovs raises plain Exception when the schema cannot be fetched
            raise IaaSUnavailable(f"hypervisor OVSDB {ovsdb} unreachable: {e}") from e
        return cls(api, bridge, hv_netns)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ovs.ovsdb_connection.stop(timeout=5)

    def vm_of(self, port_id: str) -> str | None:
        """The VM (netns path) the port `port_id` is plugged into, None if none."""
        rows = self.ovs.db_find("Interface", ("external_ids", "=", {"iface-id": port_id}),
                                columns=["external_ids"]).execute(check_error=True)
        return next((vm for row in rows if (vm := row["external_ids"].get(EXT_ATTACHED_TO))), None)

    def ensure_attached(self, port_id: str, mac: str, vm_netns: str, *, mtu: int = 1400) -> bool:
        """`attach` unless the port is plugged into that VM already (True if it plugged it now);
        IaaSError if it is plugged into another VM."""
        where = self.vm_of(port_id)
        if where == vm_netns:
            return False
        if where is not None:
            raise IaaSError(f"port {port_id} is plugged into {where}, not {vm_netns}")
        self.attach(port_id, mac, vm_netns, mtu=mtu)
        return True

    def _wait_ofport(self, tap: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            ofport = self.ovs.db_get("Interface", tap, "ofport").execute(check_error=True)
            ofport = ofport[0] if isinstance(ofport, list) and ofport else ofport
            if isinstance(ofport, int) and ofport > 0:
                return
            if ofport == -1 or time.monotonic() > deadline:
                raise IaaSError(f"ovs-vswitchd could not attach {tap}: ofport {ofport}")
            time.sleep(0.01)

    def detach(self, port_id: str) -> bool:
        """Unplug `port_id` from whatever VM holds it (wherever the guest moved the NIC); idempotent."""
        tap = tap_name(port_id)
        had = False
        rows = self.ovs.db_find("Interface", ("external_ids", "=", {"iface-id": port_id}),
                                columns=["name", "external_ids"]).execute(check_error=True)
        for row in rows:
            if EXT_ATTACHED_TO in row["external_ids"]:
                self.ovs.del_port(row["name"], if_exists=True).execute(check_error=True)
                had = True
        with contextlib.suppress(FileNotFoundError):
            hv = _Ns(self.hv_netns)
            try:
                if hv.index(tap) is not None:
                    hv.ipr.link("del", ifname=tap)
                    had = True
            finally:
                hv.close()
        return had
