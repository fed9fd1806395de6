"""The data-plane layer: root, real daemons, per-run names.

Without ``--require-netns`` these tests skip (with the reason) where the machine cannot run them.
With it (what `make test` and CI pass) a skipped or missing netns layer fails the run: a layer
that silently did not run must never count as a pass.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_TOOLS = ("ovsdb-server", "ovs-vswitchd", "ovn-northd", "ovn-controller", "containerd", "etcd")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-netns",
        action="store_true",
        help="fail (do not skip) when the netns/e2e layer cannot run or runs no test",
    )


def _why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "the netns layer needs root"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        return f"missing tools: {', '.join(missing)} (run tools/install-system.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.netns)
    reason = _why_not_runnable()
    if reason is None:
        return
    if config.getoption("--require-netns"):
        raise pytest.UsageError(f"--require-netns given but the netns layer cannot run: {reason}")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=reason))


class _LayerTally:
    def __init__(self) -> None:
        self.passed = 0
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "netns_tests" not in report.nodeid:
            return
        if report.when == "call" and report.passed:
            self.passed += 1
        elif report.skipped:
            self.skipped.append(report.nodeid)


_tally = _LayerTally()


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_tally, "netctl-netns-tally")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--require-netns"):
        return
    problems = []
    if _tally.skipped:
        problems.append(f"{len(_tally.skipped)} netns test(s) skipped: {', '.join(_tally.skipped[:5])}")
    if _tally.passed == 0:
        problems.append("no netns test passed")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("netns layer required but: " + "; ".join(problems), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
