"""Rules and memory on a tenant node: a tenant-scoped kproxy vs an unscoped (kube-proxy-like) one.

Usage (root):  .venv/bin/python bench/kproxy_scope.py [--tenants 100] [--services 100] [--endpoints 3]

The cluster: ``--tenants`` tenants, each with one namespace (labelled ``netctl.io/tenant``) holding
``--services`` Services with one EndpointSlice each. Two variants, each a fresh process (so its
RSS is its own) running inside its own throwaway network namespace with libnftables in-process:

* **scoped** — kproxy's pipeline for tenant ``t0``: ``TenantScope`` over an informer factory that
  answers as the API server does for kproxy's watches (namespaces by label selector, then
  Services/EndpointSlices per namespace) -> ``Proxier`` -> one full sync;
* **unscoped** — what a stock kube-proxy does: every Service and EndpointSlice of the cluster
  -> ``Proxier`` -> one full sync.

The objects are generated on demand, per namespace, as the server would send them — a variant
never holds what it was not sent. Reported per variant: objects received, service ports, the
kernel's rule and element counts (``nft -j list table`` in its namespace), VmRSS after start-up
and after the sync, sync seconds; then the unscoped/scoped ratios. DESIGN §7: a tenant node holds
its own tenant's services only — proportional to ``--services``, not tenants x services.
Never fails on size or time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
TENANT_LABEL = "netctl.io/tenant"


def namespace(t: int) -> Obj:
    return {"kind": "Namespace", "metadata": {"name": f"t{t}-ns", "labels": {TENANT_LABEL: f"t{t}"}}}


def objects(t: int, services: int, endpoints: int) -> tuple[list[Obj], list[Obj]]:
    """Tenant ``t``'s Services and EndpointSlices (cluster IPs and pod IPs unique cluster-wide)."""
    ns, svcs, slices = f"t{t}-ns", [], []
    for i in range(services):
        n = t * services + i
        svcs.append({"kind": "Service", "metadata": {"namespace": ns, "name": f"s{i}"},
                     "spec": {"clusterIP": f"10.96.{n // 250}.{n % 250 + 1}",
                              "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
        labels = {"kubernetes.io/service-name": f"s{i}"}
        slices.append({"kind": "EndpointSlice", "addressType": "IPv4",
                       "metadata": {"namespace": ns, "name": f"s{i}-x", "labels": labels},
                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       "endpoints": [{"addresses": [f"10.{100 + t}.{i}.{j + 1}"], "conditions": {"ready": True}}
                                     for j in range(endpoints)]})  # fmt: skip
    return svcs, slices


class ListOnce:
    """An informer that lists once (its objects made on demand) and never watches: enough here."""

    def __init__(self, produce: Callable[[], list[Obj]]) -> None:
        self._produce = produce
        self._handlers: list[Callable[[Obj], None]] = []
        self._synced = False

    def add_handler(self, on_add: Any = None, on_update: Any = None, on_delete: Any = None) -> None:
        self._handlers.append(on_add)

    def start(self) -> None:
        for obj in self._produce():
            for h in self._handlers:
                h(obj)
        self._synced = True

    def stop(self, timeout: float | None = 5.0) -> None:
        pass

    def has_synced(self) -> bool:
        return self._synced


class ServerLikeFactory:
    """Answers kproxy's watches as the API server would: label-selected namespaces, per-namespace objects."""

    def __init__(self, tenants: int, services: int, endpoints: int) -> None:
        self.n_tenants, self.n_services, self.n_endpoints = tenants, services, endpoints
        self.sent = 0

    def _count(self, objs: list[Obj]) -> list[Obj]:
        self.sent += len(objs)
        return objs

    def namespaces(self, label_selector: str) -> ListOnce:
        key, _, value = label_selector.partition("=")
        return ListOnce(lambda: self._count([ns for t in range(self.n_tenants) if
                                             (ns := namespace(t))["metadata"]["labels"].get(key) == value]))

    def _tenant(self, ns: str) -> int:
        return int(ns[1:].split("-")[0])

    def services(self, ns: str) -> ListOnce:
        return ListOnce(lambda: self._count(objects(self._tenant(ns), self.n_services, self.n_endpoints)[0]))

    def endpoint_slices(self, ns: str) -> ListOnce:
        return ListOnce(lambda: self._count(objects(self._tenant(ns), self.n_services, self.n_endpoints)[1]))


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(variant: str, table: str, tenants: int, services: int, endpoints: int) -> Obj:
    """One variant, in this process (already inside its namespace)."""
    from kproxy.nft import NftablesBackend
    from kproxy.proxier import Proxier
    from kproxy.render import RenderConfig
    from kproxy.scope import TenantScope

    backend = NftablesBackend()
    proxier = Proxier(backend, RenderConfig(table=table))
    rss_start = rss_kb()
    t0 = time.perf_counter()
    if variant == "scoped":
        factory = ServerLikeFactory(tenants, services, endpoints)
        scope = TenantScope(factory, "t0", proxier)
        scope.start()
        if not scope.wait_for_sync(60):
            raise RuntimeError("scope never synced")
        received = factory.sent
    else:
        received = 0
        for t in range(tenants):
            svcs, slices = objects(t, services, endpoints)
            received += 1 + len(svcs) + len(slices)
            for s in svcs:
                proxier.on_service(s)
            for sl in slices:
                proxier.on_slice(sl)
    feed_s = time.perf_counter() - t0
    proxier.mark_initialized()
    r = proxier.sync()
    if r.error:
        raise RuntimeError(f"sync failed: {r.error}")
    return {"variant": variant, "received": received, "service_ports": len(proxier.tracker.all_states()),
            "feed_s": feed_s, "sync_s": r.seconds, "rss_start_kb": rss_start, "rss_kb": rss_kb()}


def kernel_counts(netns: str, table: str) -> tuple[int, int, int]:
    """(chains, rules, elements) of our table, as the kernel lists them."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "ip", table],
                         check=True, capture_output=True, text=True).stdout
    objs = json.loads(out)["nftables"]
    chains = sum(1 for o in objs if "chain" in o)
    rules = sum(1 for o in objs if "rule" in o)
    elements = sum(len((o.get("map") or o.get("set") or {}).get("elem", [])) for o in objs if "map" in o or "set" in o)
    return chains, rules, elements


def run_variant(variant: str, args: argparse.Namespace) -> Obj:
    netns = "kpxs" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, __file__, "--child", variant, "--table",
                              netns, "--tenants", str(args.tenants), "--services", str(args.services),
                              "--endpoints", str(args.endpoints)],
                             capture_output=True, text=True, timeout=1800)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
        result: Obj = json.loads(out.stdout.splitlines()[-1])
        result["chains"], result["rules"], result["elements"] = kernel_counts(netns, netns)
        return result
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def rows(results: list[Obj]) -> Iterator[str]:
    for r in results:
        yield (f"{r['variant']:>9}: received {r['received']} objects, {r['service_ports']} service ports, "
               f"kernel {r['chains']} chains / {r['rules']} rules / {r['elements']} elements, "
               f"RSS {r['rss_kb'] / 1024:.1f} MiB ({(r['rss_kb'] - r['rss_start_kb']) / 1024:+.1f} MiB over start-up), "
               f"feed {r['feed_s']:.2f} s, sync {r['sync_s']:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--services", type=int, default=100, help="per tenant")
    ap.add_argument("--endpoints", type=int, default=3, help="per service")
    ap.add_argument("--child", choices=("scoped", "unscoped"), help=argparse.SUPPRESS)
    ap.add_argument("--table", default="kproxy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        print(json.dumps(child(args.child, args.table, args.tenants, args.services, args.endpoints)))
        return 0
    results = [run_variant(v, args) for v in ("scoped", "unscoped")]
    print(f"cluster: {args.tenants} tenants x {args.services} services x {args.endpoints} endpoints")
    for line in rows(results):
        print(line)
    s, u = results
    grow = (u["rss_kb"] - u["rss_start_kb"]) / max(1, s["rss_kb"] - s["rss_start_kb"])
    print(f"unscoped / scoped: objects {u['received'] / s['received']:.1f}x, "
          f"elements {u['elements'] / max(1, s['elements']):.1f}x, rules {u['rules'] / max(1, s['rules']):.1f}x, "
          f"RSS {u['rss_kb'] / s['rss_kb']:.2f}x (growth over start-up {grow:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
