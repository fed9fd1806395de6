"""kproxy's per-tenant credentials: desired state, diffs, and exactly which writes the workers make.

Pure parts (``role_binding``, ``plan_namespace``, ``plan_resync``) are checked directly; the writes
through ``TenantRbac`` with an in-memory writer; the wiring (informer events -> queue keys ->
handlers) through the real ``Controller`` over in-memory list/watches. The real API server and the
real RBAC are exercised in netns_tests/test_controller_rbac.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from netctl.controller import app
from netctl.controller import tenant_rbac as tr
from netctl.controller.app import RBAC_SYNC_KEY, SYNC_KEY, Controller, ControllerOptions
from netctl.kube.workqueue import Priority
from tests.fakes import FakeIaaS, FakeRecorder, FakeWriter, MemListWatch
from tests.fakes_rbac import FakeRbacWriter, LabelCache, ns, tenant

SA, CRB, RB = "serviceaccounts", "clusterrolebindings", "rolebindings"


def managed_rb(t: str, namespace: str, uid: str | None = None) -> dict:
    return tr.role_binding(t, namespace, tenant(t, uid))


# ---- desired state ------------------------------------------------------------------------------


def test_objects_are_named_labelled_and_owned_by_their_tenant() -> None:
    t = tenant("alpha", uid="u-a")
    sa, crb = tr.service_account("alpha", t), tr.cluster_role_binding("alpha", t)
    rb = tr.role_binding("alpha", "shop", t)
    for o in (sa, crb, rb):
        m = o["metadata"]
        assert m["name"] == "netctl-kproxy-alpha"
        assert m["labels"] == {"netctl.io/tenant": "alpha", "app.kubernetes.io/managed-by": "netctl-controller"}
        assert m["ownerReferences"] == [{"apiVersion": "netctl.io/v1alpha1", "kind": "Tenant", "name": "alpha",
                                         "uid": "u-a"}]  # fmt: skip
        assert "blockOwnerDeletion" not in m["ownerReferences"][0]
    assert sa["metadata"]["namespace"] == "kube-system" and "namespace" not in crb["metadata"]
    assert rb["metadata"]["namespace"] == "shop"
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": "netctl-kproxy-node"}  # fmt: skip
    assert rb["roleRef"]["name"] == "netctl-kproxy-services"
    subject = {"kind": "ServiceAccount", "name": "netctl-kproxy-alpha", "namespace": "kube-system"}
    assert crb["subjects"] == rb["subjects"] == [subject]


def test_desired_tenant_needs_label_live_namespace_and_tenant_object() -> None:
    tenants = {"alpha": tenant("alpha")}
    assert tr.desired_tenant(ns("a", "alpha"), tenants) == "alpha"
    assert tr.desired_tenant(ns("b", "beta"), tenants) is None  # no Tenant beta
    assert tr.desired_tenant(ns("c", None), tenants) is None
    assert tr.desired_tenant(None, tenants) is None
    dying = ns("d", "alpha")
    dying["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert tr.desired_tenant(dying, tenants) is None


def test_plan_namespace_join_in_step_leave_and_move() -> None:
    t = tenant("alpha")
    join = tr.plan_namespace("shop", "alpha", t, [])
    assert join.apply == (tr.role_binding("alpha", "shop", t),) and join.delete == ()
    assert tr.plan_namespace("shop", "alpha", t, [managed_rb("alpha", "shop")]).empty
    leave = tr.plan_namespace("shop", None, None, [managed_rb("alpha", "shop")])
    assert leave.apply == () and leave.delete == ("netctl-kproxy-alpha",)
    move = tr.plan_namespace("shop", "beta", tenant("beta"), [managed_rb("alpha", "shop")])
    assert [tr.model.meta(o)["name"] for o in move.apply] == ["netctl-kproxy-beta"]
    assert move.delete == ("netctl-kproxy-alpha",)


def test_plan_namespace_repairs_drift_and_ignores_bindings_not_ours() -> None:
    t = tenant("alpha", uid="new")
    old_owner = managed_rb("alpha", "shop", uid="old")  # Tenant re-created: owner uid changed
    assert tr.plan_namespace("shop", "alpha", t, [old_owner]).apply == (tr.role_binding("alpha", "shop", t),)
    edited = managed_rb("alpha", "shop", uid="new")
    edited["subjects"].append({"kind": "User", "name": "mallory"})
    assert len(tr.plan_namespace("shop", "alpha", t, [edited]).apply) == 1
    theirs = managed_rb("beta", "shop")
    del theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"]
    assert tr.plan_namespace("shop", None, None, [theirs]).empty


def test_plan_resync_finds_every_out_of_step_namespace_and_stale_tenants() -> None:
    tenants = {"alpha": tenant("alpha"), "beta": tenant("beta")}
    namespaces = [ns("a1", "alpha"), ns("a2", "alpha"), ns("b1", "beta"), ns("plain", None), ns("moved", "beta")]
    existing = [
        managed_rb("alpha", "a1"),  # in step
        # a2: missing
        managed_rb("beta", "b1"),  # in step
        managed_rb("alpha", "plain"),  # left its tenant
        managed_rb("alpha", "moved"),  # relabelled alpha -> beta
        managed_rb("alpha", "gone"),  # namespace no longer exists
        managed_rb("gamma", "g1"),  # Tenant gamma deleted
    ]
    plan = tr.plan_resync(namespaces, tenants, existing)
    assert plan.namespaces_to_sync == ("a2", "g1", "gone", "moved", "plain")
    assert plan.stale_tenants == ("gamma",)
    in_step = [managed_rb("alpha", "a1"), managed_rb("alpha", "a2"), managed_rb("beta", "b1"),
               managed_rb("beta", "moved")]  # fmt: skip
    assert tr.plan_resync(namespaces, tenants, in_step).empty


# ---- the workers' writes ------------------------------------------------------------------------


class Harness:
    """TenantRbac + a key list standing in for the queue; ``drain`` runs keys like the workers do."""

    def __init__(self, namespaces: list[dict], tenants: list[dict]) -> None:
        self.namespaces = LabelCache(namespaces)
        self.tenants = LabelCache(tenants)
        self.writer = FakeRbacWriter()
        self.rbac = tr.TenantRbac(self.namespaces, self.tenants, self.writer)
        self.keys: list[str] = []

    def enqueue_ns(self, name: str) -> None:
        self.keys.append("rbac:" + name)

    def enqueue_tenant(self, name: str) -> None:
        self.keys.append("tenant:" + name)

    def drain(self) -> None:
        while self.keys:
            kind, _, name = self.keys.pop(0).partition(":")
            if kind == "rbac":
                self.rbac.sync_namespace(name)
            else:
                self.rbac.sync_tenant(name, self.enqueue_ns)


@pytest.fixture
def h() -> Harness:
    return Harness([ns("a1", "alpha"), ns("a2", "alpha"), ns("b1", "beta"), ns("plain", None)],
                   [tenant("alpha"), tenant("beta")])  # fmt: skip


def test_new_tenant_gets_account_bindings_and_one_rolebinding_per_namespace(h: Harness) -> None:
    h.rbac.sync_tenant("alpha", h.enqueue_ns)
    assert sorted(h.keys) == ["rbac:a1", "rbac:a2"]
    h.drain()
    assert h.writer.writes() == [
        ("apply", SA, "kube-system", "netctl-kproxy-alpha"),
        ("apply", CRB, None, "netctl-kproxy-alpha"),
        ("apply", RB, "a1", "netctl-kproxy-alpha"),
        ("apply", RB, "a2", "netctl-kproxy-alpha"),
    ]
    # Nothing changed: a second pass lists and writes nothing for the namespaces.
    h.writer.clear_calls()
    h.rbac.sync_namespace("a1")
    h.rbac.sync_namespace("plain")
    assert h.writer.writes() == []


def test_namespace_moving_between_tenants_moves_its_binding(h: Harness) -> None:
    for t in ("alpha", "beta"):
        h.rbac.sync_tenant(t, h.enqueue_ns)
    h.drain()
    h.writer.clear_calls()
    h.namespaces.put(ns("a2", "beta"))
    h.rbac.sync_namespace("a2")
    assert h.writer.writes() == [("apply", RB, "a2", "netctl-kproxy-beta"), ("delete", RB, "a2", "netctl-kproxy-alpha")]
    h.writer.clear_calls()
    h.namespaces.put(ns("a2", None))  # leaves every tenant
    h.rbac.sync_namespace("a2")
    assert h.writer.writes() == [("delete", RB, "a2", "netctl-kproxy-beta")]
    assert h.writer.names(RB) == {("a1", "netctl-kproxy-alpha"), ("b1", "netctl-kproxy-beta")}


def test_deleted_tenant_loses_account_bindings_and_rolebindings(h: Harness) -> None:
    for t in ("alpha", "beta"):
        h.rbac.sync_tenant(t, h.enqueue_ns)
    h.drain()
    h.namespaces.put(ns("plain", "beta"))  # labelled, its binding not made yet
    h.writer.put(managed_rb("beta", "elsewhere"))  # a namespace that no longer carries beta's label
    h.writer.clear_calls()
    h.tenants.remove("beta")
    h.rbac.sync_tenant("beta", h.enqueue_ns)
    assert sorted(h.keys) == ["rbac:b1", "rbac:elsewhere", "rbac:plain"]
    h.drain()
    assert sorted(h.writer.writes()) == sorted([
        ("delete", SA, "kube-system", "netctl-kproxy-beta"),
        ("delete", CRB, None, "netctl-kproxy-beta"),
        ("delete", RB, "b1", "netctl-kproxy-beta"),
        ("delete", RB, "elsewhere", "netctl-kproxy-beta"),
    ])
    assert h.writer.names(SA) == {("kube-system", "netctl-kproxy-alpha")}
    assert h.writer.names(CRB) == {(None, "netctl-kproxy-alpha")}
    assert h.writer.names(RB) == {("a1", "netctl-kproxy-alpha"), ("a2", "netctl-kproxy-alpha")}


def test_objects_of_that_name_not_ours_are_never_deleted(h: Harness) -> None:
    h.writer.put({"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "netctl-kproxy-gone", "namespace": "kube-system"}})  # fmt: skip
    h.rbac.sync_tenant("gone", h.enqueue_ns)
    h.drain()
    assert h.writer.writes() == []
    assert h.writer.names(SA) == {("kube-system", "netctl-kproxy-gone")}


def test_resync_lists_once_and_queues_only_what_is_out_of_step(h: Harness) -> None:
    for t in ("alpha", "beta"):
        h.rbac.sync_tenant(t, h.enqueue_ns)
    h.drain()
    h.writer.clear_calls()
    plan = h.rbac.resync(h.enqueue_ns, h.enqueue_tenant)
    assert plan.empty and h.keys == [] and h.writer.calls == [("list", None, None)]
    # Drift: someone deleted a binding, a namespace was relabelled while we were away,
    # and a deleted tenant left a binding behind.
    del h.writer.objects[(RB, "a1", "netctl-kproxy-alpha")]
    h.namespaces.put(ns("b1", "alpha"))
    h.writer.put(managed_rb("gamma", "g1"))
    h.writer.clear_calls()
    plan = h.rbac.resync(h.enqueue_ns, h.enqueue_tenant)
    assert plan.namespaces_to_sync == ("a1", "b1", "g1") and plan.stale_tenants == ("gamma",)
    assert h.writer.writes() == []  # the resync itself only queues keys
    h.drain()
    assert sorted(h.writer.writes()) == sorted([
        ("apply", RB, "a1", "netctl-kproxy-alpha"),
        ("apply", RB, "b1", "netctl-kproxy-alpha"),
        ("delete", RB, "b1", "netctl-kproxy-beta"),
        ("delete", RB, "g1", "netctl-kproxy-gamma"),
        # tenant:gamma: its account and CRB do not exist (get answers None), so no delete
    ])
    assert h.rbac.resync(h.enqueue_ns, h.enqueue_tenant).empty


def test_binding_with_another_roleref_is_recreated(h: Harness) -> None:
    wrong = managed_rb("alpha", "a1")
    wrong["roleRef"]["name"] = "view"
    h.writer.put(wrong)
    h.rbac.sync_namespace("a1")
    name = "netctl-kproxy-alpha"
    assert h.writer.writes() == [("apply", RB, "a1", name), ("delete", RB, "a1", name), ("apply", RB, "a1", name)]
    assert h.writer.objects[(RB, "a1", "netctl-kproxy-alpha")]["roleRef"]["name"] == "netctl-kproxy-services"


# ---- wiring: informer events -> keys -> handlers (the real Controller) -------------------------


def wait_for(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Wired:
    def __init__(self, ctl: Controller, lws: dict[str, MemListWatch], writer: FakeRbacWriter) -> None:
        self.ctl, self.lws, self.writer = ctl, lws, writer
        self.seen: list[tuple[str, Priority]] = []

    def drain(self, settle_s: float = 0.1) -> None:
        """Serve the queue on this thread until it stays empty for ``settle_s``."""
        while (item := self.ctl.queue.get(timeout=settle_s)) is not None:
            key, priority = item
            self.seen.append(item)
            try:
                self.ctl.handle(key, priority)
            finally:
                self.ctl.queue.done(key)


def wired_controller(monkeypatch: pytest.MonkeyPatch, manage: bool) -> Iterator[Wired]:
    lws = {
        "pods": MemListWatch(),
        "namespaces": MemListWatch([ns("a1", "alpha"), ns("b1", "beta"), ns("plain", None)]),
        "nodes": MemListWatch(),
        "tenants": MemListWatch([tenant("alpha"), tenant("beta")]),
    }
    monkeypatch.setattr(app, "ApiListWatch", lambda api, *, plural, **kw: lws[plural])
    writer = FakeRbacWriter()
    ctl = Controller(None, FakeIaaS(), FakeWriter(), FakeRecorder(), ControllerOptions(workers=1),
                     rbac_writer=writer if manage else None)  # fmt: skip
    try:
        ctl.start_informers(timeout=5)
        yield Wired(ctl, lws, writer)
    finally:
        ctl.stop()


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wired]:
    yield from wired_controller(monkeypatch, manage=True)


def test_controller_events_keep_bindings_in_step(wired: Wired) -> None:
    wait_for(lambda: len(wired.ctl.queue) >= 4, what="tenant and namespace keys")
    wired.drain()
    # No RBAC work ever jumps ahead of a new pod (ADD is for pods and tenants' networks).
    assert all(p != Priority.ADD for k, p in wired.seen if k.startswith("rbac"))
    w = wired.writer
    assert w.names(SA) == {("kube-system", "netctl-kproxy-alpha"), ("kube-system", "netctl-kproxy-beta")}
    assert w.names(RB) == {("a1", "netctl-kproxy-alpha"), ("b1", "netctl-kproxy-beta")}

    # Relabel b1: beta -> alpha; "plain" joins beta.
    wired.seen.clear()
    w.clear_calls()
    wired.lws["namespaces"].put(ns("b1", "alpha"))
    wired.lws["namespaces"].put(ns("plain", "beta"))
    wait_for(lambda: wired.ctl.namespaces.get("plain")["metadata"]["labels"], what="the relabel to arrive")
    wired.drain()
    assert ("rbac:b1", Priority.UPDATE) in wired.seen and ("rbac:plain", Priority.UPDATE) in wired.seen
    assert sorted(w.writes()) == sorted([
        ("apply", RB, "b1", "netctl-kproxy-alpha"), ("delete", RB, "b1", "netctl-kproxy-beta"),
        ("apply", RB, "plain", "netctl-kproxy-beta"),
    ])  # fmt: skip

    # Tenant beta deleted: account, CRB and every RoleBinding of it go.
    w.clear_calls()
    wired.lws["tenants"].delete("beta")
    wait_for(lambda: wired.ctl.tenants.get("beta") is None, what="the tenant delete to arrive")
    wired.drain()
    assert sorted(w.writes()) == sorted([
        ("delete", SA, "kube-system", "netctl-kproxy-beta"), ("delete", CRB, None, "netctl-kproxy-beta"),
        ("delete", RB, "plain", "netctl-kproxy-beta"),
    ])  # fmt: skip

    # The periodic SYNC queues one rbac-sync, which lists once and finds everything in step.
    w.clear_calls()
    wired.seen.clear()
    wired.ctl.queue.add(SYNC_KEY, Priority.SYNC)
    wired.drain()
    assert (RBAC_SYNC_KEY, Priority.SYNC) in wired.seen
    assert w.calls.count(("list", None, None)) == 1
    # tenant:alpha at SYNC re-applies (verifies) its account and CRB, but does not fan out.
    assert sorted(w.writes()) == [("apply", CRB, None, "netctl-kproxy-alpha"),
                                  ("apply", SA, "kube-system", "netctl-kproxy-alpha")]  # fmt: skip


def test_rbac_failure_does_not_hold_up_the_port_resync(wired: Wired) -> None:
    wait_for(lambda: len(wired.ctl.queue) >= 4, what="initial keys")
    wired.drain()

    def broken(*a: object, **kw: object) -> list:
        raise RuntimeError("403 forbidden")

    wired.writer.list_managed_role_bindings = broken  # type: ignore[method-assign]
    wired.ctl.handle(SYNC_KEY, Priority.SYNC)  # does not raise: RBAC has a key of its own
    with pytest.raises(RuntimeError):
        wired.ctl.handle(RBAC_SYNC_KEY, Priority.SYNC)  # retried with back-off by the workers


@pytest.fixture
def unmanaged(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wired]:
    yield from wired_controller(monkeypatch, manage=False)


def test_without_rbac_writer_no_rbac_keys_are_queued(unmanaged: Wired) -> None:
    wait_for(lambda: len(unmanaged.ctl.queue) >= 2, what="tenant keys")
    unmanaged.lws["namespaces"].put(ns("plain", "alpha"))
    unmanaged.ctl.queue.add(SYNC_KEY, Priority.SYNC)
    unmanaged.drain()
    assert not [k for k, _ in unmanaged.seen if k.startswith("rbac")]
    assert unmanaged.writer.calls == []
