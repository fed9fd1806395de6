"""The netctl-cni node agent: one per node, does the work the thin `netctl-cni` executable hands it.

Run it as root on the node (in the node's network namespace)::

    python -m cni.agent --config /etc/netctl/cni-agent.json

(the `netctl-cni-agent` console script is not declared: adding one needs a reinstall of the
package), with a JSON config::

    {"socket": "/run/netctl/cni-agent.sock",        # unix socket, created 0600 (root only)
     "nodeName": "node-1",                          # this node's Kubernetes name
     "kubeconfig": "/etc/netctl/cni.kubeconfig",    # read-only identity (deploy/rbac/cni.yaml)
     "ovsdb": "unix:/run/openvswitch/db.sock",      # optional, warmed at start
     "ovsNetns": "/proc/1/ns/net"}                  # optional, warmed at start

and put `"agentSocket": "<socket>"` into the node's CNI config. The executable then forwards
ADD/DEL/CHECK/STATUS/GC (its CNI_* environment and stdin) to the agent and prints the answer
(cni/agent_protocol.py); the agent runs the very same verbs (cni/plugin.py) with:

- warm handles: one ovsdbapp connection per OVSDB remote and one netlink/ethtool handle for the
  OVS netns, kept open and reused by every request (re-opened when OVSDB drops the session or
  the netns is replaced); all plumbing runs on one worker thread (pyroute2 sockets are per
  thread), so it is serialised while API waits of many ADDs overlap;
- a watch on the pods bound to this node (`fieldSelector=spec.nodeName=<node>`): ADD waits on
  the watch cache's condition variable, not by polling, and returns as soon as the pod's
  `netctl.io/port` annotation arrives; timeouts are code 11 as in the executable;
- the same checks as the executable, against the API: the pod is the runtime's (K8S_POD_UID),
  bound to this node, namespace tenant == node tenant, annotation tenant == namespace tenant.
  The pod comes from the watch cache when the cache has the runtime's uid, else from a GET;
  node and namespace (their tenant labels) come from watches of this node and of the namespaces
  while those watches are healthy, else from GETs, so a relabelled namespace or node is honoured
  as soon as the API server reports it, without two GETs on every ADD. The node name and the
  credentials are the agent's own, never the caller's (a config naming another node is refused,
  code 7).

Only root (or the agent's own uid) may talk to it: the socket is 0600 and every peer's uid is
checked with SO_PEERCRED. Restarting the agent affects no running pod: it holds no state that
the OVS database, the kernel and the API server do not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cni import agent_protocol as proto
from cni import kubeapi, plugin
from cni import ovs_binding as ob
from cni.netconf import DEFAULT_OVSDB, INIT_NETNS, NetConf
from cni.spec import CniError, Code

_log = logging.getLogger("netctl.cni.agent")

REQUEST_READ_TIMEOUT_S = 5.0
WATCH_TIMEOUT_S = 240
RETRY_MAX_S = 5.0
SWITCH_INTERVAL_S = 0.0005
T = TypeVar("T")


class AgentConfigError(Exception):
    """The agent's config file is unusable; the message names the key."""


@dataclass(frozen=True)
class AgentConfig:
    socket: str
    node_name: str
    kubeconfig: str
    ovsdb: str = DEFAULT_OVSDB
    ovs_netns: str = INIT_NETNS

    @classmethod
    def load(cls, path: str) -> AgentConfig:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise AgentConfigError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise AgentConfigError(f"{path} is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise AgentConfigError(f"{path} must hold a JSON object")

        def req(key: str) -> str:
            value = doc.get(key)
            if not isinstance(value, str) or not value:
                raise AgentConfigError(f"{path}: {key} must be a non-empty string")
            return value

        sock = req("socket")
        if not sock.startswith("/") or len(sock.encode()) > 107:
            raise AgentConfigError(f"{path}: socket must be an absolute path of at most 107 bytes")
        return cls(socket=sock, node_name=req("nodeName"), kubeconfig=req("kubeconfig"),
                   ovsdb=str(doc.get("ovsdb") or DEFAULT_OVSDB), ovs_netns=str(doc.get("ovsNetns") or INIT_NETNS))


# ---- the watches --------------------------------------------------------------------------------


class WatchCache:
    """The objects of one collection (narrowed by `params`, e.g. a field selector), kept current by
    list + watch on a client of its own; waiters block on `cond`. Keys are (namespace, name), with
    namespace "" for cluster-scoped objects."""

    def __init__(self, client: kubeapi.KubeClient, path: str, params: dict[str, str], what: str) -> None:
        self.client = client
        self.path = path
        self.params = params
        self.what = what
        self.cond = threading.Condition()
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}  # the objects (pods for the pod watch)
        self.synced = False
        self.last_error = ""
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def get(self, ns: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            return self.pods.get((ns, name))

    def current(self, ns: str, name: str) -> dict[str, Any] | None:
        """The object if the watch is healthy and holds it; None: ask the API server."""
        with self.cond:
            if not self.synced or self.last_error:
                return None
            return self.pods.get((ns, name))

    @staticmethod
    def _key(obj: Any) -> tuple[str, str] | None:
        meta = plugin.meta_of(obj) if isinstance(obj, dict) else {}
        ns, name = meta.get("namespace", ""), meta.get("name")
        return (ns, name) if isinstance(ns, str) and isinstance(name, str) else None

    def _run(self) -> None:
        path, selector = self.path, self.params
        backoff = 0.2
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    listed = self.client.get(path, params=selector)
                    items = listed.get("items")
                    items = items if isinstance(items, list) else []
                    fresh = {k: p for p in items if (k := self._key(p)) is not None}
                    rv = str(plugin.meta_of(listed).get("resourceVersion") or "")
                    with self.cond:
                        self.pods = fresh
                        self.synced = True
                        self.last_error = ""
                        self.cond.notify_all()
                    _log.info("listed %d of the %s at resourceVersion %s", len(fresh), self.what, rv)
                for event in self.client.watch(path, {**selector, "resourceVersion": rv}, WATCH_TIMEOUT_S):
                    obj = event.get("object")
                    new_rv = plugin.meta_of(obj).get("resourceVersion") if isinstance(obj, dict) else None
                    if isinstance(new_rv, str) and new_rv:
                        rv = new_rv
                    key = self._key(obj)
                    if key is None or event.get("type") == "BOOKMARK":
                        continue
                    with self.cond:
                        if event.get("type") == "DELETED":
                            self.pods.pop(key, None)
                        else:
                            assert isinstance(obj, dict)
                            self.pods[key] = obj
                        self.events += 1
                        self.cond.notify_all()
                    if self._stop.is_set():
                        return
                backoff = 0.2
            except kubeapi.Gone as e:
                _log.info("watch of the %s: %s; listing again", self.what, e)
                rv = ""
            except kubeapi.KubeError as e:
                with self.cond:
                    self.last_error = str(e)
                _log.warning("watch of the %s: %s; retrying in %.1fs", self.what, e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                rv = ""  # relist: events may have been missed
            except Exception:
                with self.cond:
                    self.last_error = "the watch failed (see the agent's log)"
                _log.exception("watch of the %s failed; retrying in %.1fs", self.what, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                rv = ""


# ---- the verbs' resources -----------------------------------------------------------------------


class AgentResources(plugin.Resources):
    """Warm OVSDB/netlink handles and the pod watch, shared by all requests (thread-safe)."""

    in_agent = True

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.access = kubeapi.load_kubeconfig(cfg.kubeconfig)
        node = cfg.node_name
        self.pods = WatchCache(kubeapi.KubeClient(self.access), "/api/v1/pods",
                               {"fieldSelector": f"spec.nodeName={node}"}, f"pods of node {node}")
        self.nodes = WatchCache(kubeapi.KubeClient(self.access), "/api/v1/nodes",
                                {"fieldSelector": f"metadata.name={node}"}, f"node {node}")
        self.namespaces = WatchCache(kubeapi.KubeClient(self.access), "/api/v1/namespaces", {}, "namespaces")
        self._watches = (self.pods, self.nodes, self.namespaces)
        self._clients: queue.LifoQueue[kubeapi.KubeClient] = queue.LifoQueue()
        # Every OVSDB/netlink call runs on this one thread: the warm handles are created and used
        # there only (pyroute2's sockets are per thread), and plumbing is serialised for free.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plumbing")
        self._ovs: dict[str, ob.OvsDb] = {}
        self._hosts: dict[str, ob.Netns] = {}

    def start(self) -> None:
        for watch in self._watches:
            watch.start()
        self._worker.submit(self._warm_up).result()

    def _warm_up(self) -> None:
        try:
            self._ovsdb(self.cfg.ovsdb)
        except ob.BindingError as e:
            _log.warning("OVSDB not reachable yet (%s); connecting on first use", e)
        self._host(self.cfg.ovs_netns)

    def _close_handles(self) -> None:
        for db in self._ovs.values():
            db.close()
        for ns in self._hosts.values():
            ns.close()
        self._ovs.clear()
        self._hosts.clear()

    def close(self) -> None:
        for watch in self._watches:
            watch.stop()
        self._worker.submit(self._close_handles).result()
        self._worker.shutdown()
        while not self._clients.empty():
            self._clients.get_nowait().close()

    # -- warm handles --

    def _ovsdb(self, remote: str) -> ob.OvsDb:
        db = self._ovs.get(remote)
        if db is not None and db.connected():
            return db
        if db is not None:
            _log.info("OVSDB %s session lost; reconnecting", remote)
            db.close()
            del self._ovs[remote]
        db = ob.OvsDb.connect(remote)
        self._ovs[remote] = db
        return db

    def _host(self, path: str) -> ob.Netns | None:
        """The open handle for `path`, re-opened if the netns there was replaced; None if absent."""
        ns = self._hosts.get(path)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if ns is not None:
            held = os.fstat(ns.fd)
            if st is not None and (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                return ns
            ns.close()
            del self._hosts[path]
        if st is None:
            return None
        try:
            ns = ob.Netns(path, echo=True)  # plug_port reads the new host end from the echo
        except OSError:
            return None  # the binding opens it itself and reports the error
        self._hosts[path] = ns
        return ns

    def plumb(self, conf: NetConf, fn: Callable[[ob.OvsDb | None, ob.Netns | None], T]) -> T:
        return self._worker.submit(lambda: fn(self._ovsdb(conf.ovsdb), self._host(conf.ovs_netns))).result()

    def netlink(self, fn: Callable[[], T]) -> T:
        return self._worker.submit(fn).result()

    @contextlib.contextmanager
    def _client(self) -> Iterator[kubeapi.KubeClient]:
        try:
            client = self._clients.get_nowait()
        except queue.Empty:
            client = kubeapi.KubeClient(self.access)
        try:
            yield client
        finally:
            self._clients.put(client)

    # -- the verbs' hooks --

    def adopt(self, conf: NetConf) -> NetConf:
        asked = conf.raw.get("nodeName")
        if asked and asked != self.cfg.node_name:
            raise CniError(Code.INVALID_NETCONF,
                           f"invalid network config: nodeName {asked!r} but the agent at {self.cfg.socket} "
                           f"serves node {self.cfg.node_name!r}")
        return dataclasses.replace(conf, node_name=self.cfg.node_name, kubeconfig=self.cfg.kubeconfig)

    def not_ready(self, conf: NetConf) -> str | None:
        with self.pods.cond:
            if not self.pods.synced:
                return (f"the agent has not listed the pods of node {self.cfg.node_name} yet"
                        + (f": {self.pods.last_error}" if self.pods.last_error else ""))
        return None

    def resolve(self, conf: NetConf, ns: str, name: str, uid: str | None, deadline: float,
                log: plugin.Log) -> tuple[Any, str, Any]:
        from cni import public_nic
        from netctl.annotations import PORT_ANNOTATION

        pod_ref = f"pod {ns}/{name}"
        cached = self.pods.get(ns, name)
        if cached is not None and uid and plugin.meta_of(cached).get("uid") != uid:
            cached = None  # the cache may lag a re-created pod: ask the API
        node = self.nodes.current("", conf.node_name)
        namespace = self.namespaces.current("", ns)
        with self._client() as client:
            pod, tenant = plugin.checked_pod(client, conf, ns, name, uid, deadline, cached, node, namespace)
        want_uid = plugin.meta_of(pod).get("uid")
        seen = cached is not None
        waited = time.monotonic()
        with self.pods.cond:
            while (missing := public_nic.awaited(pod, pod_ref)) is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise plugin.no_annotation(pod_ref, conf, tenant, missing)
                self.pods.cond.wait(remaining)
                fresh = self.pods.pods.get((ns, name))
                if fresh is None:
                    if seen:
                        raise CniError(Code.POD_IDENTITY, f"{pod_ref} was deleted while waiting for its "
                                       f"{PORT_ANNOTATION} annotation")
                    continue  # the watch has not delivered it yet
                if plugin.meta_of(fresh).get("uid") != want_uid:
                    if seen:
                        plugin.check_pod(fresh, ns, name, str(want_uid or ""), conf.node_name)  # re-created: 104
                    continue  # an older incarnation the watch still holds
                seen = True
                plugin.check_pod(fresh, ns, name, uid, conf.node_name)
                pod = fresh
        if time.monotonic() - waited > 0.001:
            log.info(f"the {PORT_ANNOTATION} annotation arrived by the pod watch after "
                     f"{time.monotonic() - waited:.3f}s")
        pod_uid = str(want_uid or "")
        return plugin.port_of(pod, ns, name, tenant), pod_uid, public_nic.public_port_of(pod, pod_ref, pod_uid)


# ---- the socket server --------------------------------------------------------------------------


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.resources = AgentResources(cfg)
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._inflight = 0
        self._idle = threading.Condition()

    def bind(self) -> None:
        """Create the socket 0600 (umask while binding, chmod to be sure); refuse to steal a live one."""
        path = self.cfg.socket
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise SystemExit(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: left by an agent that died
            else:
                raise SystemExit(f"another agent is serving {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._listener = sock

    def serve(self) -> None:
        assert self._listener is not None
        self._listener.listen(256)
        _log.info("serving %s for node %s (pid %d)", self.cfg.socket, self.cfg.node_name, os.getpid())
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            with self._idle:
                self._inflight += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def interrupt(self) -> None:
        """Make serve() return (safe from a signal handler)."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to `grace`), remove the socket."""
        self.interrupt()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.socket)
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, grace)
        self.resources.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                uid = proto.peer_uid(conn)
                if uid not in (0, os.geteuid()):
                    _log.warning("refused a connection from uid %d", uid)
                    return
                try:
                    data = proto.read_to_eof(conn, time.monotonic() + REQUEST_READ_TIMEOUT_S)
                    if not data:
                        return  # a liveness probe
                    env, stdin = proto.decode_request(data)
                except (OSError, TimeoutError, proto.ProtocolError) as e:
                    _log.warning("dropped a request: %s", e or type(e).__name__)
                    return
                out = io.StringIO()
                rc = plugin.run(env, stdin, out, self.resources)
                conn.settimeout(REQUEST_READ_TIMEOUT_S)
                conn.sendall(proto.encode_response(rc, out.getvalue()))
        except OSError as e:
            _log.warning("could not answer a request: %s", e)
        except Exception:
            _log.exception("request handler failed")
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cni.agent", description="netctl-cni node agent")
    ap.add_argument("--config", required=True, help="the agent's JSON config (see the module docstring)")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A request hops between threads (handler -> plumbing worker; ovsdbapp's connection thread and
    # the commit beside the netlink work): with the default 5 ms GIL switch interval a thread woken
    # by a reply waits for a busy one to yield, which cost ~15 ms per ADD here. Latency wins.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    for noisy in ("ovsdbapp", "ovs", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = AgentConfig.load(args.config)
        agent = Agent(cfg)
    except (AgentConfigError, kubeapi.KubeError) as e:
        print(f"netctl-cni agent: {e}", file=sys.stderr)
        return 2
    agent.bind()
    agent.resources.start()

    def on_signal(signum: int, _frame: Any) -> None:
        _log.info("signal %d: stopping", signum)
        agent.interrupt()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.serve()
    finally:
        agent.stop()
    _log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
