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
cannot hand out an address twice (each port's parsed addresses are cached and dropped when the
replica reports the port changed, so this costs a dict lookup per port). Allocation runs inside
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
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ovsdbapp import exceptions as ovsdb_exc
from ovsdbapp.backend.ovs_idl import command as ovsdb_command
from ovsdbapp.backend.ovs_idl import connection as ovsdb_connection
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.schema.ovn_northbound.impl_idl import OvnNbApiIdlImpl

from netctl import ipam
from netctl.iaas.base import (
    IaaS,
    IaaSConflict,
    IaaSError,
    IaaSUnavailable,
    Network,
    NetworkNotFound,
    NetworkSpec,
    Port,
    PortNotFound,
    PortOwner,
    PortRequest,
    SubnetExhausted,
)
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
REQUESTED_CHASSIS = "requested-chassis"

LS = "Logical_Switch"
LSP = "Logical_Switch_Port"


def switch_name(tenant: str) -> str:
    """The logical switch (and network id) of a tenant."""
    return SWITCH_PREFIX + tenant


_NbApi = per_instance_connection(OvnNbApiIdlImpl)


def _ipv4_tokens(entries: Iterable[str]) -> Iterator[int]:
    """Single IPv4 addresses (or /32s) mentioned in `addresses`/`port_security` entries, as ints."""
    for entry in entries:
        for token in entry.split():
            addr, _, plen = token.partition("/")
            if plen not in ("", "32"):
                continue
            try:
                yield int(ipaddress.IPv4Address(addr))
            except ValueError:
                continue


def _row_ips(lsp: Any) -> tuple[int, ...]:
    """Every IPv4 address a port holds or may use, ours or not (conservative)."""
    return (*_ipv4_tokens(lsp.addresses), *_ipv4_tokens(lsp.dynamic_addresses),
            *_ipv4_tokens(lsp.port_security))


def _port_uuids(ls: Any) -> list[uuid.UUID]:
    """The switch's port UUIDs. Reads the raw datum: `ls.ports` would build a Row object per
    port (~25 ms per 1,000 ports here), too slow to do in every allocating transaction."""
    datum = getattr(ls, "_data", None)
    if datum is not None and "ports" in datum:
        return [atom.value for atom in datum["ports"].values]
    return [row.uuid for row in ls.ports]


class _NbIdl(ovsdb_connection.OvsdbIdl):
    """Keeps a per-port cache of the addresses each Logical_Switch_Port holds, dropped whenever
    the replica reports the row changed, so the used set of a switch costs a dict lookup per port
    instead of parsing every port in every allocating transaction. Touched only in ovsdbapp's
    connection thread (notify runs in idl.run(), commands in do_commit)."""

    port_ips: dict[uuid.UUID, tuple[int, ...]]

    def notify(self, event: Any, row: Any, updates: Any = None) -> None:
        table = getattr(row, "_table", None)
        if table is not None and table.name == LSP:
            self.port_ips.pop(row.uuid, None)
        super().notify(event, row, updates)

    def used_ips(self, ls: Any) -> set[int]:
        uuids = _port_uuids(ls)
        cached = list(map(self.port_ips.get, uuids))
        rows = self.tables[LSP].rows
        for i in [i for i, ips in enumerate(cached) if ips is None]:  # new/changed: parse that row
            row = rows.get(uuids[i])
            cached[i] = self.port_ips[uuids[i]] = _row_ips(row) if row is not None else ()
        return set(itertools.chain.from_iterable(ips for ips in cached if ips))


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


def _owner_from_ids(ids: dict[str, str]) -> PortOwner | None:
    kind = ids.get(K_OWNER)
    if kind == "pod":
        return PortOwner("pod", ids.get(K_POD, ""), ids.get(K_NAMESPACE), ids.get(K_POD_UID), ids[K_TENANT])
    if kind == "node":
        return PortOwner("node", ids.get(K_NODE, ""), None, None, ids[K_TENANT])
    return None


def _port_from_row(lsp: Any, prefixlen: int) -> Port | None:
    ids = dict(lsp.external_ids)
    tenant = ids.get(K_TENANT)
    if not tenant or not lsp.addresses:
        return None
    mac, _, rest = lsp.addresses[0].partition(" ")
    ip = rest.split()[0] if rest.split() else ""
    sec = lsp.port_security[0].split() if lsp.port_security else []
    return Port(
        id=lsp.name,
        network_id=switch_name(tenant),
        tenant=tenant,
        mac=mac,
        ip=ip,
        prefixlen=prefixlen,
        owner=_owner_from_ids(ids),
        node=ids.get(K_NODE),
        extra_ips=tuple(t for t in sec[1:] if t != ip),
    )


def _port_ids(net: Network, owner: PortOwner | None, node: str | None) -> dict[str, str]:
    ids = {K_TENANT: net.tenant}
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
        # the refreshed replica. (Verifying `ports` instead would ship the whole port list in
        # every transaction: ~40 ms per port at 5,000 ports per switch.)
        ls.verify("external_ids")
        alloc = self.iaas._allocator(net, ls)
        alloc.sync(self.api.idl.used_ips(ls))
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
            done[req.port_id] = self._insert(txn, ls, net, req, ip)
            last = ip
        if last is not None:
            gen = ls.external_ids.get(K_GENERATION, "0")
            ls.setkey("external_ids", K_GENERATION, str(int(gen) + 1 if gen.isdigit() else 1))
            ls.setkey("external_ids", K_LAST_IP, last)
        self.result = [done[r.port_id] for r in self.requests]

    def _insert(self, txn: Any, ls: Any, net: Network, req: PortRequest, ip: str) -> Port:
        mac = ipam.mac_for_ip(ip)
        lsp = txn.insert(self.api.tables[LSP])
        lsp.name = req.port_id
        lsp.addresses = [f"{mac} {ip}"]
        lsp.port_security = [" ".join([mac, ip, *req.extra_allowed_cidrs])]
        lsp.external_ids = _port_ids(net, req.owner, req.node)
        if req.node:
            lsp.options = {REQUESTED_CHASSIS: self.iaas.chassis_of(req.node)}
        ls.addvalue("ports", lsp)
        return Port(req.port_id, net.id, net.tenant, mac, ip, net.prefixlen, req.owner, req.node,
                    tuple(req.extra_allowed_cidrs))


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


class OvnIaaS(IaaS):
    """IaaS on the OVN Northbound DB. `chassis_of` maps a node name to the OVN chassis that hosts
    it (requested-chassis); identity by default, as with Neutron where it is the host name."""

    def __init__(
        self,
        nb_connection: str,
        timeout: float = 10.0,
        *,
        chassis_of: Callable[[str], str] | None = None,
    ) -> None:
        self.nb_connection = nb_connection
        self.timeout = timeout
        self.chassis_of: Callable[[str], str] = chassis_of or (lambda node: node)
        self._guard = threading.Lock()
        self._switch_locks: dict[str, threading.Lock] = {}
        self._allocators: dict[str, tuple[Network, ipam.SubnetAllocator]] = {}
        try:
            idl = _NbIdl.from_server(nb_connection, "OVN_Northbound")
            idl.port_ips = {}
            self._api = _NbApi(ovsdb_connection.Connection(idl, timeout))
        except Exception as e:  # ovs raises plain Exception when the schema cannot be fetched
            raise IaaSUnavailable(f"OVN NB {nb_connection} unreachable: {e}") from e

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self._api.ovsdb_connection.stop(timeout=5)

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

    def _allocator(self, net: Network, ls: Any) -> ipam.SubnetAllocator:
        """The switch's allocator, rebuilt when its definition changed (seeded from last-ip)."""
        with self._guard:
            cached = self._allocators.get(net.id)
            if cached is None or cached[0] != net:
                alloc = ipam.SubnetAllocator(net.cidr, net.reserved, gateway=net.gateway,
                                             last=ls.external_ids.get(K_LAST_IP))
                self._allocators[net.id] = (net, alloc)
                return alloc
            return cached[1]

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
            with self._guard:
                self._allocators.pop(name, None)

    def list_networks(self) -> list[Network]:
        with self._api.ovsdb_connection.lock:
            nets = [_network_from_row(ls) for ls in self._api.tables[LS].rows.values()]
        return sorted((n for n in nets if n is not None and n.id.startswith(SWITCH_PREFIX)),
                      key=lambda n: n.id)

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
        tenant = lsp.external_ids.get(K_TENANT)
        if not tenant:
            return None
        if tenant not in prefix_cache:
            ls = self._api.lookup(LS, switch_name(tenant), default=None)
            net = _network_from_row(ls) if ls is not None else None
            prefix_cache[tenant] = net.prefixlen if net is not None else None
        plen = prefix_cache[tenant]
        return _port_from_row(lsp, plen) if plen is not None else None


__all__ = ["OvnIaaS", "switch_name"]
