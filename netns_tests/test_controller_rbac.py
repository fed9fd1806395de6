"""The controller keeps kproxy's per-tenant credentials in step, against a real kube-apiserver 1.20.

One control plane per module on 127.0.0.1 (etcd, API server, controller-manager, scheduler; no
nodes) with the repository's deploy/rbac applied and the Tenant CRD. The real ``Controller`` runs
in-process with the ``netctl-controller`` identity (so deploy/rbac/controller.yaml is what allows
or forbids every write) and a fake IaaS (our own interface). Then, as the cluster admin: Tenants
alpha and beta with labelled namespaces; the controller makes ServiceAccounts, ClusterRoleBindings
and RoleBindings; a token minted for alpha's kproxy (TokenRequest) lists Services in alpha's
namespaces and gets 403 in beta's; a namespace moves from alpha to beta and the bindings follow;
a deleted binding comes back at the next resync; deleting Tenant beta removes its credentials.
The controller must never see an error from the API (its RBAC is sufficient) and cannot bind any
role but kproxy's (its RBAC is no more than that).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from prometheus_client import REGISTRY

from netctl.controller.app import Controller, ControllerOptions
from netctl.kube.client import api_path, new_api_client, request_json
from netctl.kube.resources import KubeWriter
from netctl.lab.k8s import CONTROLLER, K8S_BINARIES, ControlPlane, k8s_bin_dirs
from netns_tests.waiting import wait_for
from tests.fakes import FakeIaaS, FakeRecorder

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
TENANT_LABEL = "netctl.io/tenant"
MANAGED = ("app.kubernetes.io/managed-by", "netctl-controller")
RBAC = ("rbac.authorization.k8s.io", "v1")
TENANTS = ("netctl.io", "v1alpha1", "tenants")
SANITY_S = 20.0
RESYNC_S = 1.0

Obj = dict[str, Any]


def metric(kind: str, result: str) -> float:
    v = REGISTRY.get_sample_value("netctl_kproxy_rbac_syncs_total", {"kind": kind, "result": result})
    return 0.0 if v is None else v


@dataclass
class World:
    prefix: str
    cp: ControlPlane
    admin: k8s.ApiClient
    ctl: Controller
    errors_before: float

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return request_json(self.admin, "GET", api_path(group, version, plural, namespace, name))
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def sa(self, tenant: str) -> Obj | None:
        return self.get("", "v1", "serviceaccounts", "kube-system", f"netctl-kproxy-{tenant}")

    def crb(self, tenant: str) -> Obj | None:
        return self.get(*RBAC, "clusterrolebindings", None, f"netctl-kproxy-{tenant}")

    def rb(self, tenant: str, namespace: str) -> Obj | None:
        return self.get(*RBAC, "rolebindings", namespace, f"netctl-kproxy-{tenant}")

    def managed_rbs(self) -> set[tuple[str, str]]:
        got = request_json(self.admin, "GET", api_path(*RBAC, "rolebindings"),
                           query={"labelSelector": "=".join(MANAGED)})  # fmt: skip
        return {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in got["items"]}

    def label(self, namespace: str, tenant: str | None) -> None:
        request_json(self.admin, "PATCH", api_path("", "v1", "namespaces", None, namespace),
                     body={"metadata": {"labels": {TENANT_LABEL: tenant}}},
                     content_type="application/merge-patch+json")  # fmt: skip


def _require_control_plane_binaries() -> None:
    for b in K8S_BINARIES[:3]:
        if not any(os.access(d / b, os.X_OK) for d in k8s_bin_dirs()):
            pytest.skip(f"{b} not built: run tools/build-k8s.sh")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _require_control_plane_binaries()
    prefix = "kr" + secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    cp = ControlPlane(tmp / "k8s", "127.0.0.1", prefix)  # applies deploy/rbac/*.yaml
    admin = ctl_api = None
    ctl: Controller | None = None
    try:
        t0 = time.monotonic()
        cp.start()
        cp.apply(REPO / "deploy" / "crds" / "tenant.yaml")
        admin = new_api_client(str(cp.kubeconfig()), pool_maxsize=8)

        def crd_served() -> bool:
            with contextlib.suppress(k8s.ApiException):
                request_json(admin, "GET", api_path(*TENANTS))
                return True
            return False

        wait_for(crd_served, "the Tenant CRD served")
        ctl_api = new_api_client(str(cp.kubeconfig(CONTROLLER)), pool_maxsize=16)
        writer = KubeWriter(ctl_api)
        ctl = Controller(ctl_api, FakeIaaS(), writer, FakeRecorder(),
                         ControllerOptions(workers=2, resync_period_s=RESYNC_S), rbac_writer=writer)  # fmt: skip
        errors = sum(metric(k, "error") for k in ("tenant", "namespace", "resync"))
        ctl.start_informers(timeout=SANITY_S)
        ctl.run()
        print(f"\ncontrol plane + controller up in {time.monotonic() - t0:.1f} s")
        yield World(prefix, cp, admin, ctl, errors)
    finally:
        if ctl is not None:
            ctl.stop()
        for c in (admin, ctl_api):
            if c is not None:
                c.close()
        try:
            cp.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def kproxy_token(w: World, tenant: str) -> k8s.ApiClient:
    """An API client holding a TokenRequest token of ``kube-system/netctl-kproxy-<tenant>``."""
    tr = request_json(w.admin, "POST", api_path("", "v1", "serviceaccounts", "kube-system", f"netctl-kproxy-{tenant}")
                      + "/token", body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                        "spec": {"expirationSeconds": 600}})  # fmt: skip
    conf = k8s.Configuration()
    conf.host = w.cp.server
    conf.ssl_ca_cert = str(w.cp.ca_path)
    conf.api_key = {"authorization": "Bearer " + tr["status"]["token"]}
    return k8s.ApiClient(conf)


def can_list_services(api: k8s.ApiClient, namespace: str) -> bool:
    try:
        request_json(api, "GET", api_path("", "v1", "services", namespace))
        return True
    except k8s.ApiException as exc:
        if exc.status == 403:
            return False
        raise


def test_kproxy_credentials_follow_tenants_and_namespaces(world: World) -> None:
    w = world
    t0 = time.monotonic()
    a1, a2, b1, plain = w.ns("a1"), w.ns("a2"), w.ns("b1"), w.ns("plain")
    for name, tenant in ((a1, "alpha"), (a2, "alpha"), (b1, "beta"), (plain, None)):
        request_json(w.admin, "POST", api_path("", "v1", "namespaces"),
                     body={"metadata": {"name": name, "labels": {TENANT_LABEL: tenant} if tenant else {}}})
    for tenant, cidr in (("alpha", "10.61.0.0/24"), ("beta", "10.62.0.0/24")):
        request_json(w.admin, "POST", api_path(*TENANTS),
                     body={"apiVersion": "netctl.io/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant},
                           "spec": {"cidr": cidr}})  # fmt: skip

    # --- the controller creates every tenant's account and bindings
    want = {(a1, "netctl-kproxy-alpha"), (a2, "netctl-kproxy-alpha"), (b1, "netctl-kproxy-beta")}
    wait_for(lambda: w.managed_rbs() == want, "one RoleBinding per tenant namespace")
    for tenant in ("alpha", "beta"):
        sa, crb = wait_for(lambda t=tenant: w.sa(t), f"SA of {tenant}"), wait_for(lambda t=tenant: w.crb(t), "CRB")
        owner = w.get(*TENANTS, None, tenant)
        assert owner is not None
        for o in (sa, crb):
            labels = o["metadata"]["labels"]
            assert labels[TENANT_LABEL] == tenant and labels[MANAGED[0]] == MANAGED[1]
            assert [r["uid"] for r in o["metadata"]["ownerReferences"]] == [owner["metadata"]["uid"]]
        assert crb["roleRef"]["name"] == "netctl-kproxy-node"
        assert crb["subjects"] == [{"kind": "ServiceAccount", "name": f"netctl-kproxy-{tenant}",
                                    "namespace": "kube-system"}]  # fmt: skip
    rb = w.rb("alpha", a1)
    assert rb is not None and rb["roleRef"]["name"] == "netctl-kproxy-services"
    print(f"\ncredentials of 2 tenants / 3 namespaces in place after {time.monotonic() - t0:.2f} s")

    # --- alpha's kproxy token: alpha's namespaces yes, beta's and untenanted ones no
    alpha = kproxy_token(w, "alpha")
    try:
        wait_for(lambda: can_list_services(alpha, a1) and can_list_services(alpha, a2), "alpha reads its services")
        assert not can_list_services(alpha, b1)
        assert not can_list_services(alpha, plain)

        # --- a2 moves from alpha to beta: the bindings follow
        t1 = time.monotonic()
        w.label(a2, "beta")
        wait_for(lambda: w.rb("alpha", a2) is None and w.rb("beta", a2) is not None, "a2's binding moves to beta")
        wait_for(lambda: not can_list_services(alpha, a2), "alpha loses a2")
        assert can_list_services(alpha, a1)
        print(f"relabel -> bindings moved in {time.monotonic() - t1:.2f} s")
    finally:
        alpha.close()

    # --- drift: a binding deleted behind the controller's back is restored by the resync
    request_json(w.admin, "DELETE", api_path(*RBAC, "rolebindings", a1, "netctl-kproxy-alpha"))
    wait_for(lambda: w.rb("alpha", a1) is not None, "the periodic resync restores a1's binding",
             timeout=RESYNC_S + SANITY_S)  # fmt: skip

    # --- Tenant beta deleted: its account, CRB and RoleBindings go; alpha's stay
    t2 = time.monotonic()
    request_json(w.admin, "DELETE", api_path(*TENANTS, None, "beta"))
    wait_for(lambda: w.sa("beta") is None and w.crb("beta") is None, "beta's SA and CRB gone")
    wait_for(lambda: w.managed_rbs() == {(a1, "netctl-kproxy-alpha")}, "beta's RoleBindings gone")
    assert w.sa("alpha") is not None and w.crb("alpha") is not None
    print(f"tenant delete -> credentials gone in {time.monotonic() - t2:.2f} s")

    # Every write above was the controller's own, allowed by deploy/rbac/controller.yaml.
    wait_for(lambda: metric("resync", "ok") > 0, "an RBAC resync ran")
    errors = sum(metric(k, "error") for k in ("tenant", "namespace", "resync"))
    assert errors == w.errors_before, "the controller's RBAC writes failed (see the log)"


def test_controller_can_bind_only_kproxy_roles(world: World) -> None:
    """Least privilege: the controller's `bind` covers kproxy's two ClusterRoles and nothing else."""
    w = world
    ns = w.ns("esc")
    request_json(w.admin, "POST", api_path("", "v1", "namespaces"), body={"metadata": {"name": ns}})
    with w.cp.api_client(CONTROLLER) as api:
        ctl = KubeWriter(api)
        subject = [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]

        def binding(kind: str, role: str) -> Obj:
            meta: Obj = {"name": f"{w.prefix}-esc-{role.replace(':', '-')}"}
            if kind == "RoleBinding":
                meta["namespace"] = ns
            return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    "subjects": subject}  # fmt: skip

        # RBAC lets anyone bind a role whose every permission they hold themselves (so an empty role,
        # like this lab's not-yet-aggregated admin/edit/view, proves nothing): use roles with rules the
        # controller does not have.
        secrets_reader = f"{w.prefix}-secrets-reader"
        request_json(w.admin, "POST", api_path(*RBAC, "clusterroles"),
                     body={"metadata": {"name": secrets_reader},
                           "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]})  # fmt: skip
        denied = [("RoleBinding", secrets_reader), ("ClusterRoleBinding", secrets_reader),
                  ("ClusterRoleBinding", "cluster-admin"), ("RoleBinding", "system:node-proxier")]  # fmt: skip
        for kind, role in denied:
            with pytest.raises(k8s.ApiException) as e:
                ctl.apply(binding(kind, role))
            assert e.value.status == 403, (kind, role, e.value.body)
        ctl.apply(binding("RoleBinding", "netctl-kproxy-services"))  # allowed: what it is for
        assert ctl.delete("rbac.authorization.k8s.io/v1", "rolebindings", ns, f"{w.prefix}-esc-netctl-kproxy-services")
        # Accounts only in kube-system; no token minting.
        with pytest.raises(k8s.ApiException) as e:
            ctl.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x", "namespace": ns}})
        assert e.value.status == 403
        with pytest.raises(k8s.ApiException) as e:
            request_json(api, "POST", api_path("", "v1", "serviceaccounts", "kube-system", "default") + "/token",
                         body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})
        assert e.value.status == 403
