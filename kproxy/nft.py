"""The nftables backend: apply a rendered script as one transaction, and detect drift.

``NftablesBackend`` goes through libnftables (the ``nftables`` module), never the ``nft`` CLI:
no fork/exec per sync, and one ``cmd()`` buffer is one kernel transaction (all or nothing).
libnftables talks netlink in the network namespace of the calling thread; to drive another
namespace, run it there (``kproxy.netns.NetnsBackend``).

``FakeBackend`` is a transactional in-memory stand-in with the same interface, built on
``kproxy.script`` — a failing script changes nothing, exactly like the kernel — so the proxier's
failure paths (partial sync fails -> next sync is full) are unit-testable.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from kproxy.render import RenderConfig, skeleton_shape
from kproxy.script import Ruleset, ScriptError


class BackendError(Exception):
    """A transaction was refused; nothing of it was applied."""


class Backend(Protocol):
    def apply(self, script: str) -> None:
        """Apply the whole script in one transaction or raise ``BackendError``."""

    def verify(self, cfg: RenderConfig) -> str | None:
        """None when our table has the expected chains and rules; else what is wrong."""

    def remove(self, cfg: RenderConfig) -> None:
        """Delete our table if present (clean shutdown, tests)."""


def _shape_drift(actual: dict[str, int] | None, expected: dict[str, int]) -> str | None:
    if actual is None:
        return "table missing"
    for chain, rules in expected.items():
        if chain not in actual:
            return f"chain {chain} missing"
        if actual[chain] != rules:
            return f"chain {chain} has {actual[chain]} rules, expected {rules}"
    return None


class NftablesBackend:
    def __init__(self) -> None:
        import nftables  # the libnftables binding; imported here so pure users never load the .so

        self._nft: Any = nftables.Nftables()
        self._nft.set_handle_output(False)

    def _cmd(self, text: str) -> str:
        rc, out, err = self._nft.cmd(text)
        if rc != 0:
            raise BackendError((err or f"libnftables returned {rc}").strip()[:2000])
        return str(out)

    def apply(self, script: str) -> None:
        if script:
            self._cmd(script)

    def _chain_rules(self, cfg: RenderConfig) -> dict[str, int] | None:
        """Rule count per chain of our table, without listing set elements (cheap at any size)."""
        self._nft.set_json_output(True)
        try:
            try:
                listing = json.loads(self._cmd("list chains ip"))
            except BackendError:
                return None
            names = [
                o["chain"]["name"]
                for o in listing.get("nftables", [])
                if "chain" in o and o["chain"].get("table") == cfg.table
            ]
            if not names:
                try:
                    self._cmd(f"list table ip {cfg.table}")  # exists, but has no chains
                except BackendError:
                    return None
                return {}
            counts = {}
            for name in names:
                doc = json.loads(self._cmd(f"list chain ip {cfg.table} {name}"))
                counts[name] = sum(1 for o in doc.get("nftables", []) if "rule" in o)
            return counts
        finally:
            self._nft.set_json_output(False)

    def verify(self, cfg: RenderConfig) -> str | None:
        return _shape_drift(self._chain_rules(cfg), skeleton_shape(cfg))

    def remove(self, cfg: RenderConfig) -> None:
        self._cmd(f"add table ip {cfg.table}\ndelete table ip {cfg.table}")


class FakeBackend:
    """In-memory, transactional; ``fail_next`` makes the next N applies fail (and change nothing)."""

    def __init__(self) -> None:
        self.ruleset = Ruleset()
        self.applied: list[str] = []
        self.fail_next = 0

    def apply(self, script: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise BackendError("injected failure")
        try:
            self.ruleset.apply(script)
        except ScriptError as e:
            raise BackendError(str(e)) from None
        self.applied.append(script)

    def verify(self, cfg: RenderConfig) -> str | None:
        table = self.ruleset.tables.get(("ip", cfg.table))
        actual = None if table is None else {n: len(c.rules) for n, c in table.chains.items()}
        return _shape_drift(actual, skeleton_shape(cfg))

    def remove(self, cfg: RenderConfig) -> None:
        self.ruleset.tables.pop(("ip", cfg.table), None)

    # what another agent might do to the kernel
    def flush_ruleset(self) -> None:
        self.ruleset.tables.clear()
