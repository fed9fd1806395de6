"""Smoke run of bench/kproxy_sync.py: it runs, cleans up its netns, and prints the ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

BENCH = Path(__file__).resolve().parent.parent / "bench" / "kproxy_sync.py"


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_bench_smoke() -> None:
    before = _netns()
    out = subprocess.run([sys.executable, str(BENCH), "--services", "50", "--changes", "3"],
                         capture_output=True, text=True, timeout=120, cwd=BENCH.parent.parent)
    assert out.returncode == 0, out.stderr
    assert re.search(r"ratio kube-proxy-shaped / kproxy full sync = \d+(\.\d+)?x", out.stdout), out.stdout
    assert re.search(r"full sync / raw load = \d+(\.\d+)?x", out.stdout), out.stdout
    assert re.search(r"one-endpoint change .* median \d+(\.\d+)? ms", out.stdout), out.stdout
    assert {n for n in _netns() - before if n.startswith("kpxb")} == set()
