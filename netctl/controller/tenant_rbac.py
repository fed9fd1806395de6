"""kproxy's per-tenant credentials, kept in step with Tenants and namespace labels.

For every Tenant ``<t>`` (deploy/kproxy.yaml is the hand-rendered form of the same objects):

* ServiceAccount ``kube-system/netctl-kproxy-<t>``;
* ClusterRoleBinding ``netctl-kproxy-<t>`` -> ClusterRole ``netctl-kproxy-node``;
* in every namespace labelled ``netctl.io/tenant=<t>`` (and only there), RoleBinding
  ``netctl-kproxy-<t>`` -> ClusterRole ``netctl-kproxy-services``.

Every object is labelled ``netctl.io/tenant=<t>`` and ``app.kubernetes.io/managed-by=netctl-controller``
(how a resync finds ours and never touches anybody else's) and owned by its Tenant (an
ownerReference without blockOwnerDeletion), so the cluster's garbage collector removes them even
if the Tenant is deleted while no controller runs.

The first half of this module is pure desired state and diffs (no I/O); ``TenantRbac`` does the
writes, one queue key at a time:

* ``rbac:<namespace>`` -> ``sync_namespace``: list our RoleBindings in that namespace, apply the
  one it should have, delete the rest. All RoleBinding writes go through this key, so the queue's
  per-key serialisation is all the locking they need.
* ``tenant:<t>`` -> ``sync_tenant``: apply (or, Tenant gone, delete) the ServiceAccount and
  ClusterRoleBinding, and queue ``rbac:<ns>`` for the namespaces concerned.
* the periodic resync -> ``resync``: list our RoleBindings once, diff against the namespace and
  Tenant caches, queue ``rbac:<ns>`` for each namespace that is out of step and ``tenant:<t>``
  for tenants that left bindings behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from netctl.annotations import TENANT_LABEL
from netctl.controller import model
from netctl.controller.model import Obj
from netctl.controller.ports import Cache

log = logging.getLogger(__name__)

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "netctl-controller"
SA_NAMESPACE = "kube-system"
NODE_ROLE = "netctl-kproxy-node"  # deploy/rbac/kproxy.yaml
SERVICES_ROLE = "netctl-kproxy-services"
RBAC_API = "rbac.authorization.k8s.io/v1"
RBAC_GROUP = "rbac.authorization.k8s.io"
TENANT_API = "netctl.io/v1alpha1"


# ---- desired state (pure) ------------------------------------------------------------------------


def kproxy_name(tenant: str) -> str:
    """Name of the tenant's ServiceAccount and of both its bindings."""
    return f"netctl-kproxy-{tenant}"


def managed_labels(tenant: str) -> dict[str, str]:
    return {TENANT_LABEL: tenant, MANAGED_BY_LABEL: MANAGER}


def managed_selector(tenant: str | None = None) -> str:
    """Label selector of our objects (of one tenant's, when given)."""
    sel = f"{MANAGED_BY_LABEL}={MANAGER}"
    return f"{sel},{TENANT_LABEL}={tenant}" if tenant else sel


def is_managed(obj: Obj) -> bool:
    return model.labels_of(obj).get(MANAGED_BY_LABEL) == MANAGER


def _metadata(tenant: str, name: str, namespace: str | None, tenant_obj: Obj | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": managed_labels(tenant)}
    if namespace:
        meta["namespace"] = namespace
    uid = model.meta(tenant_obj).get("uid") if tenant_obj is not None else None
    if uid:
        # No blockOwnerDeletion: that would need update on tenants/finalizers, and nothing has to wait.
        meta["ownerReferences"] = [{"apiVersion": TENANT_API, "kind": "Tenant", "name": tenant, "uid": uid}]
    return meta


def _subjects(tenant: str) -> list[dict[str, str]]:
    return [{"kind": "ServiceAccount", "name": kproxy_name(tenant), "namespace": SA_NAMESPACE}]


def service_account(tenant: str, tenant_obj: Obj | None = None) -> Obj:
    return {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": _metadata(tenant, kproxy_name(tenant), SA_NAMESPACE, tenant_obj),
    }  # fmt: skip


def cluster_role_binding(tenant: str, tenant_obj: Obj | None = None) -> Obj:
    return {
        "apiVersion": RBAC_API, "kind": "ClusterRoleBinding",
        "metadata": _metadata(tenant, kproxy_name(tenant), None, tenant_obj),
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": NODE_ROLE},
        "subjects": _subjects(tenant),
    }  # fmt: skip


def role_binding(tenant: str, namespace: str, tenant_obj: Obj | None = None) -> Obj:
    return {
        "apiVersion": RBAC_API, "kind": "RoleBinding",
        "metadata": _metadata(tenant, kproxy_name(tenant), namespace, tenant_obj),
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": SERVICES_ROLE},
        "subjects": _subjects(tenant),
    }  # fmt: skip


def desired_tenant(ns: Obj | None, tenants: Mapping[str, Obj] | Cache) -> str | None:
    """The tenant whose kproxy may read this namespace: labelled, not terminating, Tenant exists."""
    if ns is None or model.meta(ns).get("deletionTimestamp"):
        return None
    tenant = model.tenant_label(ns)
    if tenant is None or tenants.get(tenant) is None:
        return None
    return tenant


def binding_matches(have: Obj, want: Obj) -> bool:
    """Whether an existing binding already says what ``want`` says (fields we set, nothing else)."""
    hm, wm = model.meta(have), model.meta(want)
    if hm.get("name") != wm.get("name"):
        return False
    labels = model.labels_of(have)
    if any(labels.get(k) != v for k, v in (wm.get("labels") or {}).items()):
        return False
    if have.get("roleRef", {}).get("name") != want["roleRef"]["name"] or \
            have.get("roleRef", {}).get("kind") != want["roleRef"]["kind"]:  # fmt: skip
        return False

    def subjects(o: Obj) -> set[tuple[str, str, str]]:
        return {(s.get("kind", ""), s.get("name", ""), s.get("namespace", "")) for s in o.get("subjects") or []}

    if subjects(have) != subjects(want):
        return False
    want_owners = {r["uid"] for r in wm.get("ownerReferences") or []}
    have_owners = {r.get("uid") for r in hm.get("ownerReferences") or []}
    return want_owners <= have_owners


@dataclass(frozen=True)
class NamespacePlan:
    apply: tuple[Obj, ...] = ()  # RoleBindings to server-side apply
    delete: tuple[str, ...] = ()  # names of our RoleBindings to delete

    @property
    def empty(self) -> bool:
        return not (self.apply or self.delete)


def plan_namespace(
    namespace: str, tenant: str | None, tenant_obj: Obj | None, existing: Iterable[Obj]
) -> NamespacePlan:
    """What to write in one namespace: ``tenant`` is its desired tenant (None: no kproxy may read it);
    ``existing`` our RoleBindings there (others are never in it: callers list by our label)."""
    want = role_binding(tenant, namespace, tenant_obj) if tenant else None
    apply: list[Obj] = []
    delete: list[str] = []
    found = False
    for rb in existing:
        if not is_managed(rb):
            continue
        name = str(model.meta(rb).get("name"))
        if want is not None and name == model.meta(want)["name"]:
            found = True
            if not binding_matches(rb, want):
                apply.append(want)
        else:
            delete.append(name)
    if want is not None and not found:
        apply.append(want)
    return NamespacePlan(tuple(apply), tuple(sorted(delete)))


@dataclass(frozen=True)
class RbacSyncPlan:
    namespaces_to_sync: tuple[str, ...] = ()  # missing, wrong or superfluous RoleBindings
    stale_tenants: tuple[str, ...] = ()  # no Tenant object, yet bindings of ours still name it

    @property
    def empty(self) -> bool:
        return not (self.namespaces_to_sync or self.stale_tenants)


def plan_resync(namespaces: Iterable[Obj], tenants: Mapping[str, Obj], existing: Iterable[Obj]) -> RbacSyncPlan:
    """Compare every namespace's desired RoleBinding with every RoleBinding of ours (one list)."""
    by_ns: dict[str, list[Obj]] = {}
    stale: set[str] = set()
    for rb in existing:
        if not is_managed(rb):
            continue
        by_ns.setdefault(str(model.meta(rb).get("namespace")), []).append(rb)
        tenant = model.tenant_label(rb)
        if tenant and tenant not in tenants:
            stale.add(tenant)
    to_sync: set[str] = set()
    seen: set[str] = set()
    for ns in namespaces:
        name = str(model.meta(ns).get("name"))
        seen.add(name)
        tenant = desired_tenant(ns, tenants)
        if not plan_namespace(name, tenant, tenants.get(tenant) if tenant else None, by_ns.get(name, [])).empty:
            to_sync.add(name)
    to_sync.update(set(by_ns) - seen)  # namespaces gone from the cache (being deleted): nothing is wanted
    return RbacSyncPlan(tuple(sorted(to_sync)), tuple(sorted(stale)))


# ---- writes --------------------------------------------------------------------------------------


class RbacWriter(Protocol):
    """What ``TenantRbac`` needs from the API (``netctl.kube.resources.KubeWriter`` implements it)."""

    def apply(self, obj: Obj) -> Obj: ...

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Obj | None: ...

    def delete(
        self, api_version: str, plural: str, namespace: str | None, name: str, uid: str | None = None
    ) -> bool: ...

    def list_managed_role_bindings(self, namespace: str | None = None, tenant: str | None = None) -> list[Obj]: ...


class TenantRbac:
    def __init__(self, namespaces: Cache, tenants: Cache, writer: RbacWriter) -> None:
        self.namespaces = namespaces
        self.tenants = tenants
        self.writer = writer

    def sync_namespace(self, namespace: str) -> NamespacePlan:
        existing = self.writer.list_managed_role_bindings(namespace=namespace)
        # The caches are read after the list: a change made after it queues this key again.
        tenant = desired_tenant(self.namespaces.get(namespace), self.tenants)
        plan = plan_namespace(namespace, tenant, self.tenants.get(tenant) if tenant else None, existing)
        for obj in plan.apply:
            log.info("namespace %s: applying RoleBinding %s", namespace, model.meta(obj)["name"])
            self._apply_binding(obj, "rolebindings")
        for name in plan.delete:
            log.info("namespace %s: deleting RoleBinding %s (namespace left its tenant)", namespace, name)
            self.writer.delete(RBAC_API, "rolebindings", namespace, name)
        return plan

    def sync_tenant(self, tenant: str, enqueue_namespace: Callable[[str], None], fan_out: bool = True) -> None:
        """ServiceAccount + ClusterRoleBinding of one tenant; ``fan_out`` also queues its namespaces.

        The periodic resync passes ``fan_out=False``: it finds out-of-step namespaces by itself.
        """
        obj = self.tenants.get(tenant)
        if obj is not None:
            self.writer.apply(service_account(tenant, obj))
            self._apply_binding(cluster_role_binding(tenant, obj), "clusterrolebindings")
            if fan_out:
                for ns in self.namespaces.by_index("tenant", tenant):
                    enqueue_namespace(str(model.meta(ns).get("name")))
            return
        self._delete_if_ours("v1", "serviceaccounts", SA_NAMESPACE, kproxy_name(tenant))
        self._delete_if_ours(RBAC_API, "clusterrolebindings", None, kproxy_name(tenant))
        # Its RoleBindings, wherever they are (namespaces may still carry the label, or not).
        spots = {str(model.meta(rb).get("namespace")) for rb in self.writer.list_managed_role_bindings(tenant=tenant)}
        spots.update(str(model.meta(ns).get("name")) for ns in self.namespaces.by_index("tenant", tenant))
        for ns_name in sorted(spots):
            enqueue_namespace(ns_name)

    def resync(
        self, enqueue_namespace: Callable[[str], None], enqueue_tenant: Callable[[str], None]
    ) -> RbacSyncPlan:
        existing = self.writer.list_managed_role_bindings()
        tenants = {str(model.meta(t).get("name")): t for t in self.tenants.list()}
        plan = plan_resync(self.namespaces.list(), tenants, existing)
        for ns in plan.namespaces_to_sync:
            enqueue_namespace(ns)
        for tenant in plan.stale_tenants:
            enqueue_tenant(tenant)
        return plan

    def _apply_binding(self, obj: Obj, plural: str) -> None:
        try:
            self.writer.apply(obj)
        except Exception as exc:
            if getattr(exc, "status", None) != 422:  # Unprocessable: the API's "invalid"
                raise
            # roleRef is immutable: a binding of that name pointing elsewhere must be re-created.
            meta = model.meta(obj)
            log.warning("%s %s has another roleRef; re-creating it", plural, model.key_of(obj))
            self.writer.delete(RBAC_API, plural, meta.get("namespace"), meta["name"])
            self.writer.apply(obj)

    def _delete_if_ours(self, api_version: str, plural: str, namespace: str | None, name: str) -> None:
        """Delete an object of ours; one of that name made by someone else is left alone."""
        have = self.writer.get(api_version, plural, namespace, name)
        if have is None:
            return
        if not is_managed(have):
            log.warning("%s %s is not managed by %s; leaving it", plural, name, MANAGER)
            return
        log.info("deleting %s %s (its Tenant is gone)", plural, model.key_of(have) if namespace else name)
        self.writer.delete(api_version, plural, namespace, name, uid=model.meta(have).get("uid"))
