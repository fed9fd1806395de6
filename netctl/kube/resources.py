"""The few writes the controllers make, in one place.

JSON merge patches touch only fields we own (pod annotations, Tenant status); whole objects the
controller owns (kproxy's ServiceAccounts and bindings) are written by server-side apply under the
field manager ``netctl-controller``.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client as k8s

from netctl.annotations import TENANT_LABEL
from netctl.kube.client import api_path, request_json

TENANT_GROUP = "netctl.io"
TENANT_VERSION = "v1alpha1"
TENANT_PLURAL = "tenants"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "netctl-controller"
# the label netctl.controller.tenant_rbac puts on every object it owns (MANAGED_BY_LABEL=MANAGER there)
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={FIELD_MANAGER}"
# plural of every kind ``apply`` is used for (no discovery round-trip); others pass plural=
PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "RoleBinding": "rolebindings",
    "ClusterRoleBinding": "clusterrolebindings",
}


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


class KubeWriter:
    def __init__(self, api: k8s.ApiClient, timeout_s: float = 10.0) -> None:
        self._api = api
        self._timeout = timeout_s

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str | None], uid: str | None = None
    ) -> None:
        """Merge-patch annotations (None deletes one); with ``uid`` the patch fails if the pod was re-created."""
        metadata: dict[str, Any] = {"annotations": annotations}
        if uid:
            metadata["uid"] = uid  # a precondition: the API rejects the patch for another object
        request_json(
            self._api, "PATCH", api_path("", "v1", "pods", namespace, name),
            body={"metadata": metadata}, content_type=MERGE_PATCH, timeout=self._timeout,
        )

    def patch_tenant_status(self, name: str, status: dict[str, Any]) -> None:
        request_json(
            self._api, "PATCH", api_path(TENANT_GROUP, TENANT_VERSION, TENANT_PLURAL, None, name) + "/status",
            body={"status": status}, content_type=MERGE_PATCH, timeout=self._timeout,
        )

    # -- whole objects the controller owns (server-side apply) ----------------------------------

    def apply(self, obj: dict[str, Any], plural: str | None = None) -> dict[str, Any]:
        """Server-side apply ``obj`` (create or update; ``force`` takes over conflicting fields).

        ``plural`` defaults from ``obj["kind"]`` (see PLURALS). Returns the object as stored.
        """
        group, version = _split_api_version(str(obj["apiVersion"]))
        meta = obj["metadata"]
        kind = str(obj["kind"])
        plural = plural or PLURALS.get(kind)
        if plural is None:
            raise ValueError(f"apply: no plural known for kind {kind!r}; pass plural=")
        return request_json(
            self._api, "PATCH", api_path(group, version, plural, meta.get("namespace"), meta["name"]),
            query={"fieldManager": FIELD_MANAGER, "force": True},
            body=json.dumps(obj),  # JSON is YAML: sent as is, as application/apply-patch+yaml
            content_type=APPLY_PATCH, timeout=self._timeout,
        )

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        group, version = _split_api_version(api_version)
        try:
            return request_json(
                self._api, "GET", api_path(group, version, plural, namespace, name), timeout=self._timeout
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(
        self, api_version: str, plural: str, namespace: str | None, name: str, uid: str | None = None
    ) -> bool:
        """Delete one object; False when it was already gone (404), or, with ``uid``, when the
        object of that name is another one now (409: the precondition failed)."""
        group, version = _split_api_version(api_version)
        body: dict[str, Any] | None = None
        if uid:
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        try:
            request_json(
                self._api, "DELETE", api_path(group, version, plural, namespace, name),
                body=body, timeout=self._timeout,
            )
        except k8s.ApiException as exc:
            if exc.status == 404 or (uid and exc.status == 409):
                return False
            raise
        return True

    def list_managed_role_bindings(
        self, namespace: str | None = None, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """RoleBindings labelled managed-by netctl-controller (of one namespace/tenant when given)."""
        selector = MANAGED_SELECTOR + (f",{TENANT_LABEL}={tenant}" if tenant else "")
        path = api_path("rbac.authorization.k8s.io", "v1", "rolebindings", namespace)
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            page = request_json(
                self._api, "GET", path,
                query={"labelSelector": selector, "limit": 500, "continue": cont},
                timeout=(self._timeout, 60.0),
            )
            for item in page.get("items") or []:
                item.setdefault("apiVersion", "rbac.authorization.k8s.io/v1")
                item.setdefault("kind", "RoleBinding")
                items.append(item)
            cont = (page.get("metadata") or {}).get("continue") or None
            if not cont:
                return items
