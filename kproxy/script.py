"""Read back the nft script dialect ``render`` writes, into an in-memory model of the table.

This is not an nft parser: it understands exactly the flat commands kproxy emits (add/delete
table, add/delete map/set, add/delete/flush chain, add rule, add/delete element) and refuses
anything else, so a renderer change that drifts from it fails loudly in unit tests. Like the
kernel, it refuses a rule or verdict jumping to a missing chain or using a missing set, and the
deletion of a chain or set something still references. It backs two things:

* ``FakeKernel`` state for the fake backend (``kproxy.nft.FakeBackend``): a script is applied to
  a copy and only committed when every command succeeded, like an nftables transaction,
  including nftables' errors for deleting a missing element or re-adding a key with other data.
* the packet tracer (``kproxy.tracer``), which walks packets through the parsed chains.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

_PRIORITY_NAMES = {"dstnat": -100, "srcnat": 100, "filter": 0}


class ScriptError(Exception):
    """A command the model does not accept (what nftables would refuse, or a dialect it can't read)."""


@dataclass
class Chain:
    name: str
    type: str | None = None  # filter | nat for base chains
    hook: str | None = None
    priority: int = 0
    rules: list[str] = field(default_factory=list)


@dataclass
class Table:
    family: str
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, dict[str, str | None]] = field(default_factory=dict)  # maps and sets


_TABLE = re.compile(r"^(add|delete|flush) table (\w+) ([\w-]+)$")
_CONTAINER = re.compile(r"^add (map|set) (\w+) ([\w-]+) ([\w-]+) \{ (.*) \}$")
_CHAIN = re.compile(r"^add chain (\w+) ([\w-]+) ([\w-]+)(?: \{ (.*) \})?$")
_BASE = re.compile(r"^type (\w+) hook (\w+) priority ([\w -]+); policy accept;$")
_RULE = re.compile(r"^add rule (\w+) ([\w-]+) ([\w-]+) (.+)$")
_ELEMENT = re.compile(r"^(add|delete) element (\w+) ([\w-]+) ([\w-]+) \{ (.*) \}$")
_CHAIN_OP = re.compile(r"^(delete|flush) chain (\w+) ([\w-]+) ([\w-]+)$")
_DELETE_SET = re.compile(r"^delete (?:set|map) (\w+) ([\w-]+) ([\w-]+)$")
_CHAIN_REF = re.compile(r"\b(?:goto|jump) ([\w-]+)")
_SET_REF = re.compile(r"@([\w-]+)")


def _priority(text: str) -> int:
    text = text.strip()
    m = re.fullmatch(r"(-?\w+)(?: ([+-]) (\d+))?", text)
    if m is None:
        raise ScriptError(f"priority {text!r}")
    base = int(m[1]) if m[1].lstrip("-").isdigit() else _PRIORITY_NAMES.get(m[1])
    if base is None:
        raise ScriptError(f"priority {text!r}")
    if m[2]:
        base += int(m[3]) if m[2] == "+" else -int(m[3])
    return base


class Ruleset:
    """Tables by (family, name)."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], Table] = {}

    def copy(self) -> Ruleset:
        return copy.deepcopy(self)

    def apply(self, script: str) -> None:
        """Apply all commands or none (raises ``ScriptError`` and leaves ``self`` unchanged)."""
        work = self.copy()
        for n, line in enumerate(script.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                work._command(line)
            except ScriptError as e:
                raise ScriptError(f"line {n}: {e}: {line[:200]}") from None
        self.tables = work.tables

    def _table(self, family: str, name: str) -> Table:
        try:
            return self.tables[(family, name)]
        except KeyError:
            raise ScriptError(f"no such table {family} {name}") from None

    def _command(self, line: str) -> None:
        if m := _TABLE.match(line):
            verb, tkey = m[1], (m[2], m[3])
            if verb == "add":
                self.tables.setdefault(tkey, Table(*tkey))
            elif verb == "delete":
                self._table(*tkey)
                del self.tables[tkey]
            else:
                for chain in self._table(*tkey).chains.values():
                    chain.rules.clear()
        elif m := _CONTAINER.match(line):
            t = self._table(m[2], m[3])
            if m[4] in t.sets or m[4] in t.chains:
                raise ScriptError(f"{m[4]} exists")
            t.sets[m[4]] = {}
        elif m := _CHAIN.match(line):
            t = self._table(m[1], m[2])
            chain = Chain(m[3])
            if m[4]:
                base = _BASE.match(m[4])
                if base is None:
                    raise ScriptError("base chain spec")
                chain.type, chain.hook, chain.priority = base[1], base[2], _priority(base[3])
            t.chains.setdefault(m[3], chain)
        elif m := _RULE.match(line):
            t = self._table(m[1], m[2])
            if m[3] not in t.chains:
                raise ScriptError(f"no such chain {m[3]}")
            for ref in _CHAIN_REF.findall(m[4]):
                if ref not in t.chains:
                    raise ScriptError(f"rule jumps to missing chain {ref}")
            for ref in _SET_REF.findall(m[4]):
                if ref not in t.sets:
                    raise ScriptError(f"rule uses missing set {ref}")
            t.chains[m[3]].rules.append(m[4])
        elif m := _CHAIN_OP.match(line):
            t = self._table(m[2], m[3])
            if m[4] not in t.chains:
                raise ScriptError(f"no such chain {m[4]}")
            if m[1] == "flush":
                t.chains[m[4]].rules.clear()
            else:
                self._check_unreferenced_chain(t, m[4])
                del t.chains[m[4]]
        elif m := _DELETE_SET.match(line):
            t = self._table(m[1], m[2])
            if m[3] not in t.sets:
                raise ScriptError(f"no such set {m[3]}")
            if any(m[3] in _SET_REF.findall(r) for c in t.chains.values() for r in c.rules):
                raise ScriptError(f"set {m[3]} is in use")
            del t.sets[m[3]]
        elif m := _ELEMENT.match(line):
            t = self._table(m[2], m[3])
            if m[4] not in t.sets:
                raise ScriptError(f"no such set/map {m[4]}")
            target = t.sets[m[4]]
            for item in m[5].split(", "):
                key, _, value = item.partition(" : ")
                val = value or None
                if m[1] == "add" and val is not None:
                    for ref in _CHAIN_REF.findall(val):
                        if ref not in t.chains:
                            raise ScriptError(f"element jumps to missing chain {ref}")
                if m[1] == "delete":
                    if key not in target:
                        raise ScriptError(f"no such element {key} in {m[4]}")
                    del target[key]
                elif key in target and target[key] != val:
                    raise ScriptError(f"element {key} exists in {m[4]} with other data")
                else:
                    target[key] = val
        else:
            raise ScriptError("unknown command")

    @staticmethod
    def _check_unreferenced_chain(t: Table, name: str) -> None:
        """nftables refuses (EBUSY) to delete a chain a rule or a verdict map element still jumps to."""
        for chain in t.chains.values():
            if chain.name != name and any(name in _CHAIN_REF.findall(r) for r in chain.rules):
                raise ScriptError(f"chain {name} is in use by chain {chain.name}")
        for set_name, elems in t.sets.items():
            if any(v is not None and name in _CHAIN_REF.findall(v) for v in elems.values()):
                raise ScriptError(f"chain {name} is in use by map {set_name}")
