"""Pod create -> annotated -> Running -> Ready, through the lab's real kubelet, containerd and CNI.

Usage (against a lab brought up with `make lab`):
    .venv/bin/python bench/pod_ready.py --count 20 [--run-dir /var/lib/netctl/lab] [--tenant alpha]

Pods are created one at a time (sequential, so the figure is latency, not throughput) and
timed from the create call to each milestone seen on a watch. The API server's own create round
trip is the reference printed beside them. Prints medians and the worst case; never fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from netctl.annotations import PORT_ANNOTATION
from netctl.kube.client import new_api_client
from netctl.lab.lab import DEFAULT_RUN_DIR, LAB_IMAGE, POD_PORT


def manifest(name: str, tenant: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "netctl-bench"}},
        "spec": {
            "nodeSelector": {"netctl.io/tenant": tenant},
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "containers": [{"name": "web", "image": LAB_IMAGE, "imagePullPolicy": "Never",
                            "command": ["/bin/busybox", "httpd", "-f", "-p", str(POD_PORT), "-h", "/"]}],
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    ap.add_argument("--tenant", default="alpha")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    kubeconfig = args.run_dir / "k8s" / "kubeconfig" / "admin.yaml"
    if not kubeconfig.exists():
        print(f"no lab in {args.run_dir} (run `make lab` first)", file=sys.stderr)
        return 2
    api = new_api_client(str(kubeconfig))
    core = client.CoreV1Api(api)
    ns = f"tenant-{args.tenant}"
    seen: dict[str, dict[str, float]] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def watcher() -> None:
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, ns, label_selector="app=netctl-bench", timeout_seconds=600):
            now = time.monotonic()
            pod = ev["object"]
            marks = seen.setdefault(pod.metadata.name, {})
            with lock:
                if pod.spec.node_name:
                    marks.setdefault("scheduled", now)
                if PORT_ANNOTATION in (pod.metadata.annotations or {}):
                    marks.setdefault("annotated", now)
                if pod.status.phase == "Running":
                    marks.setdefault("running", now)
                if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                    marks.setdefault("ready", now)
            if stop.is_set():
                w.stop()

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    time.sleep(1.0)
    created: dict[str, float] = {}
    api_rtt: list[float] = []
    names = [f"bench-{int(time.time())}-{i}" for i in range(args.count)]
    try:
        for name in names:
            t0 = time.monotonic()
            core.create_namespaced_pod(ns, manifest(name, args.tenant))
            api_rtt.append(time.monotonic() - t0)
            created[name] = t0
            deadline = t0 + args.timeout
            while "ready" not in seen.get(name, {}) and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        stop.set()
        for name in names:
            with contextlib.suppress(client.ApiException):
                core.delete_namespaced_pod(name, ns, grace_period_seconds=0)

    def stat(key: str) -> str:
        vals = [seen[n][key] - created[n] for n in created if key in seen.get(n, {})]
        if not vals:
            return f"{key:>10}: none observed"
        return (f"{key:>10}: median {statistics.median(vals) * 1000:7.0f} ms   max {max(vals) * 1000:7.0f} ms"
                f"   ({len(vals)}/{len(created)})")

    print(f"pods: {len(created)} sequential creates in namespace {ns}")
    print(f"{'api create':>10}: median {statistics.median(api_rtt) * 1000:7.0f} ms   (reference: API round trip)")
    for key in ("scheduled", "annotated", "running", "ready"):
        print(stat(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
