"""The lab's real Kubernetes control plane: etcd, kube-apiserver, controller-manager and scheduler.

Everything lives under one per-run directory (PKI, tokens, kubeconfigs, etcd data, logs) and
binds to per-run free ports, so a lab and any number of test runs coexist on one machine and
``stop()`` leaves nothing behind. The API server enforces what production enforces
(``Node,RBAC`` authorization, ``NodeRestriction``, service-account token signing), because the
point of the lab is to find out whether our components' credentials are sufficient and minimal.

Identities: a static token file holds ``admin`` (system:masters), ``netctl-controller``,
``netctl-cni``, the controller-manager and scheduler, and ``system:node:<node>`` for nodes known
before ``start()``. Nodes added later get an x509 client certificate from the lab CA instead
(the token file is only read at API server start).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from netctl.lab.procs import Daemon, DaemonError, free_port, kill_pid, proc_cmdline, run

ADMIN = "admin"
CONTROLLER = "netctl-controller"
CNI = "netctl-cni"
KCM = "system:kube-controller-manager"
SCHEDULER = "system:kube-scheduler"
SA_ISSUER = "https://kubernetes.default.svc"
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
REPO_ROOT = Path(__file__).resolve().parents[2]
RBAC_DIR = REPO_ROOT / "deploy" / "rbac"


def node_user(node: str) -> str:
    return f"system:node:{node}"


def k8s_bin_dirs() -> list[Path]:
    """Where tools/build-k8s.sh puts the binaries ($NETCTL_K8S_BIN overrides), newest first."""
    dirs = []
    if os.environ.get("NETCTL_K8S_BIN"):
        dirs.append(Path(os.environ["NETCTL_K8S_BIN"]))
    cache = Path(os.environ.get("NETCTL_CACHE", Path.home() / ".cache" / "netctl")) / "k8s"
    if cache.is_dir():
        built = [d for d in cache.iterdir() if d.is_dir()]
        dirs += sorted(built, key=lambda d: d.stat().st_mtime, reverse=True)
    return dirs


def find_k8s_binary(name: str) -> Path:
    """Path of a Kubernetes binary built by tools/build-k8s.sh (kubectl may also come from PATH)."""
    for d in k8s_bin_dirs():
        if os.access(d / name, os.X_OK):
            return d / name
    if name == "kubectl" and shutil.which("kubectl"):
        return Path(str(shutil.which("kubectl")))
    raise FileNotFoundError(f"{name} not found in {[str(d) for d in k8s_bin_dirs()]}: run tools/build-k8s.sh")


class Pki:
    """A throwaway CA and the certificates the lab needs, made with the ``openssl`` CLI."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.ca_cert = directory / "ca.crt"
        self.ca_key = directory / "ca.key"

    def create_ca(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        cnf = self.dir / "ca.cnf"
        cnf.write_text(
            "[req]\ndistinguished_name=dn\nx509_extensions=v3_ca\nprompt=no\n"
            f"[dn]\nCN={self.name}-ca\n"
            "[v3_ca]\nbasicConstraints=critical,CA:TRUE\n"
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n"
        )
        self._ec_key(self.ca_key)
        run(["openssl", "req", "-x509", "-new", "-config", cnf, "-key", self.ca_key,
             "-sha256", "-days", "30", "-out", self.ca_cert])  # fmt: skip

    def _ec_key(self, path: Path) -> None:
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path])
        os.chmod(path, 0o600)

    def issue(
        self,
        stem: str,
        cn: str,
        orgs: Sequence[str] = (),
        *,
        server: bool = False,
        client: bool = False,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
    ) -> tuple[Path, Path]:
        """Key + certificate signed by the CA; returns (cert, key)."""
        key, csr, crt, ext = (self.dir / f"{stem}{s}" for s in (".key", ".csr", ".crt", ".ext"))
        self._ec_key(key)
        subject = f"/CN={cn}" + "".join(f"/O={o}" for o in orgs)
        run(["openssl", "req", "-new", "-key", key, "-subj", subject, "-out", csr])
        usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
        sans = [f"IP:{i}" for i in ips] + [f"DNS:{d}" for d in dns]
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={','.join(usages)}",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
             "-set_serial", str(secrets.randbits(63)), "-days", "30", "-sha256", "-extfile", ext,
             "-out", crt])  # fmt: skip
        csr.unlink()
        ext.unlink()
        return crt, key

    def rsa_key_pair(self, stem: str) -> tuple[Path, Path]:
        """RSA key (service-account tokens are RS256) and its public half; returns (key, pub)."""
        key, pub = self.dir / f"{stem}.key", self.dir / f"{stem}.pub"
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key])
        os.chmod(key, 0o600)
        run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub])
        return key, pub


def _https_get(url: str, *, ca: Path | None, token: str | None, timeout: float = 2.0) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _healthz_ok(port: int) -> bool:
    """Self-signed loopback /healthz of the controller-manager or scheduler (allowed unauthenticated)."""
    return _https_get(f"https://127.0.0.1:{port}/healthz", ca=None, token=None)[0] == 200


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler for one lab or test run.

    ``bind_address`` is where the API server listens and what it advertises (the management
    bridge address, so node namespaces reach it). Use as a context manager, or ``start()`` /
    ``stop()``; ``stop()`` removes ``run_dir`` entirely.
    """

    def __init__(
        self,
        run_dir: Path | str,
        bind_address: str,
        prefix: str,
        service_cidr: str = "10.96.0.0/16",
        *,
        nodes: Iterable[str] = (),
        rbac_dir: Path | None = RBAC_DIR,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.bind_address = bind_address
        self.prefix = prefix
        self.service_cidr = service_cidr
        self.rbac_dir = rbac_dir
        self.pki = Pki(self.run_dir / "pki", prefix)
        self.port = 0
        self.timings: dict[str, float] = {}
        self._tokens: dict[str, tuple[str, list[str]]] = {}
        self._cert_users: set[str] = set()
        self._nodes = list(nodes)
        self._daemons: dict[str, Daemon] = {}
        self._started = False

    # ---- identities -------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{self.bind_address}:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.pki.ca_cert

    @property
    def first_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    def token(self, identity: str) -> str:
        """The bearer token of a static-token identity (``admin``, ``netctl-cni`` ...)."""
        return self._tokens[identity][0]

    def _kubeconfig_path(self, identity: str) -> Path:
        return self.run_dir / "kubeconfig" / f"{identity.replace(':', '-')}.yaml"

    def kubeconfig(self, identity: str = ADMIN) -> Path:
        """Kubeconfig file for an identity (user name, e.g. ``admin`` or ``system:node:n1``)."""
        path = self._kubeconfig_path(identity)
        if not path.exists():
            known = sorted(self._tokens) + sorted(self._cert_users)
            raise KeyError(f"no kubeconfig for {identity!r} (known: {known})")
        return path

    def _write_kubeconfig(self, identity: str, user: dict[str, str]) -> Path:
        path = self._kubeconfig_path(identity)
        path.parent.mkdir(parents=True, exist_ok=True)
        cluster = {"server": self.server, "certificate-authority": str(self.ca_path)}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.prefix, "cluster": cluster}],
            "users": [{"name": identity, "user": user}],
            "contexts": [{"name": self.prefix, "context": {"cluster": self.prefix, "user": identity}}],
            "current-context": self.prefix,
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        return path

    def add_node(self, node: str) -> Path:
        """Credentials for ``system:node:<node>``; returns its kubeconfig.

        Before ``start()`` the node gets a static token; afterwards an x509 client certificate
        (CN=system:node:<node>, O=system:nodes), which the API server accepts without a restart.
        """
        user = node_user(node)
        if user in self._tokens or user in self._cert_users:
            return self._kubeconfig_path(user)
        if not self._started:
            self._nodes.append(node)
            return self._kubeconfig_path(user)  # written by start()
        crt, key = self.pki.issue(f"node-{node}", user, ["system:nodes"], client=True)
        self._cert_users.add(user)
        return self._write_kubeconfig(user, {"client-certificate": str(crt), "client-key": str(key)})

    def _make_identities(self) -> None:
        wanted: dict[str, list[str]] = {
            ADMIN: ["system:masters"],
            CONTROLLER: [],
            CNI: [],
            KCM: [],
            SCHEDULER: [],
        }
        for node in self._nodes:
            wanted[node_user(node)] = ["system:nodes"]
        lines = []
        for user, groups in wanted.items():
            token = secrets.token_urlsafe(32)
            self._tokens[user] = (token, groups)
            line = f"{token},{user},{user}"
            lines.append(f'{line},"{",".join(groups)}"' if groups else line)  # no column: no "" group
        fd = os.open(self.run_dir / "tokens.csv", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        for user in wanted:
            self._write_kubeconfig(user, {"token": self._tokens[user][0]})

    # ---- daemons ------------------------------------------------------------------------

    def _daemon(self, name: str, argv: Sequence[str | Path]) -> Daemon:
        log, pid = self.run_dir / "log" / f"{name}.log", self.run_dir / "run" / f"{name}.pid"
        d = Daemon(name, [str(a) for a in argv], log, pid)
        self._daemons[name] = d
        return d

    def start(self, timeout: float = 60.0) -> ControlPlane:
        """Generate PKI and identities, start the four daemons, apply RBAC. Idempotent."""
        if self._started:
            return self
        t0 = time.monotonic()
        try:
            self._start(timeout)
        except BaseException:
            self._stop_daemons()
            raise
        self._started = True
        self.timings["control_plane_total"] = time.monotonic() - t0
        return self

    def _start(self, timeout: float) -> None:
        binaries = {b: find_k8s_binary(b) for b in K8S_BINARIES[:3]}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        t = time.monotonic()
        pki = self.pki
        pki.create_ca()
        apiserver_crt, apiserver_key = pki.issue(
            "apiserver", "kube-apiserver", server=True,
            ips=[self.bind_address, "127.0.0.1", self.first_service_ip],
            dns=["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"],
        )  # fmt: skip
        kubelet_client_crt, kubelet_client_key = pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"], client=True
        )
        etcd_crt, etcd_key = pki.issue(
            "etcd", "etcd", server=True, client=True, ips=["127.0.0.1"], dns=["localhost"]
        )
        etcd_client_crt, etcd_client_key = pki.issue("apiserver-etcd-client", "kube-apiserver", client=True)
        sa_key, sa_pub = pki.rsa_key_pair("sa")
        try:
            self.port = free_port(self.bind_address)
        except OSError as e:
            raise DaemonError(
                f"cannot listen on {self.bind_address} ({e.strerror}): the API server's bind address must "
                "exist on this host (create the MgmtNetwork first)"
            ) from e
        self._make_identities()
        self.timings["pki"] = time.monotonic() - t

        etcd_client, etcd_peer = free_port(), free_port()
        etcd_dir = self.run_dir / "etcd"
        etcd_dir.mkdir(mode=0o700, exist_ok=True)
        tls: list[str | Path] = [
            "--cert-file", etcd_crt, "--key-file", etcd_key, "--trusted-ca-file", pki.ca_cert,
            "--client-cert-auth", "--peer-cert-file", etcd_crt, "--peer-key-file", etcd_key,
            "--peer-trusted-ca-file", pki.ca_cert, "--peer-client-cert-auth",
        ]  # fmt: skip
        etcd = self._daemon("etcd", [
            "etcd", "--name", self.prefix, "--data-dir", etcd_dir,
            "--listen-client-urls", f"https://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"https://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"https://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"https://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"{self.prefix}=https://127.0.0.1:{etcd_peer}",
            "--initial-cluster-state", "new", "--initial-cluster-token", self.prefix,
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}", *tls,
        ])  # fmt: skip
        t = time.monotonic()
        etcd.start()

        apiserver = self._daemon("kube-apiserver", [
            binaries["kube-apiserver"],
            f"--etcd-servers=https://127.0.0.1:{etcd_client}",
            f"--etcd-cafile={pki.ca_cert}", f"--etcd-certfile={etcd_client_crt}",
            f"--etcd-keyfile={etcd_client_key}",
            f"--bind-address={self.bind_address}", f"--advertise-address={self.bind_address}",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--tls-cert-file={apiserver_crt}", f"--tls-private-key-file={apiserver_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--token-auth-file={self.run_dir / 'tokens.csv'}", "--anonymous-auth=false",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            f"--service-account-issuer={SA_ISSUER}", f"--api-audiences={SA_ISSUER}",
            f"--service-cluster-ip-range={self.service_cidr}",
            f"--kubelet-client-certificate={kubelet_client_crt}",
            f"--kubelet-client-key={kubelet_client_key}",
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true", "--profiling=false", "--v=1",
        ])  # fmt: skip
        apiserver.start()
        apiserver.wait_ready(self.ready, timeout, "ready (/readyz)")
        self.timings["apiserver_ready"] = time.monotonic() - t

        common = ["--leader-elect=false", "--port=0", "--bind-address=127.0.0.1", "--profiling=false",
                  "--v=1"]  # fmt: skip
        kcm_port, sched_port = free_port(), free_port()
        kcm = self._daemon("kube-controller-manager", [
            binaries["kube-controller-manager"], f"--kubeconfig={self.kubeconfig(KCM)}", *common,
            f"--secure-port={kcm_port}", f"--cert-dir={self.run_dir / 'kcm'}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
            f"--service-cluster-ip-range={self.service_cidr}",
        ])  # fmt: skip
        scheduler = self._daemon("kube-scheduler", [
            binaries["kube-scheduler"], f"--kubeconfig={self.kubeconfig(SCHEDULER)}", *common,
            f"--secure-port={sched_port}", f"--cert-dir={self.run_dir / 'scheduler'}",
        ])  # fmt: skip
        t = time.monotonic()
        kcm.start()
        scheduler.start()
        for d, port in ((kcm, kcm_port), (scheduler, sched_port)):
            d.wait_ready(functools.partial(_healthz_ok, port), timeout, "healthy (/healthz)")
        self.timings["controllers_healthy"] = time.monotonic() - t
        if self.rbac_dir is not None:
            self.apply(*sorted(self.rbac_dir.glob("*.yaml")))

    def running(self) -> bool:
        """Started and the API server process is alive."""
        d = self._daemons.get("kube-apiserver")
        return self._started and d is not None and d.running()

    def ready(self) -> bool:
        """The API server's /readyz answers ok to the admin token."""
        code, body = _https_get(f"{self.server}/readyz", ca=self.ca_path, token=self.token(ADMIN))
        return code == 200 and body.strip() == "ok"

    def _stop_daemons(self) -> None:
        """Stop our daemons; those only known from a pidfile (started by another process) too."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            d = self._daemons.get(name)
            if d is not None:
                d.stop()
                continue
            pidfile = self.run_dir / "run" / f"{name}.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().split()[0])
                # every one of these daemons names a file under run_dir on its command line
                kill_pid(pid, check=lambda p: any(str(self.run_dir) in a for a in proc_cmdline(p) or []))
                pidfile.unlink()

    def stop(self) -> None:
        """Stop every daemon and remove ``run_dir`` (PKI, tokens, etcd data, logs)."""
        self._stop_daemons()
        self._daemons.clear()
        self._started = False
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- clients ------------------------------------------------------------------------

    def api_client(self, identity: str = ADMIN) -> Any:
        """A ``kubernetes.client.ApiClient`` authenticated as ``identity``."""
        from kubernetes import config as k8s_config

        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig(identity)))

    def apply(self, *paths: Path) -> None:
        """Server-side apply every document of the given YAML files as admin (idempotent)."""
        from kubernetes import dynamic

        with self.api_client() as api:
            # discovery cache inside run_dir: the default is a file per server URL in /tmp, left behind
            dyn = dynamic.DynamicClient(api, cache_file=str(self.run_dir / "discovery-cache.json"))
            for path in paths:
                for doc in yaml.safe_load_all(Path(path).read_text()):
                    if not doc:
                        continue
                    res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
                    ns = doc["metadata"].get("namespace") if res.namespaced else None
                    dyn.server_side_apply(
                        res, body=doc, name=doc["metadata"]["name"], namespace=ns,
                        field_manager="netctl-lab", force_conflicts=True,
                    )  # fmt: skip

    def kubectl(self, *args: str, identity: str = ADMIN, timeout: float = 60.0, check: bool = True) -> str:
        """Run kubectl against this control plane (built kubectl, else the one on PATH)."""
        # --cache-dir: kubectl's default discovery/http cache (~/.kube/cache/<host_port>) would
        # collect one directory per lab run
        argv = [str(find_k8s_binary("kubectl")), f"--kubeconfig={self.kubeconfig(identity)}",
                f"--cache-dir={self.run_dir / 'kubectl-cache'}", *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise DaemonError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def wait_service_account(self, namespace: str, name: str = "default", timeout: float = 30.0) -> None:
        """Wait for the controller-manager to create a namespace's ServiceAccount and its token.

        Pods in a brand-new namespace are rejected until then (ServiceAccount admission).
        """
        from kubernetes import client as k8s

        deadline = time.monotonic() + timeout
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            while True:
                with contextlib.suppress(k8s.ApiException):
                    sa = core.read_namespaced_service_account(name, namespace)
                    if sa.secrets:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"ServiceAccount {namespace}/{name} has no token after {timeout:.0f} s; "
                        f"see {self.run_dir / 'log' / 'kube-controller-manager.log'}"
                    )
                time.sleep(0.2)

    def describe(self) -> dict[str, Any]:
        """What a lab prints: endpoint, kubeconfigs, logs."""
        return {
            "server": self.server,
            "kubeconfig": str(self._kubeconfig_path(ADMIN)),
            "logs": {n: str(d.log_path) for n, d in self._daemons.items()},
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }

    def __repr__(self) -> str:
        return f"ControlPlane({json.dumps(self.describe())})"
