"""Best-effort core/v1 Events, so an operator sees what happened to an object with ``kubectl describe``.

Recording must never slow down or break the caller: ``record`` only queues, one background
thread writes, failures are logged and dropped, and a full queue drops new events. Repeats of
the same event within ``window_s`` bump ``count``/``lastTimestamp`` of the existing Event instead
of creating a new one (a crash-looping pod would otherwise flood etcd).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes import client as k8s

from netctl.kube.client import api_path, request_json

log = logging.getLogger(__name__)

Obj = dict[str, Any]

NORMAL = "Normal"
WARNING = "Warning"
MAX_MESSAGE = 1024
MAX_SERIES = 4096


class NotFound(Exception):
    """The Event to update no longer exists (expired by the API server's event TTL)."""


class EventSink(Protocol):
    def create(self, namespace: str, event: Obj) -> Obj: ...

    def patch(self, namespace: str, name: str, patch: Obj) -> Obj:
        """Merge-patch; raises NotFound when the Event is gone."""
        ...


class ApiEventSink:
    """``EventSink`` over the Kubernetes API."""

    def __init__(self, api: k8s.ApiClient, timeout_s: float = 5.0) -> None:
        self._api = api
        self._timeout = timeout_s

    def create(self, namespace: str, event: Obj) -> Obj:
        path = api_path("", "v1", "events", namespace)
        return request_json(self._api, "POST", path, body=event, timeout=self._timeout)

    def patch(self, namespace: str, name: str, patch: Obj) -> Obj:
        path = api_path("", "v1", "events", namespace, name)
        try:
            return request_json(
                self._api,
                "PATCH",
                path,
                body=patch,
                content_type="application/merge-patch+json",
                timeout=self._timeout,
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                raise NotFound(name) from exc
            raise


@dataclass(frozen=True)
class _Item:
    obj: Obj
    type_: str
    reason: str
    message: str
    seen: float  # monotonic, for the aggregation window
    seen_wall: datetime  # for first/lastTimestamp


@dataclass
class _Series:
    name: str
    namespace: str
    count: int
    last_seen: float


def _now_rfc3339(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """``record(obj, type_, reason, message)`` from any thread; never raises."""

    def __init__(
        self,
        sink: EventSink,
        component: str,
        host: str | None = None,
        *,
        window_s: float = 600.0,
        max_queue: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.component = component
        self.host = host
        self._sink = sink
        self._window = window_s
        self._clock = clock
        self._wall = wall_clock
        self._queue: queue.Queue[_Item | None] = queue.Queue(max_queue)
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.dropped = 0

    def record(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        try:
            with self._lock:
                if self._stopped:  # no writer any more: queueing would only make flush() wait in vain
                    self.dropped += 1
                    log.debug("event recorder stopped, dropping %s %s: %s", type_, reason, message)
                    return
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="event-recorder", daemon=True)
                    self._thread.start()
                # stamped now, not when written (a backed-up queue must not move events in time);
                # queued under the lock, so nothing lands behind stop()'s end marker
                self._queue.put_nowait(_Item(obj, type_, reason, message, self._clock(), self._wall()))
        except queue.Full:
            with self._lock:
                self.dropped += 1
            log.warning("event queue full, dropping %s %s: %s", type_, reason, message)
        except Exception:
            log.exception("recording event %s failed", reason)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was written (or dropped); for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``) and end the writer; later ``record`` calls are dropped."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(item)
            except Exception as exc:
                log.warning("writing event failed: %s: %s", type(exc).__name__, exc)
            finally:
                self._queue.task_done()

    def _write(self, item: _Item) -> None:
        obj, type_, reason, message = item.obj, item.type_, item.reason, item.message
        meta = obj.get("metadata") or {}
        involved = {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        }
        involved = {k: v for k, v in involved.items() if v}
        # events about cluster-scoped objects (nodes, tenants) live in "default", as kubectl expects
        namespace = meta.get("namespace") or "default"
        message = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."
        ident = (str(involved.get(k, "")) for k in ("kind", "name", "uid"))
        series_key = (namespace, *ident, type_, reason, message)
        now = item.seen
        stamp = _now_rfc3339(item.seen_wall)

        self._expire(now)
        series = self._series.get(series_key)
        if series is not None:
            series.count += 1
            series.last_seen = now
            try:
                patch = {"count": series.count, "lastTimestamp": stamp}
                self._sink.patch(series.namespace, series.name, patch)
                return
            except NotFound:
                del self._series[series_key]

        name = f"{meta.get('name') or 'unknown'}.{uuid.uuid4().hex[:16]}"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": self.component, **({"host": self.host} if self.host else {})},
            "reportingComponent": self.component,
            "reportingInstance": self.host or self.component,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self._sink.create(namespace, event)
        self._series[series_key] = _Series(name=name, namespace=namespace, count=1, last_seen=now)

    def _expire(self, now: float) -> None:
        stale = [k for k, s in self._series.items() if now - s.last_seen > self._window]
        for k in stale:
            del self._series[k]
        if len(self._series) > MAX_SERIES:  # bound memory: forget the least recently seen half
            by_age = sorted(self._series, key=lambda k: self._series[k].last_seen)
            for k in by_age[: len(by_age) // 2]:
                del self._series[k]
