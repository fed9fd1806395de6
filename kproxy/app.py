"""kproxy wired to the API: node -> tenant, scoped informers, proxier + sync loop, /healthz, /metrics.

Start-up order (any step may wait, none may be skipped): read the Node (retrying with backoff
until it exists and carries ``netctl.io/tenant``, unless ``tenant`` is configured), find which
EndpointSlice version the server serves (``discovery.k8s.io/v1``, else ``v1beta1``), start the
tenant scope (``kproxy.scope``), and only when every watch has listed once call
``Proxier.mark_initialized`` — no rule is written from a half-listed world.

While running, the Node's label is re-read every ``node_check_period_s``: when the node moves to
another tenant (or loses its label) kproxy stops, deletes its table — no rule of a tenant it no
longer serves may stay — and exits with status 3 (``EXIT_TENANT_CHANGED``); the new tenant's
DaemonSet pod takes over from a clean start. ``proxy_name`` widens the Service selection to
Services labelled ``service.kubernetes.io/service-proxy-name=<proxy_name>`` (``proxyable_selector``).

/healthz (kube-proxy's semantics, port 10256): unhealthy when a change has been waiting longer
than ``healthz_stale_s`` for a successful sync (pending since the first change after the last
successful sync, or since a failed sync). An idle proxy with nothing to do stays healthy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kproxy.config import TENANT_LABEL, KproxyConfig
from kproxy.nft import Backend
from kproxy.proxier import ConntrackCleaner, Proxier, SyncLoop, SyncResult, SyncScheduler
from kproxy.render import RenderConfig
from kproxy.scope import InformerFactory, TenantScope
from netctl.kube.client import api_path, new_api_client, request_json
from netctl.kube.informer import ApiListWatch, Informer
from netctl.serving import Serving

log = logging.getLogger(__name__)

DISCOVERY_GROUP = "discovery.k8s.io"
SLICE_VERSIONS = ("v1", "v1beta1")  # preferred first
# What kube-proxy also filters server-side: Services (and their slices) meant for another proxy,
# and headless Services' slices, never reach us.
PROXYABLE_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
# With a proxy name, Services labelled with it are ours too; a label selector cannot say "absent
# or equal to", so the proxy-name filter moves client-side (``model.is_proxied``). What then
# reaches us extra are Services of *our own tenant* meant for another proxy: never another tenant's.
NAMED_PROXY_SELECTOR = "!service.kubernetes.io/headless"
EXIT_TENANT_CHANGED = 3


def proxyable_selector(proxy_name: str | None) -> str:
    return NAMED_PROXY_SELECTOR if proxy_name else PROXYABLE_SELECTOR


class KproxyError(RuntimeError):
    pass


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def slice_version(api: Any) -> str:
    """The EndpointSlice version to watch: v1 when the server serves it, else v1beta1 (1.20)."""
    doc = request_json(api, "GET", f"/apis/{DISCOVERY_GROUP}", timeout=10.0)
    served = {v.get("version") for v in doc.get("versions") or []}
    for version in SLICE_VERSIONS:
        if version in served:
            return version
    raise KproxyError(f"the API server serves no EndpointSlice version we know ({DISCOVERY_GROUP}: {sorted(served)})")


def node_tenant(api: Any, node_name: str) -> str | None:
    node = request_json(api, "GET", api_path("", "v1", "nodes", None, node_name), timeout=10.0)
    tenant = ((node.get("metadata") or {}).get("labels") or {}).get(TENANT_LABEL)
    return str(tenant) if tenant else None


def wait_for_tenant(
    read: Callable[[], str | None], node_name: str, stop: threading.Event, *, backoff_max_s: float = 30.0
) -> str | None:
    """The Node's tenant label (``read``); waits (backoff) while the Node is missing or unlabelled.

    None if stopped."""
    delay = 0.5
    while not stop.is_set():
        try:
            tenant = read()
            if tenant:
                return tenant
            why = f"Node {node_name} has no {TENANT_LABEL} label"
        except Exception as e:  # 404 before the node registers, API down, ...
            if _status(e) == 403:
                why = f"forbidden to read Node {node_name} (RBAC: deploy/rbac/kproxy.yaml)"
            else:
                why = f"cannot read Node {node_name}: {type(e).__name__}: {e}"
        log.warning("%s; retrying in %.1f s", why, delay)
        stop.wait(delay)
        delay = min(backoff_max_s, delay * 2)
    return None


class ApiInformerFactory:
    """``kproxy.scope.InformerFactory`` over ``netctl.kube`` informers: every watch namespace-scoped."""

    def __init__(
        self, api: Any, *, slice_version: str = "v1", resync_period_s: float = 0.0, watch_timeout_s: float = 300.0,
        proxy_name: str | None = None,
    ) -> None:
        self._api = api
        self._selector = proxyable_selector(proxy_name)
        self._slice_version = slice_version
        self._resync = resync_period_s
        self._watch_timeout = watch_timeout_s

    def _informer(self, name: str, lw: ApiListWatch) -> Informer:
        return Informer(lw, name=name, resync_period_s=self._resync, watch_timeout_s=self._watch_timeout)

    def namespaces(self, label_selector: str) -> Informer:
        lw = ApiListWatch(self._api, plural="namespaces", label_selector=label_selector)
        return self._informer("kproxy-namespaces", lw)

    def services(self, namespace: str) -> Informer:
        lw = ApiListWatch(self._api, plural="services", namespace=namespace, label_selector=self._selector)
        return self._informer(f"kproxy-services-{namespace}", lw)

    def endpoint_slices(self, namespace: str) -> Informer:
        lw = ApiListWatch(
            self._api, plural="endpointslices", group=DISCOVERY_GROUP, version=self._slice_version,
            namespace=namespace, label_selector=self._selector,
        )  # fmt: skip
        return self._informer(f"kproxy-endpointslices-{namespace}", lw)


class SyncHealth:
    """kube-proxy's healthz rule: fail when changes wait longer than ``stale_s`` for a successful sync."""

    def __init__(self, stale_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_s = stale_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending_since: float | None = None

    def changed(self) -> None:
        with self._lock:
            if self._pending_since is None:
                self._pending_since = self._clock()

    def synced(self, started: float, ok: bool, still_pending: bool) -> None:
        """A sync that began at ``started`` ended; ``still_pending``: changes arrived meanwhile."""
        with self._lock:
            if not ok:
                if self._pending_since is None:
                    self._pending_since = started
            elif still_pending:
                self._pending_since = started if self._pending_since is None else max(self._pending_since, started)
            else:
                self._pending_since = None

    def waiting_s(self) -> float:
        with self._lock:
            return 0.0 if self._pending_since is None else self._clock() - self._pending_since

    def healthy(self) -> bool:
        return self.waiting_s() <= self.stale_s


class _HealthReportingProxier(Proxier):
    health: SyncHealth | None = None

    def sync(self) -> SyncResult:
        started = self._clock()
        result = super().sync()
        if self.health is not None and result.mode != "skipped":
            self.health.synced(started, result.error is None, self.tracker.pending() > 0)
        return result


class AppMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "kproxy_api_events_total", "Watch events received from the API server", ["resource", "type"],
            registry=registry,
        )  # fmt: skip
        self.namespaces = Gauge("kproxy_tenant_namespaces", "Namespaces of our tenant being watched", registry=registry)
        self.initialized = Gauge(
            "kproxy_initialized", "1 once every watch has listed and rules are being written", registry=registry
        )
        self.pending_age = Gauge(
            "kproxy_sync_pending_seconds", "How long changes have waited for a successful sync", registry=registry
        )


class KproxyApp:
    """The whole program minus the CLI; ``api``, ``backend`` and ``factory`` may be injected (tests)."""

    def __init__(
        self,
        cfg: KproxyConfig,
        *,
        api: Any = None,
        backend: Backend | None = None,
        factory: InformerFactory | None = None,
        registry: CollectorRegistry | None = None,
        conntrack: ConntrackCleaner | None = None,
        node_tenant_reader: Callable[[], str | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = AppMetrics(self.registry)
        self.health = SyncHealth(cfg.healthz_stale_s)
        self.metrics.pending_age.set_function(self.health.waiting_s)
        self.tenant: str | None = cfg.tenant
        self.initialized = threading.Event()
        self._stop = threading.Event()
        self._api = api
        self._own_api = api is None
        self._backend = backend
        self._own_backend = backend is None
        self._factory = factory
        self._conntrack = conntrack  # with an injected backend: none unless given too
        self._read_tenant = node_tenant_reader  # default: GET our Node
        self._node_thread: threading.Thread | None = None
        self.exit_code = 0
        self.exit_reason: str | None = None
        self.proxier: _HealthReportingProxier | None = None
        self.loop: SyncLoop | None = None
        self.scope: TenantScope | None = None
        self.healthz: Serving | None = None
        self.metrics_server: Serving | None = None
        self._init_thread: threading.Thread | None = None
        self._cidr = ipaddress.ip_network(cfg.service_cidr) if cfg.service_cidr else None

    # -- start / stop ---------------------------------------------------------------------------
    def start(self) -> bool:
        """Serve health, learn the tenant, start watching; False when stopped before that."""
        cfg = self.cfg
        self.healthz = Serving(cfg.healthz_bind_address, cfg.healthz_port, self.registry)
        self.healthz.add_health_check("sync", self.health.healthy)
        self.healthz.start()
        self.metrics_server = Serving(cfg.metrics_address, cfg.metrics_port, self.registry)
        self.metrics_server.add_health_check("sync", self.health.healthy)
        self.metrics_server.start()
        if self._api is None:
            self._api = new_api_client(cfg.kubeconfig, pool_maxsize=64)
        if self._read_tenant is None:
            api = self._api
            self._read_tenant = lambda: node_tenant(api, cfg.node_name)
        follow_node = self.tenant is None and cfg.node_check_period_s > 0
        if self.tenant is None:
            self.tenant = wait_for_tenant(self._read_tenant, cfg.node_name, self._stop)
            if self.tenant is None:
                return False
        log.info("kproxy on node %s proxies tenant %s into table ip %s%s", cfg.node_name, self.tenant, cfg.table,
                 f" in netns {cfg.netns}" if cfg.netns else "")  # fmt: skip
        if self._factory is None:
            version = slice_version(self._api)
            log.info("watching EndpointSlices as %s/%s", DISCOVERY_GROUP, version)
            self._factory = ApiInformerFactory(self._api, slice_version=version, resync_period_s=cfg.resync_period_s,
                                               proxy_name=cfg.proxy_name)  # fmt: skip
        if self._backend is None:
            self._backend, self._conntrack = _make_backend(cfg.netns_name)
        proxier = _HealthReportingProxier(
            self._backend, RenderConfig(table=cfg.table, buckets=cfg.buckets, node_name=cfg.node_name),
            registry=self.registry,
            on_change=self._changed, conntrack=self._conntrack, proxy_name=cfg.proxy_name,
            verify_elements_period_s=cfg.verify_elements_period_s or math.inf,
        )  # fmt: skip
        proxier.health = self.health
        self.proxier = proxier
        self.loop = SyncLoop(proxier, SyncScheduler(cfg.min_sync_period_s, cfg.sync_max_period, cfg.verify_period))
        self.scope = TenantScope(self._factory, self.tenant, _CheckedSink(proxier, self._cidr),
                                 on_event=self._on_event)  # fmt: skip
        self.loop.start()
        self.scope.start()
        self._init_thread = threading.Thread(target=self._initialize, name="kproxy-init", daemon=True)
        self._init_thread.start()
        if follow_node:
            self._node_thread = threading.Thread(target=self._follow_node, name="kproxy-node", daemon=True)
            self._node_thread.start()
        return True

    def _follow_node(self) -> None:
        """Re-read the Node's tenant label; on a change, drop the old tenant's rules and exit.

        Why exit rather than re-scope in place: the process then starts from nothing for the new
        tenant (fresh credentials from the DaemonSet of that tenant, fresh watches, a full sync),
        and the old tenant's rules must not outlive the move — they are removed first.
        """
        assert self._read_tenant is not None
        while not self._stop.wait(self.cfg.node_check_period_s):
            try:
                tenant = self._read_tenant()
            except Exception as e:  # API hiccup: keep serving what we have, ask again later
                log.warning("cannot re-read Node %s: %s: %s", self.cfg.node_name, type(e).__name__, e)
                continue
            if tenant == self.tenant:
                continue
            self.exit_reason = (
                f"Node {self.cfg.node_name} moved from tenant {self.tenant} to "
                f"{tenant or 'no tenant'}: removed tenant {self.tenant}'s rules; exiting for a restart"
            )
            self._retire()
            log.error("%s", self.exit_reason)
            self.exit_code = EXIT_TENANT_CHANGED
            self._stop.set()
            return

    def _retire(self) -> None:
        """Stop watching and syncing, then delete our table (the rules of a tenant we no longer serve)."""
        if self.scope is not None:
            self.scope.stop()
        if self.loop is not None:
            self.loop.stop()
        if self._backend is not None:
            try:
                self._backend.remove(RenderConfig(table=self.cfg.table))
            except Exception as e:
                log.error("removing table ip %s failed: %s", self.cfg.table, e)

    def _initialize(self) -> None:
        assert self.scope is not None and self.proxier is not None
        t0 = time.monotonic()
        while not self.scope.wait_for_sync(10.0, self._stop):
            if self._stop.is_set():
                return
            log.warning("still waiting for the watches of tenant %s to list (%.0f s; namespaces: %s)",
                        self.tenant, time.monotonic() - t0, ", ".join(self.scope.namespaces()) or "none")  # fmt: skip
        log.info("watches of %d namespace(s) listed in %.2f s: writing rules",
                 len(self.scope.namespaces()), time.monotonic() - t0)  # fmt: skip
        self.proxier.mark_initialized()
        self.metrics.initialized.set(1)
        self.initialized.set()

    def _changed(self) -> None:
        self.health.changed()
        if self.loop is not None:
            self.loop.poke()

    def _on_event(self, resource: str, kind: str) -> None:
        self.metrics.events.labels(resource, kind).inc()
        if resource == "namespaces" and self.scope is not None:
            self.metrics.namespaces.set(len(self.scope.namespaces()))

    def run(self) -> int:
        """Start, then block until ``stop()`` (a signal handler, another thread, a tenant change).

        Returns the exit status: 0, or ``EXIT_TENANT_CHANGED`` when the Node changed tenant."""
        try:
            if self.start():
                self._stop.wait()
        finally:
            self.shutdown()
        return self.exit_code

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop watching and syncing. The table stays: traffic keeps flowing across a restart."""
        self._stop.set()
        if self.scope is not None:
            self.scope.stop()
        if self.loop is not None:
            self.loop.stop()
        for server in (self.healthz, self.metrics_server):
            if server is not None:
                server.stop()
        if self._own_backend and self._backend is not None:
            close = getattr(self._backend, "close", None)
            if callable(close):
                close()
        if self._own_api and self._api is not None:
            with contextlib.suppress(Exception):
                self._api.close()


class _CheckedSink:
    """Forwards to the proxier; logs (once per Service) cluster IPs outside the configured Service CIDR."""

    def __init__(self, proxier: Proxier, cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> None:
        self._proxier = proxier
        self._cidr = cidr
        self._warned: set[tuple[str, str]] = set()

    def on_service(self, obj: dict[str, Any], *, deleted: bool = False) -> None:
        if self._cidr is not None and not deleted:
            ip = (obj.get("spec") or {}).get("clusterIP")
            meta = obj.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            with contextlib.suppress(ValueError):
                if ip and ip != "None" and ipaddress.ip_address(ip) not in self._cidr and key not in self._warned:
                    self._warned.add(key)
                    log.warning("Service %s/%s has cluster IP %s outside the service CIDR %s", *key, ip, self._cidr)
        self._proxier.on_service(obj, deleted=deleted)

    def on_slice(self, obj: dict[str, Any], *, deleted: bool = False) -> None:
        self._proxier.on_slice(obj, deleted=deleted)


def _make_backend(netns: str | None) -> tuple[Backend, ConntrackCleaner]:
    """The nftables backend and the conntrack cleaner, both acting where the rules live."""
    if netns:
        from kproxy.netns import NetnsBackend

        backend = NetnsBackend(netns)
        return backend, backend.delete_flows
    from kproxy.conntrack import delete_flows
    from kproxy.nft import NftablesBackend

    return NftablesBackend(), delete_flows
