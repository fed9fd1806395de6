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
