"""Ports per second into a real OVN Northbound DB, and the restart reconcile over as many pods.

Usage (root; starts its own throwaway OVS + OVN in a per-run netns and run dir):
    .venv/bin/python bench/ovn_ports.py [--ports 10000] [--batch 100]

Three ways of writing N logical switch ports, each into its own fresh switch of the same NB,
in the same run (each switch is deleted again before the next mode, so every mode starts from
the same database size):
  (a) OvnIaaS.create_port        one transaction per port (IPAM, owner identity, port security)
  (b) OvnIaaS.create_ports       --batch ports per transaction (same work as (a))
  (c) reference: plain ovsdbapp  lsp_add + lsp_set_addresses, --batch ports per transaction,
                                 addresses precomputed (no IPAM, no external_ids, no verify)
  (d) reference: plain ovsdbapp  lsp_add with the same columns (b) writes (addresses,
                                 port_security, owner external_ids), --batch ports per txn: the
                                 same rows for the database and every IDL client to carry, so
                                 (b)/(d) is netctl's own overhead (IPAM, verify, idempotency)
Then the reconcile a restarted controller runs: `PortController.plan()` over the N ports of (b)
and N synthetic pods whose annotations match (steady state), once more with 1 % of the pods
deleted and 1 % new ones (orphans and pods to repair). Target (issue 4): 10,000 pods < 10 s.

Prints ports/s per mode and the ratios (b)/(c), (b)/(d) and (b)/(a); never fails on time (it does fail
if a mode wrote the wrong number of ports or the reconcile plan is wrong).
"""

from __future__ import annotations

import argparse
import builtins
import ipaddress
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ovsdbapp.backend.ovs_idl import connection as ovsdb_connection
from ovsdbapp.schema.ovn_northbound.impl_idl import OvnNbApiIdlImpl

from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL
from netctl.controller.ports import Caches, PortController
from netctl.controller.reconcile import expected_annotation
from netctl.iaas.base import Network, NetworkSpec, Port, PortOwner, PortRequest
from netctl.iaas.ovn import OvnIaaS
from netctl.ipam import mac_for_ip
from netctl.lab.ovs import OvnStack, OvsStack
from netctl.ovsdb import per_instance_connection

Obj = dict[str, Any]
CIDR = {"a": "10.60.0.0/16", "b": "10.61.0.0/16", "c": "10.62.0.0/16", "d": "10.63.0.0/16"}
NS = "bench-ns"


class DictCache:
    """The informer-cache surface `PortController` reads (get, list, by_index), over a dict."""

    def __init__(self, objs: list[Obj] = ()) -> None:  # type: ignore[assignment]
        self.objs: dict[str, Obj] = {}
        for o in objs:
            self.put(o)

    @staticmethod
    def key(o: Obj) -> str:
        m = o["metadata"]
        return f"{m['namespace']}/{m['name']}" if m.get("namespace") else str(m["name"])

    def put(self, o: Obj) -> None:
        self.objs[self.key(o)] = o

    def remove(self, key: str) -> None:
        del self.objs[key]

    def get(self, key: str) -> Obj | None:
        return self.objs.get(key)

    def list(self) -> list[Obj]:
        return list(self.objs.values())

    def by_index(self, index: str, value: str) -> builtins.list[Obj]:
        return [o for o in self.objs.values() if o["metadata"].get(index) == value]


class NoWriter:
    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str | None],
                              uid: str | None = None) -> None:
        raise AssertionError("plan() must not write")

    def patch_tenant_status(self, name: str, status: dict[str, Any]) -> None:
        raise AssertionError("plan() must not write")


class NoRecorder:
    def record(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        pass


def owner(i: int, tenant: str) -> PortOwner:
    return PortOwner(kind="pod", name=f"p{i}", namespace=NS, uid=f"u{tenant}{i:07d}", tenant=tenant)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def mode_a(iaas: OvnIaaS, net: Network, n: int) -> None:
    for i in range(n):
        o = owner(i, net.tenant)
        iaas.create_port(net, o, f"pod-{o.uid}")


def mode_b(iaas: OvnIaaS, net: Network, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        reqs = []
        for i in range(start, min(n, start + batch)):
            o = owner(i, net.tenant)
            reqs.append(PortRequest(f"pod-{o.uid}", o))
        iaas.create_ports(net, reqs)


def mode_c(api: Any, switch: str, n: int, batch: int) -> None:
    hosts = ipaddress.ip_network(CIDR["c"]).hosts()
    next(hosts)  # leave the gateway out, like (a)/(b)
    addrs = [str(next(hosts)) for _ in range(n)]
    for start in range(0, n, batch):
        with api.transaction(check_error=True) as txn:
            for i in range(start, min(n, start + batch)):
                add = txn.add(api.lsp_add(switch, f"ref-{i}"))
                txn.add(api.lsp_set_addresses(add, [f"{mac_for_ip(addrs[i])} {addrs[i]}"]))


def mode_d(api: Any, switch: str, tenant: str, n: int, batch: int) -> None:
    hosts = ipaddress.ip_network(CIDR["d"]).hosts()
    next(hosts)
    addrs = [str(next(hosts)) for _ in range(n)]
    for start in range(0, n, batch):
        with api.transaction(check_error=True) as txn:
            for i in range(start, min(n, start + batch)):
                o = owner(i, tenant)
                entry = f"{mac_for_ip(addrs[i])} {addrs[i]}"
                ids = {"netctl:tenant": tenant, "netctl:owner": "pod", "netctl:pod": o.name,
                       "netctl:namespace": NS, "netctl:pod-uid": str(o.uid)}
                txn.add(api.lsp_add(switch, f"refd-{o.uid}", addresses=[entry], port_security=[entry],
                                    external_ids=ids))


def pods_for(ports: list[Port], net: Network) -> list[Obj]:
    """One pod per port, scheduled nowhere, annotated exactly as the controller would have."""
    out = []
    for p in ports:
        assert p.owner is not None
        ann = expected_annotation(p, net.gateway, net.mtu).to_json()
        out.append({
            "metadata": {"name": p.owner.name, "namespace": NS, "uid": p.owner.uid,
                         "annotations": {PORT_ANNOTATION: ann}},
            "spec": {}, "status": {"phase": "Running"},
        })
    return out


def reconcile(iaas: OvnIaaS, net: Network, n: int) -> dict[str, float]:
    ports = [p for p in iaas.list_ports(tenant=net.tenant) if p.owner is not None]
    if len(ports) != n:
        raise SystemExit(f"FAIL: expected {n} pod ports in {net.id}, found {len(ports)}")
    pods = DictCache(pods_for(ports, net))
    caches = Caches(
        pods=pods,
        namespaces=DictCache([{"metadata": {"name": NS, "labels": {TENANT_LABEL: net.tenant}}}]),
        tenants=DictCache([{"metadata": {"name": net.tenant}, "spec": {"cidr": net.cidr}}]),
        nodes=DictCache(),
    )
    ctl = PortController(caches, iaas, NoWriter(), NoRecorder())
    t_list, _ = timed(lambda: iaas.list_ports())
    t_steady, plan = timed(ctl.plan)
    if not plan.empty:
        raise SystemExit(f"FAIL: steady-state plan not empty: {len(plan.orphan_ports)} orphans, "
                         f"{len(plan.pods_to_sync)} to sync")
    # 1 % churn while "down": pods gone (their ports are orphans), new pods without ports.
    k = max(1, n // 100)
    for p in pods.list()[:k]:
        pods.remove(DictCache.key(p))
    for i in range(k):
        pods.put({"metadata": {"name": f"new{i}", "namespace": NS, "uid": f"new-{i}", "annotations": {}},
                  "spec": {}, "status": {"phase": "Pending"}})
    t_churn, plan = timed(ctl.plan)
    if (len(plan.orphan_ports), len(plan.pods_to_sync)) != (k, k):
        raise SystemExit(f"FAIL: churn plan has {len(plan.orphan_ports)} orphans and {len(plan.pods_to_sync)} "
                         f"pods to sync, expected {k} and {k}")
    return {"list_ports": t_list, "plan_steady": t_steady, "plan_churn": t_churn, "churn": float(k)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ports", type=int, default=10_000, help="ports per mode (default 10,000)")
    ap.add_argument("--batch", type=int, default=100, help="ports per transaction in (b) and (c)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespace, OVS)", file=sys.stderr)
        return 2
    n, batch = args.ports, args.batch
    if not 0 < n < 65_000:
        print("--ports must be between 1 and 64,999 (one /16 per mode)", file=sys.stderr)
        return 2
    prefix = "b" + secrets.token_hex(2)
    base = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    ovs = OvsStack(base / "ovs", netns=f"{prefix}hv", timeout=60)
    ovn = OvnStack(base / "ovn", ovs, "br-int", system_id=f"{prefix}-chassis", timeout=60)
    iaas: OvnIaaS | None = None
    ref: Any = None
    try:
        ovs.start()
        ovs.add_bridge("br-int")
        ovn.start()
        iaas = OvnIaaS(ovn.nb_connection, timeout=120)
        idl = ovsdb_connection.OvsdbIdl.from_server(ovn.nb_connection, "OVN_Northbound")
        ref = per_instance_connection(OvnNbApiIdlImpl)(ovsdb_connection.Connection(idl, 120))
        print(f"ovn_ports: {n} ports per mode, batch {batch}, NB {ovn.nb_connection}")
        rates: dict[str, float] = {}

        def net_for(mode: str) -> Network:
            assert iaas is not None
            return iaas.ensure_network(NetworkSpec(tenant=f"{prefix}{mode}", cidr=CIDR[mode], gateway=None, mtu=1400))

        def check_and_drop(switch: str, tenant: str | None) -> None:
            rows = ref.lsp_list(switch).execute(check_error=True)
            if len(rows) != n:
                raise SystemExit(f"FAIL: {switch} has {len(rows)} ports, expected {n}")
            if tenant is not None:
                assert iaas is not None
                iaas.delete_network(tenant)
            else:
                ref.ls_del(switch).execute(check_error=True)

        net = net_for("a")
        secs, _ = timed(lambda: mode_a(iaas, net, n))
        rates["a"] = n / secs
        print(f"(a) OvnIaaS.create_port, 1 port/txn:            {rates['a']:9.0f} ports/s  ({secs:.2f} s)")
        check_and_drop(net.id, net.tenant)

        net = net_for("b")
        secs, _ = timed(lambda: mode_b(iaas, net, n, batch))
        rates["b"] = n / secs
        print(f"(b) OvnIaaS.create_ports, {batch} ports/txn:       {rates['b']:9.0f} ports/s  ({secs:.2f} s)")
        net_b = net

        switch_c = f"{prefix}-ref"
        ref.ls_add(switch_c).execute(check_error=True)
        secs, _ = timed(lambda: mode_c(ref, switch_c, n, batch))
        rates["c"] = n / secs
        print(f"(c) ovsdbapp lsp_add+lsp_set_addresses, {batch}/txn: {rates['c']:9.0f} ports/s  ({secs:.2f} s)")
        check_and_drop(switch_c, None)

        switch_d = f"{prefix}-refd"
        ref.ls_add(switch_d).execute(check_error=True)
        secs, _ = timed(lambda: mode_d(ref, switch_d, f"{prefix}d", n, batch))
        rates["d"] = n / secs
        print(f"(d) ovsdbapp lsp_add, same columns as (b), {batch}/txn: {rates['d']:9.0f} ports/s  ({secs:.2f} s)")
        check_and_drop(switch_d, None)

        print(f"ratio (b)/(c) batched vs plain ovsdbapp:  {rates['b'] / rates['c']:.2f}")
        print(f"ratio (b)/(d) batched vs plain ovsdbapp writing the same rows: {rates['b'] / rates['d']:.2f}")
        print(f"ratio (b)/(a) batched vs 1 port/txn:      {rates['b'] / rates['a']:.2f}")

        r = reconcile(iaas, net_b, n)
        print(f"reconcile PortController.plan() over {n} pods/ports: steady {r['plan_steady']:.3f} s, "
              f"with {int(r['churn'])} deleted + {int(r['churn'])} new pods {r['plan_churn']:.3f} s "
              f"(of which list_ports {r['list_ports']:.3f} s); target < 10 s at 10,000")
        check_and_drop(net_b.id, net_b.tenant)
        return 0
    finally:
        for closer in (getattr(iaas, "close", None), getattr(getattr(ref, "ovsdb_connection", None), "stop", None)):
            if closer is not None:
                try:
                    closer()
                except Exception as exc:  # cleanup goes on
                    print(f"cleanup: {exc}", file=sys.stderr)
        ovn.stop()
        ovs.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
