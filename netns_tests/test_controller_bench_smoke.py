"""CI's short run of bench/ovn_ports.py: it starts its own OVN, writes 200 ports three ways and
times the restart reconcile; this checks it ran to the end and printed every figure (never the
figures' values: benchmarks do not fail on time)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ovn_ports.py"
NUM = r"([0-9]+(?:\.[0-9]+)?)"


def test_ovn_ports_bench_prints_its_figures() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--ports", "200"], capture_output=True, text=True,
                          timeout=300, check=False)
    out = proc.stdout
    print(out)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{out}\n{proc.stderr}"
    rates = {}
    for mode in "abc":
        m = re.search(rf"^\({mode}\) .*?{NUM} ports/s", out, re.M)
        assert m, f"no ports/s figure for mode ({mode}) in:\n{out}"
        rates[mode] = float(m.group(1))
        assert rates[mode] > 0
    for ratio in ("(b)/(c)", "(b)/(a)"):
        m = re.search(rf"^ratio {re.escape(ratio)} .*?{NUM}$", out, re.M)
        assert m, f"no ratio {ratio} in:\n{out}"
    assert float(re.search(rf"^ratio \(b\)/\(a\) .*?{NUM}$", out, re.M).group(1)) == pytest.approx(  # type: ignore[union-attr]
        rates["b"] / rates["a"], rel=0.02)
    m = re.search(rf"^reconcile PortController\.plan\(\) over 200 pods/ports: steady {NUM} s, "
                  rf"with 2 deleted \+ 2 new pods {NUM} s", out, re.M)
    assert m, f"no reconcile figure in:\n{out}"


SCALE_BENCH = BENCH.parent / "controller_scale.py"


def test_controller_scale_bench_prints_its_figures() -> None:
    """CI's short run of bench/controller_scale.py: latency with and without pools, restart reconcile."""
    proc = subprocess.run([sys.executable, str(SCALE_BENCH), "--pods", "100", "--concurrent", "10", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout
    print(out)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{out}\n{proc.stderr[-3000:]}"
    for variant in ("without pools", "with pools"):
        m = re.search(rf"^\(1\) create -> annotated, 10 concurrent x 1 rounds, {variant}: p50 {NUM} ms, "
                      rf"p99 {NUM} ms", out, re.M)
        assert m, f"no latency figure {variant} in:\n{out}"
        assert 0 < float(m.group(1)) <= float(m.group(2))
    assert re.search(rf"^\(2\) 100 pods created through the API in {NUM} s", out, re.M), out
    m = re.search(rf"^\(2\) restart at 100 pods with 1 deleted \+ 1 new while down: first full reconcile done "
                  rf"{NUM} s after start \(the reconcile itself {NUM} s\), all three sources agree {NUM} s", out, re.M)
    assert m, f"no restart figure (or not converged) in:\n{out}"
