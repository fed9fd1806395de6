"""Crash-proof port accounting under fault injection (issue 4, item 2): churn pods through a real
kube-apiserver while the controller process is SIGKILLed at random moments and restarted; once it
has converged, the ports in the real OVN NB DB and the pods' annotations agree exactly.

Real: etcd + kube-apiserver (+ controller-manager, which gives namespaces their ServiceAccount),
the OVN NB DB (ovn_fixtures), `netctl controller` as its own process with warm pools on, under the
controller's own RBAC identity. No kubelet: the pods carry `spec.nodeName` of a Node object of the
tenant, which is all the controller needs; they are deleted with grace period 0.

What is checked at the end (read independently, with `ovn-nbctl` and the API):
  * bound ports == live pods (by uid), no pod with two, no orphaned bound port;
  * every pod's annotation names its bound port with the port's ip and mac;
  * no address is held twice on the tenant switch (pooled ports included);
  * the pool holds between min and max ports, and the Tenant status says so (Ready, pool size);
  * a second tenant whose subnet is smaller than one refill batch reports Degraded/SubnetExhausted
    (with PoolBelowMin in the message) while staying Ready;
  * Events for port creation/claims reached the API.

Counts are parameters (env): NETCTL_FAULT_PODS (pods created in all, default 1000),
NETCTL_FAULT_KILLS (SIGKILLs, default 20), NETCTL_FAULT_SEED (random seed; printed either way).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from netctl.annotations import PORT_ANNOTATION, TENANT_LABEL, AnnotationError, PortAnnotation
from netctl.kube.client import api_path, new_api_client, request_json
from netctl.lab.k8s import CONTROLLER, K8S_BINARIES, ControlPlane, k8s_bin_dirs
from netctl.lab.procs import free_port
from netns_tests.ovn_fixtures import OvnEnv
from netns_tests.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
pytest_plugins = ("netns_tests.ovn_fixtures",)

REPO = Path(__file__).resolve().parents[1]
TENANTS = ("netctl.io", "v1alpha1", "tenants")
PODS = int(os.environ.get("NETCTL_FAULT_PODS", "1000"))
KILLS = int(os.environ.get("NETCTL_FAULT_KILLS", "20"))
SEED = int(os.environ.get("NETCTL_FAULT_SEED") or secrets.randbits(32))
POOL_MIN, POOL_MAX, POOL_BATCH = 8, 16, 8
CIDR = "10.72.0.0/16"
TINY_CIDR = "10.73.0.0/29"  # a second tenant: 5 free addresses, fewer than one refill batch
CONVERGE_S = 120.0  # sanity bound for the final convergence, not a timing assertion

Obj = dict[str, Any]


@dataclass
class World:
    prefix: str
    cp: ControlPlane
    admin: k8s.ApiClient
    ovn: OvnEnv
    tenant: str
    namespace: str
    node: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    starts: int = 0
    kills: list[float] = field(default_factory=list)

    def start_controller(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [
            str(REPO / ".venv" / "bin" / "netctl"), "controller",
            f"--kubeconfig={self.cp.kubeconfig(CONTROLLER)}",
            f"--ovn-nb={self.ovn.ovn.nb_connection}",
            f"--metrics-port={port}",
            "--no-leader-elect",  # crash-proof accounting is under test here; HA has its own test
            "--no-manage-kproxy-rbac",
            "--resync-period-s=5",
            f"--pool-min={POOL_MIN}", f"--pool-max={POOL_MAX}", f"--pool-batch={POOL_BATCH}",
            "--pool-refill-interval-s=0.5",
            "--workers=4",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        log.write(f"\n==== start {self.starts} ====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1

    def healthy(self) -> bool:
        """/healthz answers 200: the informers have synced (the process is about to or does work)."""
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def kill_controller(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.kills.append(time.monotonic())

    def stop_controller(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _require_control_plane_binaries() -> None:
    for b in K8S_BINARIES[:3]:
        if not any(os.access(d / b, os.X_OK) for d in k8s_bin_dirs()):
            pytest.skip(f"{b} not built: run tools/build-k8s.sh")


@pytest.fixture(scope="module")
def world(ovn_env: OvnEnv) -> Iterator[World]:
    _require_control_plane_binaries()
    prefix = "kf" + secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    cp = ControlPlane(tmp / "k8s", "127.0.0.1", prefix)
    admin = None
    w: World | None = None
    try:
        cp.start()
        cp.apply(REPO / "deploy" / "crds" / "tenant.yaml")
        admin = new_api_client(str(cp.kubeconfig()), pool_maxsize=16)

        def crd_served() -> bool:
            with contextlib.suppress(k8s.ApiException):
                request_json(admin, "GET", api_path(*TENANTS))
                return True
            return False

        wait_for(crd_served, "the Tenant CRD served")
        tenant, ns, node = f"{prefix}t", f"{prefix}-ns", f"{prefix}-n1"
        request_json(admin, "POST", api_path("", "v1", "namespaces"),
                     body={"metadata": {"name": ns, "labels": {TENANT_LABEL: tenant}}})
        request_json(admin, "POST", api_path("", "v1", "nodes"),
                     body={"metadata": {"name": node, "labels": {TENANT_LABEL: tenant}}})
        for name, cidr in ((tenant, CIDR), (f"{prefix}tiny", TINY_CIDR)):
            request_json(admin, "POST", api_path(*TENANTS),
                         body={"apiVersion": "netctl.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
                               "spec": {"cidr": cidr}})  # fmt: skip
        cp.wait_service_account(ns)
        w = World(prefix, cp, admin, ovn_env, tenant, ns, node, tmp / "controller.log")
        yield w
    finally:
        if w is not None:
            w.stop_controller()
            for t in (w.tenant, f"{prefix}tiny"):
                with contextlib.suppress(Exception):
                    ovn_env.nbctl("--if-exists", "ls-del", f"netctl-{t}")
        if admin is not None:
            admin.close()
        try:
            cp.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- API helpers ---------------------------------------------------------------------------------------


def create_pod(w: World, name: str) -> None:
    request_json(w.admin, "POST", api_path("", "v1", "pods", w.namespace), body={
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": w.namespace},
        "spec": {"nodeName": w.node, "containers": [{"name": "c", "image": "none.invalid/never-pulled"}]},
    })  # fmt: skip


def delete_pod(w: World, name: str) -> None:
    with contextlib.suppress(k8s.ApiException):  # 404: already gone
        request_json(w.admin, "DELETE", api_path("", "v1", "pods", w.namespace, name),
                     query={"gracePeriodSeconds": "0"})


def live_pods(w: World) -> dict[str, Obj]:
    got = request_json(w.admin, "GET", api_path("", "v1", "pods", w.namespace))
    return {p["metadata"]["uid"]: p for p in got["items"]}


def switch_ports(w: World) -> list[dict[str, Any]]:
    """The tenant's logical switch ports as ovn-nbctl sees them: name, mac, ip, external_ids."""
    out = w.ovn.nbctl("--format=json", "--columns=name,addresses,external_ids", "find", "Logical_Switch_Port",
                      f"external_ids:netctl\\:tenant={w.tenant}")
    rows = []
    for name, addrs, ext in json.loads(out)["data"]:
        entries = [addrs] if isinstance(addrs, str) else addrs[1]
        mac, ip = [*entries[0].split(), "", ""][:2] if entries else ("", "")
        rows.append({"name": name, "mac": mac, "ip": ip, "ids": dict(ext[1])})
    return rows


def problems(w: World) -> list[str]:
    """Everything that is not (yet) as it must be once converged; empty = converged."""
    pods = live_pods(w)
    ports = switch_ports(w)
    bad: list[str] = []
    bound: dict[str, list[dict[str, Any]]] = {}
    pooled = 0
    for p in ports:
        state = p["ids"].get("netctl:state")
        if state == "pooled":
            pooled += 1
        elif state == "bound":
            bound.setdefault(p["ids"].get("netctl:pod-uid", ""), []).append(p)
        else:
            bad.append(f"port {p['name']} has no intent: {p['ids']}")
    for uid in bound.keys() - pods.keys():
        bad.append(f"orphaned bound ports {[p['name'] for p in bound[uid]]} (pod uid {uid} is gone)")
    for uid, pod in pods.items():
        name = pod["metadata"]["name"]
        mine = bound.get(uid, [])
        if len(mine) != 1:
            bad.append(f"pod {name} has {len(mine)} bound ports: {[p['name'] for p in mine]}")
            continue
        port = mine[0]
        raw = (pod["metadata"].get("annotations") or {}).get(PORT_ANNOTATION)
        try:
            ann = PortAnnotation.from_json(raw or "")
        except AnnotationError as exc:
            bad.append(f"pod {name}: annotation {raw!r}: {exc}")
            continue
        if (ann.port_id, ann.ip.split("/")[0], ann.mac) != (port["name"], port["ip"], port["mac"]):
            bad.append(f"pod {name}: annotation {ann.port_id} {ann.ip} {ann.mac} but its port is "
                       f"{port['name']} {port['ip']} {port['mac']}")
        if port["ids"].get("netctl:node") != w.node:
            bad.append(f"pod {name}: port {port['name']} bound to node {port['ids'].get('netctl:node')}")
    ips = [p["ip"] for p in ports]
    if len(ips) != len(set(ips)):
        bad.append(f"addresses held twice: {sorted({ip for ip in ips if ips.count(ip) > 1})}")
    if not POOL_MIN <= pooled <= POOL_MAX:
        bad.append(f"pool holds {pooled} ports, want [{POOL_MIN}, {POOL_MAX}]")
    return bad


# ---- the test --------------------------------------------------------------------------------------------


def test_churn_with_sigkills_converges_to_exact_accounting(world: World) -> None:
    w = world
    rng = random.Random(SEED)
    print(f"\nfault injection: seed {SEED} (NETCTL_FAULT_SEED={SEED} reproduces the schedule), "
          f"{PODS} pods, {KILLS} kills, pool {POOL_MIN}..{POOL_MAX}")
    waves = max(1, KILLS)
    per_wave = max(1, PODS // waves)
    created = 0
    deleted = 0
    alive: list[str] = []
    failures: list[BaseException] = []
    t0 = time.monotonic()
    w.start_controller()
    with ThreadPoolExecutor(8) as pool:
        for wave in range(waves):
            n = per_wave if wave < waves - 1 else PODS - created
            names = [f"p{wave:02d}-{i:04d}" for i in range(n)]
            doomed = rng.sample(alive, k=len(alive) * 2 // 5)  # 40 % of what lives goes
            # Killed at a random moment of its work: 0-2 s after its informers synced (the
            # start-up reconcile, claims, annotations, releases, refills are all in that window).
            kill_after = rng.uniform(0.0, 2.0)
            restart_after = rng.uniform(0.0, 1.0)  # seconds the controller stays dead

            def killer(delay: float = kill_after, down: float = restart_after) -> None:
                try:
                    wait_for(w.healthy, "the controller's /healthz", timeout=60, interval=0.05)
                    time.sleep(delay)
                    w.kill_controller()
                    time.sleep(down)
                    w.start_controller()
                except BaseException as exc:  # re-raised by the test thread
                    failures.append(exc)

            k = threading.Thread(target=killer, name=f"killer-{wave}") if wave < KILLS else None
            if k is not None:
                k.start()
            jobs = [pool.submit(create_pod, w, name) for name in names]
            jobs += [pool.submit(delete_pod, w, name) for name in doomed]
            for j in jobs:
                j.result()
            created += n
            deleted += len(doomed)
            alive = [a for a in alive if a not in set(doomed)] + names
            if k is not None:
                k.join()
            if failures:
                raise AssertionError(f"killer failed in wave {wave}:\n{w.log_tail()}") from failures[0]
            time.sleep(rng.uniform(0.0, 1.0))  # let the controller work on the wave (or not)
    churn_s = time.monotonic() - t0
    assert w.proc is not None and w.proc.poll() is None, f"controller not running:\n{w.log_tail()}"
    print(f"churn: {created} pods created, {deleted} deleted, {len(w.kills)} SIGKILLs in {churn_s:.1f} s; "
          f"{len(alive)} pods live")

    t1 = time.monotonic()
    last: list[str] = []

    def converged() -> bool:
        nonlocal last
        last = problems(w)
        return not last

    try:
        wait_for(converged, "ports, pods and annotations to converge", timeout=CONVERGE_S, interval=0.5)
    except AssertionError:
        raise AssertionError(f"not converged after {CONVERGE_S:.0f} s ({len(last)} problems):\n"
                             + "\n".join(last[:40]) + f"\n--- controller log ---\n{w.log_tail()}") from None
    print(f"converged {time.monotonic() - t1:.1f} s after the churn ended")
    assert len(w.kills) == KILLS
    pods = live_pods(w)
    assert len(pods) == len(alive) and {p["metadata"]["name"] for p in pods.values()} == set(alive)
    ports = switch_ports(w)
    bound = [p for p in ports if p["ids"]["netctl:state"] == "bound"]
    assert len(bound) == len(pods)
    from_pool = sum(p["name"].startswith("pool-") for p in bound)
    print(f"end state: {len(pods)} pods, {len(bound)} bound ports ({from_pool} taken from the pool), "
          f"{len(ports) - len(bound)} pooled")

    # The Tenant reports it (status is written by the refill loop; wait for the latest numbers).
    def status() -> Obj | None:
        st = request_json(w.admin, "GET", api_path(*TENANTS, None, w.tenant)).get("status") or {}
        pooled = len(ports) - len(bound)
        return st if (st.get("pool") or {}).get("size") == pooled else None

    st = wait_for(status, "the Tenant status to report the pool", timeout=30)
    assert st is not None
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False", conds
    assert st["pool"]["min"] == POOL_MIN and st["pool"]["max"] == POOL_MAX
    print(f"Tenant status: pool {st['pool']} (hits/misses of the last controller process), conditions "
          f"{[(c['type'], c['status'], c['reason']) for c in st['conditions']]}")
    assert st["networkId"] == f"netctl-{w.tenant}" and st["ports"]["bound"] == len(bound)
    # The tiny tenant's pool cannot be filled: Degraded (reason and message say why), still Ready.
    def tiny() -> dict[str, Obj] | None:
        st = request_json(w.admin, "GET", api_path(*TENANTS, None, f"{w.prefix}tiny")).get("status") or {}
        got = {c["type"]: c for c in st.get("conditions") or []}
        return got if got.get("Degraded", {}).get("status") == "True" else None

    tconds = wait_for(tiny, "the tiny tenant to report Degraded", timeout=30)
    assert tconds is not None
    assert tconds["Degraded"]["reason"] == "SubnetExhausted", tconds
    assert "PoolBelowMin" in tconds["Degraded"]["message"] and tconds["Ready"]["status"] == "True", tconds
    events = request_json(w.admin, "GET", api_path("", "v1", "events", w.namespace))["items"]
    reasons = {e["reason"] for e in events}
    assert reasons & {"PortClaimed", "PortCreated"}, f"no port Events, only {reasons}"
    assert "PortBound" in reasons, reasons
