"""The informer against a fake ListWatch (our own protocol): list, watch, relist diffs, bookmarks, indexes."""

from __future__ import annotations

import copy
import queue
import threading
import time

import pytest
from kubernetes.client import ApiException

from netctl.kube.informer import Informer, ResourceExpired, key_of

END = object()  # ends the current watch stream, as a server-side timeout does


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return pred()


def pod(name, node="n1", ns="default"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": {"nodeName": node}}


class FakeListWatch:
    """A tiny API server: objects with resourceVersions, a watch stream fed by the test."""

    def __init__(self, *objs):
        self.lock = threading.Lock()
        self.rv = 10
        self.objects = {}
        self.events: queue.Queue = queue.Queue()
        self.list_calls = 0
        self.watch_calls: list[str] = []
        self.list_failures: list[Exception] = []
        self.interrupted = threading.Event()
        for obj in objs:
            self._store(obj)

    def _store(self, obj):
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key_of(obj)] = obj
        return copy.deepcopy(obj)

    # changes seen by the watch
    def create(self, obj):
        with self.lock:
            self.events.put({"type": "ADDED", "object": self._store(obj)})

    def modify(self, obj):
        with self.lock:
            self.events.put({"type": "MODIFIED", "object": self._store(obj)})

    def delete(self, key):
        with self.lock:
            self.rv += 1
            obj = self.objects.pop(key)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.events.put({"type": "DELETED", "object": obj})

    # changes made while "disconnected": no events
    def silently_store(self, obj):
        with self.lock:
            self._store(obj)

    def silently_delete(self, key):
        with self.lock:
            self.rv += 1
            del self.objects[key]

    # ListWatch protocol
    def list(self, resource_version=None):
        with self.lock:
            self.list_calls += 1
            if self.list_failures:
                raise self.list_failures.pop(0)
            return [copy.deepcopy(o) for o in self.objects.values()], str(self.rv)

    def watch(self, resource_version, timeout_seconds):
        self.watch_calls.append(resource_version)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline and not self.interrupted.is_set():
            try:
                item = self.events.get(timeout=0.005)
            except queue.Empty:
                continue
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def interrupt(self):
        self.interrupted.set()


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple] = []

    def on_add(self, obj):
        with self.lock:
            self.events.append(("add", key_of(obj)))

    def on_update(self, old, new):
        with self.lock:
            kind = "resync" if old is new else "update"
            self.events.append(
                (kind, key_of(new), old["metadata"].get("resourceVersion"), new["metadata"].get("resourceVersion"))
            )

    def on_delete(self, obj):
        with self.lock:
            self.events.append(("delete", key_of(obj)))

    def kinds(self, kind):
        with self.lock:
            return [e for e in self.events if e[0] == kind]

    def clear(self):
        with self.lock:
            self.events.clear()


@pytest.fixture
def make_informer():
    made = []

    def make(lw, **kwargs):
        kwargs.setdefault("watch_timeout_s", 5.0)
        kwargs.setdefault("backoff_base_s", 0.001)
        kwargs.setdefault("backoff_max_s", 0.01)
        inf = Informer(lw, name="test", **kwargs)
        rec = Recorder()
        inf.add_handler(rec.on_add, rec.on_update, rec.on_delete)
        made.append(inf)
        return inf, rec

    yield make
    for inf in made:
        inf.stop()


def test_initial_list_adds_everything_and_syncs(make_informer):
    lw = FakeListWatch(pod("a"), pod("b"))
    inf, rec = make_informer(lw)
    assert not inf.has_synced()
    inf.start()
    assert inf.wait_for_sync(10)
    assert sorted(rec.events) == [("add", "default/a"), ("add", "default/b")]
    assert sorted(key_of(o) for o in inf.list()) == ["default/a", "default/b"]
    assert inf.resource_version == str(lw.rv)
    assert wait_until(lambda: lw.watch_calls == [str(lw.rv)])


def test_watch_events_reach_cache_and_handlers(make_informer):
    lw = FakeListWatch(pod("a"))
    inf, rec = make_informer(lw)
    inf.start()
    assert inf.wait_for_sync(10)
    rec.clear()

    lw.create(pod("b"))
    lw.modify(pod("a", node="n2"))
    lw.delete("default/b")
    assert wait_until(lambda: len(rec.events) == 3)
    assert rec.events == [("add", "default/b"), ("update", "default/a", "11", "13"), ("delete", "default/b")]
    assert inf.get("default/a")["spec"]["nodeName"] == "n2"
    assert inf.get("default/b") is None
    assert inf.resource_version == "14"


@pytest.mark.parametrize(
    "gone",
    [
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}},
        ResourceExpired("too old"),
        ApiException(status=410, reason="Gone"),
    ],
    ids=["error-event", "resource-expired", "api-exception"],
)
def test_relist_after_410_emits_the_differences(make_informer, gone):
    lw = FakeListWatch(pod("gone"), pod("changed"), pod("same"))
    inf, rec = make_informer(lw)
    inf.start()
    assert inf.wait_for_sync(10)
    rec.clear()

    # while the watch is "down" the world moves on and no events reach us
    lw.silently_delete("default/gone")
    lw.silently_store(pod("changed", node="n9"))
    lw.silently_store(pod("new"))
    lw.events.put(gone)

    assert wait_until(lambda: lw.list_calls == 2 and len(rec.events) == 3)
    assert sorted(rec.events) == [
        ("add", "default/new"),
        ("delete", "default/gone"),  # the handler learns about the object that vanished
        ("update", "default/changed", "12", "15"),
    ]  # "same" did not change: no event
    assert sorted(key_of(o) for o in inf.list()) == ["default/changed", "default/new", "default/same"]
    assert wait_until(lambda: lw.watch_calls[-1] == "16")  # and it watches on from the new list


def test_bookmark_advances_resource_version_without_events(make_informer):
    lw = FakeListWatch(pod("a"))
    inf, rec = make_informer(lw)
    inf.start()
    assert inf.wait_for_sync(10)
    rec.clear()
    lw.events.put({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "500"}}})
    assert wait_until(lambda: inf.resource_version == "500")
    lw.events.put(END)  # the server times the watch out: re-watch from the bookmark, no relist
    assert wait_until(lambda: len(lw.watch_calls) == 2)
    assert lw.watch_calls == ["11", "500"]
    assert lw.list_calls == 1
    assert rec.events == []


def test_connection_errors_retry_with_backoff(make_informer):
    lw = FakeListWatch(pod("a"))
    lw.list_failures = [ConnectionError("refused"), OSError("reset")]
    inf, _rec = make_informer(lw)
    inf.start()
    assert inf.wait_for_sync(10)
    assert lw.list_calls == 3
    lw.events.put(ConnectionResetError("watch broke"))
    assert wait_until(lambda: len(lw.watch_calls) == 2)
    assert lw.watch_calls == ["11", "11"]  # a broken watch resumes from the last RV, without a relist
    assert lw.list_calls == 3
    lw.create(pod("b"))
    assert wait_until(lambda: inf.get("default/b") is not None)


def test_indexers_follow_adds_updates_and_deletes(make_informer):
    lw = FakeListWatch(pod("a", node="n1"), pod("b", node="n1"), pod("c", node="n2"))
    inf, _rec = make_informer(lw)
    inf.add_indexer("node", lambda o: [o["spec"]["nodeName"]])
    inf.start()
    assert inf.wait_for_sync(10)
    assert sorted(key_of(o) for o in inf.by_index("node", "n1")) == ["default/a", "default/b"]

    lw.modify(pod("b", node="n2"))
    lw.delete("default/c")
    assert wait_until(lambda: inf.get("default/c") is None)
    assert [key_of(o) for o in inf.by_index("node", "n1")] == ["default/a"]
    assert [key_of(o) for o in inf.by_index("node", "n2")] == ["default/b"]
    assert inf.store.index_values("node") == ["n1", "n2"]
    assert inf.by_index("node", "nowhere") == []
    # an indexer added later indexes what is already cached
    inf.add_indexer("ns", lambda o: [o["metadata"]["namespace"]])
    assert len(inf.by_index("ns", "default")) == 2
    with pytest.raises(KeyError):
        inf.by_index("nope", "x")


def test_resync_redelivers_every_object_as_update_with_old_is_new(make_informer):
    lw = FakeListWatch(pod("a"), pod("b"))
    inf, rec = make_informer(lw, resync_period_s=0.01)
    inf.start()
    assert inf.wait_for_sync(10)
    assert wait_until(lambda: {e[1] for e in rec.kinds("resync")} == {"default/a", "default/b"})
    assert rec.kinds("update") == []


def test_direct_resync_and_late_handler_gets_the_cache(make_informer):
    lw = FakeListWatch(pod("a"), pod("b"))
    inf, rec = make_informer(lw)
    inf.start()
    assert inf.wait_for_sync(10)
    rec.clear()
    inf.resync()
    assert sorted(e[:2] for e in rec.events) == [("resync", "default/a"), ("resync", "default/b")]

    late = Recorder()
    inf.add_handler(on_add=late.on_add)
    assert sorted(late.events) == [("add", "default/a"), ("add", "default/b")]


def test_a_failing_handler_does_not_stop_delivery(make_informer):
    lw = FakeListWatch()
    inf, rec = make_informer(lw)
    inf.add_handler(on_add=lambda obj: 1 / 0)
    inf.start()
    assert inf.wait_for_sync(10)
    lw.create(pod("a"))
    lw.create(pod("b"))
    assert wait_until(lambda: len(rec.kinds("add")) == 2)


def test_cluster_scoped_keys_and_stop(make_informer):
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}
    lw = FakeListWatch(node)
    inf, _rec = make_informer(lw)
    inf.start()
    assert inf.wait_for_sync(10)
    assert inf.get("n1")["kind"] == "Node"
    inf.stop()
    assert all(not t.is_alive() for t in inf._threads)
    lw.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}})
    time.sleep(0.02)
    assert inf.get("n2") is None
