"""The one place that builds Kubernetes API clients, plus a raw JSON request helper.

Everything in netctl handles objects as plain dicts (camelCase keys, exactly what the API
returns), so requests go through ``request``/``request_json`` rather than the generated typed
methods: no model round-trips (which are slow, drop unknown fields of custom resources and
re-format timestamps), and custom resources work like built-in ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

log = logging.getLogger(__name__)

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

Query = Mapping[str, str | int | bool | None]
Timeout = float | tuple[float, float] | None


def new_api_client(
    kubeconfig: str | None = None,
    *,
    context: str | None = None,
    pool_maxsize: int | None = None,
) -> k8s.ApiClient:
    """Build an ApiClient from ``kubeconfig``, else in-cluster config, else $KUBECONFIG / ~/.kube/config.

    In-cluster is tried only when no path is given, so a program run by hand on a node with a
    service-account mount still honours an explicit ``--kubeconfig``. ``pool_maxsize`` should be at
    least the number of threads sharing the client (informers hold one connection each for watches).
    """
    configuration = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        source = kubeconfig
    elif os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(IN_CLUSTER_TOKEN):
        k8s_config.load_incluster_config(client_configuration=configuration)
        source = "in-cluster"
    else:
        env = os.environ.get("KUBECONFIG", "")
        path = env.split(os.pathsep)[0] if env else os.path.expanduser("~/.kube/config")
        k8s_config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
        source = path
    if pool_maxsize is not None:
        configuration.connection_pool_maxsize = pool_maxsize
    log.info("kubernetes API %s (config from %s)", configuration.host, source)
    return k8s.ApiClient(configuration)


def api_path(group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    """REST path of a collection or object: core group is ``/api/v1``, others ``/apis/<group>/<version>``."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    return base


def request(
    api: k8s.ApiClient,
    method: str,
    path: str,
    *,
    query: Query | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: Timeout = None,
) -> urllib3.BaseHTTPResponse:
    """Send one request and return the unread urllib3 response (callers may stream it).

    Raises ``kubernetes.client.ApiException`` (status set) for any non-2xx answer, so callers can
    branch on ``exc.status`` the same way for every resource.
    """
    params = [(k, _query_value(v)) for k, v in (query or {}).items() if v is not None]
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    serialized = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=params,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(*serialized, _request_timeout=timeout)
    if not 200 <= resp.status <= 299:
        raw = resp.read()
        text = raw.decode("utf-8", errors="replace") if raw else None
        resp.response.release_conn()
        raise k8s.ApiException(status=resp.status, reason=resp.reason, body=text)
    raw_resp: urllib3.BaseHTTPResponse = resp.response
    return raw_resp


def request_json(
    api: k8s.ApiClient,
    method: str,
    path: str,
    *,
    query: Query | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: Timeout = None,
) -> dict[str, Any]:
    """Like ``request`` but read the whole answer and decode it as a JSON object."""
    resp = request(api, method, path, query=query, body=body, content_type=content_type, timeout=timeout)
    try:
        data = resp.data
    finally:
        resp.release_conn()
    decoded = json.loads(data) if data else {}
    if not isinstance(decoded, dict):
        raise ValueError(f"{method} {path}: expected a JSON object, got {type(decoded).__name__}")
    return decoded


def _query_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
