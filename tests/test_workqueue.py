"""The prioritised work queue: ordering, de-duplication, per-key serialisation, retries, shutdown."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import pytest
from prometheus_client import CollectorRegistry

from netctl.kube.workqueue import Priority, WorkQueue


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return pred()


def metric(registry, sample, **labels):
    value = registry.get_sample_value(sample, labels)
    return 0.0 if value is None else value


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def queue(registry):
    q = WorkQueue("test", registry=registry, base_delay_s=0.001, max_delay_s=0.01)
    yield q
    q.shutdown()


def drain(q):
    out = []
    while (item := q.get(timeout=0)) is not None:
        out.append(item)
        q.done(item[0])
    return out


def test_priorities_order_add_update_delete_sync(queue):
    queue.add("s", Priority.SYNC)
    queue.add("d", Priority.DELETE)
    queue.add("u1", Priority.UPDATE)
    queue.add("a", Priority.ADD)
    queue.add("u2", Priority.UPDATE)
    assert drain(queue) == [
        ("a", Priority.ADD),
        ("u1", Priority.UPDATE),  # FIFO within one priority
        ("u2", Priority.UPDATE),
        ("d", Priority.DELETE),
        ("s", Priority.SYNC),
    ]


def test_duplicate_key_is_processed_once_at_highest_priority(queue, registry):
    queue.add("k", Priority.SYNC)
    queue.add("other", Priority.UPDATE)
    queue.add("k", Priority.ADD)
    queue.add("k", Priority.DELETE)  # lower than ADD: no change
    assert len(queue) == 2
    assert metric(registry, "netctl_workqueue_depth", name="test", priority="ADD") == 1
    assert metric(registry, "netctl_workqueue_depth", name="test", priority="SYNC") == 0
    assert drain(queue) == [("k", Priority.ADD), ("other", Priority.UPDATE)]
    assert len(queue) == 0
    assert metric(registry, "netctl_workqueue_adds_total", name="test", priority="SYNC") == 1
    assert metric(registry, "netctl_workqueue_adds_total", name="test", priority="ADD") == 1


def test_key_re_added_while_processing_waits_for_done(queue):
    queue.add("k", Priority.UPDATE)
    assert queue.get(timeout=0) == ("k", Priority.UPDATE)
    queue.add("k", Priority.SYNC)
    queue.add("k", Priority.DELETE)
    assert queue.get(timeout=0) is None  # never handed to a second worker
    queue.done("k")
    assert queue.get(timeout=0) == ("k", Priority.DELETE)  # once, at the highest priority asked for
    queue.done("k")
    assert queue.get(timeout=0) is None


def test_per_key_serialisation_under_several_workers(queue):
    lock = threading.Lock()
    active: Counter[str] = Counter()
    overlaps = []
    processed: Counter[str] = Counter()

    def handler(key, _priority):
        with lock:
            active[key] += 1
            if active[key] > 1:
                overlaps.append(key)
        time.sleep(0.0005)
        with lock:
            active[key] -= 1
            processed[key] += 1

    queue.run_workers(8, handler)
    keys = [f"k{i}" for i in range(5)]
    for round_ in range(200):
        for key in keys:
            queue.add(key, Priority(round_ % 4))
    assert wait_until(lambda: len(queue) == 0 and sum(active.values()) == 0 and all(processed[k] for k in keys))
    # every key was re-added while being processed many times; still never two workers on one key
    assert overlaps == []
    assert set(processed) == set(keys)


def test_backoff_grows_exponentially_and_is_capped(registry):
    q = WorkQueue("bo", registry=registry, base_delay_s=0.5, max_delay_s=3.0, max_retries=None)
    try:
        delays = [q.add_rate_limited("k") for _ in range(6)]
        assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
        assert q.num_requeues("k") == 6
        assert q.add_rate_limited("other") == 0.5  # per key
        q.forget("k")
        assert q.num_requeues("k") == 0
        assert q.add_rate_limited("k") == 0.5
        assert metric(registry, "netctl_workqueue_retries_total", name="bo") == 8
        assert q.backoff(1000) == 3.0
    finally:
        q.shutdown()


def test_failed_handler_is_retried_then_forgotten_on_success(queue, registry):
    calls: Counter[str] = Counter()
    succeeded = threading.Event()

    def handler(key, priority):
        calls[key] += 1
        assert priority == Priority.ADD  # a retry keeps the priority it failed at
        if calls[key] < 3:
            raise RuntimeError("transient")
        succeeded.set()

    queue.add("k", Priority.ADD)
    queue.run_workers(2, handler)
    assert succeeded.wait(10)
    assert wait_until(lambda: queue.num_requeues("k") == 0)
    assert calls["k"] == 3
    assert metric(registry, "netctl_workqueue_retries_total", name="test") == 2
    assert metric(registry, "netctl_workqueue_work_duration_seconds_count", name="test") == 3


def test_key_dropped_after_max_retries(registry):
    q = WorkQueue("drop", registry=registry, base_delay_s=0.001, max_delay_s=0.002, max_retries=2)
    calls: Counter[str] = Counter()
    try:
        q.add("bad", Priority.UPDATE)

        def always_fails(key: str, _priority: Priority) -> None:
            calls.update([key])
            raise RuntimeError("permanent")

        q.run_workers(1, always_fails)
        assert wait_until(lambda: q.dropped == 1)
        assert calls["bad"] == 3  # first try + 2 retries
        assert metric(registry, "netctl_workqueue_drops_total", name="drop") == 1
        assert q.num_requeues("bad") == 0
        assert wait_until(lambda: len(q) == 0)
    finally:
        q.shutdown()


def test_add_after_delivers_later(queue):
    queue.add_after("later", 0.01, Priority.ADD)
    assert queue.get(timeout=5) == ("later", Priority.ADD)


def test_queue_latency_uses_injected_clock(registry):
    now = [100.0]
    q = WorkQueue("lat", registry=registry, clock=lambda: now[0])
    q.add("k", Priority.SYNC)
    now[0] += 4.0
    q.add("k", Priority.ADD)  # upgrade keeps the original enqueue time
    now[0] += 1.0
    assert q.get(timeout=0) == ("k", Priority.ADD)
    assert metric(registry, "netctl_workqueue_queue_duration_seconds_sum", name="lat", priority="ADD") == 5.0
    q.shutdown()


def test_two_queues_share_a_registry(registry):
    a = WorkQueue("a", registry=registry)
    b = WorkQueue("b", registry=registry)
    a.add("x", Priority.ADD)
    b.add("y", Priority.SYNC)
    assert metric(registry, "netctl_workqueue_depth", name="a", priority="ADD") == 1
    assert metric(registry, "netctl_workqueue_depth", name="b", priority="SYNC") == 1
    a.shutdown()
    b.shutdown()


def test_shutdown_stops_workers_and_ignores_new_adds(registry):
    q = WorkQueue("sd", registry=registry)
    started = threading.Event()
    release = threading.Event()
    seen: defaultdict[str, int] = defaultdict(int)

    def handler(key, _p):
        seen[key] += 1
        started.set()
        release.wait(10)

    threads = q.run_workers(3, handler)
    q.add("busy")
    assert started.wait(10)
    stopper = threading.Thread(target=q.shutdown)
    stopper.start()
    assert wait_until(lambda: q.shutting_down)
    q.add("late")
    assert q.get(timeout=0) is None
    release.set()  # shutdown waits for the running handler
    stopper.join(10)
    assert not stopper.is_alive()
    assert all(not t.is_alive() for t in threads)
    assert dict(seen) == {"busy": 1}
