"""The few writes the controllers make, in one place (JSON merge patches: touch only fields we own)."""

from __future__ import annotations

from typing import Any

from kubernetes import client as k8s

from netctl.kube.client import api_path, request_json

TENANT_GROUP = "netctl.io"
TENANT_VERSION = "v1alpha1"
TENANT_PLURAL = "tenants"
MERGE_PATCH = "application/merge-patch+json"


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
