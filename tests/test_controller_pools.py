"""Warm port pools and crash-proof port accounting (issue 4, items 1, 2, 5): the pure sizing and
condition logic, the reconcile plan over pods/ports/annotations, and PortController against fakes
of our own interfaces (IaaS, cache, writer, recorder)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from netctl.annotations import PORT_ANNOTATION, PortAnnotation
from netctl.controller.pools import PoolConfig, refill_batches, split_freed, tenant_conditions
from netctl.controller.ports import Caches, PortController
from netctl.controller.reconcile import choose_port, expected_annotation, plan_sync
from netctl.iaas.base import IaaSUnavailable, Network, Port, PortOwner, PortRequest, SubnetExhausted
from tests.fakes import FakeCache, FakeIaaS, FakeRecorder, FakeWriter, namespace, node, pod, tenant

POOL = PoolConfig(min=4, max=6, batch=3)


# ---- pure: sizing and conditions ------------------------------------------------------------------


def test_pool_config_defaults_off_and_validates() -> None:
    off = PoolConfig()
    assert not off.enabled and off.ceiling == 0 and refill_batches(0, off) == []
    assert PoolConfig(min=5).ceiling == 10  # max 0 = twice min
    for bad in ({"min": -1}, {"min": 5, "max": 2}, {"batch": 0}, {"refill_interval_s": 0}):
        with pytest.raises(ValueError):
            PoolConfig(**bad)


def test_refill_goes_to_min_in_batches() -> None:
    assert refill_batches(0, POOL) == [3, 1]
    assert refill_batches(3, POOL) == [1]
    assert refill_batches(4, POOL) == [] and refill_batches(9, POOL) == []


def test_freed_ports_fill_the_pool_up_to_max_and_the_rest_go() -> None:
    assert split_freed(4, ["a", "b", "c"], POOL) == (["a", "b"], ["c"])
    assert split_freed(6, ["a"], POOL) == ([], ["a"])
    assert split_freed(0, ["a"], PoolConfig()) == ([], ["a"])  # pools off: freed ports are deleted


def test_conditions_ready_and_degraded_with_reasons() -> None:
    ok = {c["type"]: c for c in tenant_conditions(True, {}, 4, POOL)}
    assert ok["Ready"]["status"] == "True" and ok["Degraded"]["status"] == "False"
    low = {c["type"]: c for c in tenant_conditions(True, {}, 1, POOL)}
    assert low["Ready"]["status"] == "True"  # a pool miss still gives the pod a port
    assert low["Degraded"]["status"] == "True" and low["Degraded"]["reason"] == "PoolBelowMin"
    down = {c["type"]: c for c in tenant_conditions(True, {"IaaSUnavailable": "NB timed out"}, 1, POOL)}
    assert down["Ready"]["status"] == "False" and down["Ready"]["reason"] == "IaaSUnavailable"
    assert down["Degraded"]["reason"] == "IaaSUnavailable" and "PoolBelowMin" in down["Degraded"]["message"]
    full = {c["type"]: c for c in tenant_conditions(True, {"SubnetExhausted": "no address"}, 9, POOL)}
    assert full["Ready"]["reason"] == "SubnetExhausted" and full["Degraded"]["reason"] == "SubnetExhausted"
    pool_only = {c["type"]: c for c in tenant_conditions(True, {}, 0, POOL, {"SubnetExhausted": "full"})}
    assert pool_only["Ready"]["status"] == "True" and pool_only["Degraded"]["reason"] == "SubnetExhausted"
    nonet = {c["type"]: c for c in tenant_conditions(False, {"NetworkFailed": "bad cidr"}, 0, PoolConfig())}
    assert nonet["Ready"]["status"] == "False" and nonet["Ready"]["message"] == "bad cidr"


# ---- pure: the reconcile plan -----------------------------------------------------------------------

NET = Network("netctl-a", "a", "10.1.0.0/24", "10.1.0.1", 1400)


def bound(pid: str, uid: str, ip: str, node_name: str | None = None, state: Any = "bound") -> Port:
    owner = PortOwner("pod", f"p-{uid}", "tenant-a", uid, "a")
    return Port(pid, NET.id, "a", f"0a:58:0a:01:00:{int(ip.rsplit('.', 1)[1]):02x}", ip, 24, owner, node_name,
                (), state)


def pooled(pid: str, ip: str) -> Port:
    return Port(pid, NET.id, "a", "0a:58:0a:01:00:ff", ip, 24, None, None, (), "pooled")


def annotated(p: dict[str, Any], port: Port) -> dict[str, Any]:
    p["metadata"]["annotations"][PORT_ANNOTATION] = expected_annotation(port, NET.gateway, NET.mtu).to_json()
    return p


def plan(pods: list[dict[str, Any]], ports: list[Port], ceiling: int | None = None) -> Any:
    tenant_of = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": "a" for p in pods}
    return plan_sync(pods, tenant_of, ports, {"a": (NET.gateway, NET.mtu)}, pool_ceiling=ceiling)


def test_plan_steady_state_is_empty_and_pooled_ports_are_not_orphans() -> None:
    p1 = bound("pool-1", "u1", "10.1.0.5")
    p2 = bound("pod-u2", "u2", "10.1.0.6", state=None)  # written before states existed: bound
    pods = [annotated(pod("p-u1", uid="u1"), p1), annotated(pod("p-u2", uid="u2"), p2)]
    got = plan(pods, [p1, p2, pooled("pool-9", "10.1.0.9")], ceiling=6)
    assert got.empty and got.pool_sizes == (("a", 1),)


def test_plan_frees_orphans_and_repairs_missing_and_mismatched() -> None:
    live = bound("pool-1", "u1", "10.1.0.5")
    orphan = bound("pool-2", "gone", "10.1.0.6")
    wrong = annotated(pod("p-u1", uid="u1"), dataclasses.replace(live, ip="10.1.0.77"))
    got = plan([wrong, pod("p-new", uid="new")], [live, orphan])
    assert got.orphan_ports == ("pool-2",)
    assert got.pods_to_sync == ("tenant-a/p-new", "tenant-a/p-u1")  # no port; annotation differs from the port


def test_plan_resolves_duplicates_keeping_the_annotated_port_else_the_lowest_id() -> None:
    a, b, c = bound("pool-b", "u1", "10.1.0.5"), bound("pool-a", "u1", "10.1.0.6"), bound("pool-c", "u1", "10.1.0.7")
    got = plan([annotated(pod("p-u1", uid="u1"), c)], [a, b, c])
    assert got.duplicate_ports == ("pool-a", "pool-b") and got.pods_to_sync == ()
    got = plan([pod("p-u1", uid="u1")], [a, b, c])
    assert got.duplicate_ports == ("pool-b", "pool-c") and got.pods_to_sync == ("tenant-a/p-u1",)
    assert choose_port([a, b], "pool-x") == (b, [a])


def test_plan_trims_pools_over_max_only_when_asked() -> None:
    ports = [pooled(f"pool-{i}", f"10.1.0.{10 + i}") for i in range(5)]
    assert plan([], ports, ceiling=3).pools_over_max == (("a", 3),)
    assert plan([], ports, ceiling=5).pools_over_max == ()
    assert plan([], ports).pools_over_max == ()


# ---- PortController with pools -------------------------------------------------------------------------


@pytest.fixture
def world() -> Any:
    pods = FakeCache()
    caches = Caches(
        pods=pods,
        namespaces=FakeCache([namespace("tenant-a", "a")]),
        tenants=FakeCache([tenant("a", "10.1.0.0/24")]),
        nodes=FakeCache([node("a-1", "a")]),
    )
    iaas = FakeIaaS()
    writer = FakeWriter(pods)
    rec = FakeRecorder()
    claims: list[tuple[str, bool]] = []
    ctl = PortController(caches, iaas, writer, rec, pool=POOL, on_claim=lambda t, hit: claims.append((t, hit)))
    return ctl, pods, iaas, writer, rec, claims


def annotation_of(pods: FakeCache, key: str) -> PortAnnotation:
    return PortAnnotation.from_json(pods.get(key)["metadata"]["annotations"][PORT_ANNOTATION])


def test_refill_creates_min_in_batches_then_a_pod_takes_a_pooled_port(world: Any) -> None:
    ctl, pods, iaas, writer, rec, claims = world
    assert ctl.refill_pool("a") == 4
    assert len(iaas.pooled_ports("a")) == 4
    assert ctl.refill_pool("a") == 0  # at min: nothing to do
    pods.put(pod("web", uid="u1", node="a-1"))
    ctl.sync_pod("tenant-a/web")
    (port,) = iaas.ports_of_pod("u1")
    assert port.id.startswith("pool-") and port.state == "bound" and port.node == "a-1"
    assert port.owner == PortOwner("pod", "web", "tenant-a", "u1", "a")
    ann = annotation_of(pods, "tenant-a/web")
    assert (ann.port_id, ann.ip, ann.mac) == (port.id, f"{port.ip}/24", port.mac)
    assert claims == [("a", True)] and len(iaas.pooled_ports("a")) == 3
    assert [e[2] for e in rec.events] == ["PortClaimed", "PortBound"]
    ctl.sync_tenant("a")
    st = writer.statuses["a"]
    assert st["pool"] == {"size": 3, "min": 4, "max": 6, "hits": 1, "misses": 0}
    assert st["ports"]["bound"] == 1
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "PoolBelowMin"
    ctl.refill_pool("a")
    st = writer.statuses["a"]
    assert next(c for c in st["conditions"] if c["type"] == "Degraded")["status"] == "False"


def test_empty_pool_is_a_miss_that_creates_the_pods_own_port(world: Any) -> None:
    ctl, pods, iaas, _, rec, claims = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    assert [p.id for p in iaas.ports_of_pod("u1")] == ["pod-u1"]
    assert claims == [("a", False)] and [e[2] for e in rec.events] == ["PortCreated"]


def test_deleted_pods_port_is_scrubbed_into_the_pool_below_max_else_deleted(world: Any) -> None:
    ctl, pods, iaas, _, _, _ = world
    ctl.refill_pool("a")  # 4 pooled
    for i in range(8):  # 4 hits, 4 misses
        pods.put(pod(f"p{i}", uid=f"u{i}"))
        ctl.sync_pod(f"tenant-a/p{i}")
    assert iaas.pooled_ports("a") == []
    old = {i: iaas.ports_of_pod(f"u{i}")[0] for i in range(8)}
    for i in range(8):
        pods.remove(f"tenant-a/p{i}")
        ctl.sync_pod(f"tenant-a/p{i}")
    pool = iaas.pooled_ports("a")
    assert len(pool) == 6  # up to max; the other two were deleted
    assert all(p.owner is None and p.node is None and p.state == "pooled" for p in pool)
    # scrubbed: fresh names (a node still plugged with the old one matches nothing) and addresses
    assert not {p.id for p in pool} & {p.id for p in old.values()}
    assert not {p.ip for p in pool} & {p.ip for p in old.values()}
    assert all(iaas.ports_of_pod(f"u{i}") == [] for i in range(8))
    assert len(iaas.ports) == 6
    ips = [p.ip for p in iaas.ports.values()]
    assert len(ips) == len(set(ips))


def test_crash_between_claim_and_annotation_is_recovered_from_the_port(world: Any) -> None:
    ctl, pods, iaas, writer, _, _ = world
    ctl.refill_pool("a")
    pods.put(pod("web", uid="u1"))

    def crash(*a: Any, **kw: Any) -> None:
        raise SystemExit("controller killed before the annotation")

    writer.patch_pod_annotations = crash
    with pytest.raises(SystemExit):
        ctl.sync_pod("tenant-a/web")
    (claimed,) = iaas.ports_of_pod("u1")  # the intent is on the port already
    # A new process: no memory, the same IaaS and pods.
    writer2 = FakeWriter(pods)
    fresh = PortController(ctl.caches, iaas, writer2, FakeRecorder(), pool=POOL)
    queued: list[str] = []
    got = fresh.resync(queued.append, lambda t: None)
    assert got.orphan_ports == () and queued == ["tenant-a/web"]
    fresh.sync_pod("tenant-a/web")
    assert iaas.ports_of_pod("u1") == [claimed]  # no second port
    assert annotation_of(pods, "tenant-a/web").port_id == claimed.id
    assert fresh.plan().empty


def test_resync_resolves_duplicates_returns_orphans_and_trims(world: Any) -> None:
    ctl, pods, iaas, _, _, _ = world
    net = ctl.network_for("a")
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    keep = iaas.ports_of_pod("u1")[0]
    owner = PortOwner("pod", "web", "tenant-a", "u1", "a")
    dup = iaas.create_ports(net, [PortRequest("pod-zz-dup", owner)])[0]  # a racing claimer's port
    ghost = iaas.create_ports(net, [PortRequest("pod-ghost", PortOwner("pod", "x", "tenant-a", "ghost", "a"))])[0]
    iaas.create_ports(net, [PortRequest(f"pool-x{i}", None) for i in range(8)])  # over max (6)
    queued: list[str] = []
    got = ctl.resync(queued.append, lambda t: None)
    assert got.duplicate_ports == (dup.id,) and got.orphan_ports == (ghost.id,)
    assert got.pools_over_max == (("a", 6),)
    assert iaas.ports_of_pod("u1") == [keep] and iaas.ports_of_pod("ghost") == []
    assert len(iaas.pooled_ports("a")) == 6
    assert ctl.plan().empty


def test_annotation_naming_another_port_is_repaired_from_the_bound_port(world: Any) -> None:
    ctl, pods, iaas, _, _, _ = world
    pods.put(pod("web", uid="u1"))
    ctl.sync_pod("tenant-a/web")
    port = iaas.ports_of_pod("u1")[0]
    ann = annotation_of(pods, "tenant-a/web")
    lie = dataclasses.replace(ann, port_id="pool-someone-else", ip="10.1.0.200/24")
    pods.get("tenant-a/web")["metadata"]["annotations"][PORT_ANNOTATION] = lie.to_json()
    assert ctl.plan().pods_to_sync == ("tenant-a/web",)
    ctl.sync_pod("tenant-a/web")
    assert annotation_of(pods, "tenant-a/web").port_id == port.id
    assert iaas.ports_of_pod("u1") == [port]


class BrokenIaaS(FakeIaaS):
    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None

    def create_ports(self, network: Network, requests: Any) -> list[Port]:
        if self.error is not None:
            raise self.error
        return super().create_ports(network, requests)


@pytest.mark.parametrize("error,reason,retried", [(IaaSUnavailable("NB down"), "IaaSUnavailable", True),
                                                  (SubnetExhausted("no address left"), "SubnetExhausted", False)])
def test_refill_failure_marks_the_tenant_degraded_until_it_recovers(error: Exception, reason: str,
                                                                    retried: bool) -> None:
    """A pool that cannot be refilled degrades the tenant; it stays Ready (a miss still creates a
    port). An IaaS outage is raised (retried with back-off); a full subnet is not (no use)."""
    caches = Caches(FakeCache(), FakeCache([namespace("tenant-a", "a")]),
                    FakeCache([tenant("a", "10.1.0.0/24")]), FakeCache())
    iaas = BrokenIaaS()
    writer = FakeWriter()
    ctl = PortController(caches, iaas, writer, FakeRecorder(), pool=POOL)
    iaas.error = error
    if retried:
        with pytest.raises(type(error)):
            ctl.refill_pool("a")
    else:
        assert ctl.refill_pool("a") == 0
    conds = {c["type"]: c for c in writer.statuses["a"]["conditions"]}
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == reason
    assert str(error) in conds["Degraded"]["message"] and "PoolBelowMin" in conds["Degraded"]["message"]
    assert conds["Ready"]["status"] == "True"
    caches.tenants.put({**tenant("a", "10.1.0.0/24"), "status": writer.statuses["a"]})
    iaas.error = None
    ctl.refill_pool("a")
    conds = {c["type"]: c for c in writer.statuses["a"]["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"


def test_pool_hits_and_misses_reach_the_claim_callback_and_status(world: Any) -> None:
    ctl, pods, _, writer, _, claims = world
    ctl.refill_pool("a")
    for i in range(6):
        pods.put(pod(f"p{i}", uid=f"u{i}"))
        ctl.sync_pod(f"tenant-a/p{i}")
        ctl.sync_pod(f"tenant-a/p{i}")  # idempotent: no second claim
    assert [hit for _, hit in claims] == [True] * 4 + [False] * 2
    ctl.sync_tenant("a")
    assert writer.statuses["a"]["pool"]["hits"] == 4 and writer.statuses["a"]["pool"]["misses"] == 2


def test_failed_claim_is_a_pod_event_and_a_tenant_condition_until_a_create_succeeds() -> None:
    pods = FakeCache([pod("web", uid="u1")])
    caches = Caches(pods, FakeCache([namespace("tenant-a", "a")]), FakeCache([tenant("a", "10.1.0.0/24")]),
                    FakeCache())
    iaas = BrokenIaaS()
    writer = FakeWriter(pods)
    rec = FakeRecorder()
    ctl = PortController(caches, iaas, writer, rec)  # pools off
    iaas.error = SubnetExhausted("network netctl-a: no free address")
    with pytest.raises(SubnetExhausted):
        ctl.sync_pod("tenant-a/web")
    assert rec.events[-1][2] == "PortFailed" and "no free address" in rec.events[-1][3]
    conds = {c["type"]: c for c in writer.statuses["a"]["conditions"]}
    assert conds["Ready"]["reason"] == "SubnetExhausted" and conds["Degraded"]["reason"] == "SubnetExhausted"
    assert PORT_ANNOTATION not in pods.get("tenant-a/web")["metadata"]["annotations"]
    iaas.error = None
    ctl.sync_pod("tenant-a/web")
    ctl.sync_tenant("a")
    conds = {c["type"]: c for c in writer.statuses["a"]["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"
    assert annotation_of(pods, "tenant-a/web").port_id == "pod-u1"


def test_the_controller_refills_pools_and_exports_pool_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring: with pools on, the leader's refill timer fills each tenant's pool to min, pods take
    pooled ports, and the pool size and hits/misses are metrics."""
    import time

    from prometheus_client import REGISTRY

    from netctl.controller import app
    from tests.fakes import MemListWatch

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    lws = {
        "pods": MemListWatch(),
        "namespaces": MemListWatch([namespace("tenant-p", "pt")]),
        "nodes": MemListWatch([node("pt-1", "pt")]),
        "tenants": MemListWatch([tenant("pt", "10.9.0.0/24")]),
    }
    monkeypatch.setattr(app, "ApiListWatch", lambda api, *, plural, **kw: lws[plural])
    iaas = FakeIaaS()
    cfg = PoolConfig(min=3, max=5, batch=2, refill_interval_s=0.05)
    ctl = app.Controller(None, iaas, FakeWriter(), FakeRecorder(),
                         app.ControllerOptions(workers=2, resync_period_s=3600.0, pool=cfg))
    hits0 = value("netctl_pool_claims_total", tenant="pt", result="hit")

    def wait(pred: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    try:
        ctl.start_informers(timeout=5)
        ctl.run()
        wait(lambda: len(iaas.pooled_ports("pt")) == 3, "the pool filled to min")
        wait(lambda: value("netctl_pool_ports", tenant="pt") == 3, "the pool size metric")
        lws["pods"].put(pod("w", ns="tenant-p", uid="w1", node="pt-1"))
        wait(lambda: iaas.ports_of_pod("w1"), "the pod's port")
        assert iaas.ports_of_pod("w1")[0].id.startswith("pool-")
        assert value("netctl_pool_claims_total", tenant="pt", result="hit") == hits0 + 1
        wait(lambda: len(iaas.pooled_ports("pt")) == 3, "the pool refilled")
    finally:
        ctl.stop()


def test_an_unchanged_tenant_status_is_not_written_again_and_keeps_transition_times(world: Any) -> None:
    ctl, _, _, writer, _, _ = world
    writes: list[dict[str, Any]] = []
    real = writer.patch_tenant_status

    def counting(name: str, status: dict[str, Any]) -> None:
        writes.append(status)
        real(name, status)
        ctl.caches.tenants.put({**tenant("a", "10.1.0.0/24"), "status": status})  # as the watch would

    writer.patch_tenant_status = counting
    ctl.refill_pool("a")
    n = len(writes)
    assert n >= 1 and writes[-1]["observedGeneration"] == 1
    first = {c["type"]: c["lastTransitionTime"] for c in writes[-1]["conditions"]}
    ctl.refill_pool("a")
    ctl.sync_tenant("a")
    assert len(writes) == n  # nothing changed: nothing written
    ctl.iaas.trim_pool("a", 0)
    ctl.refill_pool("a")  # the pool was emptied and refilled: same numbers, same conditions
    assert len(writes) == n
    assert {c["type"]: c["lastTransitionTime"] for c in writes[-1]["conditions"]} == first


def test_a_deleted_tenants_pool_goes_with_its_network(world: Any) -> None:
    from netctl.controller.ports import TenantNotReady

    ctl, _, iaas, _, _, _ = world
    ctl.refill_pool("a")
    assert iaas.pooled_ports("a")
    ctl.caches.tenants.remove("a")
    with pytest.raises(TenantNotReady):
        ctl.sync_tenant("a")
    assert iaas.list_ports(tenant="a") == [] and iaas.get_network("a") is None
    assert ctl.refill_pool("a") == 0  # no Tenant, no pool
