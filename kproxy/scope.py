"""Which objects kproxy receives: only its tenant's Services and EndpointSlices.

The API server does the filtering (DESIGN §3): one watch on Namespaces with the label selector
``netctl.io/tenant=<tenant>``, and for each namespace it reports two namespace-scoped watches
(Services, EndpointSlices). Nothing is ever listed cluster-wide, so other tenants' objects never
reach this process, and RBAC can deny them (RoleBindings only in the tenant's namespaces).

When a namespace joins the tenant (created with the label, or labelled later) its watches start;
when it leaves (label removed or changed, namespace deleted) they stop and every Service and
EndpointSlice they had delivered is deleted from the tracker, so its rules go with the next sync.
Events from a watch that was already retired are dropped, whatever its threads still deliver.

Informers are made by an ``InformerFactory`` (``kproxy.app.ApiInformerFactory`` for the real
API; the unit tests use a fake of this protocol). Handlers only forward to a ``Sink`` (the
proxier: update the tracker, poke the sync loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy.config import TENANT_LABEL

log = logging.getLogger(__name__)

Obj = dict[str, Any]

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
NAMESPACES = "namespaces"


class InformerHandle(Protocol):
    """The part of ``netctl.kube.informer.Informer`` the scope uses."""

    def add_handler(
        self,
        on_add: Callable[[Obj], None] | None = None,
        on_update: Callable[[Obj, Obj], None] | None = None,
        on_delete: Callable[[Obj], None] | None = None,
    ) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = 5.0) -> None: ...

    def has_synced(self) -> bool: ...


class InformerFactory(Protocol):
    def namespaces(self, label_selector: str) -> InformerHandle: ...

    def services(self, namespace: str) -> InformerHandle: ...

    def endpoint_slices(self, namespace: str) -> InformerHandle: ...


class Sink(Protocol):
    def on_service(self, obj: Obj, *, deleted: bool = False) -> None: ...

    def on_slice(self, obj: Obj, *, deleted: bool = False) -> None: ...


EventCallback = Callable[[str, str], None]  # (resource, "add" | "update" | "delete")


def tenant_selector(tenant: str) -> str:
    return f"{TENANT_LABEL}={tenant}"


def _meta(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


@dataclass
class _NamespaceWatch:
    namespace: str
    services: InformerHandle
    slices: InformerHandle
    service_names: set[str] = field(default_factory=set)
    slice_names: set[str] = field(default_factory=set)

    def has_synced(self) -> bool:
        return self.services.has_synced() and self.slices.has_synced()

    def stop(self) -> None:
        for inf in (self.services, self.slices):
            try:
                inf.stop()
            except Exception:
                log.exception("stopping a watch of namespace %s failed", self.namespace)


class TenantScope:
    def __init__(
        self, factory: InformerFactory, tenant: str, sink: Sink, *, on_event: EventCallback | None = None
    ) -> None:
        if not tenant:
            raise ValueError("tenant must not be empty")
        self.tenant = tenant
        self._factory = factory
        self._sink = sink
        self._on_event = on_event
        self._lock = threading.RLock()
        self._watches: dict[str, _NamespaceWatch] = {}
        self._ns_informer: InformerHandle | None = None
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        inf = self._factory.namespaces(tenant_selector(self.tenant))
        inf.add_handler(self._ns_added, self._ns_updated, self._ns_deleted)
        self._ns_informer = inf
        inf.start()

    def stop(self) -> None:
        """Stop every watch; the tracker keeps what it has (rules stay in place across a restart)."""
        with self._lock:
            self._stopped = True
            watches, self._watches = list(self._watches.values()), {}
        if self._ns_informer is not None:
            self._ns_informer.stop()
        for w in watches:
            w.stop()

    def namespaces(self) -> list[str]:
        with self._lock:
            return sorted(self._watches)

    def has_synced(self) -> bool:
        """The namespace watch and every current namespace's watches have listed once."""
        if self._ns_informer is None or not self._ns_informer.has_synced():
            return False
        with self._lock:
            return all(w.has_synced() for w in self._watches.values())

    def wait_for_sync(self, timeout: float | None = None, stop: threading.Event | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.has_synced():
            if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(0.02)
        return True

    # -- namespaces -----------------------------------------------------------------------------
    def _count(self, resource: str, kind: str) -> None:
        if self._on_event is not None:
            self._on_event(resource, kind)

    def _belongs(self, ns: Obj) -> bool:
        labels = (ns.get("metadata") or {}).get("labels") or {}
        return bool(labels.get(TENANT_LABEL) == self.tenant)

    def _ns_added(self, ns: Obj) -> None:
        self._count(NAMESPACES, "add")
        self._ns_changed(ns)

    def _ns_updated(self, old: Obj, new: Obj) -> None:
        self._count(NAMESPACES, "update")
        self._ns_changed(new)

    def _ns_deleted(self, ns: Obj) -> None:
        self._count(NAMESPACES, "delete")
        self.leave(_meta(ns)[1])

    def _ns_changed(self, ns: Obj) -> None:
        name = _meta(ns)[1]
        if self._belongs(ns):
            self.join(name)
        else:
            # The server filters on the label, so this is a relabel racing the watch (or a server
            # that ignored the selector): never proxy a namespace that is not ours.
            self.leave(name)

    def join(self, namespace: str) -> None:
        with self._lock:
            if self._stopped or not namespace or namespace in self._watches:
                return
            w = _NamespaceWatch(
                namespace, self._factory.services(namespace), self._factory.endpoint_slices(namespace)
            )
            self._watches[namespace] = w
            w.services.add_handler(
                lambda o: self._event(w, SERVICES, "add", o),
                lambda _old, o: self._event(w, SERVICES, "update", o),
                lambda o: self._event(w, SERVICES, "delete", o),
            )
            w.slices.add_handler(
                lambda o: self._event(w, ENDPOINT_SLICES, "add", o),
                lambda _old, o: self._event(w, ENDPOINT_SLICES, "update", o),
                lambda o: self._event(w, ENDPOINT_SLICES, "delete", o),
            )
            log.info("namespace %s joined tenant %s: watching its Services and EndpointSlices", namespace, self.tenant)
            w.services.start()
            w.slices.start()

    def leave(self, namespace: str) -> None:
        with self._lock:
            w = self._watches.pop(namespace, None)
            if w is None:
                return
            log.info("namespace %s left tenant %s: forgetting %d services, %d endpoint slices",
                     namespace, self.tenant, len(w.service_names), len(w.slice_names))  # fmt: skip
            for name in sorted(w.service_names):
                self._sink.on_service({"metadata": {"namespace": namespace, "name": name}}, deleted=True)
            for name in sorted(w.slice_names):
                self._sink.on_slice({"metadata": {"namespace": namespace, "name": name}}, deleted=True)
        w.stop()  # outside the lock: its threads may be waiting for it in _event

    # -- services and slices --------------------------------------------------------------------
    def _event(self, w: _NamespaceWatch, resource: str, kind: str, obj: Obj) -> None:
        self._count(resource, kind)
        ns, name = _meta(obj)
        with self._lock:
            if self._watches.get(w.namespace) is not w:
                return  # a retired watch: the namespace left (and maybe re-joined with a new watch)
            if ns != w.namespace or not name:
                log.warning("ignoring %s %s/%s from the watch of namespace %s", resource, ns, name, w.namespace)
                return
            deleted = kind == "delete"
            names = w.service_names if resource == SERVICES else w.slice_names
            if deleted:
                names.discard(name)
            else:
                names.add(name)
            if resource == SERVICES:
                self._sink.on_service(obj, deleted=deleted)
            else:
                self._sink.on_slice(obj, deleted=deleted)
