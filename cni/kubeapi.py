"""A minimal, GET-only Kubernetes API client on the standard library (GET, list and watch).

The CNI executable starts once per pod and the `kubernetes` package alone takes longer to import
than a whole ADD may take (DESIGN §5), so this reads the kubeconfig itself (PyYAML) and speaks
HTTPS with http.client/ssl over one keep-alive connection. It only ever GETs: the CNI's RBAC is
read-only (deploy/rbac/cni.yaml).

Errors are typed so the caller can map them to CNI codes: `ApiUnreachable` (connection failed,
timeout, 429/5xx: try again later), `NotFound` (404), `ApiError` (refused or unexpected, e.g.
401/403, bad TLS), `KubeconfigError` (the file is unusable), `Gone` (410: a watch's
resourceVersion is too old; list again).

The node agent also uses `watch()`: a streaming GET with `watch=1` on a connection of its own,
yielding one decoded event per line until the server ends the stream.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import json
import os
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 5.0


class KubeError(Exception):
    """Base of every error this module raises; the message is meant for a human."""


class KubeconfigError(KubeError):
    """The kubeconfig is missing, malformed or uses an auth method we do not support."""


class ApiUnreachable(KubeError):
    """Transient: the API server could not be reached or asked us to come back later."""


class NotFound(KubeError):
    """404: the object does not exist."""


class Gone(KubeError):
    """410: the resourceVersion a watch started from is too old; list again."""


class ApiError(KubeError):
    """The API server refused the request (401/403) or answered something unexpected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClusterAccess:
    """Everything needed to reach and authenticate to one API server (from a kubeconfig)."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    insecure: bool = False
    tls_server_name: str | None = None
    token: str | None = None
    client_cert_file: str | None = None
    client_cert_data: bytes | None = None  # PEM
    client_key_file: str | None = None
    client_key_data: bytes | None = None  # PEM

    def __repr__(self) -> str:  # never let a token or key reach a log through repr()
        return f"ClusterAccess(server={self.server!r})"


def _named(items: Any, name: str, kind: str, path: str) -> dict[str, Any]:
    if not isinstance(items, list):
        raise KubeconfigError(f"kubeconfig {path}: {kind}s must be a list")
    for item in items:
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(kind)
            if not isinstance(body, dict):
                raise KubeconfigError(f"kubeconfig {path}: {kind} {name!r} has no {kind} section")
            return body
    raise KubeconfigError(f"kubeconfig {path}: no {kind} named {name!r}")


def _decode_b64(value: Any, what: str, path: str) -> bytes:
    if not isinstance(value, str):
        raise KubeconfigError(f"kubeconfig {path}: {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KubeconfigError(f"kubeconfig {path}: {what} is not valid base64: {e}") from None


def _file(value: Any, what: str, base: Path, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise KubeconfigError(f"kubeconfig {path}: {what} must be a file path")
    return str(base / value)  # relative paths are relative to the kubeconfig's directory


def load_kubeconfig(path: str) -> ClusterAccess:
    """Parse the current context of a kubeconfig file (clusters, users, contexts)."""
    import yaml  # only ADD needs it

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KubeconfigError(f"kubeconfig {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a mapping")
    contexts = doc.get("contexts") or []
    current = doc.get("current-context")
    if not current and isinstance(contexts, list) and len(contexts) == 1 and isinstance(contexts[0], dict):
        current = contexts[0].get("name")
    if not isinstance(current, str) or not current:
        raise KubeconfigError(f"kubeconfig {path} has no current-context")
    ctx = _named(contexts, current, "context", path)
    cluster = _named(doc.get("clusters"), str(ctx.get("cluster")), "cluster", path)
    user = _named(doc.get("users"), str(ctx.get("user")), "user", path) if ctx.get("user") else {}
    base = Path(path).resolve().parent

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubeconfigError(f"kubeconfig {path}: cluster server must be an http(s) URL, got {server!r}")
    for unsupported in ("exec", "auth-provider", "username"):
        if unsupported in user:
            raise KubeconfigError(
                f"kubeconfig {path}: user auth via {unsupported!r} is not supported by netctl-cni; "
                "use a token, tokenFile or client certificate"
            )
    token = user.get("token")
    if token is None and user.get("tokenFile") is not None:
        token_file = _file(user.get("tokenFile"), "tokenFile", base, path)
        try:
            token = Path(str(token_file)).read_text().strip()
        except OSError as e:
            raise KubeconfigError(f"kubeconfig {path}: cannot read tokenFile: {e.strerror or e}") from None
    if token is not None and not isinstance(token, str):
        raise KubeconfigError(f"kubeconfig {path}: token must be a string")
    ca_data = cluster.get("certificate-authority-data")
    cert_data, key_data = user.get("client-certificate-data"), user.get("client-key-data")
    access = ClusterAccess(
        server=server.rstrip("/"),
        ca_file=_file(cluster.get("certificate-authority"), "certificate-authority", base, path),
        ca_data=_decode_b64(ca_data, "certificate-authority-data", path).decode("ascii", "replace")
        if ca_data is not None else None,
        insecure=cluster.get("insecure-skip-tls-verify") is True,
        tls_server_name=cluster.get("tls-server-name") or None,
        token=token or None,
        client_cert_file=_file(user.get("client-certificate"), "client-certificate", base, path),
        client_cert_data=_decode_b64(cert_data, "client-certificate-data", path) if cert_data is not None else None,
        client_key_file=_file(user.get("client-key"), "client-key", base, path),
        client_key_data=_decode_b64(key_data, "client-key-data", path) if key_data is not None else None,
    )
    has_cert = access.client_cert_file or access.client_cert_data
    has_key = access.client_key_file or access.client_key_data
    if bool(has_cert) != bool(has_key):
        raise KubeconfigError(f"kubeconfig {path}: a client certificate needs its key and vice versa")
    return access


def _pem_path(data: bytes, name: str) -> tuple[int, str]:
    """An anonymous in-memory file holding `data` (ssl only loads cert chains from paths)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


def ssl_context(access: ClusterAccess) -> ssl.SSLContext:
    """TLS context: verify against the kubeconfig's CA (or the system's), present the client cert."""
    try:
        ctx = ssl.create_default_context(cafile=access.ca_file, cadata=access.ca_data)
        if access.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if access.client_cert_file or access.client_cert_data:
            fds = []
            try:
                cert = access.client_cert_file
                key = access.client_key_file
                if access.client_cert_data is not None:
                    fd, cert = _pem_path(access.client_cert_data, "kube-cert")
                    fds.append(fd)
                if access.client_key_data is not None:
                    fd, key = _pem_path(access.client_key_data, "kube-key")
                    fds.append(fd)
                ctx.load_cert_chain(str(cert), str(key))
            finally:
                for fd in fds:
                    os.close(fd)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise KubeconfigError(f"cannot set up TLS for {access.server}: {e}") from None
    return ctx


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPSConnection that can verify against a different name (kubeconfig tls-server-name)."""

    def __init__(self, host: str, port: int | None, *, timeout: float, context: ssl.SSLContext,
                 server_name: str | None) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name or host
        self._ssl_ctx = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._ssl_ctx.wrap_socket(self.sock, server_hostname=self._server_name)


class KubeClient:
    """GET-only client over one keep-alive connection; reconnects after any failure."""

    def __init__(self, access: ClusterAccess, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.access = access
        self.timeout = timeout
        url = urllib.parse.urlsplit(access.server)
        self._tls = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        self._ctx = ssl_context(access) if self._tls else None
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def from_kubeconfig(cls, path: str, timeout: float = DEFAULT_TIMEOUT_S) -> KubeClient:
        return cls(load_kubeconfig(path), timeout)

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._ctx is not None:
            return _HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ctx,
                                    server_name=self.access.tls_server_name)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "netctl-cni"}
        if self.access.token:
            headers["Authorization"] = f"Bearer {self.access.token}"
        return headers

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = self._new_connection(timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, timeout: float | None = None, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET `path` (e.g. /api/v1/nodes/n1) and return the decoded JSON object."""
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        where = f"{self.access.server}{path}"
        conn = self._connection(self.timeout if timeout is None else max(0.1, timeout))
        try:
            conn.request("GET", self._prefix + path, headers=self._headers())
            resp = conn.getresponse()
            body = resp.read()
        except ssl.SSLCertVerificationError as e:
            self.close()
            raise ApiError(0, f"TLS verification of {self.access.server} failed: {e.verify_message}") from None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise ApiUnreachable(f"API server {self.access.server} unreachable: {e or type(e).__name__}") from None
        if resp.status == 200:
            try:
                data = json.loads(body)
            except ValueError:
                raise ApiError(200, f"GET {where}: response is not JSON") from None
            if not isinstance(data, dict):
                raise ApiError(200, f"GET {where}: response is not a JSON object")
            return data
        raise _status_error(where, resp.status, _status_message(body) or resp.reason)

    def watch(self, path: str, params: Mapping[str, str], timeout_s: int = 300) -> Iterator[dict[str, Any]]:
        """Watch events ({"type", "object"}) of the collection at `path` from `params["resourceVersion"]`.

        Runs on a connection of its own (GETs on this client go on meanwhile) that the server
        ends after `timeout_s`; the generator then returns and the caller watches again from the
        last resourceVersion it saw. A too-old resourceVersion raises Gone (HTTP 410 or an ERROR
        event with code 410); a silent connection raises ApiUnreachable after `timeout_s` + 30 s.
        """
        query = {**params, "watch": "1", "timeoutSeconds": str(timeout_s), "allowWatchBookmarks": "true"}
        full = f"{path}?{urllib.parse.urlencode(query)}"
        where = f"{self.access.server}{full}"
        conn = self._new_connection(float(timeout_s + 30))
        try:
            try:
                conn.request("GET", self._prefix + full, headers=self._headers())
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as e:
                raise ApiError(0, f"TLS verification of {self.access.server} failed: {e.verify_message}") from None
            except (OSError, http.client.HTTPException) as e:
                raise ApiUnreachable(f"watch {where}: {e or type(e).__name__}") from None
            if resp.status != 200:
                raise _status_error(where, resp.status, _status_message(resp.read()) or resp.reason)
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise ApiUnreachable(f"watch {where} broke: {e or type(e).__name__}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise ApiError(200, f"watch {where}: an event is not JSON") from None
                if not isinstance(event, dict):
                    raise ApiError(200, f"watch {where}: an event is not a JSON object")
                obj = event.get("object")
                if event.get("type") == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    msg = obj.get("message") if isinstance(obj, dict) else None
                    if code == 410:
                        raise Gone(f"watch {where}: {msg or 'resourceVersion too old'}")
                    raise ApiError(int(code) if isinstance(code, int) else 0, f"watch {where}: {msg or event}")
                yield event
        finally:
            conn.close()

    def get_pod(self, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self.get(f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}", timeout)

    def get_node(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self.get(f"/api/v1/nodes/{_q(name)}", timeout)

    def get_namespace(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self.get(f"/api/v1/namespaces/{_q(name)}", timeout)


def _status_error(where: str, status: int, reason: str) -> KubeError:
    if status == 404:
        return NotFound(f"GET {where}: not found ({reason})")
    if status == 410:
        return Gone(f"GET {where}: {reason}")
    if status == 429 or status >= 500:
        return ApiUnreachable(f"GET {where}: HTTP {status} {reason}")
    return ApiError(status, f"GET {where}: HTTP {status} {reason}")


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _status_message(body: bytes) -> str:
    """The `message` of a Kubernetes Status object, if the body is one."""
    with contextlib.suppress(ValueError, AttributeError):
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return str(data["message"])
    return ""
