"""The controller's metrics exist and move: port operations by result, resync duration, queue depth
and latency per priority (issue 4, item 5).

The real `Controller` (informers -> prioritised queue -> PortController) runs against fakes of our
own interfaces: a `ListWatch` per resource (a tiny in-memory API with a watch stream), the IaaS,
the writer and the recorder. Metrics live in the process-wide registry, so every check is a delta.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from netctl.annotations import PORT_ANNOTATION
from netctl.controller import app
from netctl.controller.app import SYNC_KEY, Controller, ControllerOptions
from netctl.iaas.base import IaaSError, Network, Port, PortRequest
from netctl.kube.workqueue import Priority
from tests.fakes import FakeIaaS, FakeRecorder, FakeWriter, MemListWatch, namespace, node, pod, tenant

Obj = dict[str, Any]


class FlakyIaaS(FakeIaaS):
    """Fails the creation of the port ids in ``fail`` (an IaaS outage for those pods)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: set[str] = set()

    def create_ports(self, network: Network, requests: Any) -> list[Port]:
        reqs: list[PortRequest] = list(requests)
        bad = [r.port_id for r in reqs if r.port_id in self.fail]
        if bad:
            raise IaaSError(f"injected failure for {bad}")
        return super().create_ports(network, reqs)


class EchoWriter(FakeWriter):
    """Writes annotations back through the pods' ListWatch, as the API server's watch would."""

    def __init__(self, pods: MemListWatch) -> None:
        super().__init__()
        self.lw = pods

    def patch_pod_annotations(
        self, namespace: str, name: str, annotations: dict[str, str | None], uid: str | None = None
    ) -> None:
        super().patch_pod_annotations(namespace, name, annotations, uid)
        with self.lw.lock:
            cur = copy.deepcopy(self.lw.objects.get(f"{namespace}/{name}"))
        if cur is None:
            return
        anns = cur["metadata"].setdefault("annotations", {})
        for k, v in annotations.items():
            if v is None:
                anns.pop(k, None)
            else:
                anns[k] = v
        self.lw.put(cur)


def value(metric: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(metric, labels)
    return 0.0 if v is None else v


def wait_for(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Controller, dict[str, MemListWatch], FlakyIaaS]]:
    lws = {
        "pods": MemListWatch([]),  # the test adds its pods after the initial lists (they queue at ADD)
        "namespaces": MemListWatch([namespace("tenant-a", "a")]),
        "nodes": MemListWatch([node("a-1", "a")]),
        "tenants": MemListWatch([tenant("a", "10.1.0.0/24")]),
    }
    monkeypatch.setattr(app, "ApiListWatch", lambda api, *, plural, **kw: lws[plural])
    iaas = FlakyIaaS()
    ctl = Controller(None, iaas, EchoWriter(lws["pods"]), FakeRecorder(),
                     ControllerOptions(workers=2, resync_period_s=3600.0))
    try:
        yield ctl, lws, iaas
    finally:
        ctl.stop()


def test_metrics_exist_and_move(world: tuple[Controller, dict[str, MemListWatch], FlakyIaaS]) -> None:
    ctl, lws, iaas = world
    q = ctl.queue.name
    depth = "netctl_workqueue_depth"
    latency = "netctl_workqueue_queue_duration_seconds_count"
    ops = "netctl_port_operations_total"
    before = {
        "create_ok": value(ops, op="create", result="ok"),
        "create_err": value(ops, op="create", result="error"),
        "delete_ok": value(ops, op="delete", result="ok"),
        "annotate_ok": value(ops, op="annotate", result="ok"),
        "resync": value("netctl_resync_duration_seconds_count"),
        "resync_sum": value("netctl_resync_duration_seconds_sum"),
        "lat_add": value(latency, name=q, priority="ADD"),
        "lat_sync": value(latency, name=q, priority="SYNC"),
    }
    # Every family is exported (with its labels) before any work is done.
    for p in Priority:
        assert REGISTRY.get_sample_value(depth, {"name": q, "priority": p.name}) == 0.0

    # Not leading yet: informer events only queue keys. Depth per priority shows them.
    iaas.fail.add("pod-m3")
    ctl.start_informers(timeout=5)
    for name, uid in (("web-1", "m1"), ("web-2", "m2"), ("web-3", "m3")):
        lws["pods"].put(pod(name, uid=uid))
    ctl.queue.add(SYNC_KEY, Priority.SYNC)
    wait_for(lambda: value(depth, name=q, priority="ADD") >= 4, what="3 pods + 1 tenant queued at ADD")
    assert value(depth, name=q, priority="ADD") == 4  # pod keys de-duplicated at their highest priority
    assert value(depth, name=q, priority="SYNC") == 1
    assert sum(value(depth, name=q, priority=p.name) for p in Priority) == len(ctl.queue)

    # Leading: the queue drains, ports are created (one fails), the full SYNC runs and is timed.
    ctl.run()
    wait_for(lambda: {"pod-m1", "pod-m2"} <= set(iaas.ports), what="ports of web-1, web-2")
    wait_for(lambda: value(ops, op="create", result="error") > before["create_err"], what="a create error")
    wait_for(lambda: value("netctl_resync_duration_seconds_count") > before["resync"], what="a resync")
    assert value("netctl_resync_duration_seconds_sum") > before["resync_sum"]
    assert value(ops, op="create", result="ok") - before["create_ok"] == 2
    wait_for(lambda: value(ops, op="annotate", result="ok") - before["annotate_ok"] >= 2, what="annotations")
    assert value(latency, name=q, priority="ADD") - before["lat_add"] >= 4
    # The SYNC queued above is served after the ADD keys (lowest priority); the leader's own
    # first reconcile runs before the workers start, outside the queue.
    wait_for(lambda: value(latency, name=q, priority="SYNC") - before["lat_sync"] >= 1, what="the queued SYNC")

    # The IaaS recovers: the retry (with back-off) succeeds and counts as ok.
    iaas.fail.clear()
    wait_for(lambda: "pod-m3" in iaas.ports, what="the retried port")
    assert value(ops, op="create", result="ok") - before["create_ok"] == 3
    wait_for(lambda: PORT_ANNOTATION in lws["pods"].objects["tenant-a/web-3"]["metadata"]["annotations"],
             what="web-3's annotation")

    # A deleted pod's port goes: a DELETE key, counted by result.
    lws["pods"].delete("tenant-a/web-1")
    wait_for(lambda: "pod-m1" not in iaas.ports, what="web-1's port to go")
    assert value(ops, op="delete", result="ok") - before["delete_ok"] >= 1
    # ...and the queue is empty again at every priority.
    wait_for(lambda: all(value(depth, name=q, priority=p.name) == 0 for p in Priority), what="an empty queue")


def test_pods_of_the_initial_list_are_left_to_the_full_reconcile(
    world: tuple[Controller, dict[str, MemListWatch], FlakyIaaS],
) -> None:
    """At start the informers list every pod; queueing each (10,000 at scale) would make a restart
    re-check them all ahead of the few that need work. The leader's full reconcile queues exactly
    those instead, so every pod present at start still gets its port."""
    ctl, lws, iaas = world
    for name, uid in (("old-1", "o1"), ("old-2", "o2")):
        lws["pods"].seed(pod(name, uid=uid))
    ctl.start_informers(timeout=5)
    assert not any(k.startswith("pod:") for k in ctl.queue.waiting()), ctl.queue.waiting()
    ctl.run()
    wait_for(lambda: {"pod-o1", "pod-o2"} <= set(iaas.ports), what="ports of the pods present at start")
