"""A simulated tenant node: its own containerd and a real kubelet inside the node's network namespace.

The node "VM" is a network namespace with a management NIC (see ``hosts.MgmtNetwork``); both
daemons run in it, so the kubelet reaches the API server over the management network, the
runtime invokes the CNI plugin in the node's namespace exactly as on a real VM, and pods' host
ends appear there. Filesystem and cgroups are the host's, which is where the traps are: kubelet
changes host sysctls and creates directories and cgroups outside its root dir, and containerd
1.6 keeps its shims' sockets in ``/run/containerd/s`` whatever its config says. ``stop()`` undoes
each of those (see ``HostState`` for what many nodes, even in several processes, share).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from netctl.lab import images as lab_images
from netctl.lab.k8s import ControlPlane, find_k8s_binary
from netctl.lab.procs import Daemon, DaemonError, free_port, iter_processes, kill_pid, run, tail

log = logging.getLogger(__name__)

SHIM_SOCKET_DIR = Path("/run/containerd/s")
CGROUP_FS = Path("/sys/fs/cgroup")
REFERENCE_CNI_DIR = Path("/usr/lib/cni")
CRI_NAMESPACE = "k8s.io"
UNIX_PATH_MAX = 107
MNT_DETACH = 2

# What kubelet 1.20 changes on the host outside its --root-dir (measured, see DESIGN §5).
KUBELET_SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# Host dirs kubelet (and containerd's libcni result cache, which has no config knob in 1.6) create.
KUBELET_HOST_DIRS = (
    "/var/lib/kubelet", "/var/lib/kubelet/device-plugins", "/var/log/pods", "/var/log/containers",
    "/var/lib/cni", "/var/lib/cni/results",
)  # fmt: skip
CNI_RESULT_CACHE = Path("/var/lib/cni/results")
HOST_STATE = Path("/run/lock/netctl-lab-kubelet.json")
HOST_STATE_LOCK = Path("/run/lock/netctl-lab-kubelet.lock")

# Label domains a kubelet may not set on itself under NodeRestriction (applied by admin instead).
_SELF_LABEL_OK = ("kubelet.kubernetes.io", "node.kubernetes.io")
_SELF_LABEL_KEYS_OK = {
    "kubernetes.io/hostname", "kubernetes.io/arch", "kubernetes.io/os",
    "beta.kubernetes.io/arch", "beta.kubernetes.io/os", "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type", "topology.kubernetes.io/region", "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region", "failure-domain.beta.kubernetes.io/zone",
}  # fmt: skip


def kubelet_may_self_label(key: str) -> bool:
    """NodeRestriction's rule: no self-labels in *.kubernetes.io / *.k8s.io but a few allowed ones."""
    if "/" not in key or key in _SELF_LABEL_KEYS_OK:
        return True
    domain = key.split("/", 1)[0]
    if any(domain == d or domain.endswith("." + d) for d in _SELF_LABEL_OK):
        return True
    return not (domain.endswith("kubernetes.io") or domain.endswith("k8s.io"))


# ---- host state shared by every kubelet on the machine -----------------------------------------


def _read_sysctl(key: str) -> str:
    return Path("/proc/sys", key).read_text().strip()


class HostState:
    """Reference-counted snapshot of what kubelets change on the host.

    The first kubelet anywhere on the machine (any process) records the sysctls and which host
    directories existed; the last one to stop restores the sysctls and removes the directories
    that did not exist. Holders are ``pid:node-dir`` keys, and a holder whose process died no
    longer counts, so a crashed run's snapshot is reused (not re-taken from changed values) and
    restored by the next run's last node.
    """

    def __init__(self, holder: str) -> None:
        self.holder = holder

    @classmethod
    def for_this_process(cls, what: str) -> HostState:
        return cls(f"{os.getpid()}:{what}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        HOST_STATE_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(HOST_STATE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(HOST_STATE.read_text()) if HOST_STATE.exists() else {}
            except (OSError, ValueError):
                state = {}
            state.setdefault("holders", [])
            state["holders"] = [h for h in state["holders"] if _pid_alive(int(h.split(":", 1)[0]))]
            yield state
            if state["holders"] or state.get("keep"):
                tmp = HOST_STATE.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=1))
                os.replace(tmp, HOST_STATE)
            else:
                HOST_STATE.unlink(missing_ok=True)

    def acquire(self) -> None:
        with self._locked() as state:
            if "sysctls" not in state:
                state["sysctls"] = {k: _read_sysctl(k) for k in KUBELET_SYSCTLS if Path("/proc/sys", k).exists()}
                state["missing_dirs"] = [d for d in KUBELET_HOST_DIRS if not os.path.lexists(d)]
            if self.holder not in state["holders"]:
                state["holders"].append(self.holder)

    def release(self) -> dict[str, str]:
        """Drop this holder; if it was the last, restore and clean up. Returns what was restored."""
        restored: dict[str, str] = {}
        with self._locked() as state:
            if self.holder in state["holders"]:
                state["holders"].remove(self.holder)
            if state["holders"] or "sysctls" not in state:
                return restored
            for key, value in state["sysctls"].items():
                with contextlib.suppress(OSError):
                    if _read_sysctl(key) != value:
                        Path("/proc/sys", key).write_text(value)
                        restored[key] = value
            # deepest first, so a parent goes after its children
            for d in sorted(state.get("missing_dirs", []), key=len, reverse=True):
                p = Path(d)
                if p.name == "device-plugins":
                    shutil.rmtree(p, ignore_errors=True)  # kubelet's own socket and checkpoint
                else:
                    with contextlib.suppress(OSError):
                        p.rmdir()  # only if empty: never delete logs we did not write
            state.clear()
            state["holders"] = []
        return restored


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- cgroups -----------------------------------------------------------------------------------


def cgroup_version() -> int:
    """2 on a pure cgroup v2 host, else 1 (v1 or hybrid, where kubelet uses the v1 hierarchies)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(CGROUP_FS):
                return 2 if fields[fields.index("-") + 1] == "cgroup2" else 1
    return 1


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, named ones, unified)."""
    if cgroup_version() == 2:
        return [CGROUP_FS]
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                points.append(Path(fields[4]))
    return points


def make_cgroup_root(name: str) -> None:
    """Create ``/<name>`` in every hierarchy: kubelet refuses a --cgroup-root that does not exist."""
    for h in cgroup_hierarchies():
        d = h / name
        d.mkdir(exist_ok=True)
        if (h / "cpuset.cpus").exists() and cgroup_version() == 1:
            # a v1 cpuset child starts empty and accepts no task until cpus/mems are set
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (d / f).read_text().strip():
                    (d / f).write_text((h / f).read_text())
    if cgroup_version() == 2:
        wanted = set((CGROUP_FS / "cgroup.controllers").read_text().split())
        for c in sorted(wanted & {"cpu", "cpuset", "io", "memory", "pids", "hugetlb"}):
            with contextlib.suppress(OSError):
                (CGROUP_FS / name / "cgroup.subtree_control").write_text(f"+{c}")


def kill_cgroup_tasks(name: str) -> None:
    """SIGKILL every process in the tree ``/<name>`` (orphaned containers after their shim died)."""
    for root in [h / name for h in cgroup_hierarchies() if (h / name).exists()]:
        for dirpath, _dirs, files in os.walk(root):
            if "cgroup.procs" not in files:
                continue
            with contextlib.suppress(OSError):
                for pid in Path(dirpath, "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)


def cgroup_leftovers(name: str) -> list[Path]:
    return [h / name for h in cgroup_hierarchies() if (h / name).exists()]


def remove_cgroup_root(name: str, timeout: float = 10.0) -> None:
    """rmdir the tree ``/<name>`` bottom-up in every hierarchy (retrying while tasks exit)."""
    deadline = time.monotonic() + timeout
    while True:
        for root in cgroup_leftovers(name):
            for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        left = cgroup_leftovers(name)
        if not left:
            return
        if time.monotonic() > deadline:
            raise DaemonError(f"cgroups still busy after {timeout:.0f} s: {[str(p) for p in left]}")
        time.sleep(0.2)


# ---- mounts --------------------------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (root mount namespace), deepest first."""
    prefix = str(path).rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                points.append(mp)
    return sorted(points, key=len, reverse=True)


def unmount_under(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(5):  # stacked mounts (kubelet bind-mounts its root dir onto itself) need passes
        points = mounts_under(path)
        if not points:
            return
        for mp in points:
            libc.umount2(mp.encode(), MNT_DETACH)
    left = mounts_under(path)
    if left:
        raise DaemonError(f"could not unmount {left}")


# ---- containerd shims --------------------------------------------------------------------------


def shim_socket_path(argv: list[str]) -> Path | None:
    """Socket of a containerd 1.6 shim from its argv: /run/containerd/s/<sha256(address/namespace/id)>.

    containerd puts it there whatever its own config says, so it is computed, not configured.
    """
    try:
        address = argv[argv.index("-address") + 1]
        ns, ident = argv[argv.index("-namespace") + 1], argv[argv.index("-id") + 1]
    except (ValueError, IndexError):
        return None
    return SHIM_SOCKET_DIR / hashlib.sha256(os.path.join(address, ns, ident).encode()).hexdigest()


def live_shim_sockets() -> set[Path]:
    """Sockets of every running containerd shim on the host."""
    found = set()
    for _pid, argv in iter_processes():
        if "containerd-shim" in os.path.basename(argv[0]):
            sock = shim_socket_path(argv)
            if sock is not None:
                found.add(sock)
    return found


def _rpc_details(e: grpc.RpcError) -> str:
    details = getattr(e, "details", None)
    return str(details()) if callable(details) else str(e)


# ---- the CRI client ------------------------------------------------------------------------------


class Cri:
    """The few CRI RuntimeService calls the lab needs (containerd answers ``runtime.v1``)."""

    def __init__(self, socket: Path, timeout: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = cri_grpc.RuntimeServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def version(self) -> str:
        resp = self.stub.Version(cri.VersionRequest(), timeout=2)
        return f"{resp.runtime_name} {resp.runtime_version}"

    def sandboxes(self, labels: Mapping[str, str] | None = None) -> list[Any]:
        flt = cri.PodSandboxFilter(label_selector=dict(labels or {}))
        return list(self.stub.ListPodSandbox(cri.ListPodSandboxRequest(filter=flt), timeout=self.timeout).items)

    def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        resp = self.stub.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=self.timeout
        )
        info: dict[str, Any] = json.loads(resp.info.get("info", "{}"))
        return info

    def remove_all(self) -> tuple[list[Any], list[str]]:
        """Stop and remove every sandbox (ready or not) and its containers.

        Returns every sandbox seen and the errors; one sandbox whose CNI DEL fails must not keep
        the others alive.
        """
        seen, errors = [], []
        for sb in self.sandboxes():
            seen.append(sb)
            try:
                req_list = cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=sb.id))
                for c in self.stub.ListContainers(req_list, timeout=self.timeout).containers:
                    with contextlib.suppress(grpc.RpcError):
                        req = cri.StopContainerRequest(container_id=c.id, timeout=2)
                        self.stub.StopContainer(req, timeout=self.timeout)
                    with contextlib.suppress(grpc.RpcError):
                        self.stub.RemoveContainer(cri.RemoveContainerRequest(container_id=c.id), timeout=self.timeout)
                self.stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=self.timeout)
                self.stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=self.timeout)
            except grpc.RpcError as e:
                errors.append(f"sandbox {sb.metadata.namespace}/{sb.metadata.name}: {_rpc_details(e)}")
        return seen, errors


# ---- the node ------------------------------------------------------------------------------------


class NodeRuntime:
    """containerd + kubelet for one simulated node, both inside netns ``netns``.

    ``run_dir`` is this node's private directory (keep it short: unix socket paths are limited
    to 107 bytes). ``cni_conf_dir`` must already hold the node's conflist when ``start()`` runs;
    ``cni_bin_dir`` gets a ``loopback`` symlink to the reference plugin if it lacks one.
    """

    def __init__(
        self,
        name: str,
        netns: str,
        mgmt_ip: str,
        run_dir: Path | str,
        control_plane: ControlPlane | None,
        cni_bin_dir: Path | str,
        cni_conf_dir: Path | str,
        labels: Mapping[str, str] | None = None,
        prefix: str = "netctl",
        *,
        images: Mapping[str, Path] | None = None,
    ) -> None:
        self.name = name
        self.netns = netns
        self.mgmt_ip = mgmt_ip
        self.run_dir = Path(run_dir)
        self.cp = control_plane
        self.cni_bin_dir = Path(cni_bin_dir)
        self.cni_conf_dir = Path(cni_conf_dir)
        self.labels = dict(labels or {})
        self.prefix = prefix
        self.images = dict(images) if images is not None else None
        self.cgroup_root = f"{prefix}-{name}"
        self.socket = self.run_dir / "containerd" / "containerd.sock"
        if len(str(self.socket)) + len(".ttrpc") > UNIX_PATH_MAX:
            raise ValueError(f"run_dir {self.run_dir} too long for a unix socket path")
        self.kubelet_dir = self.run_dir / "kubelet"
        self.kubeconfig = control_plane.add_node(name) if control_plane else self.run_dir / "kubeconfig"
        self.timings: dict[str, float] = {}
        self._host = HostState.for_this_process(str(self.run_dir))
        self._shim_sockets_dir_existed = SHIM_SOCKET_DIR.exists()
        self.containerd = Daemon(
            f"containerd[{name}]",
            ["containerd", "--config", str(self.run_dir / "containerd" / "config.toml")],
            self.run_dir / "log" / "containerd.log",
            self.run_dir / "run" / "containerd.pid",
            netns=netns,
        )
        self.kubelet: Daemon | None = None

    # ---- configuration ----

    def _containerd_config(self) -> str:
        c = self.run_dir / "containerd"
        cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
# snapshotters this host cannot use (aufs would be modprobe'd at every start)
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{self.socket}"

[{cri_plugin}]
  sandbox_image = "{lab_images.PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri_plugin}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri_plugin}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri_plugin}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{c / 'state' / 'runc'}"

[{cri_plugin}.cni]
  bin_dir = "{self.cni_bin_dir}"
  conf_dir = "{self.cni_conf_dir}"
  max_conf_num = 1

[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"
"""

    def _control_plane(self) -> ControlPlane:
        if self.cp is None:
            raise RuntimeError(f"node {self.name} was attached without a control plane: it can only stop()")
        return self.cp

    def _kubelet_argv(self) -> list[str]:
        k = self.kubelet_dir
        self_labels = {key: v for key, v in self.labels.items() if kubelet_may_self_label(key)}
        argv = [
            str(find_k8s_binary("kubelet")),
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{self.socket}",
            f"--containerd={self.socket}",
            "--cgroup-driver=cgroupfs",
            f"--cgroup-root=/{self.cgroup_root}",
            "--cgroups-per-qos=true",
            "--enforce-node-allocatable=pods",
            "--fail-swap-on=false",
            f"--root-dir={k}",
            f"--cert-dir={k / 'pki'}",
            f"--volume-plugin-dir={k / 'volume-plugins'}",
            f"--kubeconfig={self.kubeconfig}",
            f"--client-ca-file={self._control_plane().ca_path}",
            "--anonymous-auth=false",
            "--authentication-token-webhook=true",
            "--authorization-mode=Webhook",
            f"--hostname-override={self.name}",
            f"--node-ip={self.mgmt_ip}",
            "--register-node=true",
            "--protect-kernel-defaults=false",
            f"--address={self.mgmt_ip}",
            f"--port={free_port()}",
            f"--healthz-bind-address={self.mgmt_ip}",
            f"--healthz-port={free_port()}",
            "--read-only-port=0",
            # computed locally, written to the API only on change: 2 s gets Ready ~8 s sooner
            "--node-status-update-frequency=2s",
            "--make-iptables-util-chains=false",
            "--eviction-hard=memory.available<1Mi,nodefs.available<1%,nodefs.inodesFree<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99",
            "--v=1",
        ]
        if self_labels:
            argv.append("--node-labels=" + ",".join(f"{key}={v}" for key, v in sorted(self_labels.items())))
        return argv

    # ---- lifecycle ----

    def start(self, timeout: float = 90.0) -> NodeRuntime:
        """Start containerd, import the images, start kubelet; return once the Node is Ready."""
        if self.kubelet is not None and self.kubelet.running():
            return self
        self._control_plane()
        t0 = time.monotonic()
        try:
            self._start_containerd(timeout)
            self._start_kubelet(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        self.timings["node_total"] = time.monotonic() - t0
        return self

    def _start_containerd(self, timeout: float) -> None:
        confs = [p for p in self.cni_conf_dir.glob("*") if p.suffix in (".conf", ".conflist", ".json")]
        if not confs:
            raise DaemonError(
                f"node {self.name}: no CNI config in {self.cni_conf_dir}; write it before start() "
                "(containerd's watcher misses files moved in later)"
            )
        if not (self.cni_bin_dir / "loopback").exists():
            # containerd itself runs `loopback` for every sandbox. Left in place at stop(): the
            # directory belongs to the caller and may serve other nodes that still run.
            self.cni_bin_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another node got there first
                (self.cni_bin_dir / "loopback").symlink_to(REFERENCE_CNI_DIR / "loopback")
        (self.run_dir / "containerd").mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / "containerd" / "config.toml").write_text(self._containerd_config())
        self._save_state()
        t = time.monotonic()
        self.containerd.start()
        cri_client = Cri(self.socket)
        try:
            self.containerd.wait_ready(lambda: bool(cri_client.version()), timeout, "answering CRI")
        finally:
            cri_client.close()
        self.timings["containerd_ready"] = time.monotonic() - t
        t = time.monotonic()
        for tarball in (self.images or lab_images.lab_images()).values():
            run(["ctr", "--address", self.socket, "-n", CRI_NAMESPACE, "images", "import", tarball], timeout=120)
        self.timings["images_imported"] = time.monotonic() - t

    def restart_containerd(self, timeout: float = 60.0) -> None:
        """Stop and start containerd alone, as an upgrade would: shims (and so pods) keep running,
        kubelet reconnects to the CRI socket by itself."""
        self.containerd.stop()
        self.containerd.start()
        cri_client = Cri(self.socket)
        try:
            self.containerd.wait_ready(lambda: bool(cri_client.version()), timeout, "answering CRI")
        finally:
            cri_client.close()

    def _start_kubelet(self, timeout: float) -> None:
        for sub in ("pki", "volume-plugins"):
            (self.kubelet_dir / sub).mkdir(parents=True, exist_ok=True)
        make_cgroup_root(self.cgroup_root)
        self._host.acquire()
        self.kubelet = self._kubelet_daemon(self._kubelet_argv())
        self._save_state()
        t = time.monotonic()
        self.kubelet.start()
        from kubernetes import client as k8s

        with self._control_plane().api_client() as api:
            core = k8s.CoreV1Api(api)
            self.kubelet.wait_ready(lambda: self._node_ready(core), timeout, "Ready (Node condition)")
            self.timings["node_ready"] = time.monotonic() - t
            admin_labels = {key: v for key, v in self.labels.items() if not kubelet_may_self_label(key)}
            if admin_labels:
                core.patch_node(self.name, {"metadata": {"labels": admin_labels}})

    def _kubelet_daemon(self, argv: list[str]) -> Daemon:
        log, pid = self.run_dir / "log" / "kubelet.log", self.run_dir / "run" / "kubelet.pid"
        return Daemon(f"kubelet[{self.name}]", argv, log, pid, netns=self.netns)

    def _save_state(self) -> None:
        """What ``attach()`` needs to tear this node down from another process (``netctl lab down``)."""
        state = {
            "name": self.name, "netns": self.netns, "mgmt_ip": self.mgmt_ip, "prefix": self.prefix,
            "cni_bin_dir": str(self.cni_bin_dir), "cni_conf_dir": str(self.cni_conf_dir),
            "shim_dir_existed": self._shim_sockets_dir_existed,
            "host_holder": self._host.holder, "kubelet_argv": self.kubelet.argv if self.kubelet else None,
        }  # fmt: skip
        (self.run_dir / "node.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def attach(
        cls, name: str, netns: str, run_dir: Path | str, prefix: str = "netctl",
        control_plane: ControlPlane | None = None,
    ) -> NodeRuntime:  # fmt: skip
        """A handle on a node started by another (maybe dead) process, good for ``stop()``."""
        state = json.loads((Path(run_dir) / "node.json").read_text())
        rt = cls(name, netns, state["mgmt_ip"], run_dir, control_plane, state["cni_bin_dir"],
                 state["cni_conf_dir"], prefix=prefix)  # fmt: skip
        rt._shim_sockets_dir_existed = state["shim_dir_existed"]
        rt._host = HostState(state["host_holder"])
        if state.get("kubelet_argv"):
            rt.kubelet = rt._kubelet_daemon(state["kubelet_argv"])
        return rt

    def _node_ready(self, core: Any) -> bool:
        node = core.read_node(self.name)
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    # ---- pods ----

    def cri(self) -> Cri:
        """A CRI client on this node's containerd (close it when done)."""
        return Cri(self.socket)

    def pod_sandbox(self, namespace: str, name: str) -> Any:
        """The ready CRI sandbox of a pod on this node."""
        c = self.cri()
        try:
            items = c.sandboxes({"io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.name": name})
        finally:
            c.close()
        ready = [s for s in items if s.state == cri.SANDBOX_READY]
        if not ready:
            raise LookupError(f"no ready sandbox for pod {namespace}/{name} on node {self.name}")
        return max(ready, key=lambda s: s.created_at)

    def pod_netns(self, namespace: str, name: str) -> str:
        """Path of the pod's network namespace (bind mount under containerd's state dir)."""
        sb = self.pod_sandbox(namespace, name)
        c = self.cri()
        try:
            info = c.sandbox_info(sb.id)
        finally:
            c.close()
        for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return str(ns["path"])
        raise LookupError(f"pod {namespace}/{name}: sandbox {sb.id[:12]} has no network namespace path")

    # ---- teardown ----

    def _shims(self) -> list[tuple[int, list[str]]]:
        """containerd-shim processes of *this* containerd (matched by their -address argument)."""
        mine = []
        for pid, argv in iter_processes():
            if "containerd-shim" in os.path.basename(argv[0]) and "-address" in argv:
                i = argv.index("-address")
                if i + 1 < len(argv) and argv[i + 1] == str(self.socket):
                    mine.append((pid, argv))
        return mine


    def leftovers(self) -> dict[str, list[str]]:
        """Anything of this node still on the host (empty lists when fully torn down)."""
        return {
            "processes": [
                f"{pid} {' '.join(argv[:3])}"
                for pid, argv in iter_processes()
                if any(str(self.run_dir) in a or a == str(self.socket) for a in argv)
            ],
            "mounts": mounts_under(self.run_dir),
            "cgroups": [str(p) for p in cgroup_leftovers(self.cgroup_root)],
            "dirs": [str(self.run_dir)] if self.run_dir.exists() else [],
        }

    def stop(self) -> None:
        """Remove pods, stop kubelet and containerd and their shims, undo host changes, delete the Node.

        Every step is attempted whatever failed before it. Pods whose sandbox cannot be removed
        through the CRI (a CNI DEL that fails) are still cleaned up: their processes are killed
        through the node's cgroups and their netns mounts unmounted; that is logged, and only
        what really stays behind is raised.
        """
        errors: list[str] = []
        if self.kubelet is not None:
            self.kubelet.stop()
        pods: list[Any] = []
        if self.containerd.running():
            c = self.cri()
            try:
                pods, sandbox_errors = c.remove_all()
                for err in sandbox_errors:
                    log.warning("node %s: could not remove %s; cleaning up by force", self.name, err)
            except grpc.RpcError as e:
                log.warning("node %s: listing sandboxes failed: %s", self.name, _rpc_details(e))
            finally:
                c.close()
        self.containerd.stop(timeout=15)
        for pid, argv in self._shims():
            kill_pid(pid, timeout=5)
            sock = shim_socket_path(argv)
            if sock is not None:
                sock.unlink(missing_ok=True)
        kill_cgroup_tasks(self.cgroup_root)  # containers of sandboxes the CRI could not remove
        self._remove_pod_logs([sb.metadata for sb in pods])
        self._remove_cni_results([sb.id for sb in pods])
        try:
            unmount_under(self.run_dir)
        except DaemonError as e:
            errors.append(str(e))
        try:
            remove_cgroup_root(self.cgroup_root)
        except DaemonError as e:
            errors.append(str(e))
        if self.kubelet is not None:
            self._host.release()
            self.kubelet = None
        if not self._shim_sockets_dir_existed:
            with contextlib.suppress(OSError):
                SHIM_SOCKET_DIR.rmdir()
                SHIM_SOCKET_DIR.parent.rmdir()
        self._delete_node()
        if not mounts_under(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise DaemonError(f"node {self.name} teardown incomplete: {'; '.join(errors)}")

    def _remove_pod_logs(self, pods: list[Any]) -> None:
        """kubelet writes pod logs to /var/log/pods whatever its root dir; remove this node's.

        Pods are known from the CRI and from kubelet's own ``<root>/pods/<uid>`` directories.
        """
        uids = {m.uid for m in pods}
        with contextlib.suppress(OSError):
            uids |= set(os.listdir(self.kubelet_dir / "pods"))
        base = Path("/var/log/pods")
        dirs = [d for d in base.iterdir() if d.name.rsplit("_", 1)[-1] in uids] if base.is_dir() else []
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        links = Path("/var/log/containers")
        if links.is_dir():
            for link in links.iterdir():
                target = os.readlink(link) if link.is_symlink() else ""
                if any(target.startswith(str(d) + "/") for d in dirs):
                    link.unlink(missing_ok=True)

    def _remove_cni_results(self, sandbox_ids: list[str]) -> None:
        """libcni caches each ADD result in /var/lib/cni/results/<net>-<sandbox id>-<if> until a
        DEL succeeds; after a forced cleanup those files would stay forever."""
        if not sandbox_ids or not CNI_RESULT_CACHE.is_dir():
            return
        for f in CNI_RESULT_CACHE.iterdir():
            if any(f"-{sid}-" in f.name for sid in sandbox_ids):
                f.unlink(missing_ok=True)

    def _delete_node(self) -> None:
        if self.cp is None or not self.cp.running():
            return
        from kubernetes import client as k8s

        with contextlib.suppress(Exception), self.cp.api_client() as api:
            k8s.CoreV1Api(api).delete_node(self.name, _request_timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        """Recent kubelet and containerd log lines (for test failure messages)."""
        logs = [self.containerd.log_path] + ([self.kubelet.log_path] if self.kubelet else [])
        return "\n".join(f"== {p}\n{tail(p, lines)}" for p in logs)

    def __enter__(self) -> NodeRuntime:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
