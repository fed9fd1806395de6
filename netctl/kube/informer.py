"""List + watch into a local indexed cache, delivering add/update/delete to handlers.

Why our own: objects stay plain dicts (fast, and custom resources need no models), the cache has
named indexes the controllers query (pods by node, by tenant), and the relist after ``410 Gone``
diffs against the cache so a handler always sees a delete for an object that vanished while the
watch was down - the property leak-free port cleanup depends on.

The informer talks to the API only through the small ``ListWatch`` protocol; ``ApiListWatch`` is
the real implementation, tests use a fake of the protocol.
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from kubernetes import client as k8s

from netctl.kube.client import api_path, request, request_json

log = logging.getLogger(__name__)

Obj = dict[str, Any]
IndexFunc = Callable[[Obj], list[str]]
AddHandler = Callable[[Obj], None]
UpdateHandler = Callable[[Obj, Obj], None]
DeleteHandler = Callable[[Obj], None]


class ResourceExpired(Exception):
    """The resourceVersion we hold is too old (HTTP 410 Gone): only a fresh list can continue."""


class ListWatch(Protocol):
    """How an informer reads one kind of object; events are ``{"type": ..., "object": {...}}``.

    ``list`` and ``watch`` may raise ``ResourceExpired`` (or any exception with ``status == 410``)
    when the resourceVersion is too old. An implementation may also offer ``interrupt()``, which
    ``Informer.stop`` calls to end a blocked watch early.
    """

    def list(self, resource_version: str | None = None) -> tuple[list[Obj], str]: ...

    def watch(self, resource_version: str, timeout_seconds: float) -> Iterator[Obj]: ...


def key_of(obj: Obj) -> str:
    """Cache key: ``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def resource_version_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Store:
    """Thread-safe key -> object map with named secondary indexes (index value -> keys)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._items: dict[str, Obj] = {}
        self._indexers: dict[str, IndexFunc] = {}
        self._indices: dict[str, dict[str, set[str]]] = {}

    def add_indexer(self, name: str, func: IndexFunc) -> None:
        with self._lock:
            if name in self._indexers:
                raise ValueError(f"indexer {name!r} already exists")
            self._indexers[name] = func
            self._indices[name] = {}
            for key, obj in self._items.items():
                self._index_one(name, key, obj)

    def get(self, key: str) -> Obj | None:
        with self._lock:
            return self._items.get(key)

    def list(self) -> builtins.list[Obj]:
        with self._lock:
            return list(self._items.values())

    def list_keys(self) -> builtins.list[str]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def by_index(self, name: str, value: str) -> builtins.list[Obj]:
        with self._lock:
            keys = self._indices_for(name).get(value, ())
            return [self._items[k] for k in keys]

    def index_keys(self, name: str, value: str) -> builtins.list[str]:
        with self._lock:
            return sorted(self._indices_for(name).get(value, ()))

    def index_values(self, name: str) -> builtins.list[str]:
        """Every value the index currently holds (e.g. every node that has pods)."""
        with self._lock:
            return sorted(self._indices_for(name))

    def put(self, obj: Obj) -> Obj | None:
        """Insert or replace; returns the previous object (None when new)."""
        key = key_of(obj)
        with self._lock:
            old = self._items.get(key)
            if old is not None:
                self._unindex(key, old)
            self._items[key] = obj
            for name in self._indexers:
                self._index_one(name, key, obj)
            return old

    def remove(self, key: str) -> Obj | None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._unindex(key, old)
            return old

    def _indices_for(self, name: str) -> dict[str, set[str]]:
        try:
            return self._indices[name]
        except KeyError:
            raise KeyError(f"no indexer named {name!r}") from None

    def _index_one(self, name: str, key: str, obj: Obj) -> None:
        try:
            values = self._indexers[name](obj)
        except Exception:
            log.exception("indexer %s failed on %s", name, key)
            return
        index = self._indices[name]
        for value in values:
            index.setdefault(value, set()).add(key)

    def _unindex(self, key: str, obj: Obj) -> None:
        for name, func in self._indexers.items():
            try:
                values = func(obj)
            except Exception:
                continue
            index = self._indices[name]
            for value in values:
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]


class _Handlers:
    __slots__ = ("on_add", "on_delete", "on_update")

    def __init__(
        self, on_add: AddHandler | None, on_update: UpdateHandler | None, on_delete: DeleteHandler | None
    ) -> None:
        self.on_add = on_add
        self.on_update = on_update
        self.on_delete = on_delete


class Informer:
    """Keeps ``store`` in step with the API and tells handlers what changed.

    Handlers run on the informer's threads, one event at a time (watch events and resync
    deliveries are serialised): keep them short - typically they enqueue a key. Cached objects are
    shared, not copied: treat them as read-only.
    """

    def __init__(
        self,
        list_watch: ListWatch,
        *,
        name: str = "informer",
        resync_period_s: float = 0.0,
        watch_timeout_s: float = 300.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.name = name
        self.store = Store()
        self._lw = list_watch
        self._resync_period = resync_period_s
        self._watch_timeout = watch_timeout_s
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._handlers: builtins.list[_Handlers] = []
        self._deliver_lock = threading.RLock()
        self._rv = ""
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._threads: builtins.list[threading.Thread] = []

    # -- configuration -------------------------------------------------------------------------

    def add_handler(
        self,
        on_add: AddHandler | None = None,
        on_update: UpdateHandler | None = None,
        on_delete: DeleteHandler | None = None,
    ) -> None:
        """Register handlers; one added after the initial list is first sent adds for the cache."""
        handlers = _Handlers(on_add, on_update, on_delete)
        with self._deliver_lock:
            self._handlers.append(handlers)
            if self._synced.is_set() and on_add is not None:
                for obj in self.store.list():
                    self._call(on_add, obj)

    def add_indexer(self, name: str, func: IndexFunc) -> None:
        self.store.add_indexer(name, func)

    # -- queries -------------------------------------------------------------------------------

    def get(self, key: str) -> Obj | None:
        return self.store.get(key)

    def list(self) -> builtins.list[Obj]:
        return self.store.list()

    def by_index(self, name: str, value: str) -> builtins.list[Obj]:
        return self.store.by_index(name, value)

    @property
    def resource_version(self) -> str:
        return self._rv

    def has_synced(self) -> bool:
        return self._synced.is_set()

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError(f"informer {self.name} already started")
        self._threads.append(threading.Thread(target=self._run, name=f"{self.name}-watch", daemon=True))
        if self._resync_period > 0:
            self._threads.append(threading.Thread(target=self._resync_loop, name=f"{self.name}-resync", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop delivering events; a watch blocked in the network ends at its timeout at the latest."""
        self._stop.set()
        interrupt = getattr(self._lw, "interrupt", None)
        if callable(interrupt):
            interrupt()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # -- the list/watch loop -------------------------------------------------------------------

    def _run(self) -> None:
        need_list = True
        failures = 0
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                started = time.monotonic()
                if self._watch_once() or time.monotonic() - started >= min(1.0, self._watch_timeout / 2):
                    failures = 0
                    continue
                # an empty stream that ended at once (a misbehaving proxy?): back off, never spin
                raise ConnectionError("watch ended immediately without events")
            except ResourceExpired as exc:
                log.info("%s: resourceVersion %s expired (%s), relisting", self.name, self._rv, exc)
                need_list = True
                failures = 0
            except Exception as exc:
                if self._stop.is_set():
                    return  # the watch was interrupted by stop()
                if _status_of(exc) == 410:
                    log.info("%s: resourceVersion %s gone, relisting", self.name, self._rv)
                    need_list = True
                    continue
                delay = min(self._backoff_max, self._backoff_base * (2**failures))
                delay *= random.uniform(0.8, 1.0)
                failures += 1
                log.warning(
                    "%s: %s failed (%s: %s), retrying in %.2fs",
                    self.name,
                    "list" if need_list else "watch",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self._stop.wait(delay)

    def _relist(self) -> None:
        items, rv = self._lw.list()
        fresh = {key_of(o): o for o in items}
        with self._deliver_lock:
            if self._stop.is_set():
                return
            for key in self.store.list_keys():
                if key not in fresh:
                    old = self.store.remove(key)
                    if old is not None:
                        self._emit_delete(old)
            for obj in fresh.values():
                old = self.store.put(obj)
                if old is None:
                    self._emit_add(obj)
                elif resource_version_of(old) != resource_version_of(obj):
                    self._emit_update(old, obj)
            self._rv = rv
            if not self._synced.is_set():
                log.info("%s: synced %d objects at resourceVersion %s", self.name, len(fresh), rv)
                self._synced.set()

    def _watch_once(self) -> int:
        """Consume one watch stream until the server ends it (timeout) or it fails; count its events."""
        count = 0
        for event in self._lw.watch(self._rv, self._watch_timeout):
            count += 1
            if self._stop.is_set():
                return count
            etype = event.get("type")
            obj = event.get("object") or {}
            if etype == "ERROR":
                code = obj.get("code")
                if code == 410:
                    raise ResourceExpired(obj.get("message") or "watch error 410")
                raise RuntimeError(f"watch error {code}: {obj.get('message')}")
            rv = resource_version_of(obj)
            if etype == "BOOKMARK":
                if rv:
                    self._rv = rv
                continue
            with self._deliver_lock:
                if self._stop.is_set():
                    return count
                if etype in ("ADDED", "MODIFIED"):
                    old = self.store.put(obj)
                    if old is None:
                        self._emit_add(obj)
                    else:
                        self._emit_update(old, obj)
                elif etype == "DELETED":
                    self.store.remove(key_of(obj))
                    self._emit_delete(obj)
                else:
                    log.warning("%s: ignoring watch event of type %r", self.name, etype)
                    continue
                if rv:
                    self._rv = rv
        return count

    def _resync_loop(self) -> None:
        while not self._stop.wait(self._resync_period):
            if self._synced.is_set():
                self.resync()

    def resync(self) -> None:
        """Re-deliver every cached object as ``on_update(obj, obj)`` (periodic reconciliation)."""
        for key in self.store.list_keys():
            with self._deliver_lock:
                if self._stop.is_set():
                    return
                obj = self.store.get(key)
                if obj is not None:
                    self._emit_update(obj, obj)

    # -- delivery ------------------------------------------------------------------------------

    def _emit_add(self, obj: Obj) -> None:
        for h in self._handlers:
            if h.on_add is not None:
                self._call(h.on_add, obj)

    def _emit_update(self, old: Obj, new: Obj) -> None:
        for h in self._handlers:
            if h.on_update is not None:
                self._call(h.on_update, old, new)

    def _emit_delete(self, obj: Obj) -> None:
        for h in self._handlers:
            if h.on_delete is not None:
                self._call(h.on_delete, obj)

    def _call(self, func: Callable[..., None], *args: Obj) -> None:
        try:
            func(*args)
        except Exception:
            name = getattr(func, "__name__", repr(func))
            log.exception("%s: handler %s failed on %s", self.name, name, key_of(args[-1]))


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


class ApiListWatch:
    """``ListWatch`` over the Kubernetes REST API for any group/version/plural, as plain dicts.

    ``group`` is "" for the core group (pods, services, nodes, namespaces, ...). Listed items get
    ``apiVersion``/``kind`` filled in (the API omits them inside lists) so every cached object can
    be an Event's involvedObject.
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        plural: str,
        group: str = "",
        version: str = "v1",
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._api = api
        self._path = api_path(group, version, plural, namespace)
        self._api_version = f"{group}/{version}" if group else version
        self._label_selector = label_selector
        self._field_selector = field_selector
        self._page_size = page_size
        self._connect_timeout = connect_timeout_s
        self._active_lock = threading.Lock()
        self._active: Any = None

    @classmethod
    def for_api_version(cls, api: k8s.ApiClient, api_version: str, plural: str, **kwargs: Any) -> ApiListWatch:
        """Build from an ``apiVersion`` string: ``"v1"``, ``"netctl.io/v1alpha1"``, ..."""
        group, _, version = api_version.rpartition("/")
        return cls(api, plural=plural, group=group, version=version, **kwargs)

    def __repr__(self) -> str:
        return f"ApiListWatch({self._path}, labels={self._label_selector!r}, fields={self._field_selector!r})"

    def list(self, resource_version: str | None = None) -> tuple[builtins.list[Obj], str]:
        items: builtins.list[Obj] = []
        rv = ""
        cont: str | None = None
        while True:
            page = request_json(
                self._api,
                "GET",
                self._path,
                query={
                    "labelSelector": self._label_selector,
                    "fieldSelector": self._field_selector,
                    "limit": self._page_size,
                    "continue": cont,
                    "resourceVersion": resource_version if cont is None else None,
                },
                timeout=(self._connect_timeout, 120.0),
            )
            kind = str(page.get("kind") or "")
            item_kind = kind[: -len("List")] if kind.endswith("List") else kind
            for item in page.get("items") or []:
                item.setdefault("apiVersion", self._api_version)
                if item_kind:
                    item.setdefault("kind", item_kind)
                items.append(item)
            meta = page.get("metadata") or {}
            if not rv:
                rv = str(meta.get("resourceVersion") or "")
            cont = meta.get("continue") or None
            if not cont:
                return items, rv

    def watch(self, resource_version: str, timeout_seconds: float) -> Iterator[Obj]:
        server_timeout = max(1, int(timeout_seconds + 0.999))
        try:
            resp = request(
                self._api,
                "GET",
                self._path,
                query={
                    "watch": True,
                    "resourceVersion": resource_version or None,
                    "allowWatchBookmarks": True,
                    "timeoutSeconds": server_timeout,
                    "labelSelector": self._label_selector,
                    "fieldSelector": self._field_selector,
                },
                # the read timeout only catches a silently dead connection: the server ends the stream first
                timeout=(self._connect_timeout, server_timeout + 30.0),
            )
        except k8s.ApiException as exc:
            if exc.status == 410:
                raise ResourceExpired(str(exc.reason)) from exc
            raise
        with self._active_lock:
            self._active = resp
        try:
            buf = bytearray()
            for chunk in resp.stream(amt=None, decode_content=True):
                buf += chunk
                start = 0
                while (end := buf.find(b"\n", start)) != -1:
                    line = bytes(buf[start:end])
                    start = end + 1
                    if line.strip():
                        yield json.loads(line)
                del buf[:start]
            if buf.strip():
                yield json.loads(bytes(buf))
        finally:
            with self._active_lock:
                self._active = None
            resp.release_conn()

    def interrupt(self) -> None:
        """Break a blocked watch read from another thread (used by ``Informer.stop``)."""
        with self._active_lock:
            resp = self._active
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:
                log.debug("interrupting watch on %s failed", self._path, exc_info=True)
