"""The Service data path on lab nodes: kproxy per node VM, forwarding on, its tenant-scoped token.

Pods reach a ClusterIP through a route (set by the CNI) via their node's tenant address; the
node's kproxy DNATs to a backend pod and masquerades to the node address (DESIGN §1). kproxy runs
inside the node netns with the credentials the controller maintains for the tenant's kproxy
ServiceAccount, so it can read its own tenant's Services and nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from netctl.lab.procs import Daemon, free_port

KPROXY_SA_NAMESPACE = "kube-system"

# setns + write /proc/sys (the net.* sysctls are per network namespace).
_SYSCTL = (
    "import ctypes, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0: sys.exit(3)\n"
    "for kv in sys.argv[2:]:\n"
    "    k, v = kv.split('=')\n"
    "    open('/proc/sys/' + k.replace('.', '/'), 'w').write(v)\n"
)


def node_sysctls(netns: str) -> None:
    """A node VM routes (Service traffic, hostPorts): forwarding on, no ICMP redirects."""
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", _SYSCTL, f"/run/netns/{netns}",
         "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0"],
        check=True, timeout=10,
    )


def kproxy_service_account(tenant: str) -> str:
    return f"netctl-kproxy-{tenant}"


def kproxy_kubeconfig(cp: Any, tenant: str, path: Path, timeout: float = 60.0) -> Path:
    """Mint a token (TokenRequest) for the tenant's kproxy ServiceAccount, which the controller
    creates once it has seen the Tenant, and write a kubeconfig with it."""
    from kubernetes import client as k8s

    sa = kproxy_service_account(tenant)
    deadline = time.monotonic() + timeout
    with cp.api_client() as api:
        core = k8s.CoreV1Api(api)
        while True:
            try:
                req = core.create_namespaced_service_account_token(
                    sa, KPROXY_SA_NAMESPACE,
                    k8s.AuthenticationV1TokenRequest(
                        spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=86400)
                    ),
                )
                if req.status is None:
                    raise RuntimeError(f"TokenRequest for {sa} returned no status")
                token = req.status.token
                break
            except k8s.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no token for {KPROXY_SA_NAMESPACE}/{sa} (the controller creates it): {exc.reason}"
                    ) from None
                time.sleep(0.3)
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_path)}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": sa}}],
        "current-context": "lab",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def kproxy_daemon(kproxy_bin: str, node: str, netns: str, node_dir: Path, kubeconfig: Path,
                  service_cidr: str) -> Daemon:
    """kproxy inside the node VM's netns (its healthz port 10256 is the node's own)."""
    argv = [
        kproxy_bin, f"--kubeconfig={kubeconfig}", f"--node-name={node}", f"--service-cidr={service_cidr}",
        f"--metrics-port={free_port()}", "--min-sync-period-s=0.2",
    ]
    return Daemon(f"kproxy-{node}", argv, node_dir / "kproxy.log", node_dir / "kproxy.pid", netns=netns)
