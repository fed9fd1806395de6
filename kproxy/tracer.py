"""A tiny packet tracer: walk one packet through a table as ``kproxy.script`` parsed it.

It interprets only the rule forms kproxy renders (and raises on anything else), in the order the
kernel would: base chains of the packet's hook by priority, then postrouting. Tests use it to
assert what happens to a packet — DNAT to which endpoint, reject how, masquerade or not —
independently of how the renderer builds its elements. ``bucket`` stands in for
``numgen random``: tests pick it, or the tracer draws it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kproxy.script import Chain, Table


class TraceError(Exception):
    pass


@dataclass(frozen=True)
class Packet:
    saddr: str
    daddr: str
    proto: str  # tcp | udp | sctp | icmp
    dport: int
    hook: str = "prerouting"  # prerouting (from another host) | output (from the node itself)


@dataclass(frozen=True)
class Verdict:
    action: str  # accept | reject | drop
    reject_with: str | None = None  # "tcp reset" | "icmp port-unreachable"
    daddr: str = ""
    dport: int = 0
    dnat: bool = False
    masquerade: bool = False


_KEY3 = "ip daddr . meta l4proto . th dport"
_RULES = [
    ("jump", re.compile(r"^(jump|goto) ([\w-]+)$")),
    ("vmap", re.compile(rf"^{re.escape(_KEY3)} vmap @([\w-]+)$")),
    ("setgoto", re.compile(rf"^{re.escape(_KEY3)} @([\w-]+) (goto|jump) ([\w-]+)$")),
    ("reject_tcp", re.compile(r"^meta l4proto tcp reject with tcp reset$")),
    ("reject_icmp", re.compile(r"^reject with icmp type port-unreachable$")),
    ("dnat", re.compile(rf"^dnat ip to {re.escape(_KEY3)} \. numgen random mod (\d+) map @([\w-]+)$")),
    ("masq", re.compile(r"^ct status dnat masquerade$")),
]


class _Walk:
    def __init__(self, table: Table, pkt: Packet, bucket: int | None, rng: random.Random) -> None:
        self.t, self.bucket, self.rng = table, bucket, rng
        self.daddr, self.dport, self.proto = pkt.daddr, pkt.dport, pkt.proto
        self.dnat = self.masq = False
        self.reject: str | None = None

    def key3(self) -> str:
        return f"{self.daddr} . {self.proto} . {self.dport}"

    def run(self, chain: Chain, depth: int = 0) -> str | None:
        """Returns "stop" on a terminal verdict (reject), "return" on goto-return, None on fall-through."""
        if depth > 16:
            raise TraceError("chain depth > 16 (loop?)")
        for rule in chain.rules:
            result = self.rule(rule, depth)
            if result is not None:
                return result
        return None

    def rule(self, rule: str, depth: int) -> str | None:
        for kind, rx in _RULES:
            m = rx.match(rule)
            if m is None:
                continue
            if kind == "jump":
                res = self.run(self.chain(m[2]), depth + 1)
                return res if (res == "stop" or m[1] == "goto") else None
            if kind == "vmap":
                verdict = self.t.sets[m[1]].get(self.key3())
                if verdict is None:
                    return None
                verb, target = verdict.split()
                res = self.run(self.chain(target), depth + 1)
                return res if (res == "stop" or verb == "goto") else None
            if kind == "setgoto":
                if self.key3() not in self.t.sets[m[1]]:
                    return None
                res = self.run(self.chain(m[3]), depth + 1)
                return res if (res == "stop" or m[2] == "goto") else None
            if kind == "reject_tcp":
                if self.proto != "tcp":
                    return None
                self.reject = "tcp reset"
                return "stop"
            if kind == "reject_icmp":
                self.reject = "icmp port-unreachable"
                return "stop"
            if kind == "dnat":
                mod = int(m[1])
                b = self.bucket if self.bucket is not None else self.rng.randrange(mod)
                if not 0 <= b < mod:
                    raise TraceError(f"bucket {b} outside mod {mod}")
                found = self.t.sets[m[2]].get(f"{self.key3()} . {b}")
                if found is None:
                    return None  # lookup miss: the rule does not match
                ip, _, port = found.partition(" . ")
                self.daddr, self.dport, self.dnat = ip, int(port), True
                return "return"  # NAT is a terminal verdict for this hook's nat chain
            if kind == "masq":
                if self.dnat:
                    self.masq = True
                    return "return"
                return None
        raise TraceError(f"rule the tracer does not understand: {rule}")

    def chain(self, name: str) -> Chain:
        try:
            return self.t.chains[name]
        except KeyError:
            raise TraceError(f"no chain {name}") from None


def trace(table: Table, pkt: Packet, bucket: int | None = None, rng: random.Random | None = None) -> Verdict:
    walk = _Walk(table, pkt, bucket, rng or random.Random())
    for hook in (pkt.hook, "postrouting"):
        bases = sorted((c for c in table.chains.values() if c.hook == hook), key=lambda c: c.priority)
        for chain in bases:
            if walk.run(chain) == "stop":
                return Verdict("reject", walk.reject, walk.daddr, walk.dport, walk.dnat, walk.masq)
    return Verdict("accept", None, walk.daddr, walk.dport, walk.dnat, walk.masq)
