"""kproxy's tenant scoping and app wiring against a fake of our own ``InformerFactory`` (no API server)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from kproxy.app import EXIT_TENANT_CHANGED, KproxyApp, SyncHealth, proxyable_selector
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


def started_app(backend: FakeBackend, **cfg: Any) -> tuple[KproxyApp, FakeFactory]:
    """An app on fakes, its tenant's one namespace listed (with one Service), rules written."""
    factory = FakeFactory()
    settings: dict[str, Any] = dict(node_name="n1", tenant="alpha", table="kpt", min_sync_period_s=0.01,
                                    healthz_port=0, metrics_port=0, verify_period_s=0)
    settings.update(cfg)
    app = KproxyApp(KproxyConfig(**settings), api=object(), backend=backend, factory=factory)
    assert app.start()
    nsi = factory.live("namespaces")
    nsi.add(ns("a1", "alpha"))
    factory.live("services", "a1").add(svc("web", "a1", ip="10.96.0.10"))
    factory.live("endpointslices", "a1").add(eps("web", "a1", addrs=["10.1.0.5"]))
    for inf in (nsi, factory.live("services", "a1"), factory.live("endpointslices", "a1")):
        inf.synced = True
    wait(lambda: any("10.96.0.10 . tcp . 80" in s for s in backend.applied))
    return app, factory


def test_healthz_fails_while_syncs_are_stale_and_recovers() -> None:
    """kube-proxy's rule on the configured /healthz port: a change waiting longer than
    healthz_stale_s for a successful sync (here the nft backend refuses every transaction)."""
    backend = FakeBackend()
    app, factory = started_app(backend, healthz_stale_s=0.3)
    try:
        assert app.healthz is not None and app.metrics_server is not None
        url = app.healthz.url + "/healthz"
        assert get(url)[0] == 200
        backend.fail_next = 10**9  # the kernel refuses from now on
        factory.live("endpointslices", "a1").update({}, eps("web", "a1", addrs=["10.1.0.6"]))
        wait(lambda: get(url)[0] == 503)  # after healthz_stale_s of failed retries
        status, body = get(url)
        assert status == 503 and "sync" in body, body
        assert get(app.metrics_server.url + "/healthz")[0] == 503  # the metrics port tells the same
        metrics = get(app.metrics_server.url + "/metrics")[1]
        errors = [ln for ln in metrics.splitlines() if ln.startswith("kproxy_sync_errors_total{")]
        assert errors and all(float(ln.split()[-1]) >= 1 for ln in errors if 'mode="partial"' in ln), errors
        backend.fail_next = 0  # the kernel accepts again: the retried (full) sync succeeds
        wait(lambda: get(url)[0] == 200)
        assert any("10.1.0.6" in s for s in backend.applied[-1:])
    finally:
        app.shutdown()


def test_operations_metrics_are_exported() -> None:
    backend = FakeBackend()
    app, factory = started_app(backend)
    try:
        assert app.metrics_server is not None
        factory.live("endpointslices", "a1").update({}, eps("web", "a1", addrs=["10.1.0.6", "10.1.0.7"]))
        wait(lambda: any("10.1.0.7" in s for s in backend.applied))
        metrics = get(app.metrics_server.url + "/metrics")[1]
        values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                  if ln.startswith("kproxy_")}  # fmt: skip
        for mode in ("full", "partial"):  # sync duration histograms, full and partial
            assert values[f'kproxy_sync_duration_seconds_count{{mode="{mode}"}}'] >= 1, mode
            assert f'kproxy_sync_duration_seconds_bucket{{le="0.01",mode="{mode}"}}' in values
        assert values["kproxy_rules"] > 0 and values["kproxy_elements"] >= 3  # rule and element counts
        assert values["kproxy_last_successful_sync_timestamp_seconds"] > 1.6e9
        assert values['kproxy_api_events_total{resource="endpointslices",type="update"}'] == 1
        assert values['kproxy_api_events_total{resource="services",type="add"}'] == 1
        assert values['kproxy_api_events_total{resource="namespaces",type="add"}'] == 1
        assert "kproxy_sync_pending_seconds" in values and "kproxy_conntrack_deleted_total" in values
        assert values["kproxy_service_ports"] == 1
    finally:
        app.shutdown()


# -- scoping details ------------------------------------------------------------------------------


def test_proxy_name_selects_own_and_unlabelled_services_only() -> None:
    assert proxyable_selector(None) == "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    assert proxyable_selector("kp") == "!service.kubernetes.io/headless"  # the name is checked client-side
    backend = FakeBackend()
    app, factory = started_app(backend, proxy_name="netctl-kproxy")
    try:
        assert app.proxier is not None
        services = factory.live("services", "a1")
        label = "service.kubernetes.io/service-proxy-name"
        services.add(svc("mine", "a1", ip="10.96.0.11", labels={label: "netctl-kproxy"}))
        services.add(svc("theirs", "a1", ip="10.96.0.12", labels={label: "cilium"}))
        for name in ("mine", "theirs"):
            factory.live("endpointslices", "a1").add(eps(name, "a1", addrs=["10.1.0.5"]))
        wait(lambda: any("10.96.0.11" in s for s in backend.applied))
        assert app.proxier.sync().error is None
        programmed = "".join(backend.applied)
        assert "10.96.0.10 . tcp" in programmed and "10.96.0.11 . tcp" in programmed
        assert "10.96.0.12" not in programmed
    finally:
        app.shutdown()


def test_node_moving_to_another_tenant_removes_the_rules_and_exits() -> None:
    backend, factory = FakeBackend(), FakeFactory()
    labels = ["alpha"]
    cfg = KproxyConfig(node_name="n1", table="kpt", min_sync_period_s=0.01, healthz_port=0, metrics_port=0,
                       verify_period_s=0, node_check_period_s=0.02)
    app = KproxyApp(cfg, api=object(), backend=backend, factory=factory, node_tenant_reader=lambda: labels[-1])
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(app.run()))
    runner.start()
    try:
        wait(lambda: bool(factory.made))
        assert app.tenant == "alpha" and factory.live("namespaces").selector == "netctl.io/tenant=alpha"
        nsi = factory.live("namespaces")
        nsi.add(ns("a1", "alpha"))
        for inf in (nsi, factory.live("services", "a1"), factory.live("endpointslices", "a1")):
            inf.synced = True
        factory.live("services", "a1").add(svc("web", "a1", ip="10.96.0.10"))
        wait(lambda: ("ip", "kpt") in backend.ruleset.tables)
        labels.append("beta")  # the node is relabelled while kproxy runs
        runner.join(10)
        assert not runner.is_alive() and result == [EXIT_TENANT_CHANGED]
        assert ("ip", "kpt") not in backend.ruleset.tables  # alpha's rules are gone
        assert app.exit_reason is not None and "moved from tenant alpha to beta" in app.exit_reason
        assert all(i.stopped for i in factory.made)
    finally:
        app.stop()
        runner.join(10)


def test_node_label_read_errors_do_not_stop_kproxy() -> None:
    backend, factory = FakeBackend(), FakeFactory()
    reads: list[int] = []

    def reader() -> str:
        reads.append(1)
        if len(reads) > 1:
            raise OSError("API down")
        return "alpha"

    cfg = KproxyConfig(node_name="n1", table="kpt", min_sync_period_s=0.01, healthz_port=0, metrics_port=0,
                       verify_period_s=0, node_check_period_s=0.02)
    app = KproxyApp(cfg, api=object(), backend=backend, factory=factory, node_tenant_reader=reader)
    try:
        assert app.start()
        wait(lambda: len(reads) > 3)
        assert app.exit_code == 0 and app.exit_reason is None
    finally:
        app.shutdown()
