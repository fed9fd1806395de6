"""kproxy's tenant scoping and app wiring against a fake of our own ``InformerFactory`` (no API server)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from kproxy.app import KproxyApp, SyncHealth
from kproxy.config import KproxyConfig
from kproxy.main import main
from kproxy.nft import FakeBackend
from kproxy.scope import TenantScope
from netctl.config import ConfigError
from tests.test_kproxy_tracker import eps, svc

Obj = dict[str, Any]


class FakeInformer:
    def __init__(self, kind: str, namespace: str | None = None, selector: str | None = None) -> None:
        self.kind, self.namespace, self.selector = kind, namespace, selector
        self.handlers: list[tuple[Any, Any, Any]] = []
        self.started = self.stopped = False
        self.synced = False

    def add_handler(self, on_add: Any = None, on_update: Any = None, on_delete: Any = None) -> None:
        self.handlers.append((on_add, on_update, on_delete))

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float | None = 5.0) -> None:
        self.stopped = True

    def has_synced(self) -> bool:
        return self.synced

    # what the API would deliver
    def add(self, obj: Obj) -> None:
        for h in self.handlers:
            h[0](obj)

    def update(self, old: Obj, new: Obj) -> None:
        for h in self.handlers:
            h[1](old, new)

    def delete(self, obj: Obj) -> None:
        for h in self.handlers:
            h[2](obj)


class FakeFactory:
    def __init__(self) -> None:
        self.made: list[FakeInformer] = []

    def _make(self, kind: str, namespace: str | None = None, selector: str | None = None) -> FakeInformer:
        inf = FakeInformer(kind, namespace, selector)
        self.made.append(inf)
        return inf

    def namespaces(self, label_selector: str) -> FakeInformer:
        return self._make("namespaces", selector=label_selector)

    def services(self, namespace: str) -> FakeInformer:
        return self._make("services", namespace)

    def endpoint_slices(self, namespace: str) -> FakeInformer:
        return self._make("endpointslices", namespace)

    def live(self, kind: str, namespace: str | None = None) -> FakeInformer:
        found = [i for i in self.made if i.kind == kind and i.namespace == namespace and not i.stopped]
        assert len(found) == 1, (kind, namespace, found)
        return found[0]

    def watched(self) -> set[tuple[str, str | None]]:
        return {(i.kind, i.namespace) for i in self.made if i.started and not i.stopped}


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def on_service(self, obj: Obj, *, deleted: bool = False) -> None:
        m = obj["metadata"]
        self.calls.append(("service", f"{m['namespace']}/{m['name']}", deleted))

    def on_slice(self, obj: Obj, *, deleted: bool = False) -> None:
        m = obj["metadata"]
        self.calls.append(("slice", f"{m['namespace']}/{m['name']}", deleted))


def ns(name: str, tenant: str | None) -> Obj:
    labels = {"netctl.io/tenant": tenant} if tenant else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


@pytest.fixture
def scoped() -> tuple[FakeFactory, RecordingSink, TenantScope]:
    factory, sink = FakeFactory(), RecordingSink()
    scope = TenantScope(factory, "alpha", sink)
    scope.start()
    return factory, sink, scope


def test_only_tenant_namespaces_are_watched_and_only_namespace_scoped(scoped: Any) -> None:
    factory, _, scope = scoped
    nsi = factory.live("namespaces")
    assert nsi.selector == "netctl.io/tenant=alpha"  # the server filters, not us
    assert factory.watched() == {("namespaces", None)}  # nothing else until a namespace joins
    nsi.add(ns("a1", "alpha"))
    nsi.add(ns("a2", "alpha"))
    assert factory.watched() == {("namespaces", None), ("services", "a1"), ("endpointslices", "a1"),
                                 ("services", "a2"), ("endpointslices", "a2")}
    assert scope.namespaces() == ["a1", "a2"]
    # no informer is ever cluster-wide for services or slices
    assert all(i.namespace for i in factory.made if i.kind != "namespaces")


def test_a_namespace_of_another_tenant_is_never_watched_even_if_delivered(scoped: Any) -> None:
    factory, _, scope = scoped
    factory.live("namespaces").add(ns("b1", "beta"))
    factory.live("namespaces").add(ns("x", None))
    assert scope.namespaces() == []
    assert factory.watched() == {("namespaces", None)}


def test_events_reach_the_sink_and_leaving_deletes_what_was_delivered(scoped: Any) -> None:
    factory, sink, scope = scoped
    nsi = factory.live("namespaces")
    nsi.add(ns("a1", "alpha"))
    services, slices = factory.live("services", "a1"), factory.live("endpointslices", "a1")
    services.add(svc("web", "a1"))
    services.add(svc("gone", "a1"))
    services.delete(svc("gone", "a1"))
    slices.add(eps("web", "a1", name="web-1"))
    assert sink.calls == [("service", "a1/web", False), ("service", "a1/gone", False),
                          ("service", "a1/gone", True), ("slice", "a1/web-1", False)]
    sink.calls.clear()
    nsi.update(ns("a1", "alpha"), ns("a1", "beta"))  # relabelled to another tenant
    assert sink.calls == [("service", "a1/web", True), ("slice", "a1/web-1", True)]
    assert services.stopped and slices.stopped
    assert scope.namespaces() == []
    sink.calls.clear()
    services.add(svc("late", "a1"))  # a retired watch still delivering: dropped
    assert sink.calls == []


def test_rejoin_starts_fresh_watches_and_delete_of_namespace_leaves(scoped: Any) -> None:
    factory, sink, _ = scoped
    nsi = factory.live("namespaces")
    nsi.add(ns("a1", "alpha"))
    old = factory.live("services", "a1")
    nsi.delete(ns("a1", "alpha"))
    assert old.stopped
    nsi.add(ns("a1", "alpha"))
    new = factory.live("services", "a1")
    assert new is not old and new.started
    old.add(svc("web", "a1"))
    new.add(svc("web", "a1"))
    assert sink.calls == [("service", "a1/web", False)]  # only the live watch counts
    nsi.update(ns("a1", "alpha"), ns("a1", "alpha"))  # a resync: no restart
    assert factory.live("services", "a1") is new


def test_object_from_another_namespace_is_ignored(scoped: Any) -> None:
    factory, sink, _ = scoped
    factory.live("namespaces").add(ns("a1", "alpha"))
    factory.live("services", "a1").add(svc("web", "b1"))
    assert sink.calls == []


def test_synced_only_when_every_watch_listed(scoped: Any) -> None:
    factory, _, scope = scoped
    nsi = factory.live("namespaces")
    nsi.add(ns("a1", "alpha"))
    assert not scope.has_synced()
    nsi.synced = True
    assert not scope.has_synced()
    factory.live("services", "a1").synced = True
    assert not scope.has_synced()
    factory.live("endpointslices", "a1").synced = True
    assert scope.has_synced()
    nsi.add(ns("a2", "alpha"))
    assert not scope.has_synced()
    assert not scope.wait_for_sync(0.05)


def test_stop_stops_everything_without_deleting(scoped: Any) -> None:
    factory, sink, scope = scoped
    factory.live("namespaces").add(ns("a1", "alpha"))
    factory.live("services", "a1").add(svc("web", "a1"))
    scope.stop()
    assert all(i.stopped for i in factory.made)
    assert sink.calls == [("service", "a1/web", False)]  # rules stay across a restart
    factory.made[0].add(ns("a2", "alpha"))
    assert scope.namespaces() == []


# -- health ---------------------------------------------------------------------------------------


def test_sync_health_follows_kube_proxy_rule() -> None:
    now = [100.0]
    h = SyncHealth(10.0, clock=lambda: now[0])
    now[0] += 1000
    assert h.healthy()  # idle: nothing pending, however long ago the last sync
    h.changed()
    now[0] += 9
    assert h.healthy()
    now[0] += 2
    assert not h.healthy() and h.waiting_s() == pytest.approx(11)
    h.synced(now[0], ok=True, still_pending=False)
    assert h.healthy() and h.waiting_s() == 0
    h.synced(now[0], ok=False, still_pending=False)  # a failed sync counts as pending
    now[0] += 11
    assert not h.healthy()
    started = now[0]
    h.synced(started, ok=True, still_pending=True)  # changes arrived during the sync
    now[0] += 5
    assert h.waiting_s() == pytest.approx(5)


# -- config and CLI -------------------------------------------------------------------------------


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="node_name"):
        KproxyConfig()
    with pytest.raises(ConfigError, match="leader"):
        KproxyConfig(node_name="n1", leader_elect=True)
    with pytest.raises(ConfigError, match="service_cidr"):
        KproxyConfig(node_name="n1", service_cidr="fd00::/108")
    with pytest.raises(ConfigError, match="table"):
        KproxyConfig(node_name="n1", table="a b")
    assert KproxyConfig(node_name="n1", netns="/run/netns/node1").netns_name == "node1"
    assert KproxyConfig(node_name="n1", netns="node1").netns_name == "node1"
    assert KproxyConfig(node_name="n1", netns="/proc/1/ns/net").netns_name == "../../proc/1/ns/net"
    cfg = KproxyConfig(node_name="n1")
    assert (cfg.healthz_bind_address, cfg.healthz_port, cfg.table, cfg.min_sync_period_s) == ("127.0.0.1", 10256,
                                                                                              "kproxy", 1.0)


def test_cli_help_describes_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--node-name", "--tenant", "--table", "--min-sync-period-s", "--sync-period-s",
                 "--verify-period-s", "--healthz-bind-address", "--healthz-port", "--metrics-port", "--netns",
                 "--service-cidr", "--kubeconfig"):
        assert flag in out
    assert "tenant" in out and "never lists cluster-wide" in " ".join(out.split())


def test_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--node-name", "n1", "--buckets", "0"]) == 2
    assert "buckets" in capsys.readouterr().err


# -- the app with fakes ---------------------------------------------------------------------------


def wait(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_app_writes_nothing_before_all_watches_listed_then_follows_namespaces() -> None:
    factory, backend = FakeFactory(), FakeBackend()
    cfg = KproxyConfig(node_name="n1", tenant="alpha", table="kpt", min_sync_period_s=0.01, healthz_port=0,
                       metrics_port=0, verify_period_s=0)
    app = KproxyApp(cfg, api=object(), backend=backend, factory=factory)
    try:
        assert app.start()
        assert app.healthz is not None and app.metrics_server is not None
        nsi = factory.live("namespaces")
        nsi.add(ns("a1", "alpha"))
        factory.live("services", "a1").add(svc("web", "a1", ip="10.96.0.10"))
        factory.live("endpointslices", "a1").add(eps("web", "a1", addrs=["10.1.0.5"]))
        nsi.synced = True
        factory.live("services", "a1").synced = True
        import time

        time.sleep(0.1)
        assert backend.applied == []  # slices not listed yet: nothing written
        factory.live("endpointslices", "a1").synced = True
        wait(app.initialized.is_set)
        wait(lambda: any("10.96.0.10 . tcp . 80" in s for s in backend.applied))
        assert get(app.healthz.url + "/healthz")[0] == 200
        metrics = get(app.metrics_server.url + "/metrics")[1]
        assert 'kproxy_api_events_total{resource="services",type="add"} 1.0' in metrics
        assert "kproxy_initialized 1.0" in metrics
        n = len(backend.applied)
        nsi.delete(ns("a1", "alpha"))  # the namespace left: its rules go
        wait(lambda: len(backend.applied) > n)
        assert "delete element" in backend.applied[-1] and "10.96.0.10" in backend.applied[-1]
        assert app.proxier is not None and app.proxier.tracker.all_states() == {}
    finally:
        app.shutdown()
    assert all(i.stopped for i in factory.made)
