"""The embedded IaaS: ovsdbapp against the OVN Northbound DB, writing what Neutron ML2/OVN writes.

One logical switch per tenant (`netctl-<tenant>`; its `external_ids` carry tenant, cidr, gateway,
mtu, reserved ranges), one logical switch port per pod or node NIC with `addresses` and
`port_security` = "MAC IP [extra CIDRs]", owner identity in `external_ids` (CONVENTIONS.md) and
`options:requested-chassis` when bound.

IP allocation is netctl's own (`netctl.ipam`), persisted in the NB DB itself, not OVN's dynamic
IPAM (`addresses=dynamic` + `other_config:subnet`, deliberately never set here):
  * the answer is synchronous: the MAC and IP are known when the transaction commits, with no
    wait for ovn-northd to fill in `dynamic_addresses`, so the controller can annotate the pod at
    once and batch hundreds of ports per transaction;
  * the MAC is chosen up front (derived from the IP, unique with it) instead of by northd;
  * it behaves like the OpenStack backend, where Neutron hands back the address synchronously.
The used set is the addresses held by the switch's ports in ovsdbapp's in-memory replica (current:
ovsdbapp applies a committed transaction's rows before returning), so a restarted controller
cannot hand out an address twice. It is kept incrementally (`_NbIdl`): a port's addresses are
parsed when the replica reports the port created or readdressed, a switch's membership follows the
changes of its `ports` column, and the switch's allocator is told of every address taken or freed,
so an allocating transaction costs O(ports it creates), not O(ports on the switch). Allocation runs inside
the transaction (in ovsdbapp's connection thread, which commits transactions one at a time); each
allocating transaction bumps a generation on the switch and verifies the switch's external_ids,
so if another netctl process allocated meanwhile, OVSDB answers "try again" and ovsdbapp re-runs
the allocation against the refreshed replica. A per-switch lock additionally serialises callers
in-process, so a batch is allocated against a stable view.
The rotation cursor is stored on the switch (`netctl:last-ip`) so that a just-freed address is
not reused at once even across restarts.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ovs.db import idl as ovs_idl
from ovsdbapp import exceptions as ovsdb_exc
from ovsdbapp.backend.ovs_idl import command as ovsdb_command
from ovsdbapp.backend.ovs_idl import connection as ovsdb_connection
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.schema.ovn_northbound.impl_idl import OvnNbApiIdlImpl

from netctl import ipam
from netctl.annotations import PUBLIC_NETWORK
from netctl.iaas.base import (
    Claim,
    IaaS,
    IaaSConflict,
    IaaSError,
    IaaSUnavailable,
    NestingUnsupported,
    Network,
    NetworkNotFound,
    NetworkSpec,
    Port,
    PortNotFound,
    PortOwner,
    PortRequest,
    PortState,
    SubnetExhausted,
    pool_port_id,
)
from netctl.iaas.ovn_nested import Hypervisor, MakeSubport
from netctl.ovsdb import per_instance_connection

LOG = logging.getLogger(__name__)

SWITCH_PREFIX = "netctl-"
# Logical_Switch external_ids
K_CIDR = "netctl:cidr"
K_GATEWAY = "netctl:gateway"
K_MTU = "netctl:mtu"
K_RESERVED = "netctl:reserved"
K_LAST_IP = "netctl:last-ip"
K_GENERATION = "netctl:alloc-gen"
# shared / Logical_Switch_Port external_ids (CONVENTIONS.md)
K_TENANT = "netctl:tenant"
K_OWNER = "netctl:owner"
K_POD_UID = "netctl:pod-uid"
K_NAMESPACE = "netctl:namespace"
K_POD = "netctl:pod"
K_NODE = "netctl:node"
K_STATE = "netctl:state"  # pooled | bound: the port's intent, written with its identity
# the Logical_Switch_Port columns whose addresses count as held
_ADDRESS_COLUMNS = ("addresses", "dynamic_addresses", "port_security")
REQUESTED_CHASSIS = "requested-chassis"

LS = "Logical_Switch"
LSP = "Logical_Switch_Port"


def switch_name(tenant: str) -> str:
    """The logical switch (and network id) of a tenant."""
    return SWITCH_PREFIX + tenant


_NbApi = per_instance_connection(OvnNbApiIdlImpl)


def _ipv4_tokens(entries: Iterable[str]) -> Iterator[int]:
    """Single IPv4 addresses (or /32s) mentioned in `addresses`/`port_security` entries, as ints
    (parsed as OVN does, with inet_pton; MACs, IPv6 and keywords are skipped)."""
    for entry in entries:
        for token in entry.split():
            if "." not in token:
                continue
            addr, _, plen = token.partition("/")
            if plen not in ("", "32"):
                continue
            try:
                yield int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big")
            except OSError:
                continue


def _strings(row: Any, column: str) -> Iterable[str]:
    """A string set column, read from the raw datum (no per-read conversion of the row)."""
    try:
        return [atom.value for atom in row._data[column].values]
    except (AttributeError, KeyError, TypeError):
        return getattr(row, column)


def _string(row: Any, column: str) -> str:
    """A plain string column, read from the raw datum."""
    try:
        return str(next(iter(row._data[column].values)).value)
    except (AttributeError, KeyError, TypeError, StopIteration):
        return str(getattr(row, column))


def _row_ips(lsp: Any) -> frozenset[int]:
    """Every IPv4 address a port holds or may use, ours or not (conservative)."""
    return frozenset(_ipv4_tokens(itertools.chain(*(_strings(lsp, c) for c in _ADDRESS_COLUMNS))))


def _port_uuids(ls: Any) -> list[uuid.UUID]:
    """The switch's port UUIDs. Reads the raw datum: `ls.ports` would build a Row object per
    port (~25 ms per 1,000 ports here)."""
    datum = getattr(ls, "_data", None)
    if datum is not None and "ports" in datum:
        return [atom.value for atom in datum["ports"].values]
    return [row.uuid for row in ls.ports]


def _n_ports(ls: Any) -> int:
    datum = getattr(ls, "_data", None)
    if datum is not None and "ports" in datum:
        return len(datum["ports"].values)
    return len(ls.ports)



class _SwitchState:
    """What one logical switch's ports hold, maintained incrementally from the replica's change
    notifications, and the switch's allocator kept in step with it (touched only in ovsdbapp's
    connection thread)."""

    __slots__ = ("alloc", "held", "hi", "inflight", "lo", "members", "net")

    def __init__(self) -> None:
        self.members: set[uuid.UUID] = set()
        self.held: dict[int, int] = {}  # address -> how many member ports hold it (>= 1)
        self.net: Network | None = None  # the definition `alloc` was built for
        self.alloc: ipam.SubnetAllocator | None = None
        self.lo = self.hi = 0  # the allocator's host range
        # handed out by an attempt that has not (yet) been seen to commit: held by the allocator
        # only; released again unless a port turns up holding them
        self.inflight: set[int] = set()

    def hold(self, ips: frozenset[int]) -> None:
        held, alloc = self.held, self.alloc
        for ip in ips:
            n = held.get(ip, 0)
            held[ip] = n + 1
            if n == 0 and alloc is not None and self.lo <= ip <= self.hi:
                alloc.mark_used(str(ipaddress.IPv4Address(ip)))

    def drop(self, ips: frozenset[int]) -> None:
        held, alloc = self.held, self.alloc
        for ip in ips:
            n = held.get(ip, 0)
            if n > 1:
                held[ip] = n - 1
                continue
            held.pop(ip, None)
            if alloc is not None and ip not in self.inflight and self.lo <= ip <= self.hi:
                alloc.release(str(ipaddress.IPv4Address(ip)))

    def allocator(self, net: Network, last: str | None) -> ipam.SubnetAllocator:
        """The allocator for the switch's current definition; rebuilt (seeded with the held set
        and the persisted rotation cursor) when that changed or on first use."""
        if self.alloc is None or self.net != net:
            alloc = ipam.SubnetAllocator(net.cidr, net.reserved, gateway=net.gateway, last=last)
            alloc.sync(self.held)
            network = alloc.network
            self.lo, self.hi = int(network.network_address) + 1, int(network.broadcast_address) - 1
            self.alloc, self.net = alloc, net
            self.inflight.clear()
        return self.alloc

    def settle(self) -> None:
        """Forget a failed attempt's addresses (those no port holds go back to the allocator)."""
        if self.inflight:
            alloc = self.alloc
            if alloc is not None:
                for ip in self.inflight:
                    if ip not in self.held:
                        alloc.release(str(ipaddress.IPv4Address(ip)))
            self.inflight.clear()


class _NbIdl(ovsdb_connection.OvsdbIdl):
    """The NB replica plus an index of the addresses each logical switch's ports hold, maintained
    from the replica's change notifications: a port's addresses are parsed once when it is
    created or its address columns change, and a switch's membership follows the changes of its
    `ports` column, so allocating costs O(ports in the transaction), not O(ports on the switch).
    Touched only in ovsdbapp's connection thread (notify runs in idl.run(), commands in
    do_commit). When the replica is re-read from scratch the index is too (`_Idl__clear`); if it
    is ever found out of step with the replica (a failed notification, a member count that does
    not match), it is rebuilt from the replica before the next allocation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.port_ips: dict[uuid.UUID, frozenset[int]] = {}
        self.port_switches: dict[uuid.UUID, set[uuid.UUID]] = {}
        self.switches: dict[uuid.UUID, _SwitchState] = {}
        # who each port belongs to, so a pod's ports and a tenant's pool are found without a scan
        self.port_keys: dict[uuid.UUID, tuple[str | None, str | None]] = {}  # row -> (bound uid, pool tenant)
        self.pod_ports: dict[str, set[uuid.UUID]] = {}
        self.pool_ports: dict[str, set[uuid.UUID]] = {}
        self.index_stale = False
        super().__init__(*args, **kwargs)

    # -- maintenance (notifications) ------------------------------------------------------------

    def notify(self, event: Any, row: Any, updates: Any = None) -> None:
        table = getattr(row, "_table", None)
        name = table.name if table is not None else None
        if name in (LSP, LS) and not self.index_stale:
            try:
                if name == LSP:
                    self._port_changed(event, row, updates)
                else:
                    self._switch_changed(event, row, updates)
            except Exception:  # never break the replica; rebuild the index before its next use
                LOG.exception("address index out of step; it will be rebuilt")
                self.index_stale = True
        super().notify(event, row, updates)

    def _Idl__clear(self) -> None:
        """ovs.db.idl drops the replica before a full dump (the first connect, or a reconnect
        that could not resume) without a notification per row; every row then comes back as a
        create, which rebuilds the index from nothing."""
        super()._Idl__clear()
        self.port_ips = {}
        self.port_switches = {}
        self.switches = {}
        self.port_keys, self.pod_ports, self.pool_ports = {}, {}, {}
        self.index_stale = False

    def _set_identity(self, port: uuid.UUID, key: tuple[str | None, str | None]) -> None:
        old = self.port_keys.pop(port, (None, None))
        if old == key and key != (None, None):
            self.port_keys[port] = key
            return
        for value, index in zip(old, (self.pod_ports, self.pool_ports), strict=True):
            if value is not None and (members := index.get(value)) is not None:
                members.discard(port)
                if not members:
                    del index[value]
        if key != (None, None):
            self.port_keys[port] = key
            for value, index in zip(key, (self.pod_ports, self.pool_ports), strict=True):
                if value is not None:
                    index.setdefault(value, set()).add(port)

    def _port_changed(self, event: str, row: Any, updates: Any) -> None:
        if event == ovs_idl.ROW_DELETE:
            self._set_port_ips(row.uuid, frozenset())
            self.port_ips.pop(row.uuid, None)
            self._set_identity(row.uuid, (None, None))
        elif event == ovs_idl.ROW_CREATE:
            self._set_port_ips(row.uuid, _row_ips(row))
            self._set_identity(row.uuid, _identity(row.external_ids))
        else:
            old = getattr(updates, "_data", None)
            if old is None or any(c in old for c in _ADDRESS_COLUMNS):
                self._set_port_ips(row.uuid, _row_ips(row))
            if old is None or "external_ids" in old:
                self._set_identity(row.uuid, _identity(row.external_ids))

    def _switch_changed(self, event: str, row: Any, updates: Any) -> None:
        if event == ovs_idl.ROW_DELETE:
            state = self.switches.pop(row.uuid, None)
            if state is not None:
                for p in state.members:
                    self._forget_member(p, row.uuid)
        elif event == ovs_idl.ROW_CREATE or row.uuid not in self.switches:
            self._reindex_switch(row)
        else:
            old = getattr(updates, "_data", None)
            if old is None:
                self._reindex_switch(row)
            elif "ports" in old:
                now = row._data["ports"].values
                state = self.switches[row.uuid]
                # the symmetric difference of the two datums' keys (C-level, by stored hashes):
                # the ports added to or removed from the switch
                for atom in now.keys() ^ old["ports"].values.keys():
                    if atom in now:
                        self._add_member(state, atom.value, row.uuid)
                    else:
                        state.members.discard(atom.value)
                        state.drop(self.port_ips.get(atom.value, frozenset()))
                        self._forget_member(atom.value, row.uuid)

    def _set_port_ips(self, port: uuid.UUID, ips: frozenset[int]) -> None:
        old = self.port_ips.get(port, frozenset())
        self.port_ips[port] = ips
        if old != ips:
            for sw in self.port_switches.get(port, ()):
                state = self.switches[sw]
                state.drop(old)
                state.hold(ips)

    def _add_member(self, state: _SwitchState, port: uuid.UUID, switch: uuid.UUID) -> None:
        if port in state.members:
            return
        state.members.add(port)
        self.port_switches.setdefault(port, set()).add(switch)
        ips = self.port_ips.get(port)
        if ips is None:
            prow = self.tables[LSP].rows.get(port)
            ips = self.port_ips[port] = _row_ips(prow) if prow is not None else frozenset()
        state.hold(ips)

    def _forget_member(self, port: uuid.UUID, switch: uuid.UUID) -> None:
        sws = self.port_switches.get(port)
        if sws is not None:
            sws.discard(switch)
            if not sws:
                del self.port_switches[port]

    def _reindex_switch(self, ls: Any) -> None:
        old = self.switches.get(ls.uuid)
        state = _SwitchState()
        if old is not None:  # keep the allocator (its rotation and in-flight addresses)
            for p in old.members:
                self._forget_member(p, ls.uuid)
            state.net, state.alloc, state.lo, state.hi = old.net, old.alloc, old.lo, old.hi
            state.inflight = old.inflight
        self.switches[ls.uuid] = state
        for p in _port_uuids(ls):
            self._add_member(state, p, ls.uuid)
        if state.alloc is not None:  # resync the kept allocator with what is held now
            state.alloc.sync([*state.held, *state.inflight])

    def rebuild_index(self) -> None:
        """Re-derive the whole index from the replica (after a reload, or if it went astray)."""
        self.port_ips = {}
        self.port_switches = {}
        self.port_keys, self.pod_ports, self.pool_ports = {}, {}, {}
        self.index_stale = False
        for lsp in list(self.tables[LSP].rows.values()):
            self._set_identity(lsp.uuid, _identity(lsp.external_ids))
        for ls in list(self.tables[LS].rows.values()):
            self._reindex_switch(ls)
        for sw in [u for u in self.switches if u not in self.tables[LS].rows]:
            del self.switches[sw]

    # -- use (inside an allocating transaction) -------------------------------------------------

    def switch_state(self, ls: Any) -> _SwitchState:
        """The switch's index entry, checked cheaply against the replica (rebuilt if stale)."""
        if self.index_stale:
            self.rebuild_index()
        state = self.switches.get(ls.uuid)
        if state is None or len(state.members) != _n_ports(ls):
            if state is not None:
                LOG.warning("address index of %s out of step with the replica; rebuilding", ls.name)
            self._reindex_switch(ls)
            state = self.switches[ls.uuid]
        return state

    def identity_index(self) -> tuple[dict[str, set[uuid.UUID]], dict[str, set[uuid.UUID]]]:
        """(pod uid -> bound port rows, tenant -> pooled port rows), rebuilt first if stale."""
        if self.index_stale:
            self.rebuild_index()
        return self.pod_ports, self.pool_ports

    def used_ips(self, ls: Any) -> set[int]:
        """Every address held by the switch's ports (from the index)."""
        return set(self.switch_state(ls).held)


def _network_from_row(ls: Any) -> Network | None:
    """The switch as a Network, or None if it is not (or no longer validly) netctl's."""
    ids = ls.external_ids
    tenant, cidr = ids.get(K_TENANT), ids.get(K_CIDR)
    if not tenant or not cidr:
        return None
    try:
        mtu = int(ids.get(K_MTU, "1400"))
    except ValueError:
        LOG.warning("switch %s has a malformed %s=%r", ls.name, K_MTU, ids.get(K_MTU))
        return None
    return Network(
        id=ls.name,
        tenant=tenant,
        cidr=cidr,
        gateway=ids.get(K_GATEWAY) or None,
        mtu=mtu,
        reserved=tuple(r for r in ids.get(K_RESERVED, "").split(",") if r),
    )


def _state(ids: dict[str, str]) -> PortState | None:
    """The port's intent; a pod port written before states existed counts as bound."""
    state = ids.get(K_STATE)
    if state == "pooled":
        return "pooled"
    if state == "bound":
        return "bound"
    return "bound" if ids.get(K_OWNER) == "pod" else None


def _identity(ids: dict[str, str]) -> tuple[str | None, str | None]:
    """(uid of the pod the port is bound to, tenant whose pool it is in), for the index."""
    tenant = ids.get(K_TENANT)
    if not tenant:
        return None, None
    state = _state(ids)
    if state == "pooled":
        return None, tenant
    if state == "bound" and ids.get(K_OWNER) == "pod":
        return ids.get(K_POD_UID) or None, None
    return None, None


def _owner_from_ids(ids: dict[str, str]) -> PortOwner | None:
    kind = ids.get(K_OWNER)
    if kind == "pod":
        return PortOwner("pod", ids.get(K_POD, ""), ids.get(K_NAMESPACE), ids.get(K_POD_UID), ids[K_TENANT])
    if kind == "node":
        return PortOwner("node", ids.get(K_NODE, ""), None, None, ids[K_TENANT])
    return None


def _string_map(row: Any, column: str) -> dict[str, str]:
    """A string map column, read from the raw datum (as `_strings`: no per-read conversion)."""
    try:
        return {k.value: v.value for k, v in row._data[column].values.items()}
    except (AttributeError, KeyError, TypeError):
        return dict(getattr(row, column))


def _port_from_row(lsp: Any, prefixlen: int, ids: dict[str, str] | None = None) -> Port | None:
    if ids is None:
        ids = _string_map(lsp, "external_ids")
    tenant = ids.get(K_TENANT)
    addresses = sorted(_strings(lsp, "addresses"))
    if not tenant or not addresses:
        return None
    mac, _, rest = addresses[0].partition(" ")
    ip = rest.split()[0] if rest.split() else ""
    security = sorted(_strings(lsp, "port_security"))
    sec = security[0].split() if security else []
    return Port(
        id=_string(lsp, "name"),
        network_id=switch_name(tenant),
        tenant=tenant,
        mac=mac,
        ip=ip,
        prefixlen=prefixlen,
        owner=_owner_from_ids(ids),
        node=ids.get(K_NODE),
        extra_ips=tuple(t for t in sec[1:] if t != ip),
        state=_state(ids),
        parent=next(iter(_strings(lsp, "parent_name")), None) or None,
        vlan=next((int(t) for t in _strings(lsp, "tag_request")), None),
    )


def _port_ids(net: Network, owner: PortOwner | None, node: str | None,
              state: PortState | None = None) -> dict[str, str]:
    ids = {K_TENANT: net.tenant}
    if state is not None:
        ids[K_STATE] = state
    if owner is not None:
        ids[K_OWNER] = owner.kind
        if owner.kind == "pod":
            ids[K_POD] = owner.name
            if owner.namespace:
                ids[K_NAMESPACE] = owner.namespace
            if owner.uid:
                ids[K_POD_UID] = owner.uid
    if node:
        ids[K_NODE] = node
    return ids


class _CreatePorts(ovsdb_command.BaseCommand):
    """Allocate addresses for a batch and insert its ports; runs (and re-runs on "try again")
    inside ovsdbapp's connection thread against the current replica."""

    def __init__(self, iaas: OvnIaaS, switch: str, requests: Sequence[PortRequest]) -> None:
        super().__init__(iaas._api)
        self.iaas = iaas
        self.switch = switch
        self.requests = requests

    def run_idl(self, txn: Any) -> None:
        ls = self.api.lookup(LS, self.switch, default=None)
        net = _network_from_row(ls) if ls is not None else None
        if ls is None or net is None:
            raise NetworkNotFound(f"no network {self.switch}")
        # Optimistic concurrency with other netctl processes: every allocating transaction bumps
        # the switch's netctl:alloc-gen, and each verifies external_ids is what it read, so a
        # concurrent allocation makes OVSDB answer "try again" and ovsdbapp re-runs this against
        # the refreshed replica (and index). A few keys, whatever the switch's size. (Verifying
        # `ports` instead would ship the whole port list in every transaction.)
        ls.verify("external_ids")
        state = self.api.idl.switch_state(ls)
        state.settle()  # a previous attempt (this one re-running, or one that failed) is over
        alloc = state.allocator(net, ls.external_ids.get(K_LAST_IP))
        try:
            self.result = self._create(txn, ls, net, state, alloc)
        except BaseException:
            state.settle()
            raise
        self._state = state

    def post_commit(self, txn: Any) -> None:
        # committed: the ports (already in the replica) hold what this attempt handed out
        state = getattr(self, "_state", None)
        if state is not None:
            state.inflight.clear()

    def _create(self, txn: Any, ls: Any, net: Network, state: _SwitchState,
                alloc: ipam.SubnetAllocator) -> list[Port]:
        done: dict[str, Port] = {}
        last = None
        for req in self.requests:
            if req.port_id in done:
                continue
            if req.owner is not None and req.owner.tenant != net.tenant:  # the switch's word counts
                raise IaaSConflict(f"{req.owner.kind} {req.owner.name} of tenant {req.owner.tenant} "
                                   f"cannot have a port on {net.id} of tenant {net.tenant}")
            existing = self.api.lookup(LSP, req.port_id, default=None)
            if existing is not None:
                port = _port_from_row(existing, net.prefixlen)
                if port is None or port.tenant != net.tenant:
                    raise IaaSConflict(f"port {req.port_id} exists outside network {net.id}")
                done[req.port_id] = port
                continue
            try:
                ip = alloc.allocate(req.port_id)
            except ipam.SubnetExhausted as e:
                raise SubnetExhausted(f"network {net.id}: {e}") from None
            state.inflight.add(int(ipaddress.IPv4Address(ip)))
            done[req.port_id] = self._insert(txn, ls, net, req, ip)
            last = ip
        if last is not None:
            gen = ls.external_ids.get(K_GENERATION, "0")
            ls.setkey("external_ids", K_GENERATION, str(int(gen) + 1 if gen.isdigit() else 1))
            ls.setkey("external_ids", K_LAST_IP, last)
        return [done[r.port_id] for r in self.requests]

    def _insert(self, txn: Any, ls: Any, net: Network, req: PortRequest, ip: str) -> Port:
        mac = ipam.mac_for_ip(ip)
        lsp = txn.insert(self.api.tables[LSP])
        lsp.name = req.port_id
        lsp.addresses = [f"{mac} {ip}"]
        lsp.port_security = [" ".join([mac, ip, *req.extra_allowed_cidrs])]
        lsp.external_ids = _port_ids(net, req.owner, req.node, req.state)
        if req.node:
            lsp.options = {REQUESTED_CHASSIS: self.iaas.chassis_of(req.node)}
        ls.addvalue("ports", lsp)
        return Port(req.port_id, net.id, net.tenant, mac, ip, net.prefixlen, req.owner, req.node,
                    tuple(req.extra_allowed_cidrs), req.state)


class _PendingClaim:
    """One caller's claim waiting to be committed (possibly by another caller: group commit)."""

    __slots__ = ("claim", "done", "error", "fallback_id", "node", "owner")

    def __init__(self, owner: PortOwner, fallback_id: str, node: str | None) -> None:
        self.owner, self.fallback_id, self.node = owner, fallback_id, node
        self.claim: Claim | None = None
        self.error: BaseException | None = None
        self.done = False


class _ClaimPorts(_CreatePorts):
    """For each pending claim: the pod's bound port if it has one, else a pooled port (identity
    and binding written only if the row is still pooled: verify makes a concurrent claimer's
    transaction "try again"), else a new port. All of them in one transaction, so the intent is
    on every port before anyone annotates, and N concurrent claims on a switch cost one commit."""

    def __init__(self, iaas: OvnIaaS, switch: str, pending: Sequence[_PendingClaim]) -> None:
        super().__init__(iaas, switch, [])
        self.pending = pending
        self.claims: list[Claim] = []

    def run_idl(self, txn: Any) -> None:
        ls = self.api.lookup(LS, self.switch, default=None)
        net = _network_from_row(ls) if ls is not None else None
        if ls is None or net is None:
            raise NetworkNotFound(f"no network {self.switch}")
        pod_ports, pool_ports = self.api.idl.identity_index()
        rows = self.api.tables[LSP].rows
        pooled = sorted((r for u in pool_ports.get(net.tenant, ()) if (r := rows.get(u)) is not None),
                        key=lambda r: r.name, reverse=True)  # pop() takes the lowest name
        claims: list[Claim | None] = []
        by_uid: dict[str, int] = {}  # a uid twice in one batch gets one port
        creates: list[tuple[int, PortRequest]] = []
        for i, want in enumerate(self.pending):
            uid = str(want.owner.uid)
            if uid in by_uid:
                claims.append(None)
                continue
            by_uid[uid] = i
            # Only ports on this switch: the pod may also hold a port on another one (its public NIC).
            mine = sorted((r for u in pod_ports.get(uid, ()) if (r := rows.get(u)) is not None
                           and r.external_ids.get(K_TENANT) == net.tenant), key=lambda r: r.name)
            port = _port_from_row(mine[0], net.prefixlen) if mine else None
            if port is not None:
                claims.append(Claim(port, hit=False, existing=True))
            elif pooled:
                lsp = pooled.pop()
                lsp.verify("external_ids")
                lsp.external_ids = _port_ids(net, want.owner, want.node, "bound")
                if want.node:
                    lsp.setkey("options", REQUESTED_CHASSIS, self.iaas.chassis_of(want.node))
                mac, _, rest = lsp.addresses[0].partition(" ")
                claims.append(Claim(Port(lsp.name, net.id, net.tenant, mac, rest.split()[0], net.prefixlen,
                                         want.owner, want.node, (), "bound"), hit=True))
            else:
                claims.append(None)
                creates.append((i, PortRequest(want.fallback_id, want.owner, want.node)))
        self.requests = [req for _, req in creates]
        if creates:
            super().run_idl(txn)
            for (i, _), port in zip(creates, self.result, strict=True):
                claims[i] = Claim(port, hit=False)
        for i, want in enumerate(self.pending):
            if claims[i] is None:  # the same uid earlier in the batch
                first = claims[by_uid[str(want.owner.uid)]]
                assert first is not None
                claims[i] = Claim(first.port, hit=False, existing=True)
        self.claims = [c for c in claims if c is not None]


class _ReleasePorts(_CreatePorts):
    """Scrub ports of one switch back into its pool: a fresh name (a node still plugged with the
    old name as iface-id no longer matches, and a stale id can never reach the port's next
    owner), a fresh address from the rotating allocator (a dead pod's address is not handed out
    again at once), no identity, no binding."""

    def __init__(self, iaas: OvnIaaS, switch: str, port_ids: Sequence[str]) -> None:
        super().__init__(iaas, switch, [])
        self.port_ids = port_ids

    def _create(self, txn: Any, ls: Any, net: Network, state: _SwitchState,
                alloc: ipam.SubnetAllocator) -> list[Port]:
        out: list[Port] = []
        last = None
        for pid in self.port_ids:
            lsp = self.api.lookup(LSP, pid, default=None)
            if lsp is None or lsp.external_ids.get(K_TENANT) != net.tenant:
                continue
            new_id = pool_port_id()
            try:
                ip = alloc.allocate(new_id)
            except ipam.SubnetExhausted as e:
                raise SubnetExhausted(f"network {net.id}: {e}") from None
            state.inflight.add(int(ipaddress.IPv4Address(ip)))
            # The row is replaced rather than renamed in place: ovs.db.idl's client-side name
            # index cannot follow a change of an indexed column. Same transaction, same effect.
            ls.delvalue("ports", lsp)
            lsp.delete()
            out.append(self._insert(txn, ls, net, PortRequest(new_id, None), ip))
            last = ip
        if last is not None:
            gen = ls.external_ids.get(K_GENERATION, "0")
            ls.setkey("external_ids", K_GENERATION, str(int(gen) + 1 if gen.isdigit() else 1))
            ls.setkey("external_ids", K_LAST_IP, last)
        return out


class _DeletePorts(ovsdb_command.BaseCommand):
    """Delete ports by name; unlike ovsdbapp's lsp_del it finds the switch through
    netctl:tenant instead of scanning every switch's port list per port."""

    def __init__(self, api: Any, port_ids: Iterable[str]) -> None:
        super().__init__(api)
        self.port_ids = list(port_ids)

    def run_idl(self, txn: Any) -> None:
        for pid in self.port_ids:
            lsp = self.api.lookup(LSP, pid, default=None)
            if lsp is None:
                continue
            ls = self.api.lookup(LS, switch_name(lsp.external_ids.get(K_TENANT, "")), default=None)
            if ls is None:  # not ours or inconsistent: fall back to a scan
                ls = next((s for s in self.api.tables[LS].rows.values() if lsp in s.ports), None)
            if ls is not None:
                ls.delvalue("ports", lsp)
            lsp.delete()


class _TrimPool(ovsdb_command.BaseCommand):
    """Delete a tenant's pooled ports beyond `keep`, choosing them inside the transaction (a port
    claimed meanwhile is no longer pooled, so it is never taken; verify covers other processes)."""

    def __init__(self, api: Any, tenant: str, keep: int) -> None:
        super().__init__(api)
        self.tenant = tenant
        self.keep = keep

    def run_idl(self, txn: Any) -> None:
        _, pool_ports = self.api.idl.identity_index()
        rows = self.api.tables[LSP].rows
        pooled = sorted((r for u in pool_ports.get(self.tenant, ()) if (r := rows.get(u)) is not None),
                        key=lambda r: r.name)
        doomed = pooled[self.keep:]
        ls = self.api.lookup(LS, switch_name(self.tenant), default=None) if doomed else None
        for lsp in doomed:
            lsp.verify("external_ids")
            if ls is not None:
                ls.delvalue("ports", lsp)
            lsp.delete()
        self.result = len(doomed)


class OvnIaaS(IaaS):
    """IaaS on the OVN Northbound DB. `chassis_of` maps a node name to the OVN chassis that hosts
    it (requested-chassis); identity by default, as with Neutron where it is the host name."""

    def __init__(
        self,
        nb_connection: str,
        timeout: float = 10.0,
        *,
        chassis_of: Callable[[str], str] | None = None,
        hypervisor: Hypervisor | None = None,
        sync_in_background: bool = False,
    ) -> None:
        """``hypervisor``: what plugs ports into VMs for nested-nic tenants (None: hot-plug unsupported).
        ``sync_in_background``: return once the schema is read and fill the replica on a thread of its
        own (the first call waits for it): a process that also lists from the API server overlaps
        the two (the replica's first read costs ~0.45 ms per port, 4-5 s at 10,000)."""
        self.nb_connection = nb_connection
        self.hypervisor = hypervisor
        self.timeout = timeout
        self.chassis_of: Callable[[str], str] = chassis_of or (lambda node: node)
        self._guard = threading.Lock()
        self._switch_locks: dict[str, threading.Lock] = {}
        self._pending_claims: dict[str, list[_PendingClaim]] = {}  # by switch, under _guard
        try:
            idl = _NbIdl.from_server(nb_connection, "OVN_Northbound")
            self._nb = _NbApi(ovsdb_connection.Connection(idl, timeout), start=False)
        except Exception as e:  # ovs raises plain Exception when the schema cannot be fetched
            raise IaaSUnavailable(f"OVN NB {nb_connection} unreachable: {e}") from e
        self._synced = threading.Event()
        self._sync_lock = threading.Lock()
        self._sync_error: Exception | None = None
        if sync_in_background:
            threading.Thread(target=self._initial_sync, name="ovn-nb-initial-sync", daemon=True).start()
        else:
            self._initial_sync()
            if self._sync_error is not None:
                raise IaaSUnavailable(f"OVN NB {nb_connection} unreachable: {self._sync_error}")

    # -- plumbing -----------------------------------------------------------------------------

    def _initial_sync(self) -> None:
        with self._sync_lock:
            try:
                self._nb.start_connection(self._nb.ovsdb_connection)
                self._sync_error = None
            except Exception as e:  # OvsdbConnectionUnavailable wrapping the cause
                self._sync_error = e
            finally:
                self._synced.set()

    @property
    def _api(self) -> Any:
        """The NB API once its replica holds the database (waits for the first read; a failed one is
        tried again here, so an NB that comes up later is picked up by the next call)."""
        if not self._synced.is_set():
            self._synced.wait()
        if self._sync_error is not None:
            self._initial_sync()
            if self._sync_error is not None:
                raise IaaSUnavailable(f"OVN NB {self.nb_connection} unreachable: {self._sync_error}")
        return self._nb

    def close(self) -> None:
        self._nb.ovsdb_connection.stop(timeout=5)
        if self.hypervisor is not None:
            self.hypervisor.close()

    def _commit(self, *commands: Any) -> list[Any]:
        try:
            with self._api.transaction(check_error=True, log_errors=False) as txn:
                for c in commands:
                    txn.add(c)
        except IaaSError:
            raise
        except (ovsdb_exc.TimeoutException, ovsdb_exc.OvsdbConnectionUnavailable) as e:
            raise IaaSUnavailable(f"OVN NB {self.nb_connection}: {e}") from e
        except RuntimeError as e:
            if "timed out" in str(e):
                raise IaaSUnavailable(f"OVN NB {self.nb_connection}: {e}") from e
            raise IaaSError(f"OVN NB transaction failed: {e}") from e
        return [c.result for c in commands]

    def _switch_lock(self, switch: str) -> threading.Lock:
        with self._guard:
            return self._switch_locks.setdefault(switch, threading.Lock())

    # -- networks -----------------------------------------------------------------------------

    def ensure_network(self, spec: NetworkSpec) -> Network:
        name = switch_name(spec.tenant)
        ids = {
            K_TENANT: spec.tenant,
            K_CIDR: spec.cidr,
            K_GATEWAY: spec.gateway or "",
            K_MTU: str(spec.mtu),
            K_RESERVED: ",".join(spec.reserved),
        }
        with self._switch_lock(name):
            existing = self.get_network(spec.tenant)
            if existing is None:
                self._commit(self._api.ls_add(name, may_exist=True, external_ids=ids))
            elif (existing.cidr, existing.gateway) != (spec.cidr, spec.gateway):
                raise IaaSConflict(
                    f"network {name} exists with cidr {existing.cidr} gateway {existing.gateway}, "
                    f"requested {spec.cidr} gateway {spec.gateway}"
                )
            elif (existing.mtu, existing.reserved) != (spec.mtu, spec.reserved):
                self._commit(self._api.db_set(LS, name, ("external_ids", ids), if_exists=False))
        net = self.get_network(spec.tenant)
        if net is None:
            raise IaaSConflict(f"a logical switch {name} exists that netctl did not create")
        return net

    def get_network(self, tenant: str) -> Network | None:
        with self._api.ovsdb_connection.lock:
            ls = self._api.lookup(LS, switch_name(tenant), default=None)
            return _network_from_row(ls) if ls is not None else None

    def delete_network(self, tenant: str) -> None:
        name = switch_name(tenant)
        with self._switch_lock(name):
            self._commit(self._api.ls_del(name, if_exists=True))

    def list_networks(self) -> list[Network]:
        with self._api.ovsdb_connection.lock:
            nets = [_network_from_row(ls) for ls in self._api.tables[LS].rows.values()]
        return sorted((n for n in nets if n is not None and n.id.startswith(SWITCH_PREFIX)),
                      key=lambda n: n.id)

    def ensure_uplink_port(self, network: Network, name: str, mac: str, ip: str) -> None:
        """A port holding `mac`/`ip` with no port security, outside netctl's bookkeeping (no
        netctl:tenant, so no resync ever frees it): what stands for the upstream router of a
        provider network (the lab's "internet"). Its address counts as held by the allocator."""
        addresses = [f"{mac} {ip}"]
        with self._switch_lock(network.id):
            self._commit(self._api.lsp_add(network.id, name, may_exist=True, addresses=addresses))
            self._commit(self._api.db_set(LSP, name, ("addresses", addresses), ("port_security", []),
                                          if_exists=False))

    # -- ports --------------------------------------------------------------------------------

    def create_port(
        self,
        network: Network,
        owner: PortOwner | None,
        port_id: str,
        node: str | None = None,
        extra_allowed_cidrs: Sequence[str] = (),
    ) -> Port:
        return self.create_ports(network, [PortRequest(port_id, owner, node, tuple(extra_allowed_cidrs))])[0]

    def create_ports(self, network: Network, requests: Iterable[PortRequest]) -> list[Port]:
        reqs = [self._checked(network, r) for r in requests]
        if not reqs:
            return []
        with self._switch_lock(network.id):
            (ports,) = self._commit(_CreatePorts(self, network.id, reqs))
        return list(ports)

    @staticmethod
    def _checked(network: Network, req: PortRequest) -> PortRequest:
        """Refuse cross-tenant ports; a node NIC is bound to (and named after) its node."""
        if not req.port_id:
            raise ValueError("port id must not be empty")
        owner = req.owner
        if owner is not None and owner.tenant != network.tenant:
            raise IaaSConflict(f"{owner.kind} {owner.name} of tenant {owner.tenant} cannot have a port "
                               f"on network {network.id} of tenant {network.tenant}")
        for c in req.extra_allowed_cidrs:
            ipaddress.IPv4Network(c, strict=False)
        if owner is not None and owner.kind == "node":
            if req.node not in (None, owner.name):
                raise ValueError(f"node NIC of {owner.name} cannot be bound to node {req.node}")
            return PortRequest(req.port_id, owner, owner.name, req.extra_allowed_cidrs)
        return req

    def claim_port(self, network: Network, owner: PortOwner, fallback_id: str, node: str | None = None) -> Claim:
        """Group commit: a claim joins the switch's pending list; whoever holds the switch lock
        commits everything pending in one transaction (a commit costs the same for 1 or 50 claims,
        and more as the switch grows), the others find their answer when they get the lock."""
        self._checked(network, PortRequest(fallback_id, owner, node))
        me = _PendingClaim(owner, fallback_id, node)
        with self._guard:
            self._pending_claims.setdefault(network.id, []).append(me)
        with self._switch_lock(network.id):
            if not me.done:
                with self._guard:
                    batch = self._pending_claims.pop(network.id, [])[:]
                self._commit_claims(network.id, batch)
        if me.error is not None:
            raise me.error
        assert me.claim is not None
        return me.claim

    def _commit_claims(self, switch: str, batch: list[_PendingClaim]) -> None:
        try:
            cmd = _ClaimPorts(self, switch, batch)
            self._commit(cmd)
            for want, claim in zip(batch, cmd.claims, strict=True):
                want.claim = claim
        except BaseException as e:
            if len(batch) == 1:
                batch[0].error = e
            else:  # one bad claim must not fail the others: each on its own
                for want in batch:
                    self._commit_claims(switch, [want])
        finally:
            for want in batch:
                want.done = True

    def release_ports(self, port_ids: Iterable[str]) -> list[Port]:
        by_switch: dict[str, list[str]] = {}
        with self._api.ovsdb_connection.lock:
            for pid in port_ids:
                lsp = self._api.lookup(LSP, pid, default=None)
                tenant = lsp.external_ids.get(K_TENANT) if lsp is not None else None
                if tenant:
                    by_switch.setdefault(switch_name(tenant), []).append(pid)
        out: list[Port] = []
        for switch, ids in sorted(by_switch.items()):
            with self._switch_lock(switch):
                (ports,) = self._commit(_ReleasePorts(self, switch, ids))
            out.extend(ports)
        return out

    def trim_pool(self, tenant: str, keep: int) -> int:
        with self._switch_lock(switch_name(tenant)):
            (n,) = self._commit(_TrimPool(self._api, tenant, max(0, keep)))
        return int(n)

    def ports_of_pod(self, uid: str) -> list[Port]:
        with self._api.ovsdb_connection.lock:
            pod_ports, _ = self._api.idl.identity_index()
            return self._rows_as_ports(pod_ports.get(uid, ()))

    def pooled_ports(self, tenant: str) -> list[Port]:
        with self._api.ovsdb_connection.lock:
            _, pool_ports = self._api.idl.identity_index()
            return self._rows_as_ports(pool_ports.get(tenant, ()))

    def _rows_as_ports(self, uuids: Iterable[uuid.UUID]) -> list[Port]:
        rows = self._api.tables[LSP].rows
        cache: dict[str, int | None] = {}
        ports = [self._port(r, cache) for u in list(uuids) if (r := rows.get(u)) is not None]
        return sorted((p for p in ports if p is not None), key=lambda p: p.id)

    def bind_port(self, port_id: str, node: str) -> Port:
        port = self.get_port(port_id)
        if port is None:
            raise PortNotFound(f"no port {port_id}")
        if port.owner is not None and port.owner.kind == "node" and port.owner.name != node:
            raise IaaSConflict(f"node NIC {port_id} belongs to node {port.owner.name}, not {node}")
        cmd = self._api.db_set(LSP, port_id, ("options", {REQUESTED_CHASSIS: self.chassis_of(node)}),
                               ("external_ids", {K_NODE: node}), if_exists=False)
        try:
            self._commit(cmd)
        except IaaSError as e:
            if isinstance(e.__cause__, idlutils.RowNotFound):
                raise PortNotFound(f"no port {port_id}") from e
            raise
        bound = self.get_port(port_id)
        if bound is None:
            raise PortNotFound(f"port {port_id} vanished while being bound")
        return bound

    # -- nested mode ----------------------------------------------------------------------------

    def attach_subport(self, port_id: str, parent_id: str) -> Port:
        port, parent = self.get_port(port_id), self.get_port(parent_id)
        if port is None or parent is None:
            raise PortNotFound(f"no port {port_id if port is None else parent_id}")
        if port.tenant not in (parent.tenant, PUBLIC_NETWORK):  # the provider network is every tenant's
            raise IaaSConflict(f"port {port_id} of tenant {port.tenant} cannot be a subport of {parent_id} "
                               f"of tenant {parent.tenant}")
        if port.parent == parent_id and port.vlan is not None:
            return port
        # the switch lock serialises this process's choices of a free VLAN under one parent
        with self._switch_lock(switch_name(port.tenant)):
            self._commit(MakeSubport(self._api, port_id, parent_id))
        done = self.get_port(port_id)
        if done is None:
            raise PortNotFound(f"port {port_id} vanished while becoming a subport")
        return done

    def detach_subport(self, port_id: str) -> None:
        port = self.get_port(port_id)
        if port is None or (port.parent is None and port.vlan is None):
            return
        self._commit(self._api.db_clear(LSP, port_id, "parent_name"),
                     self._api.db_clear(LSP, port_id, "tag_request"))

    def hotplug_port(self, port_id: str, vm_port_id: str) -> bool:
        hv = self._hypervisor()
        port = self.get_port(port_id)
        if port is None:
            raise PortNotFound(f"no port {port_id}")
        vm = hv.vm_of(vm_port_id)
        if vm is None:
            raise IaaSError(f"port {vm_port_id} is not plugged into any VM of this hypervisor: cannot find the VM "
                            f"to plug {port_id} into")
        net = self.get_network(port.tenant)
        return hv.ensure_attached(port.id, port.mac, vm, mtu=net.mtu if net is not None else 1400)

    def unplug_port(self, port_id: str) -> bool:
        return self._hypervisor().detach(port_id)

    def _hypervisor(self) -> Hypervisor:
        if self.hypervisor is None:
            raise NestingUnsupported("this OVN backend has no hypervisor to hot-plug ports with "
                                     "(netctl controller --hypervisor-ovsdb)")
        return self.hypervisor

    def delete_port(self, port_id: str) -> None:
        self.delete_ports([port_id])

    def delete_ports(self, port_ids: Iterable[str]) -> None:
        ids = list(port_ids)
        if ids:
            self._commit(_DeletePorts(self._api, ids))

    def get_port(self, port_id: str) -> Port | None:
        with self._api.ovsdb_connection.lock:
            lsp = self._api.lookup(LSP, port_id, default=None)
            if lsp is None:
                return None
            return self._port(lsp, {})

    def list_ports(self, tenant: str | None = None) -> list[Port]:
        with self._api.ovsdb_connection.lock:
            if tenant is not None:
                ls = self._api.lookup(LS, switch_name(tenant), default=None)
                rows = list(ls.ports) if ls is not None else []
            else:
                rows = list(self._api.tables[LSP].rows.values())
            cache: dict[str, int | None] = {}
            ports = [self._port(r, cache) for r in rows]
        return sorted((p for p in ports if p is not None), key=lambda p: p.id)

    def _port(self, lsp: Any, prefix_cache: dict[str, int | None]) -> Port | None:
        """Row -> Port (None if not netctl's); the caller holds the connection lock."""
        ids = _string_map(lsp, "external_ids")
        tenant = ids.get(K_TENANT)
        if not tenant:
            return None
        if tenant not in prefix_cache:
            ls = self._api.lookup(LS, switch_name(tenant), default=None)
            net = _network_from_row(ls) if ls is not None else None
            prefix_cache[tenant] = net.prefixlen if net is not None else None
        plen = prefix_cache[tenant]
        return _port_from_row(lsp, plen, ids) if plen is not None else None


__all__ = ["OvnIaaS", "switch_name"]
