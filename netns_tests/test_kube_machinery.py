"""netctl/kube against a real kube-apiserver 1.20: informer, leader election, events, the pod-annotation writer.

The unit tests prove the logic against fakes of our own protocols; these prove the protocols
match what the real API server does: list/watch wire format, paging and field selectors, watch
interruption, Lease optimistic concurrency, Event validation and merge patches, and the uid
precondition the controller relies on so it never annotates a re-created pod.

Not covered here: a real ``410 Gone``. A young 1.20 server's watch cache still reaches back to
its start (watching from resourceVersion 1 replays history) and it only drops events older than
75 s once more than 100 are buffered, so 410 cannot be provoked in test time; the unit tests
cover the relist on 410.

One control plane (etcd, API server, controller-manager, scheduler; no nodes) per module, on
127.0.0.1 with per-run ports and a per-run prefix; every object a test makes carries the prefix
and is deleted by the test. No timing is asserted tightly: upper bounds are sanity bounds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from netctl.kube import informer as informer_module
from netctl.kube.client import api_path, new_api_client, request_json
from netctl.kube.events import WARNING, ApiEventSink, EventRecorder
from netctl.kube.informer import ApiListWatch, Informer, key_of, resource_version_of
from netctl.kube.leader import ApiLeaseStore, LeaderElector
from netctl.kube.resources import KubeWriter
from netctl.lab.k8s import K8S_BINARIES, ControlPlane, k8s_bin_dirs
from netns_tests.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
log = logging.getLogger(__name__)

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
SANITY_S = 20.0  # generous upper bound for anything that should take a few seconds at most


# ---- fixtures ------------------------------------------------------------------------------------


def _require_control_plane_binaries() -> None:
    for b in K8S_BINARIES[:3]:  # kube-apiserver, kube-controller-manager, kube-scheduler
        if not any(os.access(d / b, os.X_OK) for d in k8s_bin_dirs()):
            pytest.skip(f"{b} not built: run tools/build-k8s.sh")


@pytest.fixture(scope="module")
def prefix() -> str:
    return "km" + secrets.token_hex(3)


@pytest.fixture(scope="module")
def control_plane(prefix: str) -> Iterator[ControlPlane]:
    """API server on loopback only; no RBAC files applied (every client here is admin)."""
    _require_control_plane_binaries()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    cp = ControlPlane(run_dir / "k8s", "127.0.0.1", prefix, rbac_dir=None)
    try:
        cp.start()
        yield cp
    finally:
        try:
            cp.stop()
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[k8s.ApiClient]:
    """Built by our own ``new_api_client`` from the admin kubeconfig."""
    client = new_api_client(str(control_plane.kubeconfig()), pool_maxsize=32)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def namespace(control_plane: ControlPlane, api: k8s.ApiClient, prefix: str) -> Iterator[str]:
    name = f"{prefix}-ns"
    request_json(api, "POST", api_path("", "v1", "namespaces"), body={"metadata": {"name": name}})
    try:
        control_plane.wait_service_account(name)  # pods are rejected until the default SA has a token
        yield name
    finally:
        with contextlib.suppress(k8s.ApiException):
            request_json(api, "DELETE", api_path("", "v1", "namespaces", None, name))


@pytest.fixture(scope="module")
def fake_node(api: k8s.ApiClient, prefix: str) -> Iterator[Obj]:
    """A Node object without a kubelet, so pods bound to it are not garbage-collected as orphans.

    Unschedulable, so the scheduler never places anything on it by itself.
    """
    name = f"{prefix}-n1"
    node = request_json(
        api,
        "POST",
        api_path("", "v1", "nodes"),
        body={"metadata": {"name": name, "labels": {"netctl.io/tenant": "alpha"}}, "spec": {"unschedulable": True}},
    )
    try:
        yield node
    finally:
        with contextlib.suppress(k8s.ApiException):
            request_json(api, "DELETE", api_path("", "v1", "nodes", None, name))


# ---- helpers -------------------------------------------------------------------------------------


class Seen:
    """Handler that records (kind, key, old rv, new rv) in delivery order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, str, str]] = []

    def on_add(self, obj: Obj) -> None:
        with self.lock:
            self.events.append(("add", key_of(obj), "", resource_version_of(obj)))

    def on_update(self, old: Obj, new: Obj) -> None:
        with self.lock:
            self.events.append(("update", key_of(new), resource_version_of(old), resource_version_of(new)))

    def on_delete(self, obj: Obj) -> None:
        with self.lock:
            self.events.append(("delete", key_of(obj), "", resource_version_of(obj)))

    def attach(self, informer: Informer) -> Seen:
        informer.add_handler(self.on_add, self.on_update, self.on_delete)
        return self

    def snapshot(self) -> list[tuple[str, str, str, str]]:
        with self.lock:
            return list(self.events)

    def brief(self) -> list[tuple[str, str]]:
        return [(k, key) for k, key, _, _ in self.snapshot()]


@contextlib.contextmanager
def running(informer: Informer) -> Iterator[Informer]:
    informer.start()
    try:
        assert informer.wait_for_sync(SANITY_S), f"{informer.name} did not sync"
        yield informer
    finally:
        informer.stop()


def rv_map(objs: list[Obj]) -> dict[str, str]:
    return {key_of(o): resource_version_of(o) for o in objs}


def pod_body(name: str, node: str | None) -> Obj:
    spec: Obj = {
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "c", "image": "netctl.io/never-pulled:1", "imagePullPolicy": "Never"}],
    }
    if node:
        spec["nodeName"] = node  # bound at create: no scheduler, no kubelet, stays Pending
    else:
        spec["nodeSelector"] = {"netctl.io/no-such-node": "true"}  # the scheduler can never place it
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def create(api: k8s.ApiClient, plural: str, namespace: str | None, body: Obj) -> Obj:
    return request_json(api, "POST", api_path("", "v1", plural, namespace), body=body)


def get(api: k8s.ApiClient, plural: str, namespace: str | None, name: str) -> Obj:
    return request_json(api, "GET", api_path("", "v1", plural, namespace, name))


def merge_patch(api: k8s.ApiClient, plural: str, namespace: str | None, name: str, patch: Obj) -> Obj:
    return request_json(api, "PATCH", api_path("", "v1", plural, namespace, name), body=patch, content_type=MERGE_PATCH)


def delete(api: k8s.ApiClient, plural: str, namespace: str | None, name: str, *, missing_ok: bool = False) -> None:
    try:
        request_json(
            api,
            "DELETE",
            api_path("", "v1", plural, namespace, name),
            query={"gracePeriodSeconds": 0},  # a pod bound to a node would otherwise wait for its kubelet
        )
    except k8s.ApiException as exc:
        if not (missing_ok and exc.status == 404):
            raise


def wait_gone(api: k8s.ApiClient, plural: str, namespace: str | None, name: str) -> None:
    def gone() -> bool:
        try:
            get(api, plural, namespace, name)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_for(gone, f"{plural} {namespace}/{name} deleted")


# ---- informer ------------------------------------------------------------------------------------


def test_pod_informer_with_a_field_selector(api: k8s.ApiClient, namespace: str, fake_node: Obj, prefix: str) -> None:
    node = fake_node["metadata"]["name"]
    ns = namespace
    on_node = f"spec.nodeName={node}"
    a, b, other = f"{prefix}-a", f"{prefix}-b", f"{prefix}-other"
    created: list[str] = []
    try:
        create(api, "pods", ns, pod_body(a, node))
        created.append(a)
        create(api, "pods", ns, pod_body(other, None))  # not on the node: the server must filter it out
        created.append(other)

        # cluster-wide, as the controller's per-node view would be: only the selector narrows it
        lw = ApiListWatch(api, plural="pods", field_selector=on_node)
        informer = Informer(lw, name="pods-on-node", watch_timeout_s=60)
        informer.add_indexer("node", lambda o: [o.get("spec", {}).get("nodeName") or ""])
        seen = Seen().attach(informer)
        with running(informer):
            assert sorted(o["metadata"]["name"] for o in informer.list()) == [a]
            cached = informer.get(f"{ns}/{a}")
            assert cached is not None
            assert (cached["apiVersion"], cached["kind"]) == ("v1", "Pod"), "listed items get apiVersion/kind"
            assert seen.brief() == [("add", f"{ns}/{a}")]

            create(api, "pods", ns, pod_body(b, node))
            created.append(b)
            merge_patch(api, "pods", ns, a, {"metadata": {"labels": {"step": "updated"}}})
            merge_patch(api, "pods", ns, other, {"metadata": {"labels": {"step": "ignored"}}})
            delete(api, "pods", ns, b)
            created.remove(b)
            wait_for(lambda: ("delete", f"{ns}/{b}") in seen.brief(), "the delete delivered")
            time.sleep(0.5)  # anything extra (e.g. the filtered-out pod) would arrive now

            brief = seen.brief()
            assert brief[:3] == [("add", f"{ns}/{a}"), ("add", f"{ns}/{b}"), ("update", f"{ns}/{a}")], brief
            # deleting a pod bound to a node (even with grace 0) first sets deletionTimestamp: MODIFIED, then DELETED
            assert brief[3:] in ([("delete", f"{ns}/{b}")], [("update", f"{ns}/{b}"), ("delete", f"{ns}/{b}")]), brief
            events = seen.snapshot()
            _, _, old_rv, new_rv = events[2]
            assert int(new_rv) > int(old_rv), "an update carries the old and the new object"
            rvs = [int(e[3]) for e in events[1:]]
            assert rvs == sorted(rvs), "watch events are delivered in resourceVersion order"

            cached = informer.get(f"{ns}/{a}")
            assert cached is not None and cached["metadata"]["labels"] == {"step": "updated"}
            assert cached["kind"] == "Pod", "watched objects carry their kind as well"
            assert [o["metadata"]["name"] for o in informer.by_index("node", node)] == [a]

            fresh, _ = ApiListWatch(api, plural="pods", field_selector=on_node).list()
            assert rv_map(informer.list()) == rv_map(fresh)
            everything, _ = ApiListWatch(api, plural="pods", namespace=ns).list()
            on_node_client_side = [o for o in everything if o["spec"].get("nodeName") == node]
            assert rv_map(fresh) == rv_map(on_node_client_side), "the server applied the field selector"
            assert {o["metadata"]["name"] for o in everything} == {a, other}
    finally:
        for name in created:
            delete(api, "pods", ns, name, missing_ok=True)


def test_configmap_informer_converges_after_stop_and_restart(
    api: k8s.ApiClient, namespace: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = namespace
    continued: list[str] = []  # list pages fetched with a continue token

    def counting(*args: Any, **kwargs: Any) -> Obj:
        if (kwargs.get("query") or {}).get("continue"):
            continued.append(args[2])
        return request_json(*args, **kwargs)

    monkeypatch.setattr(informer_module, "request_json", counting)
    names = [f"{prefix}-c{i}" for i in range(4)]
    created: set[str] = set()

    def cm(name: str, **data: str) -> Obj:
        return {"metadata": {"name": name, "labels": {"run": prefix}}, "data": dict(data)}

    def lw() -> ApiListWatch:
        # page_size 1 < the objects present at each (re)list: the continue-token path runs for real
        return ApiListWatch(api, plural="configmaps", namespace=ns, label_selector=f"run={prefix}", page_size=1)

    try:
        for name in names[:2]:
            create(api, "configmaps", ns, cm(name, v="1"))
            created.add(name)

        first = Informer(lw(), name="cm-1", watch_timeout_s=300)  # a long watch: stop() must interrupt it
        seen = Seen().attach(first)
        first.start()
        assert first.wait_for_sync(SANITY_S)
        create(api, "configmaps", ns, cm(names[2], v="1"))
        created.add(names[2])
        merge_patch(api, "configmaps", ns, names[0], {"data": {"v": "2"}})
        delete(api, "configmaps", ns, names[1])
        created.discard(names[1])
        wait_for(lambda: len(seen.snapshot()) >= 5, "5 events")
        assert seen.brief() == [
            ("add", f"{ns}/{names[0]}"),
            ("add", f"{ns}/{names[1]}"),
            ("add", f"{ns}/{names[2]}"),
            ("update", f"{ns}/{names[0]}"),
            ("delete", f"{ns}/{names[1]}"),
        ]
        fresh, _ = lw().list()
        assert rv_map(first.list()) == rv_map(fresh)
        assert continued, "the lists were expected to page (page_size 1)"

        t = time.monotonic()
        first.stop(timeout=SANITY_S)
        stop_s = time.monotonic() - t
        assert not any(th.is_alive() for th in first._threads), "stop() left a thread behind"
        assert stop_s < SANITY_S / 2, f"stop() took {stop_s:.1f} s: the blocked watch was not interrupted"
        log.info("informer stop() with a 300 s watch open took %.3f s", stop_s)
        delivered = len(seen.snapshot())

        # changes while no informer runs
        create(api, "configmaps", ns, cm(names[3], v="1"))
        created.add(names[3])
        merge_patch(api, "configmaps", ns, names[2], {"data": {"v": "2"}})
        delete(api, "configmaps", ns, names[0])
        created.discard(names[0])
        time.sleep(0.3)
        assert len(seen.snapshot()) == delivered, "a stopped informer must not deliver"

        second = Informer(lw(), name="cm-2", watch_timeout_s=300)
        seen2 = Seen().attach(second)
        with running(second):
            fresh, _ = lw().list()
            assert rv_map(second.list()) == rv_map(fresh)
            assert sorted(second.store.list_keys()) == [f"{ns}/{names[2]}", f"{ns}/{names[3]}"]
            assert second.get(f"{ns}/{names[2]}")["data"] == {"v": "2"}  # type: ignore[index]
            assert sorted(seen2.brief()) == [("add", f"{ns}/{names[2]}"), ("add", f"{ns}/{names[3]}")]
            # and it keeps following
            merge_patch(api, "configmaps", ns, names[3], {"data": {"v": "3"}})
            wait_for(lambda: ("update", f"{ns}/{names[3]}") in seen2.brief(), "update after restart")
            assert rv_map(second.list()) == rv_map(lw().list()[0])
    finally:
        for name in created:
            delete(api, "configmaps", ns, name, missing_ok=True)


# ---- leader election -----------------------------------------------------------------------------


class Candidate:
    def __init__(self, store: ApiLeaseStore, lease: str, ns: str, identity: str, durations: tuple[float, ...]):
        self.started = threading.Event()
        self.stopped = threading.Event()
        lease_s, renew_s, retry_s = durations
        self.elector = LeaderElector(
            store,
            name=lease,
            namespace=ns,
            identity=identity,
            lease_duration_s=lease_s,
            renew_deadline_s=renew_s,
            retry_period_s=retry_s,
            on_started_leading=self.started.set,
            on_stopped_leading=self.stopped.set,
        )


def _lease(api: k8s.ApiClient, ns: str, name: str) -> Obj:
    return request_json(api, "GET", api_path("coordination.k8s.io", "v1", "leases", ns, name))


def _micro(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f%z")


def _one_leader(cands: list[Candidate]) -> Candidate | None:
    leaders = [c for c in cands if c.elector.is_leader()]
    assert len(leaders) <= 1, f"two leaders at once: {[c.elector.identity for c in leaders]}"
    return leaders[0] if leaders else None


def _elect(store: ApiLeaseStore, lease: str, ns: str, prefix: str, durations: tuple[float, ...]) -> list[Candidate]:
    cands = [Candidate(store, lease, ns, f"{prefix}-{who}", durations) for who in ("x", "y")]
    for c in cands:
        c.elector.start()
    return cands


def test_two_electors_on_a_real_lease_fail_over_when_the_leader_dies(
    api: k8s.ApiClient, namespace: str, prefix: str
) -> None:
    ns, lease = namespace, f"{prefix}-lease-kill"
    durations = (3.0, 2.0, 0.5)
    cands = _elect(ApiLeaseStore(api), lease, ns, prefix, durations)
    try:
        leader = wait_for(lambda: _one_leader(cands), "a leader elected")
        follower = next(c for c in cands if c is not leader)
        # for a while (several renewals): exactly one leads, and it stays the same one
        until = time.monotonic() + 3 * durations[1]
        while time.monotonic() < until:
            assert _one_leader(cands) is leader
            time.sleep(0.02)
        assert leader.started.is_set() and not follower.started.is_set()
        before = _lease(api, ns, lease)["spec"]
        assert before["holderIdentity"] == leader.elector.identity
        assert before["leaseDurationSeconds"] == 3
        assert follower.elector.observed_holder == leader.elector.identity

        t = time.monotonic()
        leader.elector.stop(release=False)  # dies: no release, the lease must expire
        killed_at_renew = _lease(api, ns, lease)["spec"]["renewTime"]
        assert leader.stopped.is_set() and not leader.elector.is_leader()
        wait_for(lambda: _one_leader(cands) is follower, "the follower takes over")
        handover_s = time.monotonic() - t
        log.info("leader killed: handover after %.2f s (lease %.0f s, retry %.1f s)", handover_s, *durations[::2])
        assert handover_s < SANITY_S

        after = _lease(api, ns, lease)["spec"]
        assert after["holderIdentity"] == follower.elector.identity
        assert after["leaseTransitions"] == before["leaseTransitions"] + 1
        # safety, from the Lease's own timestamps (one machine, one clock): nobody took over before the
        # dead leader's last renewal had expired
        gap = (_micro(after["acquireTime"]) - _micro(killed_at_renew)).total_seconds()
        assert gap >= durations[0] - 0.25, f"taken over {gap:.2f} s after the last renewal"
        assert follower.started.is_set()
    finally:
        for c in cands:
            c.elector.stop(release=True)
        with contextlib.suppress(k8s.ApiException):
            request_json(api, "DELETE", api_path("coordination.k8s.io", "v1", "leases", ns, lease))


def test_release_hands_the_lease_over_at_once(api: k8s.ApiClient, namespace: str, prefix: str) -> None:
    """With a 30 s lease, a takeover well under 30 s can only come from the release."""
    ns, lease = namespace, f"{prefix}-lease-release"
    durations = (30.0, 20.0, 0.5)
    cands = _elect(ApiLeaseStore(api), lease, ns, prefix, durations)
    try:
        leader = wait_for(lambda: _one_leader(cands), "a leader elected")
        follower = next(c for c in cands if c is not leader)
        wait_for(lambda: follower.elector.observed_holder == leader.elector.identity, "follower saw the lease")
        transitions = _lease(api, ns, lease)["spec"]["leaseTransitions"]

        t = time.monotonic()
        leader.elector.stop(release=True)
        assert leader.stopped.is_set()
        wait_for(lambda: _one_leader(cands) is follower, "the follower takes over after the release")
        handover_s = time.monotonic() - t
        log.info("leader released: handover after %.2f s (lease %.0f s)", handover_s, durations[0])
        assert handover_s < durations[0] / 2, f"handover took {handover_s:.1f} s: the release was not honoured"
        spec = _lease(api, ns, lease)["spec"]
        assert spec["holderIdentity"] == follower.elector.identity
        assert spec["leaseDurationSeconds"] == 30, "the new holder restores its own duration"
        assert spec["leaseTransitions"] == transitions + 1
    finally:
        for c in cands:
            c.elector.stop(release=True)
        with contextlib.suppress(k8s.ApiException):
            request_json(api, "DELETE", api_path("coordination.k8s.io", "v1", "leases", ns, lease))
    assert _lease_gone_or_free(api, ns, lease)


def _lease_gone_or_free(api: k8s.ApiClient, ns: str, name: str) -> bool:
    try:
        return not _lease(api, ns, name)["spec"].get("holderIdentity")
    except k8s.ApiException as exc:
        return exc.status == 404


# ---- events --------------------------------------------------------------------------------------


def _events_about(api: k8s.ApiClient, ns: str, uid: str) -> list[Obj]:
    page = request_json(
        api, "GET", api_path("", "v1", "events", ns), query={"fieldSelector": f"involvedObject.uid={uid}"}
    )
    return list(page.get("items") or [])


def test_event_recorder_writes_real_events_and_aggregates(
    api: k8s.ApiClient, namespace: str, fake_node: Obj, prefix: str
) -> None:
    ns = namespace
    name = f"{prefix}-ev"
    pod = create(api, "pods", ns, pod_body(name, fake_node["metadata"]["name"]))
    uid = pod["metadata"]["uid"]
    recorder = EventRecorder(ApiEventSink(api), "netctl-controller", host=f"{prefix}-host")
    written: list[Obj] = []  # only ours are deleted afterwards
    try:
        for _ in range(3):
            recorder.record(pod, WARNING, "PortCreateFailed", "tenant alpha has no network yet")
        recorder.record(fake_node, "Normal", "NodeSeen", "node joined tenant alpha")  # cluster-scoped
        assert recorder.flush(SANITY_S)
        assert recorder.dropped == 0

        events = _events_about(api, ns, uid)
        written += events
        assert len(events) == 1, [e["metadata"]["name"] for e in events]
        ev = events[0]
        assert ev["involvedObject"]["kind"] == "Pod"
        assert ev["involvedObject"]["apiVersion"] == "v1"
        assert ev["involvedObject"]["name"] == name
        assert ev["involvedObject"]["namespace"] == ns
        assert ev["involvedObject"]["uid"] == uid
        assert (ev["type"], ev["reason"]) == ("Warning", "PortCreateFailed")
        assert ev["message"] == "tenant alpha has no network yet"
        assert ev["count"] == 3
        assert ev["source"] == {"component": "netctl-controller", "host": f"{prefix}-host"}
        assert ev["firstTimestamp"] <= ev["lastTimestamp"]

        node_events = [  # the controller-manager records its own (RegisteredNode) about the node
            e
            for e in _events_about(api, "default", fake_node["metadata"]["uid"])
            if e["source"].get("component") == "netctl-controller"
        ]
        written += node_events
        assert [(e["reason"], e["count"], e["involvedObject"]["kind"]) for e in node_events] == [
            ("NodeSeen", 1, "Node")
        ]
        assert "namespace" not in node_events[0]["involvedObject"]
    finally:
        recorder.stop()
        for e in written:
            with contextlib.suppress(k8s.ApiException):
                request_json(
                    api, "DELETE", api_path("", "v1", "events", e["metadata"]["namespace"], e["metadata"]["name"])
                )
        delete(api, "pods", ns, name, missing_ok=True)


# ---- the writer's uid precondition ---------------------------------------------------------------


def test_patch_pod_annotations_honours_the_uid_precondition(
    api: k8s.ApiClient, namespace: str, fake_node: Obj, prefix: str
) -> None:
    ns, name = namespace, f"{prefix}-uid"
    node = fake_node["metadata"]["name"]
    writer = KubeWriter(api)
    key = "netctl.io/port"
    try:
        first = create(api, "pods", ns, pod_body(name, node))
        uid = first["metadata"]["uid"]

        with pytest.raises(k8s.ApiException) as wrong:
            writer.patch_pod_annotations(ns, name, {key: '{"portId": "x"}'}, uid="00000000-0000-0000-0000-000000000000")
        # 1.20 answers 422 Invalid ("metadata.uid: field is immutable"), not 409 Conflict
        assert wrong.value.status == 422, (wrong.value.status, wrong.value.body)
        assert "metadata.uid" in str(wrong.value.body)
        assert key not in (get(api, "pods", ns, name)["metadata"].get("annotations") or {})

        writer.patch_pod_annotations(ns, name, {key: '{"portId": "pod-a"}'}, uid=uid)
        got = get(api, "pods", ns, name)
        assert got["metadata"]["annotations"][key] == '{"portId": "pod-a"}'
        assert got["metadata"]["uid"] == uid

        # the case the precondition exists for: the pod was deleted and re-created under the same name
        delete(api, "pods", ns, name)
        wait_gone(api, "pods", ns, name)
        second = create(api, "pods", ns, pod_body(name, node))
        assert second["metadata"]["uid"] != uid
        with pytest.raises(k8s.ApiException) as stale:
            writer.patch_pod_annotations(ns, name, {key: '{"portId": "pod-a"}'}, uid=uid)
        assert stale.value.status == 422, (stale.value.status, stale.value.body)
        assert key not in (get(api, "pods", ns, name)["metadata"].get("annotations") or {})

        # without a precondition it applies; None deletes the annotation again
        writer.patch_pod_annotations(ns, name, {key: '{"portId": "pod-b"}', "other": "kept"})
        writer.patch_pod_annotations(ns, name, {key: None}, uid=second["metadata"]["uid"])
        assert get(api, "pods", ns, name)["metadata"]["annotations"] == {"other": "kept"}
    finally:
        delete(api, "pods", ns, name, missing_ok=True)
