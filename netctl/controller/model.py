"""Pure facts about Kubernetes objects that the controller decides on.

Objects are plain dicts as the API returns them (camelCase keys), so this module needs no client.
"""

from __future__ import annotations

from typing import Any

from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL

Obj = dict[str, Any]


def meta(obj: Obj) -> dict[str, Any]:
    m = obj.get("metadata") or {}
    return m if isinstance(m, dict) else {}


def key_of(obj: Obj) -> str:
    m = meta(obj)
    ns = m.get("namespace")
    return f"{ns}/{m.get('name')}" if ns else str(m.get("name"))


def labels_of(obj: Obj) -> dict[str, str]:
    return dict(meta(obj).get("labels") or {})


def annotations_of(obj: Obj) -> dict[str, str]:
    return dict(meta(obj).get("annotations") or {})


def tenant_label(obj: Obj | None) -> str | None:
    """The tenant a Namespace or Node belongs to, or None when it belongs to none."""
    if obj is None:
        return None
    value = labels_of(obj).get(TENANT_LABEL)
    return value or None


def port_id_for_pod(uid: str) -> str:
    """Deterministic port name: a port re-created after a crash can never be a second one."""
    return f"pod-{uid}"


def port_id_for_node(node: str) -> str:
    return f"node-{node}"


def needs_port(pod: Obj) -> bool:
    """A pod gets a tenant port unless it uses the host network or is being/has been torn down."""
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return False
    if meta(pod).get("deletionTimestamp"):
        # Still running its grace period: keep the port until the object is gone, but
        # never create one for a pod that is already going away.
        return bool(port_annotation_raw(pod))
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed")


def node_name(pod: Obj) -> str | None:
    return (pod.get("spec") or {}).get("nodeName") or None


def port_annotation_raw(pod: Obj) -> str | None:
    return annotations_of(pod).get(PORT_ANNOTATION)
