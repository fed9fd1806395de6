"""Wiring of the controller: informers -> prioritised queue -> PortController, under leader election.

Event handlers only enqueue keys (``pod:<ns>/<name>``, ``tenant:<name>``, ``rbac:<namespace>``,
``pool:<tenant>``, ``sync``, ``rbac-sync``); all work happens in queue workers, one key at a time,
so a periodic SYNC at the lowest priority never delays a new pod's network. With pools on, a timer
queues ``pool:<tenant>`` for every Tenant each refill interval (at SYNC priority: a refill never
holds up a pod, which takes a pooled port or, on a miss, creates its own).

With an ``rbac_writer``, the controller also keeps each tenant's kproxy credentials in step
(``tenant_rbac``): ``tenant:<name>`` applies or deletes the tenant's ServiceAccount and
ClusterRoleBinding, ``rbac:<namespace>`` the namespace's RoleBinding, and every SYNC queues an
``rbac-sync`` (a key of its own, so an RBAC failure never holds up or retries the port resync).
RBAC keys are never queued at ADD: a new pod's port comes first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from netctl.controller import model
from netctl.controller.pools import PoolConfig
from netctl.controller.ports import Caches, PortController, TenantNotReady
from netctl.controller.public import PublicConfig
from netctl.controller.tenant_rbac import RbacWriter, TenantRbac
from netctl.iaas.base import IaaS
from netctl.kube.informer import ApiListWatch, Informer
from netctl.kube.workqueue import Priority, WorkQueue

log = logging.getLogger(__name__)
T = TypeVar("T")

PORT_OPS = Counter("netctl_port_operations_total", "IaaS port operations by kind and result", ["op", "result"])
RESYNC_SECONDS = Histogram("netctl_resync_duration_seconds", "Duration of a full pods/ports/annotations resync")
POOL_SIZE = Gauge("netctl_pool_ports", "Pooled (warm, unowned) ports per tenant, as of the last refill or resync",
                  ["tenant"])
POOL_CLAIMS = Counter("netctl_pool_claims_total", "Pod ports taken from the pool (hit) or created (miss)",
                      ["tenant", "result"])

SYNC_KEY = "sync"
RBAC_SYNC_KEY = "rbac-sync"
RBAC_OPS = Counter("netctl_kproxy_rbac_syncs_total", "kproxy credential reconciliations by kind and result",
                   ["kind", "result"])


@dataclass
class ControllerOptions:
    workers: int = field(default=4, metadata={"help": "queue worker threads"})
    resync_period_s: float = field(default=60.0, metadata={"help": "seconds between full SYNC passes"})
    default_mtu: int = field(default=1400, metadata={"help": "pod MTU when the Tenant sets none"})
    pool: PoolConfig = field(default_factory=PoolConfig, metadata={"help": "warm port pools per tenant"})
    public: PublicConfig = field(default_factory=PublicConfig,
                                 metadata={"help": "provider network of the optional public NIC"})


class Controller:
    def __init__(
        self, api: Any, iaas: IaaS, writer: Any, recorder: Any, opts: ControllerOptions,
        rbac_writer: RbacWriter | None = None,
    ) -> None:
        """``rbac_writer``: manage kproxy's per-tenant credentials through it (None: leave them alone)."""
        self.opts = opts
        self.pods = Informer(ApiListWatch(api, plural="pods"), name="pods")
        self.namespaces = Informer(ApiListWatch(api, plural="namespaces"), name="namespaces")
        self.nodes = Informer(ApiListWatch(api, plural="nodes"), name="nodes")
        self.tenants = Informer(
            ApiListWatch(api, plural="tenants", group="netctl.io", version="v1alpha1"), name="tenants"
        )
        self.pods.add_indexer("namespace", lambda o: [str(model.meta(o).get("namespace"))])
        self.namespaces.add_indexer("tenant", lambda o: [t] if (t := model.tenant_label(o)) else [])
        self.ports = PortController(
            Caches(self.pods, self.namespaces, self.tenants, self.nodes),
            iaas, writer, recorder, default_mtu=opts.default_mtu,
            on_metric=lambda op, result: PORT_OPS.labels(op, result).inc(),
            pool=opts.pool,
            on_claim=lambda tenant, hit: POOL_CLAIMS.labels(tenant, "hit" if hit else "miss").inc(),
            public=opts.public,
        )
        self.rbac = TenantRbac(self.namespaces, self.tenants, rbac_writer) if rbac_writer is not None else None
        self.queue = WorkQueue("controller")
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._pool_timer: threading.Thread | None = None
        self._wire()

    # -- events -> keys --------------------------------------------------------------------------

    def _wire(self) -> None:
        q = self.queue
        # Pods of the initial list are not queued one by one: the full reconcile a leader runs
        # before serving (set operations over the caches) queues exactly those needing work. At
        # 10,000 pods, queueing every one made a restart re-check them all ahead of the few new ones.
        self.pods.add_handler(
            on_add=self._pod_added,
            on_update=lambda old, new: q.add(
                "pod:" + model.key_of(new), Priority.UPDATE if old is not new else Priority.SYNC
            ),
            on_delete=lambda o: q.add("pod:" + model.key_of(o), Priority.DELETE),
        )
        self.namespaces.add_handler(
            on_add=self._namespace_changed,
            on_update=lambda old, new: self._namespace_changed(new, old),
            on_delete=lambda o: self._namespace_changed(o, rbac_priority=Priority.DELETE),
        )
        self.nodes.add_handler(on_update=self._node_changed, on_add=lambda o: None)
        self.tenants.add_handler(
            on_add=lambda o: q.add("tenant:" + model.key_of(o), Priority.ADD),
            on_update=lambda old, new: q.add(
                "tenant:" + model.key_of(new),
                Priority.UPDATE if old is not new and old.get("spec") != new.get("spec") else Priority.SYNC,
            ),
            on_delete=lambda o: q.add("tenant:" + model.key_of(o), Priority.DELETE),
        )

    def _pod_added(self, pod: model.Obj) -> None:
        if self.pods.has_synced():
            self.queue.add("pod:" + model.key_of(pod), Priority.ADD)

    def _namespace_changed(
        self, ns: model.Obj, old: model.Obj | None = None, rbac_priority: Priority = Priority.UPDATE
    ) -> None:
        if old is not None and model.tenant_label(old) == model.tenant_label(ns) and old is not ns:
            return
        name = model.key_of(ns)
        # kproxy's RoleBinding: a namespace added or deleted with a tenant label, or relabelled.
        if self.rbac is not None and old is not ns and (old is not None or model.tenant_label(ns)):
            self.queue.add("rbac:" + name, rbac_priority)
        if not (self.namespaces.has_synced() and self.pods.has_synced()):
            return  # initial lists: the leader's full reconcile covers every pod
        for pod in self.pods.by_index("namespace", name):
            self.queue.add("pod:" + model.key_of(pod), Priority.UPDATE)

    def _node_changed(self, old: model.Obj, new: model.Obj) -> None:
        if old is new or model.tenant_label(old) == model.tenant_label(new):
            return
        self.queue.add(SYNC_KEY, Priority.UPDATE)

    # -- work ------------------------------------------------------------------------------------

    def handle(self, key: str, priority: Priority) -> None:
        kind, _, name = key.partition(":")
        if kind == "pod":
            self.ports.sync_pod(name)  # TenantNotReady is retried with back-off; an Event says why
        elif kind == "tenant":
            failure: Exception | None = None
            try:
                self.ports.sync_tenant(name)
            except TenantNotReady:
                pass  # deleted tenants have nothing to retry once their network is gone
            except Exception as exc:  # still do the credentials; then retry both (idempotent)
                failure = exc
            if self.rbac is not None:
                self._rbac("tenant", lambda rbac: rbac.sync_tenant(
                    name, lambda ns: self.queue.add("rbac:" + ns, min(priority, Priority.UPDATE)),
                    fan_out=priority != Priority.SYNC,
                ))
            if failure is not None:
                raise failure
        elif kind == "pool":
            try:
                self.ports.refill_pool(name)
            finally:
                POOL_SIZE.labels(name).set(len(self.ports.iaas.pooled_ports(name)))
        elif kind == "rbac":
            if self.rbac is not None:
                self._rbac("namespace", lambda rbac: rbac.sync_namespace(name))
        elif key == RBAC_SYNC_KEY:
            if self.rbac is not None:
                rplan = self._rbac("resync", lambda rbac: rbac.resync(
                    lambda ns: self.queue.add("rbac:" + ns, Priority.SYNC),
                    lambda t: self.queue.add("tenant:" + t, Priority.SYNC),
                ))
                if not rplan.empty:
                    log.info("rbac resync: %d namespaces out of step; %d deleted tenants left bindings",
                             len(rplan.namespaces_to_sync), len(rplan.stale_tenants))
        elif key == SYNC_KEY:
            with RESYNC_SECONDS.time():
                plan = self.ports.resync(
                    lambda k: self.queue.add("pod:" + k, Priority.SYNC),
                    lambda t: self.queue.add("tenant:" + t, Priority.SYNC),
                )
            sizes = dict(plan.pool_sizes)
            for tenant in {*sizes, *(model.key_of(o) for o in self.tenants.list())}:
                POOL_SIZE.labels(tenant).set(sizes.get(tenant, 0))
            if not plan.empty:
                log.info(
                    "resync: %d orphaned and %d duplicate ports freed; %d pools trimmed; %d pods to repair",
                    len(plan.orphan_ports), len(plan.duplicate_ports), len(plan.pools_over_max),
                    len(plan.pods_to_sync),
                )
            if self.rbac is not None:
                self.queue.add(RBAC_SYNC_KEY, Priority.SYNC)
        else:
            log.error("unknown queue key %r dropped", key)

    def _rbac(self, kind: str, work: Callable[[TenantRbac], T]) -> T:
        assert self.rbac is not None
        try:
            result = work(self.rbac)
        except Exception:
            RBAC_OPS.labels(kind, "error").inc()
            raise
        RBAC_OPS.labels(kind, "ok").inc()
        return result

    # -- lifecycle -------------------------------------------------------------------------------

    def informers(self) -> list[Informer]:
        return [self.namespaces, self.nodes, self.tenants, self.pods]

    def start_informers(self, timeout: float = 60.0) -> None:
        for inf in self.informers():
            inf.start()
        for inf in self.informers():
            if not inf.wait_for_sync(timeout):
                raise TimeoutError(f"informer {inf.name} did not sync within {timeout} s")

    def run(self) -> None:
        """Serve the queue (as leader), on a thread of its own: returns at once.

        A full reconcile runs *before* the workers start, so orphans left while no replica was
        leading are deleted first and every pod that needs repair is queued with what the
        informers queued meanwhile (a standby's queue fills while it waits for the lease).
        """
        threading.Thread(target=self._serve, name="controller-serve", daemon=True).start()

    def _serve(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.handle(SYNC_KEY, Priority.SYNC)
                break
            except Exception:
                log.exception("initial reconcile failed; retrying in %.1f s", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        if self._stop.is_set():
            return
        self.queue.run_workers(self.opts.workers, self.handle)  # raising = retry with back-off
        self._timer = threading.Thread(target=self._periodic, name="resync-timer", daemon=True)
        self._timer.start()
        if self.opts.pool.enabled:
            self._pool_timer = threading.Thread(target=self._refills, name="pool-timer", daemon=True)
            self._pool_timer.start()

    def _periodic(self) -> None:
        while not self._stop.wait(self.opts.resync_period_s):
            self.queue.add(SYNC_KEY, Priority.SYNC)

    def _refills(self) -> None:
        while True:
            for obj in self.tenants.list():
                self.queue.add("pool:" + model.key_of(obj), Priority.SYNC)
            if self._stop.wait(self.opts.pool.refill_interval_s):
                return

    def healthy(self) -> bool:
        return all(inf.has_synced() for inf in self.informers()) and not self.queue.shutting_down

    def stop(self) -> None:
        self._stop.set()
        self.queue.shutdown()
        for inf in self.informers():
            inf.stop()
