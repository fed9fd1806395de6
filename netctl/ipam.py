"""Pure IPv4 address and MAC allocation (no I/O).

The allocator does not own the truth about which addresses are in use: a backend feeds it the
authoritative used set (`sync`, `mark_used`), so after a restart nothing it hands out can collide
with an address already held. It hands out addresses *rotating* from the last allocation, so an
address freed a moment ago (whose pod may still have packets or ARP entries in flight) is the last
to be reused, not the first.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable


class SubnetExhausted(RuntimeError):
    """No free host address is left in the subnet."""


def mac_for_ip(ip: str) -> str:
    """0a:58 + the four IPv4 octets (as OVN-Kubernetes does): unique whenever the IP is, and
    locally administered (bit 1 of the first octet) and unicast."""
    octets = ipaddress.IPv4Address(ip).packed
    return "0a:58:" + ":".join(f"{b:02x}" for b in octets)


class SubnetAllocator:
    """Next-free host address allocation in one IPv4 subnet; thread-safe.

    Never hands out the network or broadcast address, `gateway`, or anything in `reserved`
    (addresses or CIDRs). Subnets smaller than /30 have no room for hosts and are refused.
    """

    def __init__(
        self,
        cidr: str,
        reserved: Iterable[str] = (),
        *,
        gateway: str | None = None,
        last: str | None = None,
    ) -> None:
        self.network = ipaddress.IPv4Network(cidr)  # strict: host bits set is a caller bug
        if self.network.prefixlen > 30:
            raise ValueError(f"subnet {cidr} has no room for hosts (need /30 or larger)")
        self._first = int(self.network.network_address) + 1
        self._last_host = int(self.network.broadcast_address) - 1
        self._reserved: set[int] = set()
        for item in [*reserved, *([gateway] if gateway else [])]:
            self._reserve(item)
        self._used: dict[int, str] = {}
        self._lock = threading.Lock()
        self._cursor = self._first - 1  # the last address handed out (or the one before the first)
        if last is not None and self._contains(ipaddress.IPv4Address(last)):
            self._cursor = int(ipaddress.IPv4Address(last))

    def _reserve(self, item: str) -> None:
        net = ipaddress.IPv4Network(item, strict=False)
        lo = max(int(net.network_address), self._first)
        hi = min(int(net.broadcast_address), self._last_host)
        self._reserved.update(range(lo, hi + 1))

    def _contains(self, addr: ipaddress.IPv4Address) -> bool:
        return self._first <= int(addr) <= self._last_host

    def _host(self, ip: str) -> int:
        addr = ipaddress.IPv4Address(ip)
        if not self._contains(addr):
            raise ValueError(f"{ip} is not a host address of {self.network}")
        return int(addr)

    @property
    def capacity(self) -> int:
        """How many addresses this subnet can hand out in total."""
        return self._last_host - self._first + 1 - len(self._reserved)

    @property
    def last(self) -> str | None:
        """The most recently allocated address (where the next search starts)."""
        with self._lock:
            if self._cursor < self._first:
                return None
            return str(ipaddress.IPv4Address(self._cursor))

    def in_use(self) -> dict[str, str]:
        """A snapshot: address -> owner."""
        with self._lock:
            return {str(ipaddress.IPv4Address(i)): o for i, o in self._used.items()}

    def allocate(self, owner: str = "") -> str:
        """Hand out the next free address after the last one allocated (wrapping around)."""
        with self._lock:
            size = self._last_host - self._first + 1
            start = self._cursor + 1 - self._first
            for step in range(size):
                cand = self._first + (start + step) % size
                if cand not in self._used and cand not in self._reserved:
                    self._used[cand] = owner
                    self._cursor = cand
                    return str(ipaddress.IPv4Address(cand))
        raise SubnetExhausted(f"no free address left in {self.network} ({self.capacity} usable)")

    def release(self, ip: str) -> None:
        """Return `ip` to the pool (no-op if it was not in use)."""
        with self._lock:
            self._used.pop(int(ipaddress.IPv4Address(ip)), None)

    def mark_used(self, ip: str, owner: str = "") -> None:
        """Record that `ip` is held (e.g. found in the IaaS), so it is never handed out."""
        host = self._host(ip)
        with self._lock:
            self._used[host] = owner

    def sync(self, in_use: Iterable[str | int]) -> None:
        """Replace the used set with the authoritative one (dotted strings, or ints as
        `int(IPv4Address)` for callers that keep a parsed cache); addresses outside the subnet
        or unparsable are ignored. Keeps the rotation cursor."""
        lo, hi = self._first, self._last_host
        ints: list[int] = []
        for ip in in_use:
            if not isinstance(ip, int):
                try:
                    ip = int(ipaddress.IPv4Address(ip))
                except ValueError:
                    continue
            ints.append(ip)
        used = dict.fromkeys((i for i in ints if lo <= i <= hi), "")
        with self._lock:
            self._used = used
