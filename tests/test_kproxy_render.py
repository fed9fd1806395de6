"""Rendering: golden checks on the script text, and a packet tracer over what it renders."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from kproxy.model import ServicePortName, ServicePortState
from kproxy.render import (
    CHAINS,
    MAPS,
    SETS,
    RenderConfig,
    count_elements,
    element_diff,
    full_script,
    merge,
    merge_counted,
    service_elements,
    skeleton,
    skeleton_shape,
)
from kproxy.script import Ruleset, ScriptError, Table
from kproxy.tracer import Packet, TraceError, trace
from kproxy.tracker import ChangeTracker
from tests.test_kproxy_tracker import eps, svc

CFG = RenderConfig(table="kpt", buckets=8, exact_max=4)
NODE = "10.0.0.1"  # this node's address, for NodePort traces
HTTP = ServicePortName("a", "web", "http")


def states(*objs: dict) -> dict[ServicePortName, ServicePortState]:
    t = ChangeTracker()
    for o in objs:
        if o["kind"] == "Service":
            t.update_service(o)
        else:
            t.update_slice(o)
    t.apply()
    return t.all_states()


def load(st: dict[ServicePortName, ServicePortState], cfg: RenderConfig = CFG) -> Ruleset:
    rs = Ruleset()
    rs.apply(full_script([service_elements(st[k], cfg) for k in sorted(st)], cfg))
    return rs


def table(st: dict[ServicePortName, ServicePortState], cfg: RenderConfig = CFG) -> Table:
    return load(st, cfg).tables[("ip", cfg.table)]


def backends(n: int) -> list[str]:
    return [f"10.1.0.{5 + i}" for i in range(n)]


WEB = (svc(externalIPs=["192.0.2.7"]), eps(addrs=["10.1.0.5", "10.1.0.6"]))
EMPTY = (svc(name="empty", ip="10.96.0.20", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                    {"name": "tcp", "port": 5353, "protocol": "TCP"}]),)


def test_golden_one_service() -> None:
    script = full_script([service_elements(s, CFG) for s in states(*WEB).values()], CFG)
    lines = script.splitlines()
    assert lines[:3] == ["add table ip kpt", "delete table ip kpt", "add table ip kpt"]
    assert lines[3:-2] == skeleton(CFG)
    assert lines[-2:] == [
        "add element ip kpt service_ips { 10.96.0.10 . tcp . 80 : goto svc_dnat_2, "
        "192.0.2.7 . tcp . 80 : goto svc_dnat_2 }",
        "add element ip kpt endpoints { 10.96.0.10 . tcp . 80 . 0 : 10.1.0.5 . 8080, "
        "10.96.0.10 . tcp . 80 . 1 : 10.1.0.6 . 8080, 192.0.2.7 . tcp . 80 . 0 : 10.1.0.5 . 8080, "
        "192.0.2.7 . tcp . 80 . 1 : 10.1.0.6 . 8080 }",
    ]


def test_golden_skeleton_dnat_chains() -> None:
    rules = [ln for ln in skeleton(CFG) if ln.startswith("add rule") and "numgen" in ln]
    assert rules[:2] == [
        "add rule ip kpt svc_dnat_1 dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @endpoints",
        "add rule ip kpt np_dnat_1 dnat ip to meta l4proto . th dport . numgen random mod 1 map @nodeport_endpoints",
    ]
    assert rules[-2:] == [
        "add rule ip kpt svc_dnat dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 8 map @endpoints",
        "add rule ip kpt np_dnat dnat ip to meta l4proto . th dport . numgen random mod 8 map @nodeport_endpoints",
    ]
    assert len(rules) == 2 * (CFG.exact_max + 1)


def test_chain_count_is_constant_and_elements_are_k_per_frontend() -> None:
    """DESIGN §5: the kernel pays per chain. 1 or 300 services: same chains, same rules; a
    frontend with k <= exact_max endpoints costs k elements, a bigger one ``buckets``."""
    many: list[dict[str, Any]] = []
    expected = 0
    for i in range(300):
        k = 1 + i % 6  # 1..6: both exact chains and the bucketed fallback (exact_max = 4)
        many += [svc(name=f"s{i}", ip=f"10.96.1.{i % 250}", ports=[{"name": "http", "port": 1000 + i,
                                                                     "nodePort": 30000 + i}]),
                 eps(service=f"s{i}", addrs=[f"10.1.{i % 250}.{j}" for j in range(1, k + 1)])]
        expected += k if k <= CFG.exact_max else CFG.buckets
    one, big = table(states(*WEB)), table(states(*many))
    assert {n: len(c.rules) for n, c in one.chains.items()} == {n: len(c.rules) for n, c in big.chains.items()}
    assert {n: len(c.rules) for n, c in big.chains.items()} == skeleton_shape(CFG)
    assert len(big.sets["endpoints"]) == expected
    assert len(big.sets["nodeport_endpoints"]) == expected
    assert len(big.sets["service_ips"]) == len(big.sets["nodeports"]) == 300


def test_no_endpoints_rendered_as_reject() -> None:
    el = service_elements(states(*EMPTY)[ServicePortName("a", "empty", "dns")], CFG)
    assert {k: v for k, v in el.items() if v} == {"no_endpoints": {"10.96.0.20 . udp . 53": "goto reject_svc"}}
    assert count_elements(el) == 1


def test_trace_every_slot_reaches_its_endpoint_exactly_once() -> None:
    for k in (1, 3, CFG.exact_max):
        t = table(states(svc(), eps(addrs=backends(k))))
        hits = Counter(trace(t, Packet("10.1.0.9", "10.96.0.10", "tcp", 80), bucket=b).daddr for b in range(k))
        assert hits == Counter(backends(k)), k  # exactly uniform: one slot per endpoint


def test_trace_endpoint_and_masquerade() -> None:
    t = table(states(*WEB))
    for ip in ("10.96.0.10", "192.0.2.7"):
        seen = {trace(t, Packet("10.1.0.9", ip, "tcp", 80), bucket=b).daddr for b in range(2)}
        assert seen == {"10.1.0.5", "10.1.0.6"}
    v = trace(t, Packet("10.1.0.9", "10.96.0.10", "tcp", 80), bucket=1)
    assert (v.action, v.daddr, v.dport, v.dnat, v.masquerade) == ("accept", "10.1.0.6", 8080, True, True)
    # from the node itself (output hook) too
    assert trace(t, Packet("10.0.0.1", "10.96.0.10", "tcp", 80, hook="output"), bucket=0).daddr == "10.1.0.5"


def test_trace_hairpin_is_masqueraded() -> None:
    t = table(states(*WEB))
    v = trace(t, Packet("10.1.0.5", "10.96.0.10", "tcp", 80), bucket=0)
    assert v.daddr == "10.1.0.5" and v.masquerade  # the backend sees the node, not itself, as source


def test_trace_reject_and_passthrough() -> None:
    t = table(states(*WEB, *EMPTY))
    v = trace(t, Packet("10.1.0.9", "10.96.0.20", "udp", 53))
    assert (v.action, v.reject_with) == ("reject", "icmp port-unreachable")
    v = trace(t, Packet("10.1.0.9", "10.96.0.20", "tcp", 5353))
    assert (v.action, v.reject_with) == ("reject", "tcp reset")
    for pkt in (Packet("10.1.0.9", "10.96.0.10", "tcp", 81), Packet("10.1.0.9", "10.96.0.10", "udp", 80),
                Packet("10.1.0.9", "8.8.8.8", "tcp", 80)):
        v = trace(t, pkt, local_ips=(NODE,))
        assert (v.action, v.dnat, v.masquerade, v.daddr) == ("accept", False, False, pkt.daddr)


def test_more_endpoints_than_exact_max_spread_over_buckets() -> None:
    cfg = RenderConfig(table="kpt", buckets=64, exact_max=4)
    st = states(svc(), eps(addrs=backends(5)))
    t = table(st, cfg)
    assert t.sets["service_ips"]["10.96.0.10 . tcp . 80"] == "goto svc_dnat"
    hits = Counter(trace(t, Packet("10.1.0.9", "10.96.0.10", "tcp", 80), bucket=b).daddr for b in range(64))
    assert sorted(hits.values()) == [12, 13, 13, 13, 13]  # round-robin: off by at most one slot


def test_one_endpoint_change_touches_only_that_service() -> None:
    before = states(*WEB, *EMPTY)
    after = states(svc(externalIPs=["192.0.2.7"]), eps(addrs=["10.1.0.5", "10.1.0.7"]), *EMPTY)
    rs = load(before)
    diff = element_diff(service_elements(before[HTTP], CFG), service_elements(after[HTTP], CFG), CFG)
    lines = diff.splitlines()
    assert [ln.split(" {")[0] for ln in lines] == ["delete element ip kpt endpoints", "add element ip kpt endpoints"]
    assert lines[1] == ("add element ip kpt endpoints { 10.96.0.10 . tcp . 80 . 1 : 10.1.0.7 . 8080, "
                        "192.0.2.7 . tcp . 80 . 1 : 10.1.0.7 . 8080 }")
    rs.apply(diff)
    assert rs.tables == load(after).tables
    assert element_diff(service_elements(after[HTTP], CFG), service_elements(after[HTTP], CFG), CFG) == ""


def test_endpoint_count_change_moves_the_frontend_to_another_chain() -> None:
    before, after = states(*WEB, *EMPTY), states(WEB[0], eps(addrs=backends(3)), *EMPTY)
    rs = load(before)
    diff = element_diff(service_elements(before[HTTP], CFG), service_elements(after[HTTP], CFG), CFG)
    assert "goto svc_dnat_3" in diff and "10.96.0.20" not in diff
    assert "delete element ip kpt endpoints" not in diff  # slots 0 and 1 keep their endpoints
    rs.apply(diff)
    assert rs.tables == load(after).tables


def test_service_gaining_and_losing_endpoints() -> None:
    with_eps, without = states(*WEB), states(WEB[0])
    rs = load(without)
    rs.apply(element_diff(service_elements(without[HTTP], CFG), service_elements(with_eps[HTTP], CFG), CFG))
    assert rs.tables == load(with_eps).tables
    rs.apply(element_diff(service_elements(with_eps[HTTP], CFG), service_elements(without[HTTP], CFG), CFG))
    assert rs.tables == load(without).tables


def test_script_model_is_transactional() -> None:
    rs = load(states(*WEB))
    before = rs.copy().tables
    with pytest.raises(ScriptError, match="no such element"):
        rs.apply("add element ip kpt no_endpoints { 1.2.3.4 . tcp . 1 : drop }\n"
                 "delete element ip kpt endpoints { 9.9.9.9 . tcp . 1 . 0 }\n")
    assert rs.tables == before
    with pytest.raises(ScriptError, match="other data"):
        rs.apply("add element ip kpt endpoints { 10.96.0.10 . tcp . 80 . 0 : 1.1.1.1 . 1 }")


def test_script_model_refuses_what_the_kernel_refuses() -> None:
    rs = load(states(*WEB))
    with pytest.raises(ScriptError, match="in use by map"):
        rs.apply("delete chain ip kpt svc_dnat_2")
    with pytest.raises(ScriptError, match="in use by chain"):
        rs.apply("delete chain ip kpt services")
    with pytest.raises(ScriptError, match="missing chain"):
        rs.apply("add element ip kpt service_ips { 10.96.0.99 . tcp . 80 : goto nowhere }")
    with pytest.raises(ScriptError, match="missing set"):
        rs.apply("add chain ip kpt x\nadd rule ip kpt x update @nope { ip saddr }")
    rs.apply("add set ip kpt s1 { type ipv4_addr; }\nadd chain ip kpt x\nadd rule ip kpt x ip saddr @s1 goto services")
    with pytest.raises(ScriptError, match="in use"):
        rs.apply("delete set ip kpt s1")
    rs.apply("delete chain ip kpt x\ndelete set ip kpt s1")


# -- NodePort -----------------------------------------------------------------------------------

NP = (svc(name="np", ip="10.96.0.40", ports=[{"name": "http", "port": 80, "nodePort": 30080},
                                              {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]),
      eps(service="np", addrs=backends(3), ports=[{"name": "http", "port": 8080},
                                                  {"name": "dns", "port": 5353, "protocol": "UDP"}]))
NP_EMPTY = (svc(name="npe", ip="10.96.0.41", ports=[{"name": "http", "port": 80, "nodePort": 30081}]),)


def test_nodeport_golden_elements() -> None:
    el = service_elements(states(*NP)[ServicePortName("a", "np", "dns")], CFG)
    assert el["nodeports"] == {"udp . 30053": "goto np_dnat_3"}
    assert el["nodeport_endpoints"] == {f"udp . 30053 . {n}": f"{ip} . 5353" for n, ip in enumerate(backends(3))}
    assert el["service_ips"] == {"10.96.0.40 . udp . 53": "goto svc_dnat_3"}


def test_trace_nodeport_on_local_addresses_only() -> None:
    t = table(states(*NP, *NP_EMPTY, *WEB))
    for hook in ("prerouting", "output"):
        seen = {trace(t, Packet("198.51.100.1", NODE, "tcp", 30080, hook=hook), bucket=b, local_ips=(NODE,)).daddr
                for b in range(3)}
        assert seen == set(backends(3)), hook
    v = trace(t, Packet("198.51.100.1", NODE, "udp", 30053), bucket=2, local_ips=(NODE,))
    assert (v.daddr, v.dport, v.dnat, v.masquerade) == ("10.1.0.7", 5353, True, True)
    for pkt in (Packet("198.51.100.1", "10.0.0.2", "tcp", 30080),  # not this node's address
                Packet("198.51.100.1", NODE, "udp", 30080),  # other protocol
                Packet("127.0.0.1", "127.0.0.1", "tcp", 30080, hook="output")):  # loopback: not a node port
        v = trace(t, pkt, local_ips=(NODE, "127.0.0.1"))
        assert (v.action, v.dnat) == ("accept", False), pkt
    v = trace(t, Packet("198.51.100.1", NODE, "tcp", 30081), local_ips=(NODE,))
    assert (v.action, v.reject_with) == ("reject", "tcp reset")


def test_nodeport_change_touches_only_that_service_port() -> None:
    before = states(*NP, *WEB)
    after = states(svc(name="np", ip="10.96.0.40", ports=[{"name": "http", "port": 80, "nodePort": 30080},
                                                          {"name": "dns", "port": 53, "protocol": "UDP",
                                                           "nodePort": 30054}]), NP[1], *WEB)
    dns = ServicePortName("a", "np", "dns")
    assert before[ServicePortName("a", "np", "http")] == after[ServicePortName("a", "np", "http")]
    diff = element_diff(service_elements(before[dns], CFG), service_elements(after[dns], CFG), CFG)
    assert {ln.split(" {")[0] for ln in diff.splitlines()} == {
        "delete element ip kpt nodeport_endpoints", "delete element ip kpt nodeports",
        "add element ip kpt nodeport_endpoints", "add element ip kpt nodeports"}
    assert "30053" in diff and "30054" in diff and "30080" not in diff and "10.96.0.10" not in diff
    rs = load(before)
    rs.apply(diff)
    assert rs.tables == load(after).tables


# -- traffic policies Local ---------------------------------------------------------------------

LOCAL_CFG = RenderConfig(table="kpt", buckets=8, exact_max=4, node_name="me")


def local_service(**spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    nodes = {"10.1.0.5": "me", "10.1.0.6": "other", "10.1.0.7": "me"}
    return (svc(externalIPs=["192.0.2.7"], ports=[{"name": "http", "port": 80, "nodePort": 30080}], **spec),
            eps(addrs=spec.pop("addrs", backends(3)), nodes=nodes))


def reach(t: Table, daddr: str, port: int = 80, n: int = 8) -> set[str]:
    """Endpoints reachable at ``daddr``; {"drop"} / {"reject"} when the packet is refused."""
    out = set()
    for b in range(n):
        try:
            v = trace(t, Packet("198.51.100.1", daddr, "tcp", port), bucket=b, local_ips=(NODE,))
        except TraceError:
            continue  # bucket outside this chain's mod: every slot was covered already
        out.add(v.daddr if v.action == "accept" else v.action)
    return out


def test_internal_local_restricts_cluster_ip_only() -> None:
    t = table(states(*local_service(internalTrafficPolicy="Local")), LOCAL_CFG)
    assert reach(t, "10.96.0.10") == {"10.1.0.5", "10.1.0.7"}
    assert reach(t, "192.0.2.7") == reach(t, NODE, 30080) == set(backends(3))


def test_external_local_restricts_external_frontends_and_nodeport() -> None:
    t = table(states(*local_service(externalTrafficPolicy="Local")), LOCAL_CFG)
    assert reach(t, "10.96.0.10") == set(backends(3))
    assert reach(t, "192.0.2.7") == reach(t, NODE, 30080) == {"10.1.0.5", "10.1.0.7"}


def test_local_without_local_endpoints_drops_without_any_rejects() -> None:
    only_remote = local_service(internalTrafficPolicy="Local", externalTrafficPolicy="Local", addrs=["10.1.0.6"])
    t = table(states(*only_remote), LOCAL_CFG)
    assert reach(t, "10.96.0.10") == reach(t, "192.0.2.7") == reach(t, NODE, 30080) == {"drop"}
    none = local_service(internalTrafficPolicy="Local", externalTrafficPolicy="Local", addrs=[])
    t = table(states(*none), LOCAL_CFG)
    assert reach(t, "10.96.0.10") == reach(t, "192.0.2.7") == reach(t, NODE, 30080) == {"reject"}


def test_local_without_node_name_uses_all_endpoints() -> None:
    t = table(states(*local_service(internalTrafficPolicy="Local", externalTrafficPolicy="Local")), CFG)
    assert reach(t, "10.96.0.10") == reach(t, NODE, 30080) == set(backends(3))


# -- session affinity ---------------------------------------------------------------------------

def affinity_service(addrs: list[str], timeout: int = 60) -> tuple[dict[str, Any], dict[str, Any]]:
    return (svc(name="sticky", ip="10.96.0.50", ports=[{"name": "http", "port": 80, "nodePort": 30090}],
                sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}}),
            eps(service="sticky", addrs=addrs))


STICKY = ServicePortName("a", "sticky", "http")


def test_affinity_golden() -> None:
    el = service_elements(states(*affinity_service(backends(2)))[STICKY], CFG)
    sets, chains = el[SETS], el[CHAINS]
    assert len(sets) == 2 and all(v == "{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }"
                                  for v in sets.values())
    entry = el["service_ips"]["10.96.0.50 . tcp . 80"].removeprefix("goto ")
    assert el["nodeports"] == {"tcp . 30090": f"goto {entry}"}
    assert list(chains)[-1] == entry  # created after the endpoint chains it jumps to
    s0, s1 = sets
    c0, c1 = (f"affep_{s.removeprefix('aff_')}" for s in sets)
    assert chains[c0] == f"update @{s0} {{ ip saddr }}\nmeta l4proto tcp dnat ip to 10.1.0.5:8080"
    assert chains[entry].splitlines() == [f"ip saddr @{s0} goto {c0}", f"ip saddr @{s1} goto {c1}",
                                          f"numgen random mod 2 vmap {{ 0 : goto {c0}, 1 : goto {c1} }}"]
    assert el["endpoints"] == {} and count_elements(el) == 2


def test_affinity_sticks_per_client() -> None:
    t = table(states(*affinity_service(backends(3))))
    state: dict[str, set[str]] = {}
    first = trace(t, Packet("198.51.100.1", "10.96.0.50", "tcp", 80), bucket=1, affinity=state).daddr
    assert first == "10.1.0.6"
    for b in (0, 2, 0, 1):  # whatever numgen would draw now, the client stays on its endpoint
        assert trace(t, Packet("198.51.100.1", "10.96.0.50", "tcp", 80), bucket=b, affinity=state).daddr == first
        assert trace(t, Packet("198.51.100.1", NODE, "tcp", 30090), bucket=b, affinity=state,
                     local_ips=(NODE,)).daddr == first
    other = trace(t, Packet("198.51.100.2", "10.96.0.50", "tcp", 80), bucket=2, affinity=state).daddr
    assert other == "10.1.0.7"  # another client is drawn independently


def test_affinity_with_internal_local_has_one_entry_chain_per_policy() -> None:
    nodes = {"10.1.0.5": "me", "10.1.0.6": "other"}
    st = states(svc(name="sticky", ip="10.96.0.50", ports=[{"name": "http", "port": 80, "nodePort": 30090}],
                    sessionAffinity="ClientIP", internalTrafficPolicy="Local"),
                eps(service="sticky", addrs=backends(2), nodes=nodes))
    t = table(st, LOCAL_CFG)
    inner, outer = t.sets["service_ips"]["10.96.0.50 . tcp . 80"], t.sets["nodeports"]["tcp . 30090"]
    assert inner != outer
    assert {trace(t, Packet(f"198.51.100.{i}", "10.96.0.50", "tcp", 80), bucket=0).daddr for i in range(5)} == {
        "10.1.0.5"}
    assert {trace(t, Packet("198.51.100.1", NODE, "tcp", 30090), bucket=b, local_ips=(NODE,)).daddr
            for b in range(2)} == {"10.1.0.5", "10.1.0.6"}


def test_affinity_chains_do_not_depend_on_other_services() -> None:
    t1 = table(states(*affinity_service(backends(2)), *WEB))
    t2 = table(states(*affinity_service(backends(2)), *WEB, *NP))
    assert set(t1.chains) == set(t2.chains) == set(skeleton_shape(CFG)) | set(
        service_elements(states(*affinity_service(backends(2)))[STICKY], CFG)[CHAINS])


def test_affinity_added_changed_removed_incrementally() -> None:
    base = states(*WEB, *EMPTY)
    two = states(*WEB, *EMPTY, *affinity_service(backends(2)))
    three = states(*WEB, *EMPTY, *affinity_service(backends(3)))
    longer = states(*WEB, *EMPTY, *affinity_service(backends(3), timeout=120))
    el = {name: service_elements(st[STICKY], CFG) for name, st in
          (("two", two), ("three", three), ("longer", longer))}
    rs = load(base)
    steps = [({}, el["two"], two), (el["two"], el["three"], three), (el["three"], el["longer"], longer),
             (el["longer"], {}, base)]
    for old, new, expected in steps:
        diff = element_diff(old, new, CFG)
        assert "10.96.0.10" not in diff and "10.96.0.20" not in diff  # other services untouched
        rs.apply(diff)  # the script model refuses any order the kernel would refuse
        assert rs.tables == load(expected).tables
    # a third endpoint joining keeps the first two endpoints' sets (their clients stay stuck)
    assert set(el["two"][SETS]) < set(el["three"][SETS])
    # a new timeout is a new set for every endpoint
    assert not set(el["three"][SETS]) & set(el["longer"][SETS])


def test_affinity_toggled_on_and_off_incrementally() -> None:
    plain = states(svc(name="sticky", ip="10.96.0.50", ports=[{"name": "http", "port": 80, "nodePort": 30090}]),
                   eps(service="sticky", addrs=backends(2)), *WEB)
    sticky = states(*affinity_service(backends(2)), *WEB)
    rs = load(plain)
    for old, new in ((plain, sticky), (sticky, plain), (plain, sticky)):
        rs.apply(element_diff(service_elements(old[STICKY], CFG), service_elements(new[STICKY], CFG), CFG))
        assert rs.tables == load(new).tables


def test_affinity_diff_order() -> None:
    old = service_elements(states(*affinity_service(backends(2)))[STICKY], CFG)
    new = service_elements(states(*affinity_service(backends(1)))[STICKY], CFG)
    words = [ln.split() for ln in element_diff(old, new, CFG).splitlines()]
    verbs = [f"{w[0]} {w[1]} {w[4].split('_')[0] if w[4].startswith('aff') else w[4]}" for w in words]
    assert verbs == ["add chain affsvc", "add rule affsvc", "add rule affsvc",
                     "delete element service_ips", "delete element nodeports",
                     "delete chain affsvc", "delete chain affep", "delete set aff",
                     "add element service_ips", "add element nodeports"]


def test_element_count_excludes_affinity_objects() -> None:
    el = service_elements(states(*affinity_service(backends(3)))[STICKY], CFG)
    assert count_elements(el) == sum(len(el[m]) for m in MAPS) == 2


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        RenderConfig(buckets=0)
    with pytest.raises(ValueError):
        RenderConfig(exact_max=0)
    with pytest.raises(ValueError):
        RenderConfig(table="x; flush ruleset")


def test_merge_counted_is_merge_plus_claims() -> None:
    """First one wins on a shared key (two Services on one external IP and port), and the claims
    count how many parts hold each key — with and without a clash in a container."""
    st = states(*WEB, svc(name="other", ip="10.96.0.11", externalIPs=["192.0.2.7"]),
                eps(service="other", name="other-x", addrs=["10.1.0.9"]), *EMPTY, *affinity_service(backends(2)))
    parts = [service_elements(st[k], CFG) for k in sorted(st)]
    merged, claims = merge_counted(parts)
    assert merged == merge(parts)
    assert merged["service_ips"]["192.0.2.7 . tcp . 80"] == "goto svc_dnat_1"  # a/other sorts before a/web
    assert claims["service_ips"]["192.0.2.7 . tcp . 80"] == 2
    assert claims["service_ips"]["10.96.0.10 . tcp . 80"] == 1
    for name in merged:
        assert set(claims[name]) == set(merged[name])
        assert claims[name].total() == sum(len(p[name]) for p in parts)
