"""Proxier sync decisions and the scheduler, against the transactional fake backend."""

from __future__ import annotations

import math
import threading
import time

from prometheus_client import CollectorRegistry

from kproxy.nft import FakeBackend, parse_elements
from kproxy.proxier import Proxier, SyncLoop, SyncScheduler
from kproxy.render import RenderConfig, full_script, service_elements
from kproxy.script import Ruleset
from kproxy.tracer import Packet, trace
from tests.test_kproxy_tracker import eps, svc

CFG = RenderConfig(table="kpt", buckets=4)


def make() -> tuple[Proxier, FakeBackend, CollectorRegistry]:
    backend, reg = FakeBackend(), CollectorRegistry()
    p = Proxier(backend, CFG, registry=reg)
    p.mark_initialized()
    return p, backend, reg


def expected_table(p: Proxier) -> object:
    """What a from-scratch full render of the tracker's state gives: the fake kernel must equal it."""
    st = p.tracker.all_states()
    rs = Ruleset()
    rs.apply(full_script([service_elements(st[k], CFG) for k in sorted(st)], CFG))
    return rs.tables


def test_nothing_written_before_initialized() -> None:
    backend = FakeBackend()
    p = Proxier(backend, CFG)
    p.on_service(svc())
    assert p.sync().mode == "skipped" and backend.applied == []


def test_first_sync_full_then_partial() -> None:
    p, backend, reg = make()
    p.on_service(svc())
    p.on_slice(eps())
    r = p.sync()
    assert (r.mode, r.error, r.changed) == ("full", None, 1)
    assert backend.applied[0].startswith("add table ip kpt\ndelete table ip kpt\n")
    p.on_slice(eps(addrs=["10.1.0.5", "10.1.0.6"]))
    r = p.sync()
    assert (r.mode, r.error, r.changed) == ("partial", None, 1)
    assert "table" not in backend.applied[1] and all("element" in ln for ln in backend.applied[1].splitlines())
    assert backend.ruleset.tables == expected_table(p)
    assert reg.get_sample_value("kproxy_sync_duration_seconds_count", {"mode": "full"}) == 1
    assert reg.get_sample_value("kproxy_sync_duration_seconds_count", {"mode": "partial"}) == 1
    assert reg.get_sample_value("kproxy_elements") == 1 + 2  # one frontend, one slot per endpoint
    assert reg.get_sample_value("kproxy_last_successful_sync_timestamp_seconds") > 0  # type: ignore[operator]


def test_partial_touches_only_the_changed_service() -> None:
    p, backend, _ = make()
    for i in range(20):
        p.on_service(svc(name=f"s{i}", ip=f"10.96.0.{i + 1}"))
        p.on_slice(eps(service=f"s{i}", addrs=[f"10.1.0.{i + 1}"]))
    p.sync()
    p.on_slice(eps(service="s7", addrs=["10.1.0.8", "10.1.9.9"]))
    assert p.sync().mode == "partial"
    touched = {w for w in backend.applied[-1].split() if w.startswith("10.96.")}
    assert touched == {"10.96.0.8"}
    assert backend.ruleset.tables == expected_table(p)


def test_two_services_claiming_one_external_ip_never_break_a_sync() -> None:
    """Same externalIP and port on two Services: the first (by name) wins, as in a full sync; a
    change to either is synced in full (no "File exists" from the kernel, no error metric), and
    deleting the loser leaves the winner's frontend in place."""
    p, backend, reg = make()
    for name, ip, ep in (("a-first", "10.96.0.1", "10.1.0.1"), ("b-second", "10.96.0.2", "10.1.0.2")):
        p.on_service(svc(name=name, ip=ip, externalIPs=["192.0.2.7"]))
        p.on_slice(eps(service=name, name=f"{name}-x", addrs=[ep]))
    assert p.sync().mode == "full"
    p.on_slice(eps(service="b-second", name="b-second-x", addrs=["10.1.0.3"]))
    r = p.sync()
    assert (r.mode, r.error) == ("full", None)
    assert backend.ruleset.tables == expected_table(p)
    p.on_service(svc(name="b-second", ip="10.96.0.2", externalIPs=["192.0.2.7"]), deleted=True)
    r = p.sync()
    assert (r.mode, r.error) == ("full", None)
    assert backend.ruleset.tables == expected_table(p)
    v = trace(backend.ruleset.tables[("ip", "kpt")], Packet("10.0.0.9", "192.0.2.7", "tcp", 80))
    assert v.dnat and v.daddr == "10.1.0.1", v
    p.on_slice(eps(service="a-first", name="a-first-x", addrs=["10.1.0.4"]))  # uncontested again
    assert p.sync().mode == "partial"
    assert backend.ruleset.tables == expected_table(p)
    assert not any(reg.get_sample_value("kproxy_sync_errors_total", {"mode": m}) for m in ("full", "partial"))


def test_no_change_no_transaction() -> None:
    p, backend, _ = make()
    p.on_service(svc())
    p.sync()
    p.on_service(svc())  # same object again (resync)
    assert p.sync().mode == "partial" and len(backend.applied) == 1


def test_failed_partial_makes_next_sync_full_and_converges() -> None:
    p, backend, reg = make()
    p.on_service(svc())
    p.on_slice(eps())
    p.sync()
    p.on_slice(eps(addrs=["10.1.0.6"]))
    backend.fail_next = 1
    r = p.sync()
    assert r.mode == "partial" and r.error
    assert p.needs_full
    assert reg.get_sample_value("kproxy_sync_errors_total", {"mode": "partial"}) == 1
    # the kernel still has the old endpoint (transaction refused as a whole)
    table = backend.ruleset.tables[("ip", "kpt")]
    assert trace(table, Packet("10.1.0.9", "10.96.0.10", "tcp", 80), bucket=0).daddr == "10.1.0.5"
    r = p.sync()
    assert (r.mode, r.error) == ("full", None)
    assert trace(backend.ruleset.tables[("ip", "kpt")], Packet("10.1.0.9", "10.96.0.10", "tcp", 80),
                 bucket=0).daddr == "10.1.0.6"


def test_failed_full_retries_full() -> None:
    p, backend, _ = make()
    p.on_service(svc())
    backend.fail_next = 1
    assert p.sync().error
    assert p.sync().mode == "full" and backend.ruleset.tables == expected_table(p)


def test_drift_detected_then_full_resync() -> None:
    p, backend, reg = make()
    p.on_service(svc())
    p.on_slice(eps())
    p.sync()
    assert p.verify() is None
    backend.flush_ruleset()  # another agent: nft flush ruleset
    assert p.verify() == "table missing"
    assert reg.get_sample_value("kproxy_drift_detected_total") == 1
    assert p.sync().mode == "full" and backend.ruleset.tables == expected_table(p)
    # a rule removed from one of our chains is drift too
    backend.ruleset.tables[("ip", "kpt")].chains["svc_dnat"].rules.clear()
    assert p.verify() == "chain svc_dnat has 0 rules, expected 1"


def test_full_resync_after_drift_renders_what_a_fresh_start_would() -> None:
    """A full sync forced by drift reuses the elements of unchanged service ports (no re-render)
    and renders changed ones; the script is exactly a from-scratch render of the same state."""
    p, backend, reg = make()
    for name, ip in (("a", "10.96.0.1"), ("b", "10.96.0.2"), ("c", "10.96.0.3")):
        p.on_service(svc(name=name, ip=ip, ports=[{"name": "http", "port": 80, "nodePort": 30000 + int(ip[-1])}]))
        p.on_slice(eps(service=name, name=f"{name}-x", addrs=["10.1.0.5", "10.1.0.6"]))
    p.sync()
    before = dict(p._mirror)
    backend.flush_ruleset()
    assert p.verify() == "table missing"
    p.on_slice(eps(service="b", name="b-x", addrs=["10.1.0.7"]))  # changed while a full sync is due
    p.on_service(svc(name="c", ip="10.96.0.3"), deleted=True)
    r = p.sync()
    assert (r.mode, r.error, r.changed) == ("full", None, 2)
    st = p.tracker.all_states()
    assert backend.applied[-1] == full_script([service_elements(st[k], CFG) for k in sorted(st)], CFG)
    assert backend.ruleset.tables == expected_table(p)
    a, b = (n for n in sorted(st))
    assert p._mirror[a] is before[a] and p._mirror[b] is not before[b]
    assert reg.get_sample_value("kproxy_elements") == (1 + 2) * 2 + (1 + 1) * 2  # frontends + slots, 2 ports
    p.on_slice(eps(service="a", name="a-x", addrs=["10.1.0.8"]))  # partial syncs carry on from there
    assert p.sync().mode == "partial" and backend.ruleset.tables == expected_table(p)


def test_edited_elements_are_drift_and_partial_syncs_are_not() -> None:
    p, backend, reg = make()
    for i in range(3):
        p.on_service(svc(name=f"s{i}", ip=f"10.96.0.{i + 1}"))
        p.on_slice(eps(service=f"s{i}", addrs=[f"10.1.0.{i + 1}", f"10.1.1.{i + 1}"]))
    p.sync()
    p.on_slice(eps(service="s1", addrs=["10.1.0.9"]))  # partial syncs keep the expectation in step
    p.on_service(svc(name="s2", ip="10.96.0.3"), deleted=True)
    assert p.sync().mode == "partial"
    assert p.verify() is None
    maps = backend.ruleset.tables[("ip", "kpt")].sets
    victim = next(k for k, v in maps["endpoints"].items() if v and v.startswith("10.1.0.9 "))
    del maps["endpoints"][victim]  # another agent deletes one element
    drift = p.verify()
    assert drift is not None and drift.startswith("map endpoints: 1 element(s) missing, 0 unexpected, 0 changed"), drift
    assert reg.get_sample_value("kproxy_drift_detected_total") == 1
    assert p.sync().mode == "full" and p.verify() is None
    maps = backend.ruleset.tables[("ip", "kpt")].sets
    key = next(iter(maps["endpoints"]))
    maps["endpoints"][key] = "10.6.6.6 . 6666"  # ... or rewrites one
    assert "1 changed" in (p.verify() or "")
    p.sync()
    backend.ruleset.tables[("ip", "kpt")].sets["service_ips"]["10.9.9.9 . tcp . 80"] = "goto svc_dnat_1"  # ... or adds
    assert "1 unexpected" in (p.verify() or "")


def test_parse_elements_of_a_json_listing() -> None:
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"map": {"name": "service_ips", "map": "verdict",
                 "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc_dnat_2"}}]]}},
        {"map": {"name": "endpoints", "elem": [[{"concat": ["10.96.0.10", "tcp", 80, 1]},
                                                {"concat": ["10.1.0.6", 8080]}]]}},
        {"map": {"name": "no_endpoint_nodeports", "map": "verdict", "elem": [[{"concat": ["udp", 30053]},
                                                                              {"drop": None}]]}},
        {"map": {"name": "nodeports", "map": "verdict"}},
        {"set": {"name": "aff", "elem": [{"elem": {"val": "10.1.2.3", "timeout": 10, "expires": 9}}, "10.1.2.4"]}},
    ]}  # fmt: skip
    assert parse_elements(listing) == {
        "service_ips": {"10.96.0.10 . tcp . 80": "goto svc_dnat_2"},
        "endpoints": {"10.96.0.10 . tcp . 80 . 1": "10.1.0.6 . 8080"},
        "no_endpoint_nodeports": {"udp . 30053": "drop"},
        "nodeports": {},
        "aff": {"10.1.2.3": None, "10.1.2.4": None},
    }


def test_scheduler_coalesces_bursts_and_respects_min_period() -> None:
    s = SyncScheduler(min_period=1.0, verify_period=10.0)
    assert s.take(0.0) == "sync"  # the first sync is always due
    for _ in range(100):
        s.request()
    assert s.take(0.5) is None and s.wait_time(0.5) == 0.5
    assert s.take(1.0) == "sync"
    assert s.take(1.0) is None and s.take(5.0) is None  # burst coalesced into one sync
    s.request()
    assert s.take(5.0) == "sync"  # min period long past: immediately
    assert s.take(10.0) == "verify" and s.take(10.0) is None


def test_scheduler_periodic_resync() -> None:
    s = SyncScheduler(min_period=1.0, max_period=30.0)
    assert s.take(0.0) == "sync"
    assert s.take(29.0) is None and s.take(30.0) == "sync"


def test_sync_loop_coalesces_with_a_real_thread() -> None:
    backend = FakeBackend()
    lock = threading.Lock()
    holder: list[SyncLoop] = []

    def poke() -> None:
        with lock:
            if holder:
                holder[0].poke()

    p = Proxier(backend, CFG, on_change=poke)
    loop = SyncLoop(p, SyncScheduler(min_period=0.3, verify_period=0.1))
    holder.append(loop)
    p.mark_initialized()
    loop.start()
    try:
        p.on_service(svc())
        time.sleep(0.05)  # the initial full sync has run
        for i in range(50):
            p.on_slice(eps(addrs=[f"10.1.0.{i + 1}"]))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and p.tracker.pending():
            time.sleep(0.02)
        time.sleep(0.1)
        assert p.tracker.pending() == 0
        assert len(backend.applied) <= 3  # 1 full (+ maybe the first service) + 1 coalesced partial
        assert backend.ruleset.tables == expected_table(p)
        # drift found by the loop's own verification is repaired without any event
        backend.flush_ruleset()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ("ip", "kpt") not in backend.ruleset.tables:
            time.sleep(0.02)
        assert backend.ruleset.tables == expected_table(p)
    finally:
        loop.stop()


def test_element_checks_run_at_most_once_per_period() -> None:
    """The O(elements) check is rate-limited; the cheap shape check runs on every verify."""
    now = [0.0]
    backend = FakeBackend()
    p = Proxier(backend, CFG, clock=lambda: now[0], verify_elements_period_s=60.0)
    p.mark_initialized()
    p.on_service(svc())
    p.on_slice(eps())
    p.sync()
    assert p.verify() is None  # elements checked (the first time)
    maps = backend.ruleset.tables[("ip", "kpt")].sets
    maps["endpoints"].pop(next(iter(maps["endpoints"])))
    now[0] = 10.0
    assert p.verify() is None  # shape only: the deleted element is not seen yet
    now[0] = 61.0
    assert "missing" in (p.verify() or "")
    backend.flush_ruleset()
    p.sync()
    now[0] = 70.0
    backend.flush_ruleset()
    assert p.verify() == "table missing"  # a flush is caught by the cheap check at once


def test_element_checks_can_be_off() -> None:
    backend = FakeBackend()
    p = Proxier(backend, CFG, verify_elements_period_s=math.inf)
    p.mark_initialized()
    p.on_service(svc())
    p.on_slice(eps())
    p.sync()
    maps = backend.ruleset.tables[("ip", "kpt")].sets
    maps["endpoints"].pop(next(iter(maps["endpoints"])))
    assert p.verify() is None


def test_rules_metric_counts_what_the_table_holds() -> None:
    p, backend, reg = make()

    def table_rules() -> int:
        return sum(len(c.rules) for c in backend.ruleset.tables[("ip", "kpt")].chains.values())

    p.on_service(svc())
    p.on_slice(eps(addrs=["10.1.0.5", "10.1.0.6"]))
    p.sync()
    assert reg.get_sample_value("kproxy_rules") == table_rules()
    p.on_service(svc(name="sticky", ip="10.96.0.20", sessionAffinity="ClientIP"))  # per-service chains
    p.on_slice(eps(service="sticky", addrs=["10.1.0.7", "10.1.0.8"]))
    p.sync()
    with_affinity = reg.get_sample_value("kproxy_rules")
    assert with_affinity == table_rules()
    p.on_service(svc(name="sticky", ip="10.96.0.20"), deleted=True)
    p.sync()
    assert reg.get_sample_value("kproxy_rules") == table_rules() < (with_affinity or 0)
