"""UDP conntrack cleanup: which flows went stale when endpoints changed, and deleting them.

Why: UDP has no connection teardown, so a conntrack entry that DNATed a client's flow to an
endpoint keeps steering every later packet of that flow (same source port) there until it times
out — long after the endpoint is gone, while the client is black-holed. And a flow that reached
a frontend while it had no endpoints may be tracked un-NATed; when endpoints appear it would
keep bypassing them. TCP needs none of this (a dead endpoint resets or times out the connection;
the client reconnects with a new source port).

Pure part (``stale_flows``, ``reconcile_flows``, ``FlowFilter.matches``): from the old and new
``ServicePortState`` of a service port, the filters of entries to delete — the same ones kube-proxy
deletes (original destination = a frontend address and port, protocol UDP, reply source = the
endpoint) — plus the node-port variant (any original destination, destination port = the node
port). A partial sync deletes exactly what its changes made stale; a full sync (start, failure,
drift: the previous kernel state is not known for sure) reconciles: every UDP frontend keeps only
entries whose reply source is one of its usable endpoints.

I/O part (``delete_flows``): pyroute2's conntrack netlink socket in the calling thread's network
namespace — dump with a kernel-side filter on the original tuple, delete the matches. To act in
another namespace, run it there (``kproxy.netns.NetnsBackend.run``), as nftables is.

Known limit: the usable endpoint set is the Service-wide one (``usable_endpoints``); with
traffic policy ``Local`` a frontend may use fewer, so some stale entries to non-local endpoints can
survive until they time out.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kproxy.model import ServicePortName, ServicePortState

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]  # (ip, port): what the reply tuple's source is after DNAT


@dataclass(frozen=True, order=True)
class FlowFilter:
    """UDP entries with original destination ``dst_ip`` (None: any — node ports) and ``dst_port``.

    Of those, delete the ones whose reply source (ip, port) is in ``endpoints`` — or, with
    ``keep`` set, the ones whose reply source is *not* in it. ``endpoints=None`` deletes them all.
    """

    dst_ip: str | None
    dst_port: int
    endpoints: frozenset[Endpoint] | None = None
    keep: bool = False

    def matches(self, reply_src: str, reply_sport: int) -> bool:
        if self.endpoints is None:
            return True
        return ((reply_src, reply_sport) in self.endpoints) != self.keep


def _usable(state: ServicePortState | None) -> frozenset[Endpoint]:
    if state is None:
        return frozenset()
    return frozenset((e.ip, e.port) for e in state.usable_endpoints())


def _frontends(state: ServicePortState) -> list[tuple[str | None, int]]:
    sp = state.port
    out: list[tuple[str | None, int]] = [(ip, sp.port) for ip in sp.frontend_ips]
    if sp.node_port:
        out.append((None, sp.node_port))
    return out


def _is_udp(state: ServicePortState | None) -> bool:
    return state is not None and state.port.protocol == "UDP"


def stale_flows(old: ServicePortState | None, new: ServicePortState | None) -> list[FlowFilter]:
    """What one service port's change made stale (old/new: None when absent or not proxied).

    Per frontend: flows to endpoints it no longer uses (all of them if the frontend itself went
    away); and, when it gains its first endpoints (or appears), every flow tracked to it before.
    """
    old = old if _is_udp(old) else None
    new = new if _is_udp(new) else None
    before, after = _usable(old), _usable(new)
    old_fronts = set(_frontends(old)) if old is not None else set()
    new_fronts = set(_frontends(new)) if new is not None else set()
    out: set[FlowFilter] = set()
    for ip, port in old_fronts:
        gone = before - after if (ip, port) in new_fronts else before
        if gone:
            out.add(FlowFilter(ip, port, gone))
    if after:
        out.update(FlowFilter(ip, port) for ip, port in new_fronts if not before or (ip, port) not in old_fronts)
    return sorted(out, key=_sort_key)


def reconcile_flows(
    old: Mapping[ServicePortName, ServicePortState], new: Mapping[ServicePortName, ServicePortState]
) -> list[FlowFilter]:
    """For a full sync: every UDP frontend keeps only flows to its usable endpoints.

    Frontends of service ports that are gone (in ``old`` only) lose every flow.
    """
    out: set[FlowFilter] = set()
    live: set[tuple[str | None, int]] = set()
    for state in new.values():
        if _is_udp(state):
            usable = _usable(state)
            for ip, port in _frontends(state):
                live.add((ip, port))
                out.add(FlowFilter(ip, port, usable, keep=True))
    for name, state in old.items():
        if _is_udp(state) and name not in new:
            out.update(FlowFilter(ip, port) for ip, port in _frontends(state) if (ip, port) not in live)
    return sorted(out, key=_sort_key)


def _sort_key(f: FlowFilter) -> tuple[str, int, bool, list[Endpoint]]:
    return (f.dst_ip or "", f.dst_port, f.keep, sorted(f.endpoints or ()))


def changed_flows(
    old: Mapping[ServicePortName, ServicePortState],
    new: Mapping[ServicePortName, ServicePortState | None],
) -> list[FlowFilter]:
    """``stale_flows`` over the service ports a partial sync changed (``new``: None = removed)."""
    out: set[FlowFilter] = set()
    for name, state in new.items():
        out.update(stale_flows(old.get(name), state))
    return sorted(out, key=_sort_key)


# -- I/O ------------------------------------------------------------------------------------------


INDEXED_ABOVE = 8  # more filters than this: one dump of every UDP entry instead of one dump per filter


def delete_flows(filters: Sequence[FlowFilter]) -> int:
    """Delete the UDP conntrack entries the filters select, in this thread's netns; returns how many.

    Few filters: one kernel-filtered dump each (orig dst address and port). Many (a full sync's
    reconcile): one dump of all UDP entries matched against an index, so the cost is one walk of
    the table, not one per frontend. Module-level so ``NetnsBackend.run`` can run it inside a
    node namespace. An entry that vanished between dump and delete is not an error.
    """
    if not filters:
        return 0
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    with Conntrack() as ct:
        if len(filters) <= INDEXED_ABOVE:
            victims = []
            for f in filters:
                want = NFCTAttrTuple(proto=socket.IPPROTO_UDP, daddr=f.dst_ip, dport=f.dst_port)
                victims += [e.tuple_orig for e in ct.dump_entries(tuple_orig=want) if _reply_matches(f, e.tuple_reply)]
        else:
            index = FilterIndex(filters)
            want = NFCTAttrTuple(proto=socket.IPPROTO_UDP)
            victims = [e.tuple_orig for e in ct.dump_entries(tuple_orig=want)
                       if index.matches(str(e.tuple_orig.daddr), int(e.tuple_orig.dport or 0),
                                        str(e.tuple_reply.saddr), int(e.tuple_reply.sport or 0))]  # fmt: skip
        return _delete(ct, victims)


def _delete(ct: Any, victims: list[Any]) -> int:
    from pyroute2.netlink.exceptions import NetlinkError

    deleted = 0
    for orig in victims:
        try:
            ct.entry("del", tuple_orig=orig)
            deleted += 1
        except NetlinkError as e:
            if e.code != errno.ENOENT:
                raise
    return deleted


class FilterIndex:
    """Filters by (orig dst, port) and by port alone (node ports): an entry matches if any filter does."""

    def __init__(self, filters: Iterable[FlowFilter]) -> None:
        self._exact: dict[tuple[str, int], list[FlowFilter]] = {}
        self._any: dict[int, list[FlowFilter]] = {}
        for f in filters:
            if f.dst_ip is None:
                self._any.setdefault(f.dst_port, []).append(f)
            else:
                self._exact.setdefault((f.dst_ip, f.dst_port), []).append(f)

    def matches(self, dst: str, dport: int, reply_src: str, reply_sport: int) -> bool:
        candidates = self._exact.get((dst, dport), []) + self._any.get(dport, [])
        return any(f.matches(reply_src, reply_sport) for f in candidates)


def _reply_matches(f: FlowFilter, reply: Any) -> bool:
    return f.matches(str(reply.saddr), int(reply.sport or 0))


def describe(filters: Iterable[FlowFilter]) -> str:
    """Short text for logs."""
    parts = []
    for f in filters:
        dst = f"{f.dst_ip or '*'}:{f.dst_port}"
        if f.endpoints is None:
            parts.append(f"{dst} all")
        else:
            eps = ",".join(f"{ip}:{port}" for ip, port in sorted(f.endpoints))
            parts.append(f"{dst} {'except' if f.keep else 'to'} [{eps}]")
    return "; ".join(parts)
