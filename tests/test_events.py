"""EventRecorder against a fake EventSink (our own protocol): fields, aggregation, failure isolation, overflow."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime, timedelta

import pytest

from netctl.kube.events import MAX_MESSAGE, NORMAL, WARNING, EventRecorder, NotFound

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


class FakeSink:
    """Stores Events by (namespace, name); merge-patch of top-level keys; can fail or block on demand."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple] = []
        self.fail_create: list[BaseException] = []
        self.fail_patch: list[BaseException] = []
        self.gate: threading.Event | None = None  # when set up, every call waits for it
        self.entered = threading.Event()

    def _maybe_block(self):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test never opened the gate"

    def create(self, namespace, event):
        self._maybe_block()
        with self.lock:
            self.calls.append(("create", namespace, event["metadata"]["name"]))
            if self.fail_create:
                raise self.fail_create.pop(0)
            assert event["metadata"]["namespace"] == namespace
            key = (namespace, event["metadata"]["name"])
            assert key not in self.events, "duplicate Event name"
            self.events[key] = copy.deepcopy(event)
            return copy.deepcopy(event)

    def patch(self, namespace, name, patch):
        self._maybe_block()
        with self.lock:
            self.calls.append(("patch", namespace, name, copy.deepcopy(patch)))
            if self.fail_patch:
                raise self.fail_patch.pop(0)
            if (namespace, name) not in self.events:
                raise NotFound(name)
            self.events[(namespace, name)].update(patch)
            return copy.deepcopy(self.events[(namespace, name)])

    def only(self):
        with self.lock:
            assert len(self.events) == 1, self.events
            return next(iter(self.events.values()))

    def kinds(self):
        with self.lock:
            return [c[0] for c in self.calls]


class Clocks:
    """A monotonic clock and a wall clock the test moves together."""

    def __init__(self):
        self.mono = 1000.0
        self.wall = T0

    def advance(self, seconds):
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


def pod(name="web-1", ns="team-a", uid="0b6c5b5e-1111-2222-3333-444455556666"):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "42"},
        "spec": {"nodeName": "n1"},
    }


def node(name="n1", uid="9e1f0000-aaaa-bbbb-cccc-ddddeeeeffff"):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": uid}}


def tenant(name="alpha"):
    return {"apiVersion": "netctl.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name, "uid": "t-uid-1"}}


@pytest.fixture
def clocks():
    return Clocks()


@pytest.fixture
def make_recorder(clocks):
    made = []

    def make(sink, **kwargs):
        kwargs.setdefault("clock", lambda: clocks.mono)
        kwargs.setdefault("wall_clock", lambda: clocks.wall)
        rec = EventRecorder(sink, "netctl-controller", "node-a", **kwargs)
        made.append((rec, sink))
        return rec

    yield make
    for rec, sink in made:
        if sink.gate is not None:
            sink.gate.set()
        rec.stop(timeout=5)


def test_event_carries_the_involved_object_and_source(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record(pod(), WARNING, "PortCreateFailed", "neutron said no")
    assert rec.flush()

    (ns, name), ev = next(iter(sink.events.items()))
    assert ns == "team-a"
    assert name.startswith("web-1.") and len(name) > len("web-1.")
    assert ev["apiVersion"] == "v1" and ev["kind"] == "Event"
    assert ev["metadata"] == {"name": name, "namespace": "team-a"}
    assert ev["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "web-1",
        "namespace": "team-a",
        "uid": "0b6c5b5e-1111-2222-3333-444455556666",
    }
    assert (ev["type"], ev["reason"], ev["message"]) == (WARNING, "PortCreateFailed", "neutron said no")
    assert ev["source"] == {"component": "netctl-controller", "host": "node-a"}
    assert ev["reportingComponent"] == "netctl-controller"
    assert ev["reportingInstance"] == "node-a"
    assert ev["count"] == 1
    assert ev["firstTimestamp"] == ev["lastTimestamp"] == "2024-05-01T12:00:00Z"


def test_event_without_host_and_for_a_custom_resource(clocks):
    sink = FakeSink()
    rec = EventRecorder(sink, "netctl-lb", clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    try:
        rec.record(tenant(), NORMAL, "NetworkReady", "network netctl-alpha ready")
        assert rec.flush()
    finally:
        rec.stop()
    ev = sink.only()
    assert ev["source"] == {"component": "netctl-lb"}
    assert ev["reportingInstance"] == "netctl-lb"
    assert ev["involvedObject"] == {
        "apiVersion": "netctl.io/v1alpha1",
        "kind": "Tenant",
        "name": "alpha",
        "uid": "t-uid-1",
    }


@pytest.mark.parametrize("obj", [node(), tenant()], ids=["node", "tenant"])
def test_cluster_scoped_objects_record_into_default(make_recorder, obj):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record(obj, NORMAL, "Seen", "hello")
    assert rec.flush()
    ((ns, _name),) = sink.events
    assert ns == "default"
    ev = sink.only()
    assert ev["metadata"]["namespace"] == "default"
    assert "namespace" not in ev["involvedObject"], "a cluster-scoped object has no namespace to report"


def test_repeats_within_the_window_patch_count_and_last_timestamp(make_recorder, clocks):
    sink = FakeSink()
    rec = make_recorder(sink, window_s=600)
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    assert rec.flush()
    (key,) = sink.events
    for _ in range(3):
        clocks.advance(10)
        rec.record(pod(), WARNING, "CNIFailed", "no port")
    assert rec.flush()

    assert sink.kinds() == ["create", "patch", "patch", "patch"]
    patches = [c[3] for c in sink.calls if c[0] == "patch"]
    assert [p["count"] for p in patches] == [2, 3, 4]
    assert [p["lastTimestamp"] for p in patches] == [
        "2024-05-01T12:00:10Z",
        "2024-05-01T12:00:20Z",
        "2024-05-01T12:00:30Z",
    ]
    assert all(set(p) == {"count", "lastTimestamp"} for p in patches), "a patch touches only what changes"
    assert all(c[1:3] == key for c in sink.calls)
    ev = sink.only()
    assert ev["count"] == 4
    assert ev["firstTimestamp"] == "2024-05-01T12:00:00Z"
    assert ev["lastTimestamp"] == "2024-05-01T12:00:30Z"


def test_different_events_are_not_aggregated(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    rec.record(pod(), WARNING, "CNIFailed", "another message")  # message differs
    rec.record(pod(), WARNING, "Other", "no port")  # reason differs
    rec.record(pod(), NORMAL, "CNIFailed", "no port")  # type differs
    rec.record(pod(name="web-2", uid="u2"), WARNING, "CNIFailed", "no port")  # object differs
    rec.record(pod(uid="recreated"), WARNING, "CNIFailed", "no port")  # same name, re-created pod
    rec.record(pod(ns="team-b"), WARNING, "CNIFailed", "no port")  # namespace differs
    assert rec.flush()
    assert sink.kinds() == ["create"] * 7
    assert len(sink.events) == 7


def test_a_repeat_after_the_window_starts_a_new_event(make_recorder, clocks):
    sink = FakeSink()
    rec = make_recorder(sink, window_s=60)
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    assert rec.flush()
    clocks.advance(30)
    rec.record(pod(), WARNING, "CNIFailed", "no port")  # within: aggregated, and the window restarts
    assert rec.flush()
    clocks.advance(59)
    rec.record(pod(), WARNING, "CNIFailed", "no port")  # still within 60 s of the last repeat
    assert rec.flush()
    clocks.advance(61)
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    assert rec.flush()
    assert sink.kinds() == ["create", "patch", "patch", "create"]
    counts = sorted(e["count"] for e in sink.events.values())
    assert counts == [1, 3]


def test_a_repeat_of_an_expired_event_creates_it_again(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    assert rec.flush()
    sink.events.clear()  # the API server's event TTL removed it
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    rec.record(pod(), WARNING, "CNIFailed", "no port")
    assert rec.flush()
    assert sink.kinds() == ["create", "patch", "create", "patch"]
    assert sink.only()["count"] == 2


def test_long_messages_are_truncated(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record(pod(), WARNING, "Long", "x" * (MAX_MESSAGE * 3))
    assert rec.flush()
    msg = sink.only()["message"]
    assert len(msg) == MAX_MESSAGE
    assert msg.endswith("...")


@pytest.mark.parametrize("where", ["create", "patch"])
def test_a_failing_sink_never_reaches_the_caller(make_recorder, where, caplog):
    sink = FakeSink()
    rec = make_recorder(sink)
    if where == "patch":
        rec.record(pod(), WARNING, "R", "m")
        assert rec.flush()
        sink.fail_patch.append(RuntimeError("apiserver on fire"))
    else:
        sink.fail_create.append(RuntimeError("apiserver on fire"))
    rec.record(pod(), WARNING, "R", "m")  # must not raise
    assert rec.flush()
    assert "apiserver on fire" in caplog.text
    # the writer thread survived and keeps writing
    rec.record(node(), NORMAL, "After", "still alive")
    assert rec.flush()
    assert any(e["reason"] == "After" for e in sink.events.values())


def test_consecutive_sink_failures_each_cost_only_their_own_event(make_recorder):
    class Weird(Exception):
        pass

    sink = FakeSink()
    sink.fail_create.extend([Weird("x"), ValueError("y"), TimeoutError("z")])
    rec = make_recorder(sink)
    for i in range(4):
        rec.record(pod(name=f"p{i}", uid=f"u{i}"), NORMAL, "R", "m")
    assert rec.flush()
    assert len(sink.events) == 1  # the fourth got through


def test_record_does_not_raise_on_a_malformed_object(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record({"metadata": None}, NORMAL, "R", "m")
    rec.record("not even a dict", NORMAL, "R", "m")
    assert rec.flush()
    rec.record(pod(), NORMAL, "R", "m")
    assert rec.flush()
    assert any(e["involvedObject"].get("name") == "web-1" for e in sink.events.values())


def test_record_only_queues_and_overflow_is_counted(make_recorder):
    sink = FakeSink()
    sink.gate = threading.Event()
    rec = make_recorder(sink, max_queue=3)
    rec.record(pod(name="first", uid="u0"), NORMAL, "R", "m")
    assert sink.entered.wait(5), "the writer never picked up the first event"
    # the writer is stuck in the sink: the queue (3) fills, the rest is dropped, record() never blocks
    for i in range(1, 9):
        rec.record(pod(name=f"p{i}", uid=f"u{i}"), NORMAL, "R", "m")
    assert rec.dropped == 5
    assert rec.flush(timeout=0.2) is False, "flush must report events still pending"
    sink.gate.set()
    assert rec.flush()
    names = sorted(e["involvedObject"]["name"] for e in sink.events.values())
    assert names == ["first", "p1", "p2", "p3"]
    assert rec.dropped == 5


def test_flush_with_nothing_recorded_returns_at_once(make_recorder):
    rec = make_recorder(FakeSink())
    assert rec.flush(timeout=0.5) is True


def test_stop_writes_what_was_queued_and_ends_the_thread(make_recorder):
    sink = FakeSink()
    sink.gate = threading.Event()
    rec = make_recorder(sink)
    for i in range(5):
        rec.record(pod(name=f"p{i}", uid=f"u{i}"), NORMAL, "R", "m")
    thread = rec._thread
    assert thread is not None and thread.is_alive()
    sink.gate.set()
    rec.stop(timeout=5)
    assert not thread.is_alive()
    assert len(sink.events) == 5


def test_stop_without_any_event_is_a_no_op():
    rec = EventRecorder(FakeSink(), "c")
    rec.stop(timeout=1)
    rec.stop(timeout=1)


def test_record_after_stop_drops_and_does_not_block_flush(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink)
    rec.record(pod(), NORMAL, "Before", "m")
    rec.stop(timeout=5)
    rec.record(pod(), NORMAL, "After", "m")  # must not raise nor queue for a writer that is gone
    assert rec.dropped == 1
    assert rec.flush(timeout=0.5) is True
    assert [e["reason"] for e in sink.events.values()] == ["Before"]


def test_record_from_many_threads_aggregates_exactly(make_recorder):
    sink = FakeSink()
    rec = make_recorder(sink, max_queue=10_000)

    def burst():
        for _ in range(50):
            rec.record(pod(), WARNING, "Flap", "again")

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.flush()
    assert rec.dropped == 0
    assert sink.only()["count"] == 400
    assert sink.kinds().count("create") == 1
