"""The nftables backend: apply a rendered script as one transaction, and detect drift.

``NftablesBackend`` goes through libnftables (the ``nftables`` module), never the ``nft`` CLI:
no fork/exec per sync, and one ``cmd()`` buffer is one kernel transaction (all or nothing).
libnftables talks netlink in the network namespace of the calling thread; to drive another
namespace, run it there (``kproxy.netns.NetnsBackend``).

``verify`` checks the skeleton's chains and their rule counts (``chain_rule_counts``: a netlink
dump of chains and rules, milliseconds at any size) and, when the caller passes the elements it
expects, the exact contents of the skeleton's maps and sets, so a deleted, added or rewritten
element is drift too. That second check lists the table through libnftables, O(elements) (~0.6 s
at 1,000 services / 5,000 endpoints, ~10 s at 10,000 / 50,000 here), which is why the proxier
runs it far less often than the shape check.

``FakeBackend`` is a transactional in-memory stand-in with the same interface, built on
``kproxy.script`` — a failing script changes nothing, exactly like the kernel — so the proxier's
failure paths (partial sync fails -> next sync is full) are unit-testable.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any, Protocol

from kproxy.render import RenderConfig, skeleton, skeleton_shape
from kproxy.script import Ruleset, ScriptError


class BackendError(Exception):
    """A transaction was refused; nothing of it was applied."""


# map/set name -> key -> value (None for set elements), in the renderer's nft syntax
Contents = Mapping[str, Mapping[str, str | None]]


class Backend(Protocol):
    def apply(self, script: str) -> None:
        """Apply the whole script in one transaction or raise ``BackendError``."""

    def verify(self, cfg: RenderConfig, expected: Contents | None = None) -> str | None:
        """None when our table has the expected chains and rules (and, if given, exactly the
        ``expected`` elements in the skeleton's maps and sets); else what is wrong."""

    def remove(self, cfg: RenderConfig) -> None:
        """Delete our table if present (clean shutdown, tests)."""


def skeleton_containers(cfg: RenderConfig) -> dict[str, str]:
    """Map/set name -> "map" | "set" for the skeleton's containers (what element checks cover)."""
    out = {}
    for line in skeleton(cfg):
        words = line.split()
        if len(words) > 4 and words[0] == "add" and words[1] in ("map", "set") and words[2:4] == ["ip", cfg.table]:
            out[words[4]] = words[1]
    return out


def _elements_drift(actual: Contents, expected: Contents, names: Mapping[str, str]) -> str | None:
    for name in sorted(names):
        want, have = expected.get(name, {}), actual.get(name)
        if have is None:
            return f"{names[name]} {name} missing"
        if want != have:
            missing = [k for k in want if k not in have]
            extra = [k for k in have if k not in want]
            changed = [k for k in want if k in have and have[k] != want[k]]
            example = (missing + extra + changed)[0]
            return (f"{names[name]} {name}: {len(missing)} element(s) missing, {len(extra)} unexpected, "
                    f"{len(changed)} changed (e.g. {example})")  # fmt: skip
    return None


def _json_text(x: Any) -> str:
    """One key or value of libnftables' JSON listing, in the renderer's text syntax."""
    if isinstance(x, dict):
        if "concat" in x:
            return " . ".join(_json_text(v) for v in x["concat"])
        if "elem" in x:  # an element with attributes (timeout, expires, counter)
            return _json_text(x["elem"].get("val"))
        for verdict in ("goto", "jump"):
            if verdict in x:
                return f"{verdict} {x[verdict]['target']}"
        if len(x) == 1 and next(iter(x.values())) is None:  # {"drop": null}, {"accept": null}
            return str(next(iter(x)))
    return str(x)


def parse_elements(listing: Mapping[str, Any]) -> dict[str, dict[str, str | None]]:
    """``nft -j list map/set/table`` -> name -> key -> value (None for plain set elements)."""
    out: dict[str, dict[str, str | None]] = {}
    for obj in listing.get("nftables", []):
        kind = "map" if "map" in obj else "set" if "set" in obj else None
        if kind is None:
            continue
        body = obj[kind]
        elems: dict[str, str | None] = {}
        for e in body.get("elem", []):
            if kind == "map" and isinstance(e, list) and len(e) == 2:
                elems[_json_text(e[0])] = _json_text(e[1])
            else:
                elems[_json_text(e)] = None
        out[body["name"]] = elems
    return out


def _shape_drift(actual: dict[str, int] | None, expected: dict[str, int]) -> str | None:
    if actual is None:
        return "table missing"
    for chain, rules in expected.items():
        if chain not in actual:
            return f"chain {chain} missing"
        if actual[chain] != rules:
            return f"chain {chain} has {actual[chain]} rules, expected {rules}"
    return None


def chain_rule_counts(table: str) -> dict[str, int] | None:
    """Rule count per chain of ``ip <table>`` (None: no such table), over nf_tables netlink.

    Why not libnftables: any ``list`` command there builds a cache holding every set element,
    so even a terse listing of 10,000 services took ~10 s here; dumping chains and rules over
    netlink (pyroute2) touches no element and takes milliseconds at any size.
    """
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=socket.AF_INET)  # NFPROTO_IPV4
    try:
        if table not in {m.get_attr("NFTA_TABLE_NAME") for m in nft.get_tables()}:
            return None
        counts = {m.get_attr("NFTA_CHAIN_NAME"): 0 for m in nft.get_chains() if m.get_attr("NFTA_CHAIN_TABLE") == table}
        for m in nft.get_rules():
            if m.get_attr("NFTA_RULE_TABLE") == table:
                chain = m.get_attr("NFTA_RULE_CHAIN")
                counts[chain] = counts.get(chain, 0) + 1
        return counts
    finally:
        nft.close()


class NftablesBackend:
    def __init__(self) -> None:
        import nftables  # the libnftables binding; imported here so pure users never load the .so

        self._nft: Any = nftables.Nftables()
        self._nft.set_handle_output(False)

    def _cmd(self, text: str | bytes) -> str:
        """One libnftables run. Bytes go to the library as they are (the binding would otherwise
        encode the whole script once more); its output and errors then come back as bytes."""
        rc, out, err = self._nft.cmd(text)
        if isinstance(out, bytes):
            out, err = out.decode(errors="replace"), err.decode(errors="replace")
        if rc != 0:
            raise BackendError((err or f"libnftables returned {rc}").strip()[:2000])
        return str(out)

    def apply(self, script: str | bytes) -> None:
        """``script`` as text or as its UTF-8 bytes (what ``NetnsBackend`` sends over its pipe)."""
        if script:
            self._cmd(script)

    def _elements(self, cfg: RenderConfig) -> dict[str, dict[str, str | None]] | None:
        """Our maps' and sets' contents: one ``list table`` (None: no such table). O(elements)."""
        self._nft.set_json_output(True)
        try:
            try:
                doc = json.loads(self._cmd(f"list table ip {cfg.table}"))
            except BackendError:
                return None
            return parse_elements(doc)
        finally:
            self._nft.set_json_output(False)

    def verify(self, cfg: RenderConfig, expected: Contents | None = None) -> str | None:
        drift = _shape_drift(chain_rule_counts(cfg.table), skeleton_shape(cfg))
        if drift or expected is None:
            return drift
        actual = self._elements(cfg)
        if actual is None:
            return "table missing"
        return _elements_drift(actual, expected, skeleton_containers(cfg))

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

    def verify(self, cfg: RenderConfig, expected: Contents | None = None) -> str | None:
        table = self.ruleset.tables.get(("ip", cfg.table))
        actual = None if table is None else {n: len(c.rules) for n, c in table.chains.items()}
        drift = _shape_drift(actual, skeleton_shape(cfg))
        if drift or expected is None or table is None:
            return drift
        return _elements_drift(table.sets, expected, skeleton_containers(cfg))

    def remove(self, cfg: RenderConfig) -> None:
        self.ruleset.tables.pop(("ip", cfg.table), None)

    # what another agent might do to the kernel
    def flush_ruleset(self) -> None:
        self.ruleset.tables.clear()
