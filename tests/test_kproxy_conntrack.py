"""Which UDP conntrack flows go stale (pure), and the proxier deleting them after syncs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kproxy.conntrack import FilterIndex, FlowFilter, changed_flows, reconcile_flows, stale_flows
from kproxy.model import Endpoint, ServicePort, ServicePortName, ServicePortState
from kproxy.nft import FakeBackend
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig
from tests.test_kproxy_tracker import eps, svc

DNS = ServicePortName("a", "dns", "dns")
UDP_PORTS = [{"name": "dns", "port": 53, "protocol": "UDP"}]
UDP_EPS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def state(*ips: str, proto: str = "UDP", node_port: int | None = None, external: tuple[str, ...] = (),
          not_ready: tuple[str, ...] = ()) -> ServicePortState:
    port = ServicePort(DNS, "10.96.0.53", proto, 53, node_port=node_port, external_ips=external)
    eps_ = [Endpoint(ip, 5353) for ip in ips] + [Endpoint(ip, 5353, ready=False) for ip in not_ready]
    return ServicePortState(port, tuple(sorted(eps_)))


def ep(*ips: str) -> frozenset[tuple[str, int]]:
    return frozenset((ip, 5353) for ip in ips)


def test_removed_endpoint_is_stale_for_every_frontend() -> None:
    old = state("10.1.0.1", "10.1.0.2", node_port=30053, external=("192.0.2.1",))
    new = state("10.1.0.2", node_port=30053, external=("192.0.2.1",))
    assert set(stale_flows(old, new)) == {
        FlowFilter("10.96.0.53", 53, ep("10.1.0.1")),
        FlowFilter("192.0.2.1", 53, ep("10.1.0.1")),
        FlowFilter(None, 30053, ep("10.1.0.1")),
    }


def test_endpoint_becoming_unready_is_stale() -> None:
    assert stale_flows(state("10.1.0.1", "10.1.0.2"), state("10.1.0.2", not_ready=("10.1.0.1",))) == [
        FlowFilter("10.96.0.53", 53, ep("10.1.0.1"))
    ]


def test_added_endpoint_or_no_change_flushes_nothing() -> None:
    assert stale_flows(state("10.1.0.1"), state("10.1.0.1", "10.1.0.2")) == []
    assert stale_flows(state("10.1.0.1"), state("10.1.0.1")) == []


def test_first_endpoint_flushes_the_frontend() -> None:
    """Flows tracked while there was no endpoint (un-NATed) must not keep bypassing the new one."""
    assert stale_flows(state(), state("10.1.0.1")) == [FlowFilter("10.96.0.53", 53)]
    assert stale_flows(None, state("10.1.0.1", node_port=30053)) == [
        FlowFilter(None, 30053), FlowFilter("10.96.0.53", 53)
    ]
    assert stale_flows(None, state()) == []  # still none: nothing to steer anywhere


def test_service_removed_and_frontend_removed() -> None:
    assert stale_flows(state("10.1.0.1"), None) == [FlowFilter("10.96.0.53", 53, ep("10.1.0.1"))]
    old = state("10.1.0.1", external=("192.0.2.1",))
    # the external IP went away: its flows are all stale; the cluster IP's are fine
    assert stale_flows(old, state("10.1.0.1")) == [FlowFilter("192.0.2.1", 53, ep("10.1.0.1"))]
    # a new external IP: flush what was tracked to it (nothing was ours)
    assert stale_flows(state("10.1.0.1"), old) == [FlowFilter("192.0.2.1", 53)]


def test_tcp_is_never_flushed() -> None:
    assert stale_flows(state("10.1.0.1", proto="TCP"), state("10.1.0.2", proto="TCP")) == []
    assert stale_flows(state(proto="TCP"), state("10.1.0.2", proto="TCP")) == []
    # UDP -> TCP: the UDP flows of the old port are stale
    assert stale_flows(state("10.1.0.1"), state("10.1.0.1", proto="TCP")) == [
        FlowFilter("10.96.0.53", 53, ep("10.1.0.1"))
    ]


def test_reconcile_keeps_only_usable_endpoints_and_drops_gone_services() -> None:
    gone = ServicePortName("a", "old", "dns")
    old_state = ServicePortState(ServicePort(gone, "10.96.0.99", "UDP", 53), (Endpoint("10.1.0.9", 5353),))
    filters = reconcile_flows({gone: old_state}, {DNS: state("10.1.0.1", node_port=30053)})
    assert set(filters) == {
        FlowFilter("10.96.0.53", 53, ep("10.1.0.1"), keep=True),
        FlowFilter(None, 30053, ep("10.1.0.1"), keep=True),
        FlowFilter("10.96.0.99", 53),
    }
    assert reconcile_flows({}, {DNS: state("10.1.0.1", proto="TCP")}) == []


def test_filter_and_index_matching() -> None:
    drop = FlowFilter("10.96.0.53", 53, ep("10.1.0.1"))
    keep = FlowFilter("10.96.0.53", 53, ep("10.1.0.2"), keep=True)
    assert drop.matches("10.1.0.1", 5353) and not drop.matches("10.1.0.1", 5354)
    assert not drop.matches("10.1.0.2", 5353)
    assert keep.matches("10.1.0.1", 5353) and keep.matches("10.96.0.53", 53) and not keep.matches("10.1.0.2", 5353)
    assert FlowFilter("10.96.0.53", 53).matches("10.96.0.53", 53)
    index = FilterIndex([drop, FlowFilter(None, 30053, ep("10.1.0.3"))])
    assert index.matches("10.96.0.53", 53, "10.1.0.1", 5353)
    assert not index.matches("10.96.0.54", 53, "10.1.0.1", 5353)  # another frontend
    assert index.matches("10.241.0.1", 30053, "10.1.0.3", 5353)  # node port: any local address
    assert not index.matches("10.241.0.1", 30053, "10.1.0.1", 5353)


def test_changed_flows_over_several_ports() -> None:
    other = ServicePortName("a", "x", "dns")
    old = {DNS: state("10.1.0.1", "10.1.0.2")}
    assert changed_flows(old, {DNS: state("10.1.0.2"), other: None}) == [FlowFilter("10.96.0.53", 53, ep("10.1.0.1"))]


# -- the proxier calls it after successful syncs ---------------------------------------------------


class Cleaner:
    def __init__(self) -> None:
        self.calls: list[list[FlowFilter]] = []
        self.fail = 0

    def __call__(self, filters: Sequence[FlowFilter]) -> int:
        if self.fail:
            self.fail -= 1
            raise OSError("netlink says no")
        self.calls.append(list(filters))
        return len(filters)


def dns_slice(*addrs: Any) -> dict[str, Any]:
    return eps(service="dns", addrs=list(addrs), ports=UDP_EPS)


def make() -> tuple[Proxier, FakeBackend, Cleaner]:
    backend, cleaner = FakeBackend(), Cleaner()
    p = Proxier(backend, RenderConfig(table="kpc", buckets=4), conntrack=cleaner)
    p.mark_initialized()
    p.on_service(svc(name="dns", ip="10.96.0.53", ports=UDP_PORTS))
    p.on_slice(dns_slice("10.1.0.1", "10.1.0.2"))
    p.on_service(svc(name="web", ip="10.96.0.80"))
    p.on_slice(eps(service="web", addrs=["10.1.0.1"]))
    return p, backend, cleaner


def test_proxier_reconciles_on_full_and_deletes_exactly_the_stale_on_partial() -> None:
    p, _, cleaner = make()
    assert p.sync().mode == "full"
    assert cleaner.calls == [[FlowFilter("10.96.0.53", 53, ep("10.1.0.1", "10.1.0.2"), keep=True)]]
    p.on_slice(dns_slice("10.1.0.2"))
    p.on_slice(eps(service="web", addrs=["10.1.0.7"]))  # TCP: no conntrack work
    assert p.sync().mode == "partial"
    assert cleaner.calls[-1] == [FlowFilter("10.96.0.53", 53, ep("10.1.0.1"))]
    p.on_slice(dns_slice("10.1.0.2", "10.1.0.3"))  # an added endpoint is not stale
    p.sync()
    assert len(cleaner.calls) == 2


def test_proxier_keeps_failed_cleanups_for_the_next_sync_and_skips_failed_syncs() -> None:
    p, backend, cleaner = make()
    p.sync()
    cleaner.fail = 1
    p.on_slice(dns_slice("10.1.0.2"))
    r = p.sync()
    assert r.error is None  # a conntrack failure never fails the sync
    assert p.metrics.conntrack_errors._value.get() == 1
    p.on_slice(dns_slice())  # now none at all
    p.sync()
    assert cleaner.calls[-1] == [FlowFilter("10.96.0.53", 53, ep("10.1.0.1")),
                                 FlowFilter("10.96.0.53", 53, ep("10.1.0.2"))]
    backend.fail_next = 1
    p.on_slice(dns_slice("10.1.0.4"))
    assert p.sync().error is not None
    assert len(cleaner.calls) == 2  # nothing deleted for a transaction the kernel refused
    assert p.sync().mode == "full"  # ... the full sync reconciles instead
    assert cleaner.calls[-1] == [FlowFilter("10.96.0.53", 53, ep("10.1.0.4"), keep=True)]


def test_no_cleaner_no_cleanup() -> None:
    p = Proxier(FakeBackend(), RenderConfig(table="kpc", buckets=4))
    p.mark_initialized()
    p.on_service(svc(name="dns", ip="10.96.0.53", ports=UDP_PORTS))
    p.on_slice(dns_slice("10.1.0.1"))
    assert p.sync().error is None
    p.on_slice(dns_slice())
    assert p.sync().error is None
