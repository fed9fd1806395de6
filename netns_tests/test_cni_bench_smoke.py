"""bench/cni_add.py runs end to end (deployed shape, 5 pods; in-process, 2 pods) and prints both plugins'
figures and the ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("netns_tests.k8s_fixtures")
from netns_tests.k8s_fixtures import require_k8s_binaries  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.e2e]


@pytest.mark.parametrize("mode", [["--pods", "5"], ["--pods", "2", "--no-agent", "--no-launcher"]],
                         ids=["deployed-shape", "in-process"])
def test_cni_add_bench_prints_ratios(mode: list[str]) -> None:
    require_k8s_binaries()
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.cni_add", *mode], cwd=root, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0
    for who in ("ours", "ref"):
        for verb in ("ADD", "DEL"):
            assert re.search(rf"{who} {verb}\s+p50\s+[0-9.]+ ms\s+p99\s+[0-9.]+ ms", proc.stdout)
    ratios = re.findall(r"ratio (ADD|DEL) (p50|p99) ours/reference = ([0-9.]+)x", proc.stdout)
    assert len(ratios) == 4 and all(float(r) > 0 for *_, r in ratios)
    assert "where our time goes" in proc.stdout
    if "--no-agent" in mode:
        assert "doing the work in its own process" in proc.stdout and "the console script" in proc.stdout
    else:  # the default is what a node runs: the launcher forwarding to the agent
        assert "forwarding to the node agent" in proc.stdout and "launcher" in proc.stdout
        assert re.search(r"the executable alone .* p50\s+[0-9.]+ ms", proc.stdout)
        assert re.search(r"inside the ADD verb .* p50\s+[0-9.]+ ms", proc.stdout)
