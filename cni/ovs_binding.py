"""Ovs mode: plug a port into a netns with a veth whose host end joins the OVS bridge.

The host end is created in the netns where ovs-vswitchd runs (`ovs_netns`): the root netns on a
real node, a dedicated "hypervisor" netns in the lab; the peer is created directly inside the
target netns under its final name, so no temporary name can collide and nothing of the pod's
interface ever exists in the OVS netns. Netlink sockets are opened inside a netns by a setns(2)
round trip on the calling thread, not by forking (ovsdbapp runs a thread; fork in a threaded
process can deadlock). No `ip`/`ovs-vsctl` subprocesses.

TX checksum offload is turned off on both ends: through the userspace (netdev) datapath a veth
that offloads checksums sends TCP segments with bad checksums; ping works, TCP does not (DESIGN §5).

Every port carries external_ids naming its owner, and every host veth end an alias naming its
attachment, so DEL and GC find them without any local state (a veth whose ADD died before the
OVS port existed included). A failed plug removes what it created before raising.

Speed (pod start time, issue 3): every netlink request and every OVSDB commit is a round trip
through a busy node, so plug_port sends as few as it can: no lookups of links it just created
(the kernel's echo of the new veth yields the host end's index and MAC and its peer's index), the
pod end's address, link state, lo and routes go out as one datagram (_rtnl_batch), and the OVSDB
transaction runs on a helper thread while the netlink work goes on. With `wait_attached` (the
default, what ovs-vsctl does) it then waits for ovs-vswitchd to apply the change and attach the
port; CNI ADD does not (DESIGN §5): the port committed with its external_ids is what it promises,
CHECK verifies the attachment. Unplugging deletes the port (without waiting for vswitchd: the
database is what counts) beside the veth deletion (the kernel's slowest step). Either way both are
finished (and, after a failure, both undone) before returning. Reads never scan the replica: names
go through its index, external_ids through the copy _NotifyingIdl keeps.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ovs.db import idl as ovs_idl
from ovsdbapp.backend.ovs_idl import connection as ovs_connection
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.backend.ovs_idl import transaction as ovs_transaction
from ovsdbapp.schema.open_vswitch import impl_idl
from pyroute2 import IPRoute
from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink import NETLINK_ROUTE, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_ERROR, nlmsgerr
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, rt_proto, rt_scope, rt_type
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netctl.netns import thread_in
from netctl.ovsdb import per_instance_connection

_log = logging.getLogger("netctl.cni.ovs")

EXT_CONTAINER_ID = "netctl:container-id"
EXT_IFNAME = "netctl:ifname"
EXT_POD = "netctl:pod"
EXT_POD_UID = "netctl:pod-uid"
EXT_OWNER = "netctl:owner"
EXT_VLAN = "netctl:vlan"  # nested-vlan (OVS backend): the access tag ADD gave the port
EXT_NETWORK = "netctl:cni-network"  # the CNI network (conflist `name`) the attachment belongs to
OWNER_POD_PREFIX = "pod:"  # EXT_OWNER of ports the CNI plugs; node NICs carry "node"
ALIAS_TAG = "netctl-cni"  # host veth ends carry the alias "netctl-cni <network> <container id> <ifname>"
HOST_PREFIX = "nc"
OVS_TIMEOUT_S = 10.0
# Only the columns the commands below read or write are replicated: vswitchd keeps rewriting the
# others (Interface statistics, status, link state...) and the pure-Python IDL (PyPI's ovs has no
# C JSON parser, DESIGN §5) would parse every such update on the thread our commits wait for.
_COLUMNS = {
    "Open_vSwitch": ["bridges", "cur_cfg", "next_cfg"],  # ovsdbapp's commit waits for cur_cfg >= next_cfg
    "Bridge": ["name", "ports"],
    "Port": ["name", "interfaces", "tag", "external_ids"],
    "Interface": ["name", "ofport", "error", "external_ids"],
}
_TX_CSUM = "tx-checksumming"
T = TypeVar("T")


class BindingError(Exception):
    """Plugging or unplugging failed; the message says what and where."""


class OvsUnavailable(BindingError):
    """The OVSDB server cannot be reached (transient from the CNI's point of view)."""


class OvsError(BindingError):
    """OVSDB refused a change, or ovs-vswitchd could not open the device."""


class LinkError(BindingError):
    """A netlink or ethtool operation failed (veth, address, route, offload)."""


def host_ifname(container_id: str, ifname: str) -> str:
    """Deterministic, 14-character host end name for one (container, interface) attachment."""
    digest = hashlib.sha1(f"{container_id}/{ifname}".encode(), usedforsecurity=False).hexdigest()
    return HOST_PREFIX + digest[:12]


@dataclass(frozen=True)
class PlugResult:
    """What plug_port created (for the CNI result)."""

    host_ifname: str
    host_mac: str
    ifname: str
    mac: str
    sandbox: str
    mtu: int
    ofport: int | None  # None: plugged with wait_attached=False, vswitchd attaches it on its own time


# ---- OVSDB --------------------------------------------------------------------------------------


_Api = per_instance_connection(impl_idl.OvsdbIdl)


class _CommitOnly(ovs_transaction.Transaction):
    """A transaction that is done once ovsdb-server committed it: unlike ovsdbapp's vsctl
    transaction it neither bumps next_cfg nor waits for ovs-vswitchd (ovs-vsctl --no-wait). Port
    commands still find the `expected_ifaces` set they record new interfaces in."""

    def pre_commit(self, txn: Any) -> None:
        txn.expected_ifaces = set()


class _NotifyingIdl(ovs_connection.OvsdbIdl):
    """The IDL, plus a change counter and a condition that waiters block on (no polling), plus
    every Interface's (name, external_ids) kept current from the same notifications.

    `notify` runs on ovsdbapp's connection thread (holding the connection's lock) for every row
    the server changes in the replica, the initial contents included; wait_ofport sleeps on
    `changed` until the replica moved past what it last read. Searching interfaces by
    external_ids through ovsdbapp (db_find) converts every row's map on every search: ~10 ms per
    DEL at 150 ports here, more than the veth deletion; this copy is converted once per change.
    CNI ADD does not wait for ovs-vswitchd to attach its port, so a failure to attach one of ours
    (ofport -1, `error`) seen in an update is logged here, once per failure.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed = threading.Condition()
        self.changes = 0
        self.interfaces: dict[Any, tuple[str, dict[str, str]]] = {}  # row uuid -> (name, external_ids)
        self._failed: set[Any] = set()  # uuids of our interfaces whose attach failure was logged

    def notify(self, event: Any, row: Any, updates: Any = None) -> None:
        if row._table.name == "Interface":
            if event == ovs_idl.ROW_DELETE:
                self.interfaces.pop(row.uuid, None)
                self._failed.discard(row.uuid)
            else:
                name, ids = str(row.name), dict(row.external_ids)
                self.interfaces[row.uuid] = (name, ids)
                if event == ovs_idl.ROW_UPDATE and EXT_CONTAINER_ID in ids:
                    self._check_attached(row, name, ids)
        with self.changed:
            self.changes += 1
            self.changed.notify_all()

    def _check_attached(self, row: Any, name: str, ids: Mapping[str, str]) -> None:
        error, ofport = _single(row.error), _single(row.ofport)
        if not error and ofport != -1:
            self._failed.discard(row.uuid)
        elif row.uuid not in self._failed:
            self._failed.add(row.uuid)
            _log.warning("ovs-vswitchd could not attach %s (pod %s, container %s): %s", name, ids.get(EXT_POD, "?"),
                         ids.get(EXT_CONTAINER_ID), error or "ofport -1")

    def interfaces_with(self, external_ids: Mapping[str, str]) -> list[tuple[str, dict[str, str]]]:
        """(name, external_ids) of the interfaces whose external_ids hold all of `external_ids`.
        Call it holding the connection's lock (the notifications change the copy under it)."""
        want = external_ids.items()
        return [(name, ids) for name, ids in self.interfaces.values() if all(ids.get(k) == v for k, v in want)]


class OvsDb:
    """A short-lived Open_vSwitch DB session (only the four tables, and their columns, a port needs)."""

    def __init__(self, remote: str, api: Any, conn: Any, timeout: float) -> None:
        self.remote = remote
        self.api = api
        self._conn = conn
        self.timeout = timeout

    @classmethod
    def connect(cls, remote: str, timeout: float = OVS_TIMEOUT_S) -> OvsDb:
        if remote.startswith("unix:") and not os.path.exists(remote[5:]):
            raise OvsUnavailable(f"OVSDB {remote} is not there (is ovsdb-server running?)")
        try:
            helper = idlutils.get_schema_helper(remote, "Open_vSwitch")
            for table, columns in _COLUMNS.items():
                helper.register_columns(table, columns)
            conn = ovs_connection.Connection(_NotifyingIdl(remote, helper), timeout)
            api = _Api(conn)
        except Exception as e:  # ovsdbapp raises bare Exception/TimeoutException on connect
            raise OvsUnavailable(f"cannot connect to OVSDB {remote}: {e}") from None
        return cls(remote, api, conn, timeout)

    def connected(self) -> bool:
        """The IDL's session to ovsdb-server is up (a warm connection can lose it)."""
        session = getattr(self._conn.idl, "_session", None)  # ovs.db.idl.Idl keeps its jsonrpc session there
        if session is None or not getattr(self._conn, "is_running", True):
            return session is not None
        return bool(session.is_connected())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.stop(timeout=self.timeout)

    def __enter__(self) -> OvsDb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, what: str, *commands: Any, wait_vswitchd: bool = True) -> None:
        """Commit `commands` in one transaction. `wait_vswitchd`: like ovs-vsctl, return only once
        ovs-vswitchd has applied it (next_cfg/cur_cfg; needed to see whether a new port attached);
        else as soon as ovsdb-server committed it (removals, and CNI ADD: the database is what counts)."""
        try:
            if not wait_vswitchd:
                plain = _CommitOnly(self.api, self._conn, self.timeout, check_error=True)
                for c in commands:
                    plain.add(c)
                plain.commit()
                return
            with self.api.transaction(check_error=True) as txn:
                for c in commands:
                    txn.add(c)
        except idlutils.RowNotFound as e:
            raise OvsError(f"{what}: {e}") from None
        except Exception as e:
            raise OvsError(f"{what} failed in OVSDB {self.remote}: {e}") from None

    def add_port(self, bridge: str, name: str, external_ids: Mapping[str, str], tag: int | None = None,
                 wait_vswitchd: bool = True) -> None:
        """Add `name` to `bridge`; with `tag`, as an access port of that VLAN (nested-vlan on an OVS trunk).
        `wait_vswitchd`: see _run (False: committed in the database, vswitchd attaches it on its own time)."""
        commands = [self.api.add_port(bridge, name, may_exist=False, external_ids=dict(external_ids))]
        if tag is not None:
            commands.append(self.api.db_set("Port", name, ("tag", tag)))
        self._run(f"adding port {name} to bridge {bridge}" + (f" with VLAN tag {tag}" if tag is not None else ""),
                  *commands, wait_vswitchd=wait_vswitchd)

    def port_tag(self, name: str) -> int | None:
        """The Port's access VLAN tag (None: untagged)."""
        try:
            value = self.api.db_get("Port", name, "tag").execute(check_error=True)
        except Exception as e:
            raise OvsError(f"reading the tag of port {name} from OVSDB {self.remote}: {e}") from None
        return _single(value)

    def del_port(self, name: str) -> None:
        """Remove port `name` from the database; vswitchd detaches it on its own time (no wait)."""
        self._run(f"deleting port {name}", self.api.del_port(name, if_exists=True), wait_vswitchd=False)

    def _interface_columns(self, name: str, columns: Iterable[str]) -> dict[str, Any] | None:
        """`columns` of the replica's Interface row `name`, None if there is none. Found through the
        name index: ovsdbapp's db_list compares every row's name, O(ports) on every ADD and DEL."""
        try:
            with self._conn.lock:  # ovsdbapp's connection thread updates the replica under this (R)lock
                row = self.api.lookup("Interface", name, default=None)
                if row is None:
                    return None
                values = {c: idlutils.get_column_value(row, c) for c in columns}
        except Exception as e:
            raise OvsError(f"reading interface {name} from OVSDB {self.remote}: {e}") from None
        if "error" in values:
            values["error"] = values["error"] if isinstance(values["error"], str) else ""
        if "ofport" in values:
            values["ofport"] = _single(values["ofport"])
        return values

    def has_interface(self, name: str) -> bool:
        """Whether OVSDB has an Interface `name` (interface() also finds its bridge)."""
        return self._interface_columns(name, ()) is not None

    def interface(self, name: str) -> dict[str, Any] | None:
        """The Interface row `name` (name, ofport, error, external_ids) plus its bridge, or None."""
        row = self._interface_columns(name, ("name", "ofport", "error", "external_ids"))
        if row is None:
            return None
        try:
            row["bridge"] = self.api.iface_to_br(name).execute(check_error=True)
        except Exception as e:
            raise OvsError(f"reading the bridge of interface {name} from OVSDB {self.remote}: {e}") from None
        return row

    def _interfaces_with(self, external_ids: Mapping[str, str]) -> list[tuple[str, dict[str, str]]]:
        idl = self._conn.idl
        if isinstance(idl, _NotifyingIdl):
            with self._conn.lock:
                return [(name, dict(ids)) for name, ids in idl.interfaces_with(external_ids)]
        rows = self.api.db_list("Interface", columns=["name", "external_ids"]).execute(check_error=True)
        return [(r["name"], dict(r["external_ids"])) for r in rows
                if all(r["external_ids"].get(k) == v for k, v in external_ids.items())]

    def find_interfaces(self, external_ids: Mapping[str, str]) -> list[str]:
        """Names of interfaces whose external_ids contain all of `external_ids`."""
        try:
            return sorted(name for name, _ in self._interfaces_with(external_ids))
        except Exception as e:
            raise OvsError(f"searching OVSDB {self.remote}: {e}") from None

    def attachments(self) -> list[tuple[str, dict[str, str]]]:
        """(name, external_ids) of every interface that carries a container id."""
        try:
            rows = self._interfaces_with({})
        except Exception as e:
            raise OvsError(f"listing interfaces in OVSDB {self.remote}: {e}") from None
        return sorted((name, ids) for name, ids in rows if EXT_CONTAINER_ID in ids)

    def wait_ofport(self, name: str, timeout: float | None = None, appear: bool = False) -> int:
        """vswitchd's OpenFlow port for `name`; OvsError if it could not open the device or did not
        attach it within `timeout` (default: this session's). Woken by the IDL's change
        notification, not by polling: each replica update re-reads the row once. `appear`: the row
        may not be in this replica yet (another client added it), wait for it too."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        idl = self._conn.idl
        while True:
            seen = idl.changes if isinstance(idl, _NotifyingIdl) else 0
            row = self._interface_columns(name, ("ofport", "error"))
            if row is None and not appear:
                raise OvsError(f"interface {name} vanished from OVSDB {self.remote}")
            ofport = row["ofport"] if row is not None else None
            if isinstance(ofport, int) and ofport > 0:
                return ofport
            if row is not None and (row["error"] or ofport == -1):
                raise OvsError(f"ovs-vswitchd could not attach {name}: {row['error'] or 'ofport -1'}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OvsError(f"ovs-vswitchd did not attach {name} within {limit:g}s")
            if not isinstance(idl, _NotifyingIdl):  # not through connect(): no notifications to wait for
                time.sleep(min(remaining, 0.005))
                continue
            with idl.changed:
                if idl.changes == seen:
                    idl.changed.wait(remaining)


def _single(value: Any) -> Any:
    """Optional OVSDB columns come back as [] (unset) or [x]."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


# ---- netlink in a netns -------------------------------------------------------------------------


class Netns:
    """IPRoute and ethtool handles whose sockets live in the netns at `path`.

    Raises FileNotFoundError if the netns does not exist (never creates one). Use it only on the
    thread that created it: pyroute2 (0.9) opens a netlink socket per calling thread, lazily, in
    whatever netns that thread is in.
    `echo`: also open `ipr_echo`, a socket whose requests carry NLM_F_ECHO, so creating a link
    answers with the new link itself (index, MAC, peer) instead of needing a GET (one request less
    per ADD; kernels that do not echo new links get the GET).
    `sock`: a plain rtnetlink socket for requests sent with _rtnl_batch.
    """

    def __init__(self, path: str, echo: bool = False) -> None:
        self.path = path
        self.ipr_echo: IPRoute | None = None
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with thread_in(self.fd):
                self.ipr = IPRoute()
                try:
                    self.ethtool = IoctlEthtool()
                    self.sock = _rtnl_socket()
                    if echo:
                        self.ipr_echo = IPRoute(nlm_echo=True)
                except BaseException:
                    self.ipr.close()
                    raise
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.ethtool.close()
        self.sock.close()
        if self.ipr_echo is not None:
            self.ipr_echo.close()
        self.ipr.close()
        os.close(self.fd)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def index(self, ifname: str) -> int | None:
        found = self.ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def link(self, ifname: str) -> Any | None:
        idx = self.index(ifname)
        if idx is None:
            return None
        links = self.ipr.get_links(idx)
        return links[0] if links else None

    def delete(self, ifname: str) -> bool:
        """Delete link `ifname` if present (one request, by name); True if it was there."""
        try:
            self.ipr.link("del", ifname=ifname)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
        return True

    def tx_checksum_off(self, ifname: str) -> None:
        self.ethtool.change_ifname(ifname)
        self.ethtool.set_offload_flag(_TX_CSUM, 0)
        if self.tx_checksum_on(ifname):
            raise LinkError(f"TX checksum offload is still on for {ifname} in {self.path}")

    def tx_checksum_on(self, ifname: str) -> bool:
        self.ethtool.change_ifname(ifname)
        return bool(self.ethtool.get_offload_flags()[_TX_CSUM])

    def addresses(self, index: int) -> set[str]:
        return {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in self.ipr.get_addr(index=index)}

    def routes(self, index: int) -> set[tuple[str, str | None]]:
        """(destination CIDR, gateway) of the main table's IPv4 routes through link `index`."""
        out: set[tuple[str, str | None]] = set()
        for r in self.ipr.get_routes(family=socket.AF_INET, table=254):
            if r.get_attr("RTA_OIF") == index:
                out.add((f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", r.get_attr("RTA_GATEWAY")))
        return out


def _link_error(what: str, e: BaseException) -> LinkError:
    if isinstance(e, NetlinkError):
        return LinkError(f"{what}: {os.strerror(e.code) if e.code else e}")
    return LinkError(f"{what}: {e}")


@contextlib.contextmanager
def _session(remote: str, timeout: float, ovs: OvsDb | None) -> Iterator[OvsDb]:
    """`ovs` when the caller keeps a warm connection (the node agent), else a fresh one closed afterwards."""
    if ovs is not None:
        yield ovs
        return
    with OvsDb.connect(remote, timeout) as fresh:
        yield fresh


@contextlib.contextmanager
def _host_netns(path: str, host: Netns | None, missing_ok: bool, echo: bool = False) -> Iterator[Netns | None]:
    """The OVS netns handle: `host` if the caller keeps one open, else opened here (with `echo`, see
    Netns) and closed afterwards.

    With `missing_ok`, a netns that no longer exists yields None (every veth end went with it).
    """
    if host is not None:
        yield host
        return
    try:
        opened = Netns(path, echo=echo)
    except FileNotFoundError as e:
        if not missing_ok:
            raise LinkError(f"cannot open the OVS netns {path}: {e.strerror or e}") from None
        opened = None
    except OSError as e:
        raise LinkError(f"cannot open the OVS netns {path}: {e.strerror or e}") from None
    try:
        yield opened
    finally:
        if opened is not None:
            opened.close()


_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    """Threads kept for _Beside: starting a thread per plug/unplug cost ~0.5-1 ms of GIL hand-offs."""
    global _helpers
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ovsdb-beside")
        return _helpers


class _Beside(Generic[T]):
    """Run `fn` on a helper thread while the caller goes on; `result()` waits for it and re-raises its error.

    Used for the OVSDB side of a plug/unplug only: ovsdbapp commits on its own connection thread
    and keys nested transactions by thread, so a second caller thread is safe (a pooled thread
    runs one `fn` at a time); netlink handles stay on the caller's thread (pyroute2's sockets are
    per thread).
    """

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self.name = name
        self._future: Future[T] = _helper_pool().submit(fn)

    def result(self) -> T:
        return self._future.result()

    def wait(self) -> None:
        """Wait, ignoring the outcome (rollback: the original error matters more)."""
        futures_wait([self._future])


# ---- plug / unplug / check ------------------------------------------------------------------------


def plug_port(
    *,
    ovsdb: str,
    bridge: str,
    ovs_netns: str,
    target_netns: str,
    ifname: str,
    host_ifname: str,
    port_id: str,
    mac: str,
    cidr: str,
    gateway: str | None,
    mtu: int,
    owner_tag: str | None = None,
    external_ids: Mapping[str, str] | None = None,
    routes: Iterable[tuple[str, str]] = (),
    alias: str | None = None,
    vlan: int | None = None,
    timeout: float = OVS_TIMEOUT_S,
    ovs: OvsDb | None = None,
    host: Netns | None = None,
    wait_attached: bool = True,
) -> PlugResult:
    """Create the veth, configure the target end (MAC, MTU, address, routes), attach the host end.

    `routes` are extra (destination CIDR, via) routes, e.g. the Service CIDR via the node address.
    `alias` (see attachment_alias) marks the host end so GC can find it even without an OVS port.
    `vlan`: the host end becomes an access port of that VLAN (nested-vlan with an OVS bridge on the
    VM's trunk NIC); None: untagged (ovs mode).
    On any failure everything created so far is removed and the error re-raised.
    `ovs`/`host`: a warm OVSDB connection and OVS-netns handle to use (and leave open) instead of
    connecting and opening per call (the node agent keeps them).
    `wait_attached`: also wait, as ovs-vsctl does, until ovs-vswitchd has applied the change and
    attached the port (ofport). False (CNI ADD): return once ovsdb-server committed the port with its
    external_ids; vswitchd attaches it on its own time (CHECK verifies it, waiting if still pending).
    """
    iface = ipaddress.IPv4Interface(cidr)
    ids = {"iface-id": port_id, "attached-mac": mac, "iface-status": "active", **(external_ids or {})}
    if owner_tag:
        ids[EXT_OWNER] = owner_tag
    if vlan is not None:
        ids[EXT_VLAN] = str(vlan)
    # OVSDB first: an unreachable OVS must leave nothing behind
    with _session(ovsdb, timeout, ovs) as db, _host_netns(ovs_netns, host, missing_ok=False, echo=True) as hns:
        assert hns is not None
        pod = None
        try:
            try:
                pod = _Sandbox(target_netns)
            except OSError as e:
                raise LinkError(f"cannot open netns {target_netns}: {e.strerror or e}") from None
            if db.has_interface(host_ifname):
                _unplug(db, hns, {host_ifname})  # left over by an ADD that was killed mid-way
            created = False
            port: _Beside[None] | None = None
            try:
                echoed = _create_veth(hns, pod, host_ifname, ifname, mac, mtu, target_netns, db)
                created = True
                # the OVSDB commit runs beside the netlink work below; both are done before we return
                port = _Beside(lambda: db.add_port(bridge, host_ifname, ids, vlan, wait_vswitchd=wait_attached),
                               f"add-port-{host_ifname}")
                host_idx, host_mac, peer_idx = _host_end(hns, host_ifname, echoed)
                _configure_host_end(hns, host_ifname, host_idx, alias)
                _configure_pod_end(pod, ifname, iface, gateway, routes, peer_idx)
                port.result()
                ofport = db.wait_ofport(host_ifname) if wait_attached else None
            except BaseException:
                if port is not None:
                    port.wait()  # a commit still in flight would re-create what the rollback removes
                if created:
                    _rollback(db, hns, host_ifname)
                raise
        finally:
            if pod is not None:
                pod.close()
    return PlugResult(host_ifname, host_mac, ifname, mac, target_netns, mtu, ofport)


def _create_veth(hns: Netns, pod: _Sandbox, host_ifname: str, ifname: str, mac: str, mtu: int, target_netns: str,
                 db: OvsDb) -> Any | None:
    """The veth pair, host end up already; a leftover host end of this attachment is removed first.
    Returns the host end as the kernel echoed it (None: no echo, see Netns)."""
    def add() -> Any | None:
        replies = (hns.ipr_echo or hns.ipr).link(
            "add", ifname=host_ifname, kind="veth", mtu=mtu, state="up",
            peer={"ifname": ifname, "net_ns_fd": pod.fd, "address": mac, "mtu": mtu})
        return next((m for m in replies or () if m["header"]["type"] == RTM_NEWLINK
                     and m.get_attr("IFLA_IFNAME") == host_ifname), None)

    try:
        try:
            return add()
        except NetlinkError as e:
            if e.code != errno.EEXIST or hns.index(host_ifname) is None:
                raise
            _unplug(db, hns, {host_ifname})  # a veth left by an ADD killed before its OVS port existed
            return add()
    except NetlinkError as e:
        raise _link_error(f"creating veth {host_ifname} <-> {ifname} in {target_netns}", e) from None


def _host_end(hns: Netns, name: str, link: Any | None = None) -> tuple[int, str, int | None]:
    """(index, MAC, peer's index in the pod netns) of the host end: from `link` (the kernel's echo
    of its creation) if given, else from one request."""
    if link is None:
        try:
            links = hns.ipr.link("get", ifname=name)
        except NetlinkError as e:
            raise _link_error(f"reading {name} in {hns.path}", e) from None
        if not links:
            raise LinkError(f"{name} vanished from {hns.path}")
        link = links[0]
    peer = link.get_attr("IFLA_LINK")  # a veth's link is its peer, by its index in the peer's netns
    return int(link["index"]), str(link.get_attr("IFLA_ADDRESS") or ""), int(peer) if peer else None


def attachment_alias(network: str, container_id: str, ifname: str, tag: str = ALIAS_TAG) -> str:
    """The alias of an interface we plugged (`tag`: which plumbing made it); none of the three
    may contain blanks (netconf/spec validate them)."""
    return f"{tag} {network} {container_id} {ifname}"


def parse_alias(alias: str | None, tag: str = ALIAS_TAG) -> tuple[str, str, str] | None:
    """(network, container id, ifname) from an alias with `tag`, None for anything else."""
    parts = alias.split(" ") if alias else []
    if len(parts) != 4 or parts[0] != tag or not all(parts[1:]):
        return None
    return parts[1], parts[2], parts[3]


class _Sandbox:
    """The pod's netns as plug_port uses it: ethtool, and one plain rtnetlink socket on which the pod
    end's requests go out together (see _rtnl_batch). Opening an IPRoute costs ~1 ms; this, a few µs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with thread_in(self.fd):
                self.sock = _rtnl_socket()
                try:
                    self.ethtool = IoctlEthtool()
                except BaseException:
                    self.sock.close()
                    raise
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.ethtool.close()
        self.sock.close()
        os.close(self.fd)

    def index(self, ifname: str) -> int | None:
        with thread_in(self.fd):
            try:
                return socket.if_nametoindex(ifname)
            except OSError:
                return None

    def tx_checksum_off(self, ifname: str) -> None:
        self.ethtool.change_ifname(ifname)
        self.ethtool.set_offload_flag(_TX_CSUM, 0)
        self.ethtool.change_ifname(ifname)
        if self.ethtool.get_offload_flags()[_TX_CSUM]:
            raise LinkError(f"TX checksum offload is still on for {ifname} in {self.path}")


_RTNL_TIMEOUT_S = 5.0
_RT_TABLE_MAIN = 254
_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


def _rtnl_socket() -> socket.socket:
    """A plain rtnetlink socket in the calling thread's current netns (see _rtnl_batch)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _alias_request(idx: int, alias: str) -> tuple[Any, int, int]:
    """What `ip link set <idx> alias <alias>` sends."""
    msg = ifinfmsg()
    msg["index"] = idx
    msg["attrs"] = [("IFLA_IFALIAS", alias)]
    return msg, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK


def _rtnl_batch(sock: socket.socket, requests: list[tuple[Any, int, int]]) -> list[int]:
    """Send `requests` ((pyroute2 message, type, flags)) in one datagram and return each one's errno
    (0: done), in order. The kernel handles the messages of a datagram one after the other, each to
    completion, and acknowledges each; through pyroute2's IPRoute every request is a round trip of
    its own costing ~0.5-1 ms here (DESIGN §5), through this, the encoding only."""
    payload = bytearray()
    first = 1
    for seq, (msg, kind, flags) in enumerate(requests, start=first):
        msg["header"]["type"] = kind
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        payload += msg.data
    sock.settimeout(_RTNL_TIMEOUT_S)
    sock.send(bytes(payload))
    codes: dict[int, int] = {}
    while len(codes) < len(requests):
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            ack = nlmsgerr(data[offset:])
            ack.decode()
            length = ack["header"]["length"]
            if ack["header"]["type"] == NLMSG_ERROR:
                codes[ack["header"]["sequence_number"]] = abs(ack["error"] or 0)
            offset += (length + 3) & ~3 if length else len(data)
    return [codes.get(seq, 0) for seq in range(first, first + len(requests))]


def _pod_end_requests(idx: int, iface: ipaddress.IPv4Interface, gateway: str | None,
                      routes: Iterable[tuple[str, str]]) -> list[tuple[str, tuple[Any, int, int]]]:
    """What `ip addr add`, `ip link set up` (the pod end, then lo: index 1 in every netns) and
    `ip route add` send, as (what, request)."""
    addr = ifaddrmsg()
    addr["family"], addr["prefixlen"], addr["index"] = socket.AF_INET, iface.network.prefixlen, idx
    addr["attrs"] = [("IFA_LOCAL", str(iface.ip)), ("IFA_ADDRESS", str(iface.ip))]
    out: list[tuple[str, tuple[Any, int, int]]] = [(f"adding address {iface}", (addr, RTM_NEWADDR, _CREATE))]
    for what, index in (("setting it up", idx), ("setting lo up", 1)):
        up = ifinfmsg()
        up["index"], up["flags"], up["change"] = index, IFF_UP, IFF_UP
        out.append((what, (up, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK)))
    for dst, via in ([("0.0.0.0/0", gateway)] if gateway else []) + list(routes):
        net = ipaddress.IPv4Network(dst)
        route = rtmsg()
        route["family"], route["dst_len"], route["table"] = socket.AF_INET, net.prefixlen, _RT_TABLE_MAIN
        route["proto"], route["scope"], route["type"] = rt_proto["static"], rt_scope["universe"], rt_type["unicast"]
        route["attrs"] = ([("RTA_DST", str(net.network_address))] if net.prefixlen else []) + [
            ("RTA_GATEWAY", via), ("RTA_OIF", idx)]
        out.append((f"adding route {dst} via {via}", (route, RTM_NEWROUTE, _CREATE)))
    return out


def _configure_pod_end(pod: _Sandbox, ifname: str, iface: ipaddress.IPv4Interface, gateway: str | None,
                       routes: Iterable[tuple[str, str]], idx: int | None = None) -> None:
    """`idx`: the pod end's index if the caller knows it (else looked up). Address, up, lo up and
    routes go out in one batch, in that order (a route needs the address and the link up)."""
    where = f"in {pod.path}"
    try:
        if idx is None:
            idx = pod.index(ifname)
        if idx is None:
            raise LinkError(f"{ifname} did not appear {where}")
        pod.tx_checksum_off(ifname)
        requests = _pod_end_requests(idx, iface, gateway, routes)
        codes = _rtnl_batch(pod.sock, [request for _, request in requests])
    except LinkError:
        raise
    except OSError as e:
        raise _link_error(f"configuring {ifname} ({iface}, gateway {gateway}) {where}", e) from None
    for (what, _), code in zip(requests, codes, strict=True):
        if code and not (what == "setting lo up" and code == errno.ENODEV):
            raise LinkError(f"configuring {ifname} ({iface}, gateway {gateway}) {where}: {what}: "
                            f"{os.strerror(code)}")


def _configure_host_end(host: Netns, name: str, idx: int, alias: str | None) -> None:
    """Mark it with `alias` (GC finds it by that) and turn TX checksum offload off; it is up already."""
    try:
        if alias and (code := _rtnl_batch(host.sock, [_alias_request(idx, alias)])[0]):
            raise LinkError(f"configuring host end {name} in {host.path}: setting its alias: {os.strerror(code)}")
        host.tx_checksum_off(name)
    except LinkError:
        raise
    except (NetlinkError, OSError) as e:
        raise _link_error(f"configuring host end {name} in {host.path}", e) from None


def _rollback(ovs: OvsDb, host: Netns, name: str) -> None:
    """Best effort: the original error matters more than a failure to clean up."""
    with contextlib.suppress(Exception):
        ovs.del_port(name)
    with contextlib.suppress(Exception):
        host.delete(name)


def _deleter(ovs: OvsDb, name: str) -> Callable[[], None]:
    return lambda: ovs.del_port(name)


def _unplug(ovs: OvsDb, host: Netns | None, names: set[str]) -> list[str]:
    """Remove each name's OVS port and veth; the port's commit runs beside the (slow) veth deletion."""
    removed = []
    for name in sorted(names):
        had_port = ovs.has_interface(name)
        port = _Beside(_deleter(ovs, name), f"del-port-{name}") if had_port else None
        had_link = False
        try:
            if host is not None:
                try:
                    had_link = host.delete(name)
                except NetlinkError as e:
                    raise _link_error(f"deleting {name} in {host.path}", e) from None
        finally:
            if port is not None:
                port.wait()
        if port is not None:
            port.result()
        if had_port or had_link:
            removed.append(name)
    return removed


def unplug_port(
    *,
    ovsdb: str,
    ovs_netns: str,
    host_ifname: str,
    match: Mapping[str, str] | None = None,
    timeout: float = OVS_TIMEOUT_S,
    ovs: OvsDb | None = None,
    host: Netns | None = None,
) -> list[str]:
    """Remove the OVS port(s) and host veth(s) of one attachment; idempotent.

    Finds them by the deterministic `host_ifname` and by `match` (external_ids, e.g. the
    container id), so a port is found even if the naming scheme changes. Returns what it removed.
    Raises OvsUnavailable before touching anything if OVSDB cannot be reached.
    """
    with _session(ovsdb, timeout, ovs) as db:
        names = {host_ifname}
        if match:
            names.update(db.find_interfaces(match))
        with _host_netns(ovs_netns, host, missing_ok=True) as hns:
            return _unplug(db, hns, names)


def check_port(
    *,
    ovsdb: str,
    bridge: str,
    ovs_netns: str,
    target_netns: str,
    ifname: str,
    host_ifname: str,
    mac: str,
    cidrs: Iterable[str],
    external_ids: Mapping[str, str] | None = None,
    timeout: float = OVS_TIMEOUT_S,
    ovs: OvsDb | None = None,
    host: Netns | None = None,
    tagged: bool = False,
    routes: Iterable[tuple[str, str | None]] = (),
) -> list[str]:
    """Everything that differs from what plug_port left behind; [] when all is in place.

    `tagged`: the port must be an access port of the VLAN recorded at ADD (nested-vlan), else untagged.
    `routes`: (destination CIDR, gateway) the pod must have through `ifname` (default, Service CIDR).
    """
    problems: list[str] = []
    with _session(ovsdb, timeout, ovs) as db:
        row = db.interface(host_ifname)
        if row is None:
            problems.append(f"OVS has no interface {host_ifname}")
        else:
            if row["bridge"] != bridge:
                problems.append(f"OVS interface {host_ifname} is on bridge {row['bridge']!r}, not {bridge!r}")
            recorded = row["external_ids"].get(EXT_VLAN)
            want_tag = int(recorded) if tagged and recorded and recorded.isdigit() else None
            if tagged and want_tag is None:
                problems.append(f"OVS interface {host_ifname} records no VLAN ({EXT_VLAN}={recorded!r})")
            elif (tag := db.port_tag(host_ifname)) != want_tag:
                problems.append(f"OVS port {host_ifname} has VLAN tag {tag}, expected {want_tag}")
            if row["ofport"] is None and not row["error"]:  # ADD does not wait for vswitchd: it may be pending
                try:
                    row["ofport"] = db.wait_ofport(host_ifname, timeout)
                except OvsError as e:
                    problems.append(str(e))
            elif not (isinstance(row["ofport"], int) and row["ofport"] > 0):
                problems.append(f"OVS interface {host_ifname} is not attached: {row['error'] or row['ofport']}")
            ext = row["external_ids"]
            if not ext.get("iface-id"):
                problems.append(f"OVS interface {host_ifname} has no iface-id")
            if ext.get("attached-mac") != mac:
                problems.append(f"OVS interface {host_ifname} has attached-mac {ext.get('attached-mac')!r}")
            for key, want in (external_ids or {}).items():
                if ext.get(key) != want:
                    problems.append(f"OVS interface {host_ifname} has {key}={ext.get(key)!r}, expected {want!r}")
    problems += _check_links(ovs_netns, target_netns, ifname, host_ifname, mac, cidrs, host, tuple(routes))
    return problems


def _check_links(ovs_netns: str, target_netns: str, ifname: str, host_ifname: str, mac: str,
                 cidrs: Iterable[str], host: Netns | None,
                 routes: tuple[tuple[str, str | None], ...] = ()) -> list[str]:
    problems: list[str] = []
    for path, name, want_mac, want_cidrs in ((ovs_netns, host_ifname, None, ()),
                                             (target_netns, ifname, mac, tuple(cidrs))):
        warm = host if path == ovs_netns else None
        try:
            ns = warm or Netns(path)
        except OSError as e:
            problems.append(f"netns {path}: {e.strerror or e}")
            continue
        with contextlib.ExitStack() as stack:
            if warm is None:
                stack.enter_context(ns)
            link = ns.link(name)
            if link is None:
                problems.append(f"{name} is missing in {path}")
                continue
            if not link["flags"] & 1:  # IFF_UP
                problems.append(f"{name} in {path} is down")
            if want_mac is not None and link.get_attr("IFLA_ADDRESS") != want_mac:
                problems.append(f"{name} in {path} has MAC {link.get_attr('IFLA_ADDRESS')}, expected {want_mac}")
            have = ns.addresses(link["index"])
            problems += [f"{name} in {path} lacks address {c}" for c in want_cidrs if c not in have]
            if want_mac is not None and routes:  # the pod end
                have_routes = ns.routes(link["index"])
                problems += [f"{name} in {path} lacks route {dst}" + (f" via {gw}" if gw else "")
                             for dst, gw in routes if (dst, gw) not in have_routes]
            if ns.tx_checksum_on(name):
                problems.append(f"{name} in {path} has TX checksum offload on")
    return problems


def gc_attachments(
    *,
    ovsdb: str,
    ovs_netns: str,
    network: str,
    valid: Iterable[tuple[str, str]],
    timeout: float = OVS_TIMEOUT_S,
    ovs: OvsDb | None = None,
    host: Netns | None = None,
) -> list[str]:
    """Remove OVS ports and host veth ends of `network`'s attachments that are not in `valid`.

    Only what this plugin created for `network` is considered: OVS interfaces whose external_ids
    carry EXT_CONTAINER_ID, EXT_IFNAME, EXT_NETWORK == network and a pod owner, and veth ends in
    `ovs_netns` whose alias is ours for `network`. Everything else (node NICs, other networks'
    attachments, foreign links) is left alone. Returns the names removed.
    """
    keep = set(valid)
    with _session(ovsdb, timeout, ovs) as db:
        stale: set[str] = set()
        for name, ext in db.attachments():
            key = (ext.get(EXT_CONTAINER_ID, ""), ext.get(EXT_IFNAME, ""))
            if (all(key) and ext.get(EXT_NETWORK) == network
                    and ext.get(EXT_OWNER, "").startswith(OWNER_POD_PREFIX) and key not in keep):
                stale.add(name)
        with _host_netns(ovs_netns, host, missing_ok=True) as hns:
            if hns is not None:
                try:
                    links = hns.ipr.get_links()
                except NetlinkError as e:
                    raise _link_error(f"listing links in {ovs_netns}", e) from None
                for link in links:
                    mark = parse_alias(link.get_attr("IFLA_IFALIAS"))
                    if mark is not None and mark[0] == network and (mark[1], mark[2]) not in keep:
                        stale.add(link.get_attr("IFLA_IFNAME"))
            return _unplug(db, hns, stale)
