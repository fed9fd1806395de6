"""Pure allocation: never a duplicate (also under many threads), exhaustion, rotation, release."""

from __future__ import annotations

import ipaddress
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netctl.ipam import SubnetAllocator, SubnetExhausted, mac_for_ip


def test_mac_for_ip() -> None:
    assert mac_for_ip("10.1.0.5") == "0a:58:0a:01:00:05"
    assert mac_for_ip("192.168.255.1") == "0a:58:c0:a8:ff:01"
    with pytest.raises(ValueError):
        mac_for_ip("10.1.0.300")


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_mac_unique_with_ip(a: int, b: int) -> None:
    ma, mb = mac_for_ip(str(ipaddress.IPv4Address(a))), mac_for_ip(str(ipaddress.IPv4Address(b)))
    assert (ma == mb) == (a == b)
    assert int(ma[:2], 16) & 1 == 0 and int(ma[:2], 16) & 2  # unicast, locally administered


def test_skips_network_gateway_reserved_and_broadcast() -> None:
    alloc = SubnetAllocator("10.0.0.0/28", ["10.0.0.2", "10.0.0.4/31", "192.168.0.0/16"], gateway="10.0.0.1")
    got = [alloc.allocate(f"o{i}") for i in range(alloc.capacity)]
    assert got == ["10.0.0.3", *[f"10.0.0.{i}" for i in range(6, 15)]]
    assert alloc.capacity == 10
    with pytest.raises(SubnetExhausted):
        alloc.allocate("one-too-many")


def test_exhaustion_and_release() -> None:
    alloc = SubnetAllocator("10.0.0.0/29", gateway="10.0.0.1")  # .2 .. .6
    got = {alloc.allocate() for _ in range(5)}
    assert got == {f"10.0.0.{i}" for i in range(2, 7)}
    with pytest.raises(SubnetExhausted):
        alloc.allocate()
    alloc.release("10.0.0.4")
    assert alloc.allocate() == "10.0.0.4"
    alloc.release("10.0.0.250")  # unknown: no-op
    with pytest.raises(SubnetExhausted):
        alloc.allocate()


def test_rotation_does_not_reuse_a_just_freed_address() -> None:
    alloc = SubnetAllocator("10.0.0.0/29")  # .1 .. .6
    a, b = alloc.allocate(), alloc.allocate()
    assert (a, b) == ("10.0.0.1", "10.0.0.2")
    alloc.release(a)
    assert alloc.allocate() == "10.0.0.3"  # not .1 again
    alloc.release(b)
    assert [alloc.allocate() for _ in range(3)] == ["10.0.0.4", "10.0.0.5", "10.0.0.6"]
    # only after wrapping around do the freed ones come back, oldest position first
    assert alloc.allocate() == "10.0.0.1"
    assert alloc.allocate() == "10.0.0.2"
    assert alloc.last == "10.0.0.2"


def test_seeded_cursor_continues_after_last() -> None:
    alloc = SubnetAllocator("10.0.0.0/24", gateway="10.0.0.1", last="10.0.0.10")
    assert alloc.allocate() == "10.0.0.11"
    # a seed outside the subnet is ignored
    assert SubnetAllocator("10.0.0.0/24", last="10.9.9.9").allocate() == "10.0.0.1"


def test_mark_used_and_sync() -> None:
    alloc = SubnetAllocator("10.0.0.0/29", gateway="10.0.0.1")
    alloc.mark_used("10.0.0.2", "found")
    assert alloc.allocate() == "10.0.0.3"
    assert alloc.in_use() == {"10.0.0.2": "found", "10.0.0.3": ""}
    with pytest.raises(ValueError):
        alloc.mark_used("10.0.0.7")  # broadcast
    with pytest.raises(ValueError):
        alloc.mark_used("10.1.0.2")
    # the authoritative set replaces what the allocator believed; junk is ignored
    alloc.sync(["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.9.0.1", "not-an-ip"])
    assert set(alloc.in_use()) == {"10.0.0.4", "10.0.0.5", "10.0.0.6"}
    assert alloc.allocate() == "10.0.0.2"  # wraps past the held ones; .3 was not in the new set
    assert alloc.allocate() == "10.0.0.3"
    with pytest.raises(SubnetExhausted):
        alloc.allocate()


@pytest.mark.parametrize("cidr", ["10.0.0.0/31", "10.0.0.1/32", "10.0.0.1/24", "fd00::/64", "garbage"])
def test_refuses_unusable_subnets(cidr: str) -> None:
    with pytest.raises(ValueError):
        SubnetAllocator(cidr)


def test_never_repeats_under_concurrency() -> None:
    """32 threads released at once, each allocating (and releasing some of) its addresses: no
    address is ever held by two owners at the same time, and everything is accounted for."""
    alloc = SubnetAllocator("10.8.0.0/20", gateway="10.8.0.1")
    threads_n, per_thread = 32, 120
    barrier = threading.Barrier(threads_n)
    held: dict[str, int] = {}
    held_lock = threading.Lock()
    duplicates: list[tuple[str, int, int]] = []
    kept: list[list[str]] = [[] for _ in range(threads_n)]

    def worker(k: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            ip = alloc.allocate(f"t{k}")
            with held_lock:
                if ip in held:
                    duplicates.append((ip, held[ip], k))
                held[ip] = k
            if i % 3 == 0:  # give some back while others allocate
                with held_lock:
                    del held[ip]
                alloc.release(ip)
            else:
                kept[k].append(ip)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not duplicates
    all_kept = [ip for ips in kept for ip in ips]
    assert len(all_kept) == len(set(all_kept)) == threads_n * (per_thread - per_thread // 3)
    assert set(alloc.in_use()) == set(all_kept)
    assert "10.8.0.1" not in all_kept and "10.8.0.0" not in all_kept and "10.8.15.255" not in all_kept


def test_concurrent_exhaustion_hands_out_each_address_once() -> None:
    alloc = SubnetAllocator("10.9.0.0/24", gateway="10.9.0.1")  # 253 usable
    results: list[str] = []
    exhausted = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        while True:
            try:
                ip = alloc.allocate()
            except SubnetExhausted:
                exhausted.append(1)
                return
            with lock:
                results.append(ip)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(set(results)) == 253 and len(exhausted) == 16


ops = st.lists(st.tuples(st.sampled_from(["alloc", "release"]), st.integers(0, 40)), max_size=120)


@settings(max_examples=200)
@given(ops, st.sets(st.integers(2, 30), max_size=6))
def test_model_never_hands_out_a_held_or_forbidden_address(
    sequence: list[tuple[str, int]], reserved_hosts: set[int]
) -> None:
    """Against a trivial model: an allocation is never held, reserved, the gateway, network or broadcast."""
    reserved = [f"10.5.0.{h}" for h in reserved_hosts]
    alloc = SubnetAllocator("10.5.0.0/27", reserved, gateway="10.5.0.1")
    forbidden = {"10.5.0.0", "10.5.0.1", "10.5.0.31", *reserved}
    held: list[str] = []
    for op, n in sequence:
        if op == "alloc":
            try:
                ip = alloc.allocate()
            except SubnetExhausted:
                assert len(held) == alloc.capacity
                continue
            assert ip not in held and ip not in forbidden
            held.append(ip)
        elif held:
            alloc.release(held.pop(n % len(held)))
    assert sorted(alloc.in_use()) == sorted(held)
