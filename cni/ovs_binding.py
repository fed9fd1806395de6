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
through a busy node, so plug_port sends as few as it can (no lookups of links it just created:
one GET of the host end yields its index, its MAC and the index of its peer) and runs the OVSDB
transaction (the longest single step: ovsdb-server commits, then, as ovs-vsctl does, it waits
for ovs-vswitchd to apply it) on a helper thread while the netlink work goes on. Unplugging
deletes the port (without waiting for vswitchd: the database is what counts) beside the veth
deletion (the kernel's slowest step). Either way both are finished (and, after a failure, both
undone) before returning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ovsdbapp.backend.ovs_idl import connection as ovs_connection
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.backend.ovs_idl import transaction as ovs_transaction
from ovsdbapp.schema.open_vswitch import impl_idl
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink.exceptions import NetlinkError

from netctl.ovsdb import per_instance_connection

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
    ofport: int


# ---- OVSDB --------------------------------------------------------------------------------------


_Api = per_instance_connection(impl_idl.OvsdbIdl)


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
            conn = ovs_connection.Connection(ovs_connection.OvsdbIdl(remote, helper), timeout)
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
        else as soon as ovsdb-server committed it (removals: the database is what counts)."""
        try:
            if not wait_vswitchd:
                plain = ovs_transaction.Transaction(self.api, self._conn, self.timeout, check_error=True)
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

    def add_port(self, bridge: str, name: str, external_ids: Mapping[str, str], tag: int | None = None) -> None:
        """Add `name` to `bridge`; with `tag`, as an access port of that VLAN (nested-vlan on an OVS trunk)."""
        commands = [self.api.add_port(bridge, name, may_exist=False, external_ids=dict(external_ids))]
        if tag is not None:
            commands.append(self.api.db_set("Port", name, ("tag", tag)))
        self._run(f"adding port {name} to bridge {bridge}" + (f" with VLAN tag {tag}" if tag is not None else ""),
                  *commands)

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

    def interface(self, name: str) -> dict[str, Any] | None:
        """The Interface row `name` (name, ofport, error, external_ids) plus its bridge, or None."""
        try:
            rows = self.api.db_list("Interface", [name], columns=["name", "ofport", "error", "external_ids"],
                                    if_exists=True).execute(check_error=True)
            if not rows:
                return None
            row = dict(rows[0])
            row["bridge"] = self.api.iface_to_br(name).execute(check_error=True)
        except Exception as e:
            raise OvsError(f"reading interface {name} from OVSDB {self.remote}: {e}") from None
        row["error"] = row["error"] if isinstance(row["error"], str) else ""
        row["ofport"] = _single(row["ofport"])
        return row

    def find_interfaces(self, external_ids: Mapping[str, str]) -> list[str]:
        """Names of interfaces whose external_ids contain all of `external_ids`."""
        try:
            rows = self.api.db_find("Interface", ("external_ids", "=", dict(external_ids)),
                                    columns=["name"]).execute(check_error=True)
        except Exception as e:
            raise OvsError(f"searching OVSDB {self.remote}: {e}") from None
        return sorted(r["name"] for r in rows)

    def attachments(self) -> list[tuple[str, dict[str, str]]]:
        """(name, external_ids) of every interface that carries a container id."""
        try:
            rows = self.api.db_list("Interface", columns=["name", "external_ids"]).execute(check_error=True)
        except Exception as e:
            raise OvsError(f"listing interfaces in OVSDB {self.remote}: {e}") from None
        return sorted((r["name"], dict(r["external_ids"])) for r in rows
                      if EXT_CONTAINER_ID in r["external_ids"])

    def wait_ofport(self, name: str) -> int:
        """vswitchd's OpenFlow port for `name`; OvsError if it could not open the device."""
        deadline = time.monotonic() + self.timeout
        while True:
            row = self.interface(name)
            if row is None:
                raise OvsError(f"interface {name} vanished from OVSDB {self.remote}")
            ofport = row["ofport"]
            if isinstance(ofport, int) and ofport > 0:
                return ofport
            if row["error"] or ofport == -1:
                raise OvsError(f"ovs-vswitchd could not attach {name}: {row['error'] or 'ofport -1'}")
            if time.monotonic() > deadline:
                raise OvsError(f"ovs-vswitchd did not attach {name} within {self.timeout:g}s")
            time.sleep(0.005)  # reads the local IDL replica: cheap; vswitchd attaches in a few ms


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
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with _entered(self.fd):
                self.ipr = IPRoute()
                try:
                    self.ethtool = IoctlEthtool()
                except BaseException:
                    self.ipr.close()
                    raise
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.ethtool.close()
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


@contextlib.contextmanager
def _entered(fd: int) -> Iterator[None]:
    """Run the block with the calling thread in the netns `fd`, then return to where it was."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pyroute2_netns.setns(fd)
        try:
            yield
        finally:
            pyroute2_netns.setns(here)
    finally:
        os.close(here)


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
def _host_netns(path: str, host: Netns | None, missing_ok: bool) -> Iterator[Netns | None]:
    """The OVS netns handle: `host` if the caller keeps one open, else opened here and closed afterwards.

    With `missing_ok`, a netns that no longer exists yields None (every veth end went with it).
    """
    if host is not None:
        yield host
        return
    try:
        opened = Netns(path)
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


class _Beside(Generic[T]):
    """Run `fn` on a helper thread while the caller goes on; `result()` joins it and re-raises its error.

    Used for the OVSDB side of a plug/unplug only: ovsdbapp commits on its own connection thread
    and keys nested transactions by thread, so a second caller thread is safe; netlink handles stay
    on the caller's thread (pyroute2's sockets are per thread).
    """

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to the caller by result()
            self._error = e

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set when _fn returned

    def wait(self) -> None:
        """Join, ignoring the outcome (rollback: the original error matters more)."""
        self._thread.join()


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
) -> PlugResult:
    """Create the veth, configure the target end (MAC, MTU, address, routes), attach the host end.

    `routes` are extra (destination CIDR, via) routes, e.g. the Service CIDR via the node address.
    `alias` (see attachment_alias) marks the host end so GC can find it even without an OVS port.
    `vlan`: the host end becomes an access port of that VLAN (nested-vlan with an OVS bridge on the
    VM's trunk NIC); None: untagged (ovs mode).
    On any failure everything created so far is removed and the error re-raised.
    `ovs`/`host`: a warm OVSDB connection and OVS-netns handle to use (and leave open) instead of
    connecting and opening per call (the node agent keeps them).
    """
    iface = ipaddress.IPv4Interface(cidr)
    ids = {"iface-id": port_id, "attached-mac": mac, "iface-status": "active", **(external_ids or {})}
    if owner_tag:
        ids[EXT_OWNER] = owner_tag
    if vlan is not None:
        ids[EXT_VLAN] = str(vlan)
    # OVSDB first: an unreachable OVS must leave nothing behind
    with _session(ovsdb, timeout, ovs) as db, _host_netns(ovs_netns, host, missing_ok=False) as hns:
        assert hns is not None
        pod = None
        try:
            try:
                pod = Netns(target_netns)
            except OSError as e:
                raise LinkError(f"cannot open netns {target_netns}: {e.strerror or e}") from None
            if db.interface(host_ifname) is not None:
                _unplug(db, hns, {host_ifname})  # left over by an ADD that was killed mid-way
            created = False
            port: _Beside[None] | None = None
            try:
                _create_veth(hns, pod, host_ifname, ifname, mac, mtu, target_netns, db)
                created = True
                # the OVSDB commit runs beside the netlink work below; both are done before we return
                port = _Beside(lambda: db.add_port(bridge, host_ifname, ids, vlan), f"add-port-{host_ifname}")
                host_idx, host_mac, peer_idx = _host_end(hns, host_ifname)
                _configure_host_end(hns, host_ifname, host_idx, alias)
                _configure_pod_end(pod, ifname, iface, gateway, routes, peer_idx)
                port.result()
                ofport = db.wait_ofport(host_ifname)
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


def _create_veth(hns: Netns, pod: Netns, host_ifname: str, ifname: str, mac: str, mtu: int, target_netns: str,
                 db: OvsDb) -> None:
    """The veth pair, host end up already; a leftover host end of this attachment is removed first."""
    def add() -> None:
        hns.ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu, state="up",
                     peer={"ifname": ifname, "net_ns_fd": pod.fd, "address": mac, "mtu": mtu})

    try:
        try:
            add()
        except NetlinkError as e:
            if e.code != errno.EEXIST or hns.index(host_ifname) is None:
                raise
            _unplug(db, hns, {host_ifname})  # a veth left by an ADD killed before its OVS port existed
            add()
    except NetlinkError as e:
        raise _link_error(f"creating veth {host_ifname} <-> {ifname} in {target_netns}", e) from None


def _host_end(hns: Netns, name: str) -> tuple[int, str, int | None]:
    """(index, MAC, peer's index in the pod netns) of the host end, from one request."""
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


def _configure_pod_end(pod: Netns, ifname: str, iface: ipaddress.IPv4Interface, gateway: str | None,
                       routes: Iterable[tuple[str, str]], idx: int | None = None) -> None:
    """`idx`: the pod end's index if the caller knows it (else looked up)."""
    where = f"in {pod.path}"
    try:
        if idx is None:
            idx = pod.index(ifname)
        if idx is None:
            raise LinkError(f"{ifname} did not appear {where}")
        pod.tx_checksum_off(ifname)
        pod.ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        pod.ipr.link("set", index=idx, state="up")
        try:
            pod.ipr.link("set", ifname="lo", state="up")
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
        if gateway:
            pod.ipr.route("add", dst="default", gateway=gateway, oif=idx)
        for dst, via in routes:
            pod.ipr.route("add", dst=dst, gateway=via, oif=idx)
    except LinkError:
        raise
    except (NetlinkError, OSError) as e:
        raise _link_error(f"configuring {ifname} ({iface}, gateway {gateway}) {where}", e) from None


def _configure_host_end(host: Netns, name: str, idx: int, alias: str | None) -> None:
    """Mark it with `alias` (GC finds it by that) and turn TX checksum offload off; it is up already."""
    try:
        if alias:
            host.ipr.link("set", index=idx, ifalias=alias)
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
        had_port = ovs.interface(name) is not None
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
            if not (isinstance(row["ofport"], int) and row["ofport"] > 0):
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
