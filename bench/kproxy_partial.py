"""One-endpoint change applied as a partial sync, at several table sizes, same run, same netns.

Usage (root):  .venv/bin/python bench/kproxy_partial.py [--sizes 100,1000,10000] [--changes 30]

For each size a fresh table in one throwaway namespace (per-run name, deleted at the end) is
fully synced with that many services (``--endpoints`` each), then ``--changes`` EndpointSlice
updates, each swapping one endpoint of one service, are applied one by one as partial syncs
(``Proxier.sync``: render the changed service, diff its elements, one libnftables transaction
through ``NetnsBackend``). DESIGN §7 target: < 20 ms and flat — the same at 100 and 10,000.

Prints median / p90 / max per size and the ratio of the largest size's median to the smallest's;
never fails on time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kproxy_sync import endpoint_slice, service

from kproxy.netns import NetnsBackend
from kproxy.proxier import Proxier
from kproxy.render import RenderConfig, full_script


def measure(backend: NetnsBackend, table: str, services: int, endpoints: int, changes: int) -> list[float]:
    cfg = RenderConfig(table=table)
    proxier = Proxier(backend, cfg)
    for i in range(services):
        proxier.on_service(service(i))
        proxier.on_slice(endpoint_slice(i, endpoints))
    proxier.mark_initialized()
    r = proxier.sync()
    if r.error or r.mode != "full":
        raise RuntimeError(f"full sync failed: {r}")
    out = []
    for c in range(changes):
        i = (c * 7919) % services
        proxier.on_slice(endpoint_slice(i, endpoints, first=1 + c % 2))  # one endpoint swapped
        r = proxier.sync()
        if r.error or r.mode != "partial" or r.changed != 1:
            raise RuntimeError(f"partial sync failed: {r}")
        out.append(r.seconds)
    backend.remove(cfg)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000", help="comma-separated service counts")
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--changes", type=int, default=30)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    netns = "kpxp" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", netns], check=True)
    backend = NetnsBackend(netns)
    try:
        warm = RenderConfig(table=f"{netns}w")
        backend.apply(full_script([], warm))  # first NAT chain in the netns: one-off start of conntrack/NAT
        backend.remove(warm)
        medians = {}
        for n in sizes:
            times = measure(backend, f"{netns}s{n}", n, args.endpoints, args.changes)
            medians[n] = statistics.median(times)
            print(f"one-endpoint change at {n} services: median {medians[n] * 1e3:.2f} ms, "
                  f"p90 {pct(times, 0.9) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms ({len(times)} changes)")
        lo, hi = min(sizes), max(sizes)
        print(f"flatness: median at {hi} / median at {lo} = {medians[hi] / medians[lo]:.2f}x "
              f"(target: < 20 ms at every size, ~1x)")
        return 0
    finally:
        backend.close()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
