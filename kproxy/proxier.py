"""The sync logic: tracker -> renderer -> backend, one transaction per sync, under one lock.

Full or partial is decided once, at the top of ``sync()``: full at start, after any failed
transaction, and after ``verify()`` found drift (our table flushed or edited by someone else);
partial otherwise. A partial sync renders only the service ports the tracker reports changed and
diffs their elements against ``_mirror`` — what this process last put into the kernel for each
service port — so one Service change touches only that Service's elements.

Event handlers (``on_service``/``on_slice``) only update the tracker and poke the scheduler.
Nothing is written before ``mark_initialized()`` (informers synced), so a restart never programs
a half-listed world. ``SyncScheduler`` is the pure rate limiter (min period between syncs, any
burst of pokes inside it coalesced into one sync; periodic verification); ``SyncLoop`` is the
thread that follows it.

Not here (next slice): informers, NodePort/affinity/Local policies, UDP conntrack cleanup.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kproxy.model import ServicePortName
from kproxy.nft import Backend, BackendError
from kproxy.render import Elements, RenderConfig, count_elements, element_diff, full_script, service_elements, skeleton
from kproxy.tracker import ChangeTracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    mode: str  # "full" | "partial" | "skipped"
    changed: int = 0  # service ports rendered
    error: str | None = None
    seconds: float = 0.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "kproxy_sync_duration_seconds", "Time to render and apply one sync", ["mode"], registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.errors = Counter("kproxy_sync_errors_total", "Syncs whose transaction failed", ["mode"], registry=registry)
        self.drift = Counter(
            "kproxy_drift_detected_total", "Verifications that found our table changed", registry=registry
        )
        self.rules = Gauge("kproxy_rules", "Rules in our table (constant: no per-service chains)", registry=registry)
        self.elements = Gauge("kproxy_elements", "Map and set elements in our table", registry=registry)
        self.service_ports = Gauge("kproxy_service_ports", "Service ports programmed", registry=registry)
        self.last_success = Gauge(
            "kproxy_last_successful_sync_timestamp_seconds", "Unix time of the last successful sync", registry=registry
        )


class Proxier:
    def __init__(
        self,
        backend: Backend,
        cfg: RenderConfig | None = None,
        *,
        proxy_name: str | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self.cfg = cfg or RenderConfig()
        self.tracker = ChangeTracker(proxy_name)
        self.metrics = Metrics(registry or CollectorRegistry())
        self._clock, self._wall = clock, wall_clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._mirror: dict[ServicePortName, Elements] = {}
        self._elements = 0
        self._need_full = True
        self._initialized = False
        self.last_success: float | None = None  # monotonic

    # -- event side (cheap) -----------------------------------------------------------------
    def on_service(self, obj: Mapping[str, Any], *, deleted: bool = False) -> None:
        with self._lock:
            changed = self.tracker.update_service(obj, deleted=deleted)
        if changed and self._on_change:
            self._on_change()

    def on_slice(self, obj: Mapping[str, Any], *, deleted: bool = False) -> None:
        with self._lock:
            changed = self.tracker.update_slice(obj, deleted=deleted)
        if changed and self._on_change:
            self._on_change()

    def mark_initialized(self) -> None:
        """The informers have listed everything: from now on syncs write rules."""
        self._initialized = True
        if self._on_change:
            self._on_change()

    @property
    def needs_full(self) -> bool:
        return self._need_full

    # -- sync side --------------------------------------------------------------------------
    def sync(self) -> SyncResult:
        if not self._initialized:
            return SyncResult("skipped")
        with self._lock:
            start = self._clock()
            mode = "full" if self._need_full else "partial"
            changed = self.tracker.apply()
            try:
                n = self._sync_full() if mode == "full" else self._sync_partial(changed)
            except BackendError as e:
                # The kernel refused the transaction, so it holds what it held before, but the
                # tracker has moved on: only a full sync can reconcile the two now.
                self._need_full = True
                self.metrics.errors.labels(mode).inc()
                log.warning("kproxy %s sync failed, next sync is full: %s", mode, e)
                return SyncResult(mode, 0, str(e), self._clock() - start)
            seconds = self._clock() - start
            self.metrics.duration.labels(mode).observe(seconds)
            self.metrics.last_success.set(self._wall())
            self.metrics.elements.set(self._elements)
            self.metrics.service_ports.set(len(self._mirror))
            self.last_success = self._clock()
            return SyncResult(mode, n, None, seconds)

    def _sync_full(self) -> int:
        states = self.tracker.all_states()
        parts = {name: service_elements(states[name], self.cfg) for name in sorted(states)}
        self.backend.apply(full_script(parts.values(), self.cfg))
        self._mirror = parts
        self._elements = sum(count_elements(p) for p in parts.values())
        self._need_full = False
        self.metrics.rules.set(sum(1 for line in skeleton(self.cfg) if line.startswith("add rule ")))
        return len(parts)

    def _sync_partial(self, changed: frozenset[ServicePortName]) -> int:
        new_parts: dict[ServicePortName, Elements] = {}
        script = []
        for name in sorted(changed):
            state = self.tracker.state(name)
            new = service_elements(state, self.cfg) if state else {}
            script.append(element_diff(self._mirror.get(name, {}), new, self.cfg))
            new_parts[name] = new
        text = "".join(script)
        if text:
            self.backend.apply(text)
        for name, new in new_parts.items():
            self._elements += count_elements(new) - count_elements(self._mirror.get(name, {}))
            if new and count_elements(new):
                self._mirror[name] = new
            else:
                self._mirror.pop(name, None)
        return len(changed)

    def verify(self) -> str | None:
        """Check the kernel still holds our table; on drift, the next sync is full. Returns the drift."""
        with self._lock:
            if self._need_full or not self._initialized:
                return None  # a full sync is coming anyway
            try:
                drift = self.backend.verify(self.cfg)
            except BackendError as e:
                drift = f"verify failed: {e}"
            if drift:
                log.warning("kproxy table drifted (%s): next sync is full", drift)
                self.metrics.drift.inc()
                self._need_full = True
            return drift


class SyncScheduler:
    """Pure rate limiter: when may the next sync / verification run.

    Any number of ``request()`` calls between two syncs produce one sync (coalescing), and two
    syncs are never closer than ``min_period`` seconds. A sync is also forced every
    ``max_period`` (periodic resync), and verification runs every ``verify_period``.
    """

    def __init__(self, min_period: float, max_period: float = math.inf, verify_period: float = math.inf) -> None:
        self.min_period, self.max_period, self.verify_period = min_period, max_period, verify_period
        self._requested = True  # the first sync is always wanted
        self._last_sync = -math.inf
        self._last_verify: float | None = None

    def request(self) -> None:
        self._requested = True

    def _next_sync(self) -> float:
        if self._requested:
            return self._last_sync + self.min_period
        return self._last_sync + self.max_period

    def _next_verify(self, now: float) -> float:
        if self._last_verify is None:
            self._last_verify = now
        return self._last_verify + self.verify_period

    def wait_time(self, now: float) -> float:
        return max(0.0, min(self._next_sync(), self._next_verify(now)) - now)

    def take(self, now: float) -> str | None:
        """"sync", "verify" or None; the caller must then do what it was told."""
        if now >= self._next_sync():
            self._requested = False
            self._last_sync = now
            if self._last_verify is None:
                self._last_verify = now  # verification counts from the first sync
            return "sync"
        if now >= self._next_verify(now):
            self._last_verify = now
            return "verify"
        return None


class SyncLoop:
    """The thread that runs ``Proxier.sync``/``verify`` when the scheduler says so."""

    def __init__(self, proxier: Proxier, scheduler: SyncScheduler, clock: Callable[[], float] = time.monotonic) -> None:
        self.proxier, self.scheduler, self._clock = proxier, scheduler, clock
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kproxy-sync", daemon=True)
        self.syncs = 0

    def poke(self) -> None:
        with self._cond:
            self.scheduler.request()
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    action = self.scheduler.take(self._clock())
                    if action:
                        break
                    self._cond.wait(min(self.scheduler.wait_time(self._clock()), 60.0))
                if self._stop:
                    return
            if action == "verify":
                if self.proxier.verify():
                    self.poke()
                continue
            result = self.proxier.sync()
            self.syncs += 1
            if result.error:
                self.poke()  # retried (as a full sync) after min_period
