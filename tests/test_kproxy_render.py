"""Rendering: golden checks on the script text, and a packet tracer over what it renders."""

from __future__ import annotations

from collections import Counter

import pytest

from kproxy.model import ServicePortName, ServicePortState
from kproxy.render import RenderConfig, element_diff, full_script, service_elements, skeleton, skeleton_shape
from kproxy.script import Ruleset, ScriptError
from kproxy.tracer import Packet, trace
from kproxy.tracker import ChangeTracker
from tests.test_kproxy_tracker import eps, svc

CFG = RenderConfig(table="kpt", buckets=4)


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


WEB = (svc(externalIPs=["192.0.2.7"]), eps(addrs=["10.1.0.5", "10.1.0.6"]))
EMPTY = (svc(name="empty", ip="10.96.0.20", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                    {"name": "tcp", "port": 5353, "protocol": "TCP"}]),)


def test_golden_one_service() -> None:
    script = full_script([service_elements(s, CFG) for s in states(*WEB).values()], CFG)
    lines = script.splitlines()
    assert lines[:3] == ["add table ip kpt", "delete table ip kpt", "add table ip kpt"]
    assert lines[3:-2] == skeleton(CFG)
    ep = ", ".join(f"{ip} . tcp . 80 . {b} : 10.1.0.{5 + b % 2} . 8080" for ip in ("10.96.0.10", "192.0.2.7")
                   for b in range(4))
    assert lines[-2:] == [
        "add element ip kpt service_ips { 10.96.0.10 . tcp . 80 : goto svc_dnat, "
        "192.0.2.7 . tcp . 80 : goto svc_dnat }",
        f"add element ip kpt endpoints {{ {ep} }}",
    ]
    assert len(lines) == 3 + len(skeleton(CFG)) + 2  # no_endpoints is empty: no line at all


def test_chain_count_is_constant() -> None:
    """DESIGN §5: the kernel pays per chain. 1 or 300 services: same chains, same rules."""
    many = []
    for i in range(300):
        many += [svc(name=f"s{i}", ip=f"10.96.1.{i % 250}", ports=[{"name": "http", "port": 1000 + i}]),
                 eps(service=f"s{i}", addrs=[f"10.1.{i % 250}.{j}" for j in range(1, 6)])]
    one = load(states(*WEB)).tables[("ip", "kpt")]
    big = load(states(*many)).tables[("ip", "kpt")]
    assert {n: len(c.rules) for n, c in one.chains.items()} == {n: len(c.rules) for n, c in big.chains.items()}
    assert {n: len(c.rules) for n, c in big.chains.items()} == skeleton_shape(CFG)
    assert len(big.sets["endpoints"]) == 300 * CFG.buckets


def test_no_endpoints_rendered_as_reject_set() -> None:
    el = service_elements(states(*EMPTY)[ServicePortName("a", "empty", "dns")], CFG)
    assert el == {"service_ips": {}, "endpoints": {}, "no_endpoints": {"10.96.0.20 . udp . 53": None}}


def test_trace_endpoint_and_masquerade() -> None:
    table = load(states(*WEB)).tables[("ip", "kpt")]
    for ip in ("10.96.0.10", "192.0.2.7"):
        seen = {trace(table, Packet("10.1.0.9", ip, "tcp", 80), bucket=b).daddr for b in range(4)}
        assert seen == {"10.1.0.5", "10.1.0.6"}
    v = trace(table, Packet("10.1.0.9", "10.96.0.10", "tcp", 80), bucket=1)
    assert (v.action, v.daddr, v.dport, v.dnat, v.masquerade) == ("accept", "10.1.0.6", 8080, True, True)
    # from the node itself (output hook) too
    assert trace(table, Packet("10.0.0.1", "10.96.0.10", "tcp", 80, hook="output"), bucket=0).daddr == "10.1.0.5"


def test_trace_hairpin_is_masqueraded() -> None:
    table = load(states(*WEB)).tables[("ip", "kpt")]
    v = trace(table, Packet("10.1.0.5", "10.96.0.10", "tcp", 80), bucket=0)
    assert v.daddr == "10.1.0.5" and v.masquerade  # the backend sees the node, not itself, as source


def test_trace_reject_and_passthrough() -> None:
    table = load(states(*WEB, *EMPTY)).tables[("ip", "kpt")]
    v = trace(table, Packet("10.1.0.9", "10.96.0.20", "udp", 53))
    assert (v.action, v.reject_with) == ("reject", "icmp port-unreachable")
    v = trace(table, Packet("10.1.0.9", "10.96.0.20", "tcp", 5353))
    assert (v.action, v.reject_with) == ("reject", "tcp reset")
    for pkt in (Packet("10.1.0.9", "10.96.0.10", "tcp", 81), Packet("10.1.0.9", "10.96.0.10", "udp", 80),
                Packet("10.1.0.9", "8.8.8.8", "tcp", 80)):
        v = trace(table, pkt)
        assert (v.action, v.dnat, v.masquerade, v.daddr) == ("accept", False, False, pkt.daddr)


def test_buckets_spread_evenly() -> None:
    cfg = RenderConfig(table="kpt", buckets=64)
    st = states(svc(), eps(addrs=["10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8"]))
    table = load(st, cfg).tables[("ip", "kpt")]
    hits = Counter(trace(table, Packet("10.1.0.9", "10.96.0.10", "tcp", 80), bucket=b).daddr for b in range(64))
    assert sorted(hits.values()) == [16, 16, 16, 16]


def test_one_endpoint_change_touches_only_that_service() -> None:
    before = states(*WEB, *EMPTY)
    after = states(svc(externalIPs=["192.0.2.7"]), eps(addrs=["10.1.0.5", "10.1.0.7"]), *EMPTY)
    rs = load(before)
    name = ServicePortName("a", "web", "http")
    diff = element_diff(service_elements(before[name], CFG), service_elements(after[name], CFG), CFG)
    lines = diff.splitlines()
    assert [ln.split(" {")[0] for ln in lines] == ["delete element ip kpt endpoints", "add element ip kpt endpoints"]
    assert "10.1.0.6" not in lines[1] and "10.1.0.7" in lines[1] and "10.96.0.20" not in diff
    rs.apply(diff)
    assert rs.tables == load(after).tables
    assert element_diff(service_elements(after[name], CFG), service_elements(after[name], CFG), CFG) == ""


def test_service_gaining_and_losing_endpoints() -> None:
    name = ServicePortName("a", "web", "http")
    with_eps, without = states(*WEB), states(WEB[0])
    rs = load(without)
    rs.apply(element_diff(service_elements(without[name], CFG), service_elements(with_eps[name], CFG), CFG))
    assert rs.tables == load(with_eps).tables
    rs.apply(element_diff(service_elements(with_eps[name], CFG), service_elements(without[name], CFG), CFG))
    assert rs.tables == load(without).tables


def test_script_model_is_transactional() -> None:
    rs = load(states(*WEB))
    before = rs.copy().tables
    with pytest.raises(ScriptError, match="no such element"):
        rs.apply("add element ip kpt no_endpoints { 1.2.3.4 . tcp . 1 }\n"
                 "delete element ip kpt endpoints { 9.9.9.9 . tcp . 1 . 0 }\n")
    assert rs.tables == before
    with pytest.raises(ScriptError, match="other data"):
        rs.apply("add element ip kpt endpoints { 10.96.0.10 . tcp . 80 . 0 : 1.1.1.1 . 1 }")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        RenderConfig(buckets=0)
    with pytest.raises(ValueError):
        RenderConfig(table="x; flush ruleset")
