"""kproxy full sync vs the kube-proxy-shaped nftables layout, same services, same run, same netns.

Usage (root):  .venv/bin/python bench/kproxy_sync.py [--services 1000] [--endpoints 5] [--no-reference]
The DESIGN §7 figures: ``--services 10000 --endpoints 5`` (10,000 services / 50,000 endpoints;
the kube-proxy-shaped reference alone takes ~100 s of kernel time at that size).

Everything happens in a throwaway network namespace (per-run name, deleted at the end). Measured:

* kproxy full sync: Services + EndpointSlices fed as API JSON to a ``Proxier``, ``sync()`` =
  render + one libnftables transaction (through ``NetnsBackend``), against loading the identical
  script raw: with ``nft -f`` and through libnftables (DESIGN §7: full sync within 1.2x of a raw
  ``nft -f`` of our own ruleset);
* the reference: the same services in kube-proxy's nftables-mode shape (verdict map -> one chain
  per service -> one chain per endpoint with the DNAT), loaded the same way (target: ours >= 15x
  faster at 10,000 services);
* a one-endpoint change applied as a partial sync at that size (target < 20 ms).

Besides wall-clock seconds it prints CPU seconds (user + system of every process involved: this
one, the namespace's backend process, ``nft``): on the shared 2-core machine wall-clock ratios
swing by 2x with the load, CPU ratios much less. Each load starts 0.5 s after the previous table
was deleted, so the kernel's deferred freeing of that table cannot overlap the next timing (no
measurable effect on an idle machine; on a loaded one it competes for the same two cores).

Prints figures and ratios; never fails on time (exit status 0 unless something broke).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from kproxy.netns import NetnsBackend
from kproxy.nft import Contents
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig, full_script, service_elements


def service(i: int) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"namespace": "bench", "name": f"s{i}"},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_ip(i: int, j: int) -> str:
    n = i * 8 + j
    return f"10.{100 + n // 65536}.{n // 256 % 256}.{n % 256}"


def endpoint_slice(i: int, count: int, first: int = 0) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"namespace": "bench", "name": f"s{i}-x", "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [endpoint_ip(i, j)], "conditions": {"ready": True}}
                          for j in range(first, first + count)]}


def kube_proxy_shaped(table: str, services: int, endpoints: int) -> str:
    """kube-proxy nftables mode's layout: vmap -> per-service chain -> per-endpoint chain."""
    t = f"ip {table}"
    lines = [f"add table {t}", f"delete table {t}", f"add table {t}",
             f"add map {t} service_ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
             f"add chain {t} nat_prerouting {{ type nat hook prerouting priority -100; policy accept; }}",
             f"add chain {t} services",
             f"add rule {t} nat_prerouting jump services",
             f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service_ips"]
    vmap = []
    for i in range(services):
        svc_chain = f"svc-s{i}"
        lines.append(f"add chain {t} {svc_chain}")
        targets = []
        for j in range(endpoints):
            ep_chain = f"sep-s{i}-{j}"
            lines.append(f"add chain {t} {ep_chain}")
            lines.append(f"add rule {t} {ep_chain} ip saddr {endpoint_ip(i, j)} jump mark_masq")
            lines.append(f"add rule {t} {ep_chain} meta l4proto tcp dnat to {endpoint_ip(i, j)}:8080")
            targets.append(f"{j} : goto {ep_chain}")
        lines.append(f"add rule {t} {svc_chain} numgen random mod {endpoints} vmap {{ {', '.join(targets)} }}")
        ip = service(i)["spec"]["clusterIP"]
        vmap.append(f"{ip} . tcp . 80 : goto {svc_chain}")
    lines.insert(6, f"add chain {t} mark_masq")
    lines.insert(7, f"add rule {t} mark_masq meta mark set meta mark or 0x4000")
    for k in range(0, len(vmap), 500):
        lines.append(f"add element {t} service_ips {{ {', '.join(vmap[k:k + 500])} }}")
    return "\n".join(lines) + "\n"


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def children_cpu() -> float:
    """User + system seconds of this process's waited-for children (``nft -f``)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuClock:
    """CPU seconds (user + system) of this process plus the namespace's backend process: on a shared,
    loaded machine wall-clock ratios swing by 2x, CPU-time ratios much less."""

    def __init__(self, backend: NetnsBackend) -> None:
        self.backend = backend

    def __call__(self) -> float:
        return time.process_time() + float(self.backend.run(time.process_time))


class Recording:
    """A backend wrapper keeping the last script applied: the raw loads replay exactly it."""

    def __init__(self, backend: NetnsBackend) -> None:
        self.backend = backend
        self.last = ""

    def apply(self, script: str) -> None:
        self.backend.apply(script)
        self.last = script

    def verify(self, cfg: RenderConfig, expected: Contents | None = None) -> str | None:
        return self.backend.verify(cfg, expected)

    def remove(self, cfg: RenderConfig) -> None:
        self.backend.remove(cfg)


def nft_file(netns: str, script: str) -> tuple[float, float]:
    """``nft -f`` of the script in the namespace (process start included, as an operator would):
    wall and CPU seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
        f.write(script)
    try:
        cpu0, start = children_cpu(), time.perf_counter()
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", f.name], check=True, capture_output=True)
        return time.perf_counter() - start, children_cpu() - cpu0
    finally:
        os.unlink(f.name)


def settle() -> None:
    """Let the kernel finish freeing a just-deleted table (deferred work) before the next timing."""
    time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1000, help="10000 for the DESIGN §7 target")
    ap.add_argument("--endpoints", type=int, default=5, help="endpoints per service (5: 50,000 at 10,000)")
    ap.add_argument("--changes", type=int, default=7, help="one-endpoint changes to time")
    ap.add_argument("--no-reference", action="store_true", help="skip the kube-proxy-shaped load (~100 s at 10k)")
    args = ap.parse_args()
    netns = "kpxb" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", netns], check=True)
    backend = NetnsBackend(netns)
    try:
        cfg = RenderConfig(table=f"{netns}")
        # Warm-up: the first NAT chain in a fresh namespace also starts conntrack/NAT there (a
        # one-off cost a real node paid long ago); neither our sync nor the references pay it.
        backend.apply(full_script([], cfg))
        backend.remove(cfg)
        rec = Recording(backend)
        proxier = Proxier(rec, cfg)
        t0 = time.perf_counter()
        for i in range(args.services):
            proxier.on_service(service(i))
            proxier.on_slice(endpoint_slice(i, args.endpoints))
        feed = time.perf_counter() - t0
        proxier.mark_initialized()
        settle()
        cpu = CpuClock(backend)
        cpu0 = cpu()
        result = proxier.sync()
        full_cpu = cpu() - cpu0
        if result.error or result.mode != "full":
            print(f"full sync failed: {result}", file=sys.stderr)
            return 1
        full, script = result.seconds, rec.last
        states = proxier.tracker.all_states()
        t0 = time.perf_counter()
        full_script([service_elements(states[k], cfg) for k in sorted(states)], cfg)
        render = time.perf_counter() - t0

        changes = []
        for c in range(args.changes):
            i = (c * 7919) % args.services
            proxier.on_slice(endpoint_slice(i, args.endpoints, first=1 + c % 2))  # one endpoint swapped
            r = proxier.sync()
            if r.error or r.mode != "partial":
                print(f"partial sync failed: {r}", file=sys.stderr)
                return 1
            changes.append(r.seconds)

        # The references load into an empty namespace, as the full sync did.
        backend.remove(cfg)
        settle()
        cpu0 = cpu()
        raw = timed(backend.apply, script)  # the identical script, libnftables, no rendering
        raw_cpu = cpu() - cpu0
        backend.remove(cfg)
        settle()
        raw_cli, raw_cli_cpu = nft_file(netns, script)  # the identical script through `nft -f`
        backend.remove(cfg)
        settle()
        ref = ref_script = None
        if not args.no_reference:
            ref_table = f"{netns}ref"
            ref_script = kube_proxy_shaped(ref_table, args.services, args.endpoints)
            ref = timed(backend.apply, ref_script)
            backend.remove(RenderConfig(table=ref_table))

        n_el = sum(len(line.split(", ")) for line in script.splitlines() if line.startswith("add element"))
        print(f"services={args.services} endpoints={args.services * args.endpoints} elements={n_el} "
              f"script={len(script) / 1e6:.1f} MB" +
              (f" reference-script={len(ref_script) / 1e6:.1f} MB" if ref_script else ""))
        print(f"feeding API objects to the tracker: {feed:.3f} s")
        print(f"kproxy full sync (render + one transaction): {full:.3f} s (render alone {render:.3f} s)")
        print(f"raw nft -f of the same script: {raw_cli:.3f} s -> full sync / raw nft -f = {full / raw_cli:.2f}x"
              " (target <= 1.2x)")
        print(f"raw libnftables load of the same script: {raw:.3f} s -> full sync / raw load = {full / raw:.2f}x")
        print(f"CPU seconds (user+sys, all processes involved): full sync {full_cpu:.3f}, raw nft -f {raw_cli_cpu:.3f}"
              f" ({full_cpu / raw_cli_cpu:.2f}x), raw libnftables {raw_cpu:.3f} ({full_cpu / raw_cpu:.2f}x)")
        if ref is not None:
            print(f"kube-proxy-shaped layout ({args.services + args.services * args.endpoints} chains) load: "
                  f"{ref:.3f} s")
            print(f"ratio kube-proxy-shaped / kproxy full sync = {ref / full:.1f}x (target >= 15x)")
        med = statistics.median(changes) * 1e3
        print(f"one-endpoint change (partial sync, {len(changes)} runs): median {med:.1f} ms,"
              f" max {max(changes) * 1e3:.1f} ms")
        return 0
    finally:
        backend.close()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
