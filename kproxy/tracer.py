"""A tiny packet tracer: walk one packet through a table as ``kproxy.script`` parsed it.

It interprets only the rule forms kproxy renders (and raises on anything else), in the order the
kernel would: base chains of the packet's hook by priority, then postrouting. Tests use it to
assert what happens to a packet — DNAT to which endpoint, reject how, masquerade or not —
independently of how the renderer builds its elements. ``bucket`` stands in for
``numgen random``: tests pick it, or the tracer draws it. Every traced packet opens a connection
(``ct state new``); what conntrack does to later packets is the kernel's business, not modelled.
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
_KEY2 = "meta l4proto . th dport"
_LOCAL = "ip daddr != 127.0.0.0/8 fib daddr type local"
_RULES = [
    ("jump", re.compile(r"^(?:ct state new )?(jump|goto) ([\w-]+)$")),  # traced packets open connections
    ("vmap", re.compile(rf"^{re.escape(_KEY3)} vmap @([\w-]+)$")),
    ("vmap2", re.compile(rf"^{re.escape(_LOCAL)} {re.escape(_KEY2)} vmap @([\w-]+)$")),
    ("reject_tcp", re.compile(r"^meta l4proto tcp reject with tcp reset$")),
    ("reject_icmp", re.compile(r"^reject with icmp type port-unreachable$")),
    ("dnat", re.compile(rf"^dnat ip to {re.escape(_KEY3)} \. numgen random mod (\d+) map @([\w-]+)$")),
    ("dnat2", re.compile(rf"^dnat ip to {re.escape(_KEY2)} \. numgen random mod (\d+) map @([\w-]+)$")),
    ("saddr_in", re.compile(r"^ip saddr @([\w-]+) (goto|jump) ([\w-]+)$")),
    ("update", re.compile(r"^update @([\w-]+) \{ ip saddr \}$")),
    ("dnat_to", re.compile(r"^meta l4proto (\w+) dnat ip to ([\d.]+):(\d+)$")),
    ("numgen_vmap", re.compile(r"^numgen random mod (\d+) vmap \{ (.+) \}$")),
    ("masq", re.compile(r"^ct status dnat masquerade$")),
]


class _Walk:
    def __init__(self, table: Table, pkt: Packet, bucket: int | None, rng: random.Random,
                 local_ips: frozenset[str], affinity: dict[str, set[str]]) -> None:
        self.t, self.bucket, self.rng = table, bucket, rng
        self.saddr, self.daddr, self.dport, self.proto = pkt.saddr, pkt.daddr, pkt.dport, pkt.proto
        self.local_ips, self.affinity = local_ips, affinity
        self.dnat = self.masq = False
        self.stop: tuple[str, str | None] | None = None  # (reject | drop, reject_with)

    def key3(self) -> str:
        return f"{self.daddr} . {self.proto} . {self.dport}"

    def key2(self) -> str:
        return f"{self.proto} . {self.dport}"

    def draw(self, mod: int) -> int:
        b = self.bucket if self.bucket is not None else self.rng.randrange(mod)
        if not 0 <= b < mod:
            raise TraceError(f"bucket {b} outside mod {mod}")
        return b

    def run(self, chain: Chain, depth: int = 0) -> str | None:
        """Returns "stop" on a terminal verdict (reject), "return" on goto-return, None on fall-through."""
        if depth > 16:
            raise TraceError("chain depth > 16 (loop?)")
        for rule in chain.rules:
            result = self.rule(rule, depth)
            if result is not None:
                return result
        return None

    def verdict(self, verdict: str, depth: int) -> str | None:
        if verdict == "drop":
            self.stop = ("drop", None)
            return "stop"
        verb, target = verdict.split()
        res = self.run(self.chain(target), depth + 1)
        return res if (res == "stop" or verb == "goto") else None

    def lookup_dnat(self, found: str | None) -> str | None:
        if found is None:
            return None  # lookup miss: the rule does not match
        ip, _, port = found.partition(" . ")
        self.daddr, self.dport, self.dnat = ip, int(port), True
        return "return"  # NAT is a terminal verdict for this hook's nat chain

    def rule(self, rule: str, depth: int) -> str | None:
        for kind, rx in _RULES:
            m = rx.match(rule)
            if m is None:
                continue
            if kind == "jump":
                return self.verdict(f"{m[1]} {m[2]}", depth)
            if kind in ("vmap", "vmap2"):
                if kind == "vmap2" and (self.daddr not in self.local_ips or self.daddr.startswith("127.")):
                    return None
                found = self.t.sets[m[1]].get(self.key3() if kind == "vmap" else self.key2())
                return None if found is None else self.verdict(found, depth)
            if kind == "reject_tcp":
                if self.proto != "tcp":
                    return None
                self.stop = ("reject", "tcp reset")
                return "stop"
            if kind == "reject_icmp":
                self.stop = ("reject", "icmp port-unreachable")
                return "stop"
            if kind in ("dnat", "dnat2"):
                key = self.key3() if kind == "dnat" else self.key2()
                return self.lookup_dnat(self.t.sets[m[2]].get(f"{key} . {self.draw(int(m[1]))}"))
            if kind == "saddr_in":
                if self.saddr not in self.affinity.get(m[1], set()):
                    return None
                return self.verdict(f"{m[2]} {m[3]}", depth)
            if kind == "update":
                if m[1] not in self.t.sets:
                    raise TraceError(f"no set {m[1]}")
                self.affinity.setdefault(m[1], set()).add(self.saddr)
                return None
            if kind == "dnat_to":
                if self.proto != m[1]:
                    return None
                return self.lookup_dnat(f"{m[2]} . {m[3]}")
            if kind == "numgen_vmap":
                choices = dict(item.split(" : ") for item in m[2].split(", "))
                found = choices.get(str(self.draw(int(m[1]))))
                return None if found is None else self.verdict(found, depth)
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


def trace(table: Table, pkt: Packet, bucket: int | None = None, rng: random.Random | None = None, *,
          local_ips: tuple[str, ...] = (), affinity: dict[str, set[str]] | None = None) -> Verdict:
    """Where ``pkt`` goes. ``local_ips``: this node's addresses (what ``fib daddr type local``
    matches); ``affinity``: the timed sets' content (set name -> client addresses), read and
    updated in place so a test can send several packets through the same state."""
    walk = _Walk(table, pkt, bucket, rng or random.Random(), frozenset(local_ips),
                 affinity if affinity is not None else {})
    for hook in (pkt.hook, "postrouting"):
        bases = sorted((c for c in table.chains.values() if c.hook == hook), key=lambda c: c.priority)
        for chain in bases:
            if walk.run(chain) == "stop":
                assert walk.stop is not None
                action, reject_with = walk.stop
                return Verdict(action, reject_with, walk.daddr, walk.dport, walk.dnat, walk.masq)
    return Verdict("accept", None, walk.daddr, walk.dport, walk.dnat, walk.masq)
