"""Lease leader election against a fake store with honest resourceVersion conflicts."""

from __future__ import annotations

import copy
import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from netctl.kube.leader import ConflictError, LeaderElector


class FakeLeaseStore:
    """Leases by (namespace, name); every write bumps resourceVersion; stale writes get 409."""

    def __init__(self):
        self.lock = threading.Lock()
        self.leases = {}
        self.rv = 0

    def get(self, namespace, name):
        with self.lock:
            lease = self.leases.get((namespace, name))
            return copy.deepcopy(lease)

    def create(self, namespace, lease):
        with self.lock:
            key = (namespace, lease["metadata"]["name"])
            if key in self.leases:
                raise ConflictError("already exists")
            return self._write(key, lease)

    def replace(self, namespace, name, lease):
        with self.lock:
            key = (namespace, name)
            current = self.leases.get(key)
            if current is None:
                raise ConflictError("not found")
            if lease["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                raise ConflictError("resourceVersion changed")
            return self._write(key, lease)

    def _write(self, key, lease):
        self.rv += 1
        stored = copy.deepcopy(lease)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[key] = stored
        return copy.deepcopy(stored)

    def spec(self, name="lock", namespace="kube-system"):
        return self.leases[(namespace, name)]["spec"]


class Partitionable:
    """One candidate's view of the store, which the test can cut off."""

    def __init__(self, store):
        self.store = store
        self.down = False
        self.after_get = None  # hook run between this candidate's read and its write

    def _check(self):
        if self.down:
            raise ConnectionError("partitioned")

    def get(self, namespace, name):
        self._check()
        lease = self.store.get(namespace, name)
        hook, self.after_get = self.after_get, None
        if hook:
            hook()
        return lease

    def create(self, namespace, lease):
        self._check()
        return self.store.create(namespace, lease)

    def replace(self, namespace, name, lease):
        self._check()
        return self.store.replace(namespace, name, lease)


class Clock:
    def __init__(self):
        self.now = 1000.0
        self.wall0 = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self):
        return self.now

    def wall(self):
        return self.wall0 + timedelta(seconds=self.now - 1000.0)

    def advance(self, seconds):
        self.now += seconds


class Calls:
    def __init__(self):
        self.log = []

    def started(self, who):
        return lambda: self.log.append(("started", who))

    def stopped(self, who):
        return lambda: self.log.append(("stopped", who))


@pytest.fixture
def world():
    store = FakeLeaseStore()
    clock = Clock()
    calls = Calls()

    def candidate(identity, **kwargs):
        view = Partitionable(store)
        elector = LeaderElector(
            view,
            name="lock",
            namespace="kube-system",
            identity=identity,
            on_started_leading=calls.started(identity),
            on_stopped_leading=calls.stopped(identity),
            clock=clock,
            wall_clock=clock.wall,
            **kwargs,
        )
        return elector, view

    return store, clock, calls, candidate


def test_acquire_creates_the_lease(world):
    store, _clock, calls, candidate = world
    a, _ = candidate("a")
    assert a.step() is True
    assert a.is_leader()
    spec = store.spec()
    assert spec["holderIdentity"] == "a"
    assert spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    assert spec["acquireTime"] == spec["renewTime"] == "2024-01-01T00:00:00.000000Z"
    assert calls.log == [("started", "a")]


def test_renew_updates_renew_time_only(world):
    store, clock, calls, candidate = world
    a, _ = candidate("a")
    a.step()
    rv = store.leases[("kube-system", "lock")]["metadata"]["resourceVersion"]
    clock.advance(2)
    assert a.step() is True
    spec = store.spec()
    assert spec["renewTime"] == "2024-01-01T00:00:02.000000Z"
    assert spec["acquireTime"] == "2024-01-01T00:00:00.000000Z"
    assert spec["leaseTransitions"] == 0
    assert store.leases[("kube-system", "lock")]["metadata"]["resourceVersion"] != rv
    assert calls.log == [("started", "a")]  # renewing is not a new term


def test_candidate_waits_while_leader_renews(world):
    _store, clock, _calls, candidate = world
    a, _ = candidate("a")
    b, _ = candidate("b")
    a.step()
    for _ in range(20):
        clock.advance(2)
        assert a.step() is True
        assert b.step() is False
    assert b.observed_holder == "a"


def test_takeover_only_after_expiry_and_old_leader_steps_down(world):
    store, clock, calls, candidate = world
    a, a_view = candidate("a")
    b, _ = candidate("b")
    a.step()
    assert b.step() is False  # b first sees a's record now
    a_view.down = True  # a can no longer renew

    clock.advance(9)
    assert a.step() is True  # still within the renew deadline
    clock.advance(1)
    assert a.step() is False  # renew deadline passed: a gives up ...
    assert ("stopped", "a") in calls.log
    clock.advance(4.9)
    assert b.step() is False  # ... strictly before b may take over (15 s after b saw the last renewal)
    clock.advance(0.2)
    assert b.step() is True
    spec = store.spec()
    assert spec["holderIdentity"] == "b"
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == spec["renewTime"]

    a_view.down = False
    assert a.step() is False
    assert calls.log == [("started", "a"), ("stopped", "a"), ("started", "b")]


def test_leader_that_sees_another_holder_stops_at_once(world):
    store, clock, calls, candidate = world
    a, _ = candidate("a")
    a.step()
    # somebody overwrote the lease (e.g. an operator): a must not keep leading until its deadline
    lease = store.get("kube-system", "lock")
    lease["spec"]["holderIdentity"] = "intruder"
    store.replace("kube-system", "lock", lease)
    clock.advance(2)
    assert a.step() is False
    assert calls.log == [("started", "a"), ("stopped", "a")]


def test_racing_writers_one_wins_by_resource_version(world):
    _store, _clock, _calls, candidate = world
    a, a_view = candidate("a")
    b, _ = candidate("b")
    a.step()
    a.release()
    # both read the released lease; b writes first; a's write carries the stale resourceVersion
    results: dict[str, bool] = {}
    a_view.after_get = lambda: results.setdefault("b", b.step())
    results["a"] = a.step()
    assert results == {"b": True, "a": False}
    assert b.is_leader() and not a.is_leader()


def test_racing_creators_one_wins(world):
    _store, _clock, _calls, candidate = world
    a, a_view = candidate("a")
    b, _ = candidate("b")
    results: dict[str, bool] = {}
    a_view.after_get = lambda: results.setdefault("b", b.step())
    results["a"] = a.step()
    assert results == {"b": True, "a": False}


@pytest.mark.parametrize("seed", range(30))
def test_never_two_leaders_under_random_schedules(world, seed):
    _store, clock, _calls, candidate = world
    rng = random.Random(seed)
    nodes = [candidate(name) for name in ("a", "b", "c")]
    leaders_seen = set()
    for _ in range(400):
        elector, view = rng.choice(nodes)
        action = rng.random()
        if action < 0.1:
            view.down = not view.down
        elif action < 0.13:
            elector.release()
        else:
            elector.step()
        clock.advance(rng.uniform(0, 3))
        leading = [e.identity for e, _ in nodes if e.is_leader()]
        assert len(leading) <= 1, f"seed {seed}: {leading} lead at once"
        leaders_seen.update(leading)
    assert leaders_seen  # the schedule did elect someone


def test_release_lets_a_successor_in_immediately(world):
    store, clock, calls, candidate = world
    a, _ = candidate("a")
    b, _ = candidate("b")
    a.step()
    assert b.step() is False
    a.stop(release=True)
    assert not a.is_leader()
    assert store.spec()["holderIdentity"] is None
    clock.advance(0.1)
    assert b.step() is True
    assert store.spec()["holderIdentity"] == "b"
    assert store.spec()["leaseTransitions"] == 1
    assert calls.log == [("started", "a"), ("stopped", "a"), ("started", "b")]


def test_timing_must_be_ordered():
    with pytest.raises(ValueError):
        LeaderElector(FakeLeaseStore(), name="l", namespace="n", identity="x", renew_deadline_s=20.0)
    with pytest.raises(ValueError):
        LeaderElector(FakeLeaseStore(), name="l", namespace="n", identity="")


def test_background_threads_hand_over_on_stop():
    store = FakeLeaseStore()
    started = {"a": threading.Event(), "b": threading.Event()}

    def candidate(identity: str) -> LeaderElector:
        return LeaderElector(
            store,
            name="l",
            namespace="n",
            identity=identity,
            on_started_leading=started[identity].set,
            lease_duration_s=2.0,
            renew_deadline_s=1.5,
            retry_period_s=0.01,
        )

    a, b = candidate("a"), candidate("b")
    a.start()
    assert started["a"].wait(10)
    b.start()
    for _ in range(20):
        time.sleep(0.01)
        assert not (a.is_leader() and b.is_leader())
    assert not started["b"].is_set()
    a.stop()  # releases: b takes over without waiting for expiry
    assert started["b"].wait(10)
    b.stop()
    assert store.leases[("n", "l")]["spec"]["holderIdentity"] is None
