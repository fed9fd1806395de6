"""Fakes for the kproxy-credentials work: an in-memory RBAC writer and a label-indexed cache.

Both fake *our own* interfaces (``tenant_rbac.RbacWriter``, ``ports.Cache``), not the Kubernetes API.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Iterable
from typing import Any

from netctl.annotations import TENANT_LABEL

Obj = dict[str, Any]
Key = tuple[str, str | None, str]  # (plural, namespace, name)

PLURALS = {"ServiceAccount": "serviceaccounts", "RoleBinding": "rolebindings",
           "ClusterRoleBinding": "clusterrolebindings"}  # fmt: skip


class FakeApiError(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"{status} {message}")
        self.status = status


class FakeRbacWriter:
    """Stores what is applied; records every call as ("apply"|"delete"|"get"|"list", ...)."""

    def __init__(self) -> None:
        self.objects: dict[Key, Obj] = {}
        self.calls: list[tuple[Any, ...]] = []
        self._uids = itertools.count(1)
        self._lock = threading.Lock()

    @staticmethod
    def key(obj: Obj) -> Key:
        m = obj["metadata"]
        return PLURALS[obj["kind"]], m.get("namespace"), m["name"]

    def writes(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in ("apply", "delete")]

    def clear_calls(self) -> None:
        self.calls.clear()

    def put(self, obj: Obj) -> Obj:
        """Create an object directly (someone else's, or drift), bypassing the call log."""
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("uid", f"uid-{next(self._uids)}")
        self.objects[self.key(obj)] = obj
        return obj

    def apply(self, obj: Obj) -> Obj:
        with self._lock:
            key = self.key(obj)
            self.calls.append(("apply", *key))
            have = self.objects.get(key)
            if have is not None and "roleRef" in have and have["roleRef"] != obj.get("roleRef"):
                raise FakeApiError(422, "roleRef is immutable")
            new = copy.deepcopy(obj)
            new["metadata"]["uid"] = have["metadata"]["uid"] if have else f"uid-{next(self._uids)}"
            self.objects[key] = new
            return copy.deepcopy(new)

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Obj | None:
        self.calls.append(("get", plural, namespace, name))
        o = self.objects.get((plural, namespace, name))
        return copy.deepcopy(o) if o is not None else None

    def delete(
        self, api_version: str, plural: str, namespace: str | None, name: str, uid: str | None = None
    ) -> bool:
        with self._lock:
            key = (plural, namespace, name)
            self.calls.append(("delete", *key))
            have = self.objects.get(key)
            if have is None or (uid and have["metadata"]["uid"] != uid):
                return False
            del self.objects[key]
            return True

    def list_managed_role_bindings(self, namespace: str | None = None, tenant: str | None = None) -> list[Obj]:
        self.calls.append(("list", namespace, tenant))
        out = []
        for (plural, ns, _), o in sorted(self.objects.items(), key=lambda kv: str(kv[0])):
            labels = o["metadata"].get("labels") or {}
            if plural != "rolebindings" or labels.get("app.kubernetes.io/managed-by") != "netctl-controller":
                continue
            if (namespace is None or ns == namespace) and (tenant is None or labels.get(TENANT_LABEL) == tenant):
                out.append(copy.deepcopy(o))
        return out

    def names(self, plural: str) -> set[tuple[str | None, str]]:
        return {(ns, name) for (p, ns, name) in self.objects if p == plural}


class LabelCache:
    """A cache whose "tenant" index is the netctl.io/tenant label (like the controller's informer)."""

    def __init__(self, objs: Iterable[Obj] = ()) -> None:
        self.objs: dict[str, Obj] = {}
        for o in objs:
            self.put(o)

    def put(self, o: Obj) -> None:
        self.objs[o["metadata"]["name"]] = o

    def remove(self, name: str) -> None:
        self.objs.pop(name, None)

    def get(self, key: str) -> Obj | None:
        return self.objs.get(key)

    def list(self) -> list[Obj]:
        return list(self.objs.values())

    def by_index(self, index: str, value: str) -> list[Obj]:
        assert index == "tenant"
        return [o for o in self.objs.values() if (o["metadata"].get("labels") or {}).get(TENANT_LABEL) == value]


def ns(name: str, tenant: str | None) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {TENANT_LABEL: tenant} if tenant else {}}}  # fmt: skip


def tenant(name: str, uid: str | None = None) -> Obj:
    return {"apiVersion": "netctl.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "uid": uid or f"tuid-{name}", "generation": 1},
            "spec": {"cidr": "10.9.0.0/24"}}  # fmt: skip
