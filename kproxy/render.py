"""Render service ports into nftables: a fixed skeleton of chains plus map/set elements.

Output format: nft script text in the flat command form (``add chain ...``, ``add rule ...``,
``add element ...``), one command per line, handed to libnftables' ``cmd()`` as one buffer, i.e.
one transaction. Why text and not libnftables JSON: the measurements in DESIGN §5 were made with
text, libnftables parses it faster than the equivalent JSON (which is several times larger for
concatenated keys), it diffs and golden-tests as plain lines, and ``kproxy.script`` can read it
back for the fake backend and the packet tracer.

Why this shape (DESIGN §5: the kernel pays per *chain*, not per element): the number of chains
and rules is constant, whatever the number of Services (affinity Services excepted, below).
Everything per Service is an element:

* ``service_ips`` — verdict map ``daddr . l4proto . dport -> goto svc_dnat_<k>`` for every
  frontend address of a service port with k usable endpoints (cluster IP, externalIPs, LB IPs).
* ``endpoints`` — map ``daddr . l4proto . dport . n -> endpoint ip . port``, n = 0..k-1. Chain
  ``svc_dnat_<k>`` (one per k = 1..``exact_max``) draws ``numgen random mod k`` and looks the
  endpoint up: k elements per frontend, an exactly uniform spread. A frontend with more than
  ``exact_max`` endpoints goes to ``svc_dnat`` instead, which draws ``mod buckets`` and finds the
  endpoints filled round-robin into ``buckets`` slots (off by at most one slot per endpoint; with
  more endpoints than ``buckets`` only the first ``buckets`` get traffic).
* ``nodeports`` / ``nodeport_endpoints`` / ``np_dnat_<k>`` — the same for NodePorts, keyed
  ``l4proto . dport`` and matched only when the destination is a local address of this node
  (``fib daddr type local``, loopback excluded), from prerouting (other hosts) and output (the node).
* ``no_endpoints`` / ``no_endpoint_nodeports`` — verdict maps checked by ``endpoints_check``
  (filter hooks, before DNAT, new connections only — a reply to the node's own outbound
  connection may arrive on a port that is also a node port): ``goto reject_svc`` (TCP reset,
  ICMP port unreachable otherwise) when a service port has no usable endpoint at all, ``drop``
  when a ``Local`` traffic policy leaves none on this node while other nodes have some
  (kube-proxy's choice).
* ``nat_postrouting`` masquerades what was DNATed (``ct status dnat``) so replies return through
  this node — which is also what makes hairpin (a pod reaching itself via its Service) work.

``sessionAffinity: ClientIP`` cannot be an element: the choice depends on the client. Such a
service port gets, per endpoint, a timed set (``update @set { ip saddr }`` refreshes the client's
entry, timeout = ``timeoutSeconds``) and a chain that records and DNATs, plus one chain that sends
a client found in an endpoint's set to that endpoint and draws at random otherwise. These chains
and sets travel inside the service's ``Elements`` (pseudo-containers ``chains`` and ``sets``)
under names hashed from their content, so a change creates new ones and deletes old ones in the
same transaction as the element changes, in the order nftables requires (``element_diff``); the
set of an endpoint that stays keeps its name, so its clients stay stuck to it.

Traffic policies ``Local`` (``RenderConfig.node_name`` must name this node; None = unknown, and
the policy cannot be honoured, so all endpoints are used): internal ``Local`` restricts cluster
IP frontends, external ``Local`` restricts externalIPs, LB IPs and NodePorts, to endpoints on
this node. What this data path cannot do: pods sit on the tenant network, not behind the node, so
replies must come back through the node and every DNATed flow is masqueraded — the client's
source address is *not* preserved, also with ``externalTrafficPolicy: Local`` (whose main point
in kube-proxy is to preserve it); only the endpoint restriction is honoured. Cluster-internal
clients reaching an external frontend of an external-``Local`` Service are not short-circuited to
all endpoints as kube-proxy does (we cannot tell pods from outside clients here).

Incremental updates are element diffs per service port (``element_diff``): one Service change
touches only its own elements (and its own affinity chains/sets), in one transaction.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import ItemsView, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, cycle, islice
from typing import cast

from kproxy.model import Endpoint, ServicePortState

# container name -> key -> value (None for set elements), all in nft syntax. The pseudo
# containers ``chains`` (name -> rules joined by "\n") and ``sets`` (name -> set spec) hold the
# per-service objects of affinity Services.
Elements = dict[str, dict[str, str | None]]

SERVICE_IPS = "service_ips"
ENDPOINTS = "endpoints"
NO_ENDPOINTS = "no_endpoints"
NODEPORTS = "nodeports"
NODEPORT_ENDPOINTS = "nodeport_endpoints"
NO_ENDPOINT_NODEPORTS = "no_endpoint_nodeports"
CHAINS = "chains"
SETS = "sets"
MAPS = (SERVICE_IPS, ENDPOINTS, NO_ENDPOINTS, NODEPORTS, NODEPORT_ENDPOINTS, NO_ENDPOINT_NODEPORTS)
CONTAINERS = (*MAPS, CHAINS, SETS)
DNAT_CHAIN = "svc_dnat"  # + "_<k>" for exactly k endpoints; bare: the bucketed fallback
NODEPORT_DNAT_CHAIN = "np_dnat"
REJECT_CHAIN = "reject_svc"
REJECT = f"goto {REJECT_CHAIN}"
DROP = "drop"
PROTO = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
ELEMENTS_PER_LINE = 500  # keeps single lines (and libnftables' parser buffers) reasonable
KEY3 = "ip daddr . meta l4proto . th dport"
KEY2 = "meta l4proto . th dport"
LOCAL_DST = "ip daddr != 127.0.0.0/8 fib daddr type local"


@dataclass(frozen=True)
class RenderConfig:
    table: str = "kproxy"
    buckets: int = 256  # slots of the fallback for frontends with more than exact_max endpoints
    exact_max: int = 32  # one DNAT chain per endpoint count 1..exact_max (exactly uniform)
    node_name: str | None = None  # this node, for traffic policy Local

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= 4096:
            raise ValueError(f"buckets must be within 1..4096, not {self.buckets}")
        if not 1 <= self.exact_max <= 256:
            raise ValueError(f"exact_max must be within 1..256, not {self.exact_max}")
        if not self.table.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"table name {self.table!r} must be alphanumeric (plus _ and -)")


def skeleton(cfg: RenderConfig) -> list[str]:
    """The fixed part: maps, chains and rules (same for 0 or 100,000 services)."""
    t = f"ip {cfg.table}"
    key3, key2 = "ipv4_addr . inet_proto . inet_service", "inet_proto . inet_service"
    value = "ip daddr . th dport"
    ks = range(1, cfg.exact_max + 1)
    lines = [
        f"add map {t} {SERVICE_IPS} {{ type {key3} : verdict; }}",
        f"add map {t} {NO_ENDPOINTS} {{ type {key3} : verdict; }}",
        f"add map {t} {ENDPOINTS} {{ typeof {KEY3} . numgen random mod {cfg.buckets} : {value}; }}",
        f"add map {t} {NODEPORTS} {{ type {key2} : verdict; }}",
        f"add map {t} {NO_ENDPOINT_NODEPORTS} {{ type {key2} : verdict; }}",
        f"add map {t} {NODEPORT_ENDPOINTS} {{ typeof {KEY2} . numgen random mod {cfg.buckets} : {value}; }}",
        f"add chain {t} filter_prerouting {{ type filter hook prerouting priority -110; policy accept; }}",
        f"add chain {t} filter_output {{ type filter hook output priority -110; policy accept; }}",
        f"add chain {t} nat_prerouting {{ type nat hook prerouting priority -100; policy accept; }}",
        f"add chain {t} nat_output {{ type nat hook output priority -100; policy accept; }}",
        f"add chain {t} nat_postrouting {{ type nat hook postrouting priority 100; policy accept; }}",
        f"add chain {t} endpoints_check",
        f"add chain {t} {REJECT_CHAIN}",
        f"add chain {t} services",
        *(f"add chain {t} {DNAT_CHAIN}_{k}" for k in ks),
        f"add chain {t} {DNAT_CHAIN}",
        *(f"add chain {t} {NODEPORT_DNAT_CHAIN}_{k}" for k in ks),
        f"add chain {t} {NODEPORT_DNAT_CHAIN}",
        f"add rule {t} filter_prerouting ct state new jump endpoints_check",
        f"add rule {t} filter_output ct state new jump endpoints_check",
        f"add rule {t} endpoints_check {KEY3} vmap @{NO_ENDPOINTS}",
        f"add rule {t} endpoints_check {LOCAL_DST} {KEY2} vmap @{NO_ENDPOINT_NODEPORTS}",
        f"add rule {t} {REJECT_CHAIN} meta l4proto tcp reject with tcp reset",
        f"add rule {t} {REJECT_CHAIN} reject with icmp type port-unreachable",
        f"add rule {t} nat_prerouting jump services",
        f"add rule {t} nat_output jump services",
        f"add rule {t} services {KEY3} vmap @{SERVICE_IPS}",
        f"add rule {t} services {LOCAL_DST} {KEY2} vmap @{NODEPORTS}",
    ]
    for suffix, k in [*((f"_{k}", k) for k in ks), ("", cfg.buckets)]:
        lines.append(f"add rule {t} {DNAT_CHAIN}{suffix} dnat ip to {KEY3} . numgen random mod {k} map @{ENDPOINTS}")
        lines.append(f"add rule {t} {NODEPORT_DNAT_CHAIN}{suffix} dnat ip to {KEY2} . numgen random mod {k}"
                     f" map @{NODEPORT_ENDPOINTS}")
    lines.append(f"add rule {t} nat_postrouting ct status dnat masquerade")
    return lines


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


def _empty() -> Elements:
    # a literal, not a loop over CONTAINERS: this runs once per service port on every full sync
    return {SERVICE_IPS: {}, ENDPOINTS: {}, NO_ENDPOINTS: {}, NODEPORTS: {}, NODEPORT_ENDPOINTS: {},
            NO_ENDPOINT_NODEPORTS: {}, CHAINS: {}, SETS: {}}


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:16]


_SLOTS = tuple(f" . {n}" for n in range(4096))  # key suffixes " . n", n < the largest bucket count


def _spread(target: dict[str, str | None], chain: str, front: str, values: Sequence[str], cfg: RenderConfig) -> str:
    """Elements selecting among the endpoints (``values``: "ip . port") for one frontend; returns
    the DNAT chain to go to."""
    k = len(values)
    if k <= cfg.exact_max:
        target.update(zip([front + slot for slot in _SLOTS[:k]], values, strict=True))
        return f"{chain}_{k}"
    target.update(zip([front + slot for slot in _SLOTS[:cfg.buckets]], islice(cycle(values), cfg.buckets), strict=True))
    return chain


def _affinity(out: Elements, state: ServicePortState, eps: Sequence[Endpoint]) -> str:
    """Per-endpoint timed sets and chains for ClientIP affinity; returns the entry chain's name."""
    sp = state.port
    proto, timeout = PROTO[sp.protocol], sp.affinity_timeout
    targets = []
    for ep in eps:
        h = _digest(sp.name, sp.protocol, ep.ip, ep.port, timeout)
        set_name, chain = f"aff_{h}", f"affep_{h}"
        out[SETS][set_name] = f"{{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
        out[CHAINS][chain] = f"update @{set_name} {{ ip saddr }}\nmeta l4proto {proto} dnat ip to {ep.ip}:{ep.port}"
        targets.append((set_name, chain))
    entry = "affsvc_" + _digest(sp.name, sp.protocol, timeout, *(f"{e.ip}:{e.port}" for e in eps))
    rules = [f"ip saddr @{s} goto {c}" for s, c in targets]
    rules.append(f"numgen random mod {len(targets)} vmap {{ "
                 + ", ".join(f"{n} : goto {c}" for n, (_, c) in enumerate(targets)) + " }")
    out[CHAINS][entry] = "\n".join(rules)  # after its endpoint chains: creation order = dependency order
    return entry


def service_elements(state: ServicePortState, cfg: RenderConfig) -> Elements:
    """The elements (and, for affinity, chains and sets) one service port contributes.

    Deterministic for equal input. On the full-sync path (once per service port), so written for
    speed: endpoint lists and their "ip . port" texts are computed once per port, not per frontend.
    """
    sp = state.port
    proto = PROTO[sp.protocol]
    usable = state.usable_endpoints()
    local = cfg.node_name
    internal = state.usable_endpoints(local) if sp.internal_traffic_local and local is not None else usable
    external = state.usable_endpoints(local) if sp.external_traffic_local and local is not None else usable
    cluster_ip, port = sp.cluster_ip, sp.port
    fronts = [(f"{cluster_ip} . {proto} . {port}", internal, False)]
    if sp.external_ips or sp.lb_ips:
        fronts += [(f"{ip} . {proto} . {port}", external, False) for ip in sp.frontend_ips if ip != cluster_ip]
    if sp.node_port:
        fronts.append((f"{proto} . {sp.node_port}", external, True))
    out = _empty()
    last: tuple[Endpoint, ...] | None = None
    values: list[str] = []
    for front, eps, node_port in fronts:
        if node_port:
            vmap, no_eps, target, chain = out[NODEPORTS], out[NO_ENDPOINT_NODEPORTS], out[NODEPORT_ENDPOINTS], \
                NODEPORT_DNAT_CHAIN
        else:
            vmap, no_eps, target, chain = out[SERVICE_IPS], out[NO_ENDPOINTS], out[ENDPOINTS], DNAT_CHAIN
        if not eps:
            no_eps[front] = DROP if usable else REJECT
        elif sp.session_affinity:
            vmap[front] = f"goto {_affinity(out, state, eps)}"
        else:
            if eps is not last:  # the "ip . port" texts, once per endpoint list (not per frontend)
                last, values = eps, [f"{e.ip} . {e.port}" for e in eps]
            vmap[front] = f"goto {_spread(target, chain, front, values, cfg)}"
    return out


def merge(parts: Iterable[Elements]) -> Elements:
    """Union of several services' elements; on a key clash (two Services claiming one external
    IP and port, or one node port) the first one wins, as ordered by the caller."""
    out = _empty()
    for part in parts:
        for name, elems in part.items():
            if not elems:
                continue
            target = out[name]
            if target.keys().isdisjoint(elems):  # the usual case: one C-level update, no per-key loop
                target.update(elems)
            else:
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


def _items(elems: dict[str, str | None]) -> list[str]:
    """``key : value`` texts of a container (bare keys for set elements)."""
    if None in elems.values():
        return [_fmt(k, v) for k, v in elems.items()]
    return list(map(" : ".join, cast("ItemsView[str, str]", elems.items())))  # C-level: 60,000 at 10k services


def _chain_lines(cfg: RenderConfig, chains: dict[str, str | None], *, fresh: Iterable[str] = ()) -> list[str]:
    """``add chain`` for all of ``chains`` first, then their rules (rules may goto each other);
    chains named in ``fresh`` already exist and are flushed instead of added."""
    t = f"ip {cfg.table}"
    fresh = set(fresh)
    lines = [f"flush chain {t} {c}" if c in fresh else f"add chain {t} {c}" for c in chains]
    for c, rules in chains.items():
        lines += [f"add rule {t} {c} {r}" for r in (rules or "").splitlines()]
    return lines


def full_script(parts: Iterable[Elements], cfg: RenderConfig) -> str:
    """The whole table, replacing whatever is there, in one transaction.

    ``parts`` are the per-service-port elements (``service_elements``) in a stable order.
    """
    return table_script(merge(parts), cfg)


def table_script(elements: Elements, cfg: RenderConfig) -> str:
    """``full_script`` of already merged elements. ``add table`` first makes ``delete table`` safe
    when the table does not exist yet."""
    t = f"ip {cfg.table}"
    lines = [f"add table {t}", f"delete table {t}", f"add table {t}", *skeleton(cfg)]
    lines += [f"add set {t} {name} {spec}" for name, spec in elements[SETS].items()]
    lines += _chain_lines(cfg, elements[CHAINS])
    for name in MAPS:
        lines += _element_lines("add", cfg, name, _items(elements[name]))
    return "\n".join(lines) + "\n"


_NOTHING: dict[str, str | None] = {}  # read-only stand-in for a container a part does not have


def merge_counted(parts: Sequence[Elements]) -> tuple[Elements, dict[str, Counter[str]]]:
    """``merge`` (first one wins), plus per container how many parts hold each key (what a partial
    sync checks to find frontends two service ports share).

    Per container: one count of all keys, and when no key is held twice (the usual case) the
    union is built in one C-level pass; only containers with a shared key take the per-key loop.
    """
    merged = _empty()
    claims: dict[str, Counter[str]] = {}
    for name in CONTAINERS:
        held = [elems for p in parts if (elems := p.get(name, _NOTHING))]
        counts = claims[name] = Counter(chain.from_iterable(held))
        if len(counts) == counts.total():
            merged[name] = dict(chain.from_iterable(elems.items() for elems in held))
        else:
            target = merged[name]
            for elems in held:
                for k, v in elems.items():
                    target.setdefault(k, v)
    return merged, claims


def element_diff(old: Elements, new: Elements, cfg: RenderConfig) -> str:
    """Commands turning ``old`` into ``new``; "" when equal.

    Order, as nftables requires within the transaction: new sets, new chains and their rules
    (before any element points at them), element deletes, deletion of chains (entry chains before
    the endpoint chains they jump to) and then of sets nothing references any more, element adds.
    A changed map value is a delete plus an add of the same key in the same transaction, which
    nftables applies atomically — a packet sees either the old or the new endpoint, never none.
    """
    t = f"ip {cfg.table}"
    o_sets, n_sets = old.get(SETS, {}), new.get(SETS, {})
    for name in o_sets.keys() & n_sets.keys():
        if o_sets[name] != n_sets[name]:
            raise ValueError(f"set {name} changed its spec under the same name")
    o_chains, n_chains = old.get(CHAINS, {}), new.get(CHAINS, {})
    come_chains = {c: r for c, r in n_chains.items() if c not in o_chains or o_chains[c] != r}
    lines = [f"add set {t} {name} {spec}" for name, spec in n_sets.items() if name not in o_sets]
    lines += _chain_lines(cfg, come_chains, fresh=[c for c in come_chains if c in o_chains])
    adds: list[str] = []
    for name in MAPS:
        o, n = old.get(name, {}), new.get(name, {})
        gone = [k for k, v in o.items() if k not in n or n[k] != v]
        come = [_fmt(k, v) for k, v in n.items() if k not in o or o[k] != v]
        lines += _element_lines("delete", cfg, name, gone)
        adds += _element_lines("add", cfg, name, come)
    lines += [f"delete chain {t} {c}" for c in reversed(o_chains) if c not in n_chains]
    lines += [f"delete set {t} {name}" for name in o_sets if name not in n_sets]
    lines += adds
    return "\n".join(lines) + "\n" if lines else ""


def count_elements(elements: Elements) -> int:
    """Map elements (what a service costs the kernel in lookups); affinity chains/sets not counted."""
    return sum(len(elements.get(name, {})) for name in MAPS)
