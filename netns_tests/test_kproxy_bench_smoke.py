"""Smoke runs of the kproxy benchmarks (bench/kproxy_*.py): they run at a small size, clean up
their namespaces, and print their figures and ratios. Never a timing assertion."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

BENCH = Path(__file__).resolve().parent.parent / "bench"
NUM = r"[-+]?\d+(\.\d+)?"


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def run(script: str, prefix: str, *args: str) -> str:
    """Run one bench; ``prefix``: its namespaces' (others may run other benches meanwhile)."""
    before = _netns()
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120,
                         cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr
    assert {n for n in _netns() - before if n.startswith(prefix)} == set(), "a benchmark left a namespace behind"
    return out.stdout


def test_full_sync_bench() -> None:
    out = run("kproxy_sync.py", "kpxb", "--services", "50", "--changes", "3")
    assert re.search(rf"full sync / raw nft -f = {NUM}x", out), out
    assert re.search(rf"full sync / raw load = {NUM}x", out), out
    assert re.search(rf"ratio kube-proxy-shaped / kproxy full sync = {NUM}x", out), out
    assert re.search(rf"one-endpoint change .* median {NUM} ms", out), out


def test_partial_sync_bench() -> None:
    out = run("kproxy_partial.py", "kpxp", "--sizes", "20,200", "--changes", "3")
    for n in (20, 200):
        assert re.search(rf"one-endpoint change at {n} services: median {NUM} ms", out), out
    assert re.search(rf"flatness: median at 200 / median at 20 = {NUM}x", out), out


def test_connect_latency_bench() -> None:
    out = run("kproxy_latency.py", "kpxl", "--small", "10", "--large", "200", "--connects", "30", "--rounds", "1")
    assert re.search(rf"growth 10 -> 200 services: median {NUM} %, p99 {NUM} %", out), out


def test_scope_bench_counts_are_proportional_to_the_tenant() -> None:
    out = run("kproxy_scope.py", "kpxs", "--tenants", "5", "--services", "10", "--endpoints", "2")
    # Counts, not times: the scoped node gets and programs one tenant's share, exactly.
    assert re.search(r"scoped: received 21 objects, 10 service ports, kernel \d+ chains / \d+ rules / 30 elements",
                     out), out
    assert re.search(r"unscoped: received 105 objects, 50 service ports, kernel \d+ chains / \d+ rules / 150 elements",
                     out), out
    assert re.search(rf"unscoped / scoped: objects 5.0x, elements 5.0x, rules 1.0x, RSS {NUM}x", out), out
