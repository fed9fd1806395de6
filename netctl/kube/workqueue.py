"""A prioritised, de-duplicating, per-key serialised work queue with rate-limited retries.

Priorities exist so a periodic resync of thousands of objects never delays a new pod's network
(ADD > UPDATE > DELETE > SYNC). A key sits in the queue at most once, at the highest priority it
was asked for, and is never handed to two workers at once: work on one object is serialised
without the handlers needing locks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from enum import IntEnum

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Priority(IntEnum):
    """Higher value = handed out first."""

    SYNC = 0
    DELETE = 1
    UPDATE = 2
    ADD = 3


class _Metrics:
    """One set of metric families per registry; queues are told apart by the ``name`` label."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge(
            "netctl_workqueue_depth", "Keys waiting in the queue", ["name", "priority"], registry=registry
        )
        self.adds = Counter(
            "netctl_workqueue_adds",
            "Keys added (including de-duplicated ones)",
            ["name", "priority"],
            registry=registry,
        )
        self.retries = Counter("netctl_workqueue_retries", "Rate-limited re-adds", ["name"], registry=registry)
        self.drops = Counter(
            "netctl_workqueue_drops", "Keys dropped after too many retries", ["name"], registry=registry
        )
        self.latency = Histogram(
            "netctl_workqueue_queue_duration_seconds",
            "Time a key waited in the queue before a worker took it",
            ["name", "priority"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0),
        )
        self.work = Histogram(
            "netctl_workqueue_work_duration_seconds",
            "Time a handler spent on one key",
            ["name"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0),
        )


_metrics_lock = threading.Lock()
_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    with _metrics_lock:
        metrics = _metrics_by_registry.get(registry)
        if metrics is None:
            metrics = _metrics_by_registry[registry] = _Metrics(registry)
        return metrics


class WorkQueue:
    """Keys (strings) in, ``(key, priority)`` out; call ``done(key)`` when finished with one."""

    def __init__(
        self,
        name: str,
        *,
        base_delay_s: float = 0.005,
        max_delay_s: float = 60.0,
        max_retries: int | None = 15,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self._base = base_delay_s
        self._max = max_delay_s
        self._max_retries = max_retries
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # wakes workers waiting in get()
        self._delay_cond = threading.Condition(self._lock)  # wakes the timer thread
        self._seq = itertools.count()
        # ready heap of (-priority, seq, key); an entry is live only if _queued[key] has its seq
        self._heap: list[tuple[int, int, str]] = []
        self._queued: dict[str, tuple[Priority, int, float]] = {}  # key -> (priority, seq, enqueued at)
        self._processing: set[str] = set()
        self._readd: dict[str, tuple[Priority, float]] = {}  # added while processing: queue after done
        self._failures: dict[str, int] = {}
        # delayed adds: heap of (ready at, seq, key, priority), served by one timer thread
        self._delayed: list[tuple[float, int, str, Priority]] = []
        self._delay_thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._shutdown = False
        self._dropped = 0
        self._m = _metrics_for(registry if registry is not None else REGISTRY)
        self._depth = {p: self._m.depth.labels(name, p.name) for p in Priority}
        for gauge in self._depth.values():
            gauge.set(0)

    # -- adding --------------------------------------------------------------------------------

    def add(self, key: str, priority: Priority = Priority.UPDATE) -> None:
        """Queue ``key`` (no-op if already queued at this or a higher priority)."""
        with self._cond:
            self._add_locked(key, priority)

    def _add_locked(self, key: str, priority: Priority) -> None:
        if self._shutdown:
            return
        priority = Priority(priority)
        self._m.adds.labels(self.name, priority.name).inc()
        now = self._clock()
        if key in self._processing:
            prev = self._readd.get(key)
            if prev is None or prev[0] < priority:
                self._readd[key] = (priority, prev[1] if prev else now)
            return
        queued = self._queued.get(key)
        if queued is not None:
            if queued[0] >= priority:
                return
            self._depth[queued[0]].dec()
            now = queued[2]  # latency counts from the first add
        self._push_locked(key, priority, now)

    def _push_locked(self, key: str, priority: Priority, enqueued_at: float) -> None:
        seq = next(self._seq)
        self._queued[key] = (priority, seq, enqueued_at)
        heapq.heappush(self._heap, (-priority, seq, key))
        self._depth[priority].inc()
        self._cond.notify()

    def add_after(self, key: str, delay_s: float, priority: Priority = Priority.UPDATE) -> None:
        """Queue ``key`` once ``delay_s`` has passed."""
        if delay_s <= 0:
            self.add(key, priority)
            return
        with self._cond:
            if self._shutdown:
                return
            heapq.heappush(self._delayed, (self._clock() + delay_s, next(self._seq), key, Priority(priority)))
            if self._delay_thread is None:
                self._delay_thread = threading.Thread(target=self._delay_loop, name=f"{self.name}-delay", daemon=True)
                self._delay_thread.start()
            self._delay_cond.notify()

    def add_rate_limited(self, key: str, priority: Priority = Priority.UPDATE) -> float | None:
        """Retry ``key`` after an exponentially growing delay; returns it, or None if the key was dropped."""
        with self._cond:
            failures = self._failures.get(key, 0)
            if self._max_retries is not None and failures >= self._max_retries:
                self._failures.pop(key, None)
                self._dropped += 1
                self._m.drops.labels(self.name).inc()
                log.error("%s: dropping %s after %d retries", self.name, key, failures)
                return None
            self._failures[key] = failures + 1
            delay = self.backoff(failures)
        self._m.retries.labels(self.name).inc()
        self.add_after(key, delay, priority)
        return delay

    def backoff(self, failures: int) -> float:
        """Delay before retry number ``failures + 1``: base * 2**failures, capped."""
        if failures >= 64:
            return self._max
        return float(min(self._max, self._base * (2**failures)))

    def forget(self, key: str) -> None:
        """Reset the retry count of ``key`` (call after it succeeded)."""
        with self._cond:
            self._failures.pop(key, None)

    def num_requeues(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    @property
    def dropped(self) -> int:
        with self._cond:
            return self._dropped

    def waiting(self) -> list[str]:
        """Snapshot of the keys waiting (ready or delayed), for status and tests."""
        with self._cond:
            return list(self._queued)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queued)

    # -- taking --------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> tuple[str, Priority] | None:
        """Next key at the highest priority, or None on shutdown/timeout. Caller must ``done(key)``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                while self._heap:
                    _, seq, key = heapq.heappop(self._heap)
                    queued = self._queued.get(key)
                    if queued is None or queued[1] != seq:
                        continue  # superseded by a higher-priority entry
                    del self._queued[key]
                    priority, _, enqueued_at = queued
                    self._depth[priority].dec()
                    self._processing.add(key)
                    self._m.latency.labels(self.name, priority.name).observe(max(0.0, self._clock() - enqueued_at))
                    return key, priority
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def done(self, key: str) -> None:
        """Finish processing ``key``; if it was re-added meanwhile it is queued again now."""
        with self._cond:
            self._processing.discard(key)
            readd = self._readd.pop(key, None)
            if readd is not None and not self._shutdown:
                self._push_locked(key, readd[0], readd[1])

    # -- workers -------------------------------------------------------------------------------

    def run_workers(self, n: int, handler: Callable[[str, Priority], None]) -> list[threading.Thread]:
        """Start ``n`` daemon threads calling ``handler(key, priority)``; raising = retry with back-off."""
        threads = [
            threading.Thread(target=self._worker, args=(handler,), name=f"{self.name}-worker-{i}", daemon=True)
            for i in range(n)
        ]
        # Started under the lock: a concurrent shutdown() must never see (and join) an unstarted one.
        with self._cond:
            if self._shutdown:
                return []
            for t in threads:
                t.start()
            self._workers.extend(threads)
        return threads

    def _worker(self, handler: Callable[[str, Priority], None]) -> None:
        while True:
            item = self.get()
            if item is None:
                return
            key, priority = item
            started = time.monotonic()
            try:
                handler(key, priority)
            except Exception:
                log.exception("%s: handling %s failed", self.name, key)
                self.add_rate_limited(key, priority)
            else:
                self.forget(key)
            finally:
                self._m.work.labels(self.name).observe(time.monotonic() - started)
                self.done(key)

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop handing out keys (queued ones are discarded) and wait for running handlers."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
            self._delay_cond.notify_all()
            workers = list(self._workers)
            delay_thread = self._delay_thread
        for t in [*workers, *([delay_thread] if delay_thread else [])]:
            if t is not threading.current_thread():
                t.join(timeout)

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutdown

    # -- delayed adds --------------------------------------------------------------------------

    def _delay_loop(self) -> None:
        with self._cond:
            while not self._shutdown:
                now = self._clock()
                while self._delayed and self._delayed[0][0] <= now:
                    _, _, key, priority = heapq.heappop(self._delayed)
                    self._add_locked(key, priority)
                # bounded wait so an injected (non-wall) clock is re-read now and then
                self._delay_cond.wait(min(self._delayed[0][0] - now, 1.0) if self._delayed else None)
