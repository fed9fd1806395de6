"""Leader election on a ``coordination.k8s.io/v1`` Lease.

Safety comes from two rules: every write carries the resourceVersion it was based on (so of two
candidates racing for the same record, exactly one write succeeds), and a candidate judges expiry
by its *own* clock from when it last saw the record change (so clock skew between machines does
not matter). A leader that cannot renew gives up after ``renew_deadline_s``, strictly before any
other candidate may take over (``lease_duration_s`` after it last saw a renewal).
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes import client as k8s

from netctl.kube.client import api_path, request_json

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class ConflictError(Exception):
    """The write lost a race: the object exists already, or changed since it was read (HTTP 409)."""


class LeaseStore(Protocol):
    """The three Lease calls election needs, on plain dicts."""

    def get(self, namespace: str, name: str) -> Obj | None:
        """The Lease, or None when it does not exist."""
        ...

    def create(self, namespace: str, lease: Obj) -> Obj:
        """Create; raises ConflictError if it exists."""
        ...

    def replace(self, namespace: str, name: str, lease: Obj) -> Obj:
        """Replace; raises ConflictError unless ``metadata.resourceVersion`` is the current one."""
        ...


class ApiLeaseStore:
    """``LeaseStore`` over the Kubernetes API."""

    def __init__(self, api: k8s.ApiClient, timeout_s: float = 5.0) -> None:
        self._api = api
        self._timeout = timeout_s

    def _path(self, namespace: str, name: str | None = None) -> str:
        return api_path("coordination.k8s.io", "v1", "leases", namespace, name)

    def get(self, namespace: str, name: str) -> Obj | None:
        try:
            return request_json(self._api, "GET", self._path(namespace, name), timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, namespace: str, lease: Obj) -> Obj:
        try:
            return request_json(self._api, "POST", self._path(namespace), body=lease, timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status == 409:
                raise ConflictError(str(exc.reason)) from exc
            raise

    def replace(self, namespace: str, name: str, lease: Obj) -> Obj:
        try:
            return request_json(self._api, "PUT", self._path(namespace, name), body=lease, timeout=self._timeout)
        except k8s.ApiException as exc:
            if exc.status in (404, 409):
                raise ConflictError(str(exc.reason)) from exc
            raise


def _micro_time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for, hold and release one Lease.

    ``on_started_leading`` / ``on_stopped_leading`` run on the election thread and must return
    quickly (start or stop your own threads there); while they run no renewal happens.
    """

    def __init__(
        self,
        store: LeaseStore,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity")
        if not 0 < retry_period_s < renew_deadline_s < lease_duration_s:
            raise ValueError("need 0 < retry_period_s < renew_deadline_s < lease_duration_s")
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._store = store
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.RLock()
        self._leading = False
        self._last_renew = 0.0
        self._observed: Obj | None = None  # last seen spec
        self._observed_at = 0.0
        self._observed_rv = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state ---------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """True only while the last successful renewal is within the renew deadline."""
        with self._lock:
            return self._leading and self._clock() - self._last_renew < self.renew_deadline_s

    @property
    def observed_holder(self) -> str | None:
        with self._lock:
            return (self._observed or {}).get("holderIdentity") or None

    # -- one election round --------------------------------------------------------------------

    def step(self) -> bool:
        """Try once to acquire or renew; fire callbacks on transitions. Returns ``is_leader()``."""
        with self._lock:
            now = self._clock()
            try:
                renewed = self._try_acquire_or_renew(now)
            except Exception as exc:
                log.warning("lease %s/%s: %s: %s", self.namespace, self.name, type(exc).__name__, exc)
                renewed = False
            if renewed:
                self._last_renew = now
                if not self._leading:
                    self._leading = True
                    log.info("lease %s/%s: %s is now the leader", self.namespace, self.name, self.identity)
                    self._callback(self._on_started)
            elif self._leading and (
                now - self._last_renew >= self.renew_deadline_s or self.observed_holder != self.identity
            ):
                self._lose("renewal failed" if self.observed_holder == self.identity else "lease taken")
            return self.is_leader()

    def _try_acquire_or_renew(self, now: float) -> bool:
        lease = self._store.get(self.namespace, self.name)
        wall = _micro_time(self._wall())
        if lease is None:
            spec = self._spec(wall, acquire_time=wall, transitions=0)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            try:
                created = self._store.create(self.namespace, body)
            except ConflictError:
                return False
            self._observe(created, now)
            return True

        spec = lease.get("spec") or {}
        rv = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        if rv != self._observed_rv or spec != self._observed:
            self._observe(lease, now)
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # someone else holds an unexpired lease

        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new_spec = self._spec(wall, acquire_time=spec.get("acquireTime") or wall, transitions=transitions)
        else:
            new_spec = self._spec(wall, acquire_time=wall, transitions=transitions + 1)
            log.info("lease %s/%s: taking over from %r", self.namespace, self.name, holder or None)
        updated = copy.deepcopy(lease)
        updated["spec"] = new_spec
        try:
            result = self._store.replace(self.namespace, self.name, updated)
        except ConflictError:
            return False
        self._observe(result, now)
        return True

    def _spec(self, wall: str, *, acquire_time: str, transitions: int) -> Obj:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "acquireTime": acquire_time,
            "renewTime": wall,
            "leaseTransitions": transitions,
        }

    def _observe(self, lease: Obj, now: float) -> None:
        self._observed = copy.deepcopy(lease.get("spec") or {})
        self._observed_rv = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        self._observed_at = now

    def _lose(self, why: str) -> None:
        self._leading = False
        log.warning("lease %s/%s: %s stopped leading (%s)", self.namespace, self.name, self.identity, why)
        self._callback(self._on_stopped)

    def _callback(self, func: Callable[[], None] | None) -> None:
        if func is None:
            return
        try:
            func()
        except Exception:
            log.exception("lease %s/%s: leader callback failed", self.namespace, self.name)

    def release(self) -> bool:
        """Give the lease up (holder cleared) so a successor need not wait for it to expire."""
        with self._lock:
            was_leading = self._leading
            if was_leading:
                self._lose("released")
            try:
                lease = self._store.get(self.namespace, self.name)
                if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    return False
                updated = copy.deepcopy(lease)
                spec = updated.setdefault("spec", {})
                spec["holderIdentity"] = None
                spec["leaseDurationSeconds"] = 1
                spec["renewTime"] = _micro_time(self._wall())
                result = self._store.replace(self.namespace, self.name, updated)
            except Exception as exc:
                log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, exc)
                return False
            self._observe(result, self._clock())
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
            return True

    # -- background loop -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("leader elector already started")
        self._thread = threading.Thread(target=self._run, name=f"leader-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            leading = self.step()
            # candidates jitter so they do not hit the API in lock-step
            wait = self.retry_period_s if leading else self.retry_period_s * random.uniform(1.0, 1.2)
            self._stop.wait(wait)

    def stop(self, release: bool = True, timeout: float | None = 5.0) -> None:
        """Stop campaigning; a leader releases the lease (or, with ``release=False``, stops leading)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if release:
            self.release()
        else:
            with self._lock:
                if self._leading:
                    self._lose("stopped")
