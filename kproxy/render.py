"""Render service ports into nftables: a fixed skeleton of chains plus map/set elements.

Output format: nft script text in the flat command form (``add chain ...``, ``add rule ...``,
``add element ...``), one command per line, handed to libnftables' ``cmd()`` as one buffer, i.e.
one transaction. Why text and not libnftables JSON: the measurements in DESIGN §5 were made with
text, libnftables parses it faster than the equivalent JSON (which is several times larger for
concatenated keys), it diffs and golden-tests as plain lines, and ``kproxy.script`` can read it
back for the fake backend and the packet tracer.

Why this shape (DESIGN §5: the kernel pays per *chain*, not per element): the number of chains
and rules is constant, whatever the number of Services. Everything per Service is an element:

* ``service_ips`` — verdict map ``daddr . l4proto . dport -> goto svc_dnat`` for every frontend
  address of a service port that has endpoints (cluster IP, externalIPs, LB ingress IPs).
* ``endpoints`` — map ``daddr . l4proto . dport . bucket -> endpoint ip . endpoint port``. The
  single DNAT rule in ``svc_dnat`` draws ``numgen random mod BUCKETS`` and looks the endpoint up;
  each frontend fills all BUCKETS with its usable endpoints round-robin (so with k endpoints each
  gets ``BUCKETS/k`` of the traffic, exact when k divides BUCKETS, off by at most one bucket
  otherwise). No per-service, no per-endpoint chains.
* ``no_endpoints`` — set of frontends without usable endpoints; ``endpoints_check`` (filter
  hooks, before DNAT) rejects them: TCP reset, ICMP port unreachable otherwise.
* ``nat_postrouting`` masquerades what was DNATed (``ct status dnat``) so replies return through
  this node — which is also what makes hairpin (a pod reaching itself via its Service) work.

Incremental updates are element diffs per service port (``element_diff``): one Service change
touches only its own elements, in one transaction. Not yet rendered (next slice): NodePort,
session affinity, traffic policies ``Local``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kproxy.model import ServicePortState

# map/set name -> element key -> element value (None for set elements), all in nft syntax
Elements = dict[str, dict[str, str | None]]

SERVICE_IPS = "service_ips"
ENDPOINTS = "endpoints"
NO_ENDPOINTS = "no_endpoints"
DNAT_CHAIN = "svc_dnat"
REJECT_CHAIN = "reject_svc"
PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
ELEMENTS_PER_LINE = 500  # keeps single lines (and libnftables' parser buffers) reasonable


@dataclass(frozen=True)
class RenderConfig:
    table: str = "kproxy"
    buckets: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= 4096:
            raise ValueError(f"buckets must be within 1..4096, not {self.buckets}")
        if not self.table.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"table name {self.table!r} must be alphanumeric (plus _ and -)")


def skeleton(cfg: RenderConfig) -> list[str]:
    """The fixed part: maps, set, chains and rules (same for 0 or 100,000 services)."""
    t = f"ip {cfg.table}"
    key = "ipv4_addr . inet_proto . inet_service"
    return [
        f"add map {t} {SERVICE_IPS} {{ type {key} : verdict; }}",
        f"add set {t} {NO_ENDPOINTS} {{ type {key}; }}",
        f"add map {t} {ENDPOINTS} {{ typeof ip daddr . meta l4proto . th dport . numgen random mod {cfg.buckets}"
        " : ip daddr . th dport; }",
        f"add chain {t} filter_prerouting {{ type filter hook prerouting priority -110; policy accept; }}",
        f"add chain {t} filter_output {{ type filter hook output priority -110; policy accept; }}",
        f"add chain {t} nat_prerouting {{ type nat hook prerouting priority -100; policy accept; }}",
        f"add chain {t} nat_output {{ type nat hook output priority -100; policy accept; }}",
        f"add chain {t} nat_postrouting {{ type nat hook postrouting priority 100; policy accept; }}",
        f"add chain {t} endpoints_check",
        f"add chain {t} {REJECT_CHAIN}",
        f"add chain {t} services",
        f"add chain {t} {DNAT_CHAIN}",
        f"add rule {t} filter_prerouting jump endpoints_check",
        f"add rule {t} filter_output jump endpoints_check",
        f"add rule {t} endpoints_check ip daddr . meta l4proto . th dport @{NO_ENDPOINTS} goto {REJECT_CHAIN}",
        f"add rule {t} {REJECT_CHAIN} meta l4proto tcp reject with tcp reset",
        f"add rule {t} {REJECT_CHAIN} reject with icmp type port-unreachable",
        f"add rule {t} nat_prerouting jump services",
        f"add rule {t} nat_output jump services",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
        f"add rule {t} {DNAT_CHAIN} dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {cfg.buckets}"
        f" map @{ENDPOINTS}",
        f"add rule {t} nat_postrouting ct status dnat masquerade",
    ]


def skeleton_shape(cfg: RenderConfig) -> dict[str, int]:
    """Chain name -> rule count the skeleton installs (what ``verify`` compares against)."""
    counts: dict[str, int] = {}
    prefix_chain, prefix_rule = f"add chain ip {cfg.table} ", f"add rule ip {cfg.table} "
    for line in skeleton(cfg):
        if line.startswith(prefix_chain):
            counts.setdefault(line[len(prefix_chain):].split()[0], 0)
        elif line.startswith(prefix_rule):
            counts[line[len(prefix_rule):].split()[0]] += 1
    return counts


def service_elements(state: ServicePortState, cfg: RenderConfig) -> Elements:
    """The elements one service port contributes (deterministic for equal input)."""
    sp = state.port
    proto = PROTO[sp.protocol]
    usable = state.usable_endpoints()
    out: Elements = {SERVICE_IPS: {}, ENDPOINTS: {}, NO_ENDPOINTS: {}}
    for ip in sp.frontend_ips:
        front = f"{ip} . {proto} . {sp.port}"
        if not usable:
            out[NO_ENDPOINTS][front] = None
            continue
        out[SERVICE_IPS][front] = f"goto {DNAT_CHAIN}"
        for b in range(cfg.buckets):
            ep = usable[b % len(usable)]
            out[ENDPOINTS][f"{front} . {b}"] = f"{ep.ip} . {ep.port}"
    return out


def merge(parts: Iterable[Elements]) -> Elements:
    """Union of several services' elements; on a key clash (two Services claiming one external
    IP and port) the first one wins, as ordered by the caller."""
    out: Elements = {SERVICE_IPS: {}, ENDPOINTS: {}, NO_ENDPOINTS: {}}
    for part in parts:
        for name, elems in part.items():
            target = out[name]
            for k, v in elems.items():
                target.setdefault(k, v)
    return out


def _element_lines(verb: str, cfg: RenderConfig, name: str, items: list[str]) -> list[str]:
    return [
        f"{verb} element ip {cfg.table} {name} {{ {', '.join(items[i:i + ELEMENTS_PER_LINE])} }}"
        for i in range(0, len(items), ELEMENTS_PER_LINE)
    ]


def _fmt(key: str, value: str | None) -> str:
    return key if value is None else f"{key} : {value}"


def full_script(parts: Iterable[Elements], cfg: RenderConfig) -> str:
    """The whole table, replacing whatever is there, in one transaction.

    ``parts`` are the per-service-port elements (``service_elements``) in a stable order.
    ``add table`` first makes ``delete table`` safe when the table does not exist yet.
    """
    elements = merge(parts)
    t = f"ip {cfg.table}"
    lines = [f"add table {t}", f"delete table {t}", f"add table {t}", *skeleton(cfg)]
    for name in (SERVICE_IPS, ENDPOINTS, NO_ENDPOINTS):
        items = [_fmt(k, v) for k, v in elements[name].items()]
        lines += _element_lines("add", cfg, name, items)
    return "\n".join(lines) + "\n"


def element_diff(old: Elements, new: Elements, cfg: RenderConfig) -> str:
    """Commands turning ``old`` into ``new`` (deletes first, then adds); "" when equal.

    A changed map value is a delete plus an add of the same key in the same transaction, which
    nftables applies atomically — a packet sees either the old or the new endpoint, never none.
    """
    deletes: list[str] = []
    adds: list[str] = []
    for name in (SERVICE_IPS, ENDPOINTS, NO_ENDPOINTS):
        o, n = old.get(name, {}), new.get(name, {})
        gone = [k for k, v in o.items() if k not in n or n[k] != v]
        come = [_fmt(k, v) for k, v in n.items() if k not in o or o[k] != v]
        deletes += _element_lines("delete", cfg, name, gone)
        adds += _element_lines("add", cfg, name, come)
    lines = deletes + adds
    return "\n".join(lines) + "\n" if lines else ""


def count_elements(elements: Elements) -> int:
    return sum(len(v) for v in elements.values())
